"""What an artifact is: a runtime, a precision and a device, named the same way everywhere.

Hardware profiles list the runtimes and precisions a board takes, the compiler builds one
artifact per pair, reports and bundles name it ``runtime:precision`` (``tvm:fp32``), and
the agent loads it on the runtime its bundle names.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEVICES",
    "LEGACY_FP32",
    "PRECISIONS",
    "RUNTIME_NAMES",
    "Device",
    "Precision",
    "RuntimeName",
    "artifact_id",
]

RuntimeName = Literal["tvm", "onnxruntime", "litert"]
RUNTIME_NAMES: tuple[RuntimeName, ...] = get_args(RuntimeName)

Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]
"""``fp32``: the model as trained; ``fp16``: half-precision weights and arithmetic;
``int8``: static int8 calibrated on data; ``int8-dynamic``: int8 weights, activations
quantized at run time (no calibration data needed)."""
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

LEGACY_FP32 = "none"
"""What fp32 was called before it was named ``fp32`` everywhere: bundles made then say
``"precision": "none"`` (readers take it as ``fp32``), and ``edgefleet compile --quantize
none`` is kept as a deprecated alias. Nothing writes it any more."""

Device = Literal["cpu", "gpu"]
DEVICES: tuple[Device, ...] = get_args(Device)


def artifact_id(runtime: RuntimeName, precision: Precision) -> str:
    """``runtime:precision``, as reports, bundles and the CLI name an artifact."""
    return f"{runtime}:{precision}"
