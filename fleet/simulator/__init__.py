"""Simulated devices: thousands of MQTT clients in one process that speak ``contracts.mqtt``.

They run no model. Each one connects as its own MQTT 5 client (client id = device id, its
credentials, a Last Will on its ``status`` topic), answers commands with the ack sequence a
real agent sends, and reports telemetry whose error rate, latency and shadow agreement the
test sets per bundle in :class:`Behaviour`.

The pieces: :mod:`.specs` (each device's identity, and the :class:`Behaviour` of all),
:mod:`.loop` (:class:`FleetSimulator`: the connections, one selector thread for them all),
``_protocol`` (what a device does with a command and what it reports) and ``_device`` (one
device's state).
"""

from ._protocol import MAX_UNSENT_RECORDS, TelemetryLedger
from .loop import FleetSimulator
from .specs import DEFAULT_LATENCY_MS, Behaviour, SimulatedDeviceSpec

__all__ = [
    "DEFAULT_LATENCY_MS",
    "MAX_UNSENT_RECORDS",
    "Behaviour",
    "FleetSimulator",
    "SimulatedDeviceSpec",
    "TelemetryLedger",
]
