"""What edgefleet's parts promise each other: the ground floor every package stands on.

Each module is one contract, importable with pydantic and NumPy only, and importing no
other edgefleet package, so a device, the fleet, the compiler and the OTA tools read and
write the same bytes from the same definitions:

| module | contract |
| --- | --- |
| ``contracts.artifacts`` | runtime names, precisions and devices, and how artifacts are named |
| ``contracts.tensors`` | tensor specs and the one table of element types |
| ``contracts.mqtt`` | the MQTT topics and payloads between the fleet and its devices |
| ``contracts.oip`` | the Open Inference Protocol (v2) messages and their tensor codec |
| ``contracts.report`` | ``report.json``, what a compile writes and a bundle is made from |
| ``contracts.drift`` | ``drift-reference.json``, the summaries devices send, drift scores |
| ``contracts.durable`` | how a file is written so that a crash leaves it whole or absent |
| ``contracts.cli`` | what every ``edgefleet`` command shares: ``--json``, errors, exit codes |

``docs/architecture.md`` draws the floors above this one and documents each contract.
"""
