"""Tensor specs, and the one table of element types every runtime and protocol maps through.

A :class:`TensorSpec` names a model input or output with its shape and its element type,
written as NumPy writes it (``"float32"``). :data:`ELEMENT_TYPES` says, for each type, what
ONNX Runtime calls it and what the Open Inference Protocol calls it; the agent's runtimes,
the fleet's cloud endpoint and the OIP codec all read it, so they cannot disagree on which
types exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ELEMENT_TYPES",
    "ElementType",
    "TensorSpec",
    "dtype_of_oip_datatype",
    "dtype_of_onnxruntime_type",
    "oip_datatype_of",
]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. ``None`` in ``shape`` is a dimension of any size."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    """NumPy's name of the element type (``"float32"``)."""


@dataclass(frozen=True)
class ElementType:
    numpy: str
    onnxruntime: str
    """ONNX Runtime's ``NodeArg.type``."""
    oip: str
    """The Open Inference Protocol's ``datatype``."""


ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType("bool", "tensor(bool)", "BOOL"),
    ElementType("uint8", "tensor(uint8)", "UINT8"),
    ElementType("uint16", "tensor(uint16)", "UINT16"),
    ElementType("uint32", "tensor(uint32)", "UINT32"),
    ElementType("uint64", "tensor(uint64)", "UINT64"),
    ElementType("int8", "tensor(int8)", "INT8"),
    ElementType("int16", "tensor(int16)", "INT16"),
    ElementType("int32", "tensor(int32)", "INT32"),
    ElementType("int64", "tensor(int64)", "INT64"),
    ElementType("float16", "tensor(float16)", "FP16"),
    ElementType("float32", "tensor(float)", "FP32"),
    ElementType("float64", "tensor(double)", "FP64"),
)
"""Every element type edgefleet moves between runtimes and over the wire. Strings (ONNX
``tensor(string)``, OIP ``BYTES``) are not among them."""

_BY_ONNXRUNTIME = {t.onnxruntime: t for t in ELEMENT_TYPES}
_BY_OIP = {t.oip: t for t in ELEMENT_TYPES}
_BY_NUMPY = {np.dtype(t.numpy): t for t in ELEMENT_TYPES}


def dtype_of_onnxruntime_type(type_name: str) -> str | None:
    """NumPy's name for ONNX Runtime's ``tensor(...)`` type; ``None`` if not in the table."""
    found = _BY_ONNXRUNTIME.get(type_name)
    return found.numpy if found else None


def dtype_of_oip_datatype(datatype: str) -> np.dtype[Any] | None:
    """The NumPy type of an OIP ``datatype`` (``"FP32"``); ``None`` if not in the table."""
    found = _BY_OIP.get(datatype)
    return np.dtype(found.numpy) if found else None


def oip_datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The OIP ``datatype`` of a NumPy type (``"float32"`` → ``"FP32"``).

    ``ValueError`` for a type the table does not hold (strings, complex numbers).
    """
    try:
        found = _BY_NUMPY.get(np.dtype(dtype))
    except TypeError:
        found = None
    if found is None:
        raise ValueError(
            f"{dtype} has no Open Inference Protocol datatype here; "
            f"supported: {', '.join(t.oip for t in ELEMENT_TYPES)}"
        )
    return found.oip
