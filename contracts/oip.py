"""The Open Inference Protocol (v2) JSON messages, and tensors to and from NumPy.

One codec for the three places that speak the protocol: the fleet's cloud endpoint, the
agent's local API and the agent's cloud fallback client. Only the JSON tensor encoding is
supported (no ``BYTES`` tensors, no binary data extension).

Datatypes: the data of an input is read as the ``datatype`` it declares; integers must fit
it (a ``UINT8`` of 300 is refused) and ``BOOL`` takes only ``true``/``false``. When the
model takes another type, the tensor is converted only where NumPy calls the conversion
*safe* (every value is kept: ``UINT8`` pixels or ``FP16`` into an ``FP32`` model, ``INT32``
into ``INT64``); a narrowing conversion (``FP64`` into ``FP32``) would silently change
values, so it is refused, naming the type to send. Outputs are sent in the model's own
types; NaN and infinities, which JSON cannot carry, become ``null`` (as in KServe and
MLServer) and are read back as NaN.

A request that does not fit raises :class:`~contracts.errors.InferenceRequestError`, whose
message is meant for the caller who sent it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InferenceRequestError
from .tensors import ELEMENT_TYPES, TensorSpec
from .tensors import oip_datatype_of as datatype_of

__all__ = [
    "DATATYPES",
    "ErrorResponse",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "ModelReady",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "TensorMetadata",
    "datatype_of",
    "decode_inputs",
    "decode_output",
    "encode_inputs",
    "encode_output",
    "parse_request",
    "select_outputs",
    "tensor_metadata",
]

DATATYPES: dict[str, np.dtype[Any]] = {t.oip: np.dtype(t.numpy) for t in ELEMENT_TYPES}
"""The protocol's datatypes this codec reads and writes, as NumPy types."""


# --- the protocol's messages ----------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestInput(_Message):
    name: str
    shape: list[int] = Field(description="-1 is not allowed here: every dimension is known")
    datatype: str
    data: list[Any] = Field(description="row-major, flat or nested")
    parameters: dict[str, Any] | None = None

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        if any(dim < 0 for dim in value):
            raise ValueError("dimensions must be 0 or more")
        return value

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        if value == "BYTES":
            raise ValueError("BYTES tensors are not supported by this endpoint")
        if value not in DATATYPES:
            raise ValueError(f"{value!r} is not a datatype; expected one of {', '.join(DATATYPES)}")
        return value


class RequestOutput(_Message):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Message):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(
        default=None, description="the outputs to return; all of them when absent"
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 is a dimension of any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ErrorResponse(BaseModel):
    error: str


# --- datatypes ------------------------------------------------------------------------------


def tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    shape = [-1 if dim is None else dim for dim in spec.shape]
    return TensorMetadata(name=spec.name, datatype=datatype_of(spec.dtype), shape=shape)


# --- requests, as a server reads them -------------------------------------------------------


def parse_request(body: bytes) -> InferenceRequest:
    """The request in ``body``, or ``InferenceRequestError`` naming what is wrong with it."""
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
            for err in e.errors(include_url=False)[:5]
        )
        raise InferenceRequestError(f"not an inference request: {problems}") from None


def decode_inputs(
    request: InferenceRequest, signature: Sequence[TensorSpec] | None, model: str
) -> dict[str, np.ndarray]:
    """The request's inputs as the model ``model`` with these inputs takes them.

    With no ``signature`` (the model is not known here), each input is read as it declares
    itself and the names are left for whoever runs the model to check.
    """
    names = [tensor.name for tensor in request.inputs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InferenceRequestError(f"input {duplicates[0]!r} is given more than once")
    if signature is None:
        return {t.name: _reshape(t, _parse_data(t, DATATYPES[t.datatype])) for t in request.inputs}
    specs = {spec.name: spec for spec in signature}
    unknown = [name for name in names if name not in specs]
    missing = [name for name in specs if name not in names]
    if unknown or missing:
        raise InferenceRequestError(
            f"model {model} takes the inputs {_names(specs)}; "
            + "; ".join(
                part
                for part in (
                    unknown and f"unknown: {_names(unknown)}",
                    missing and f"missing: {_names(missing)}",
                )
                if part
            )
        )
    return {tensor.name: _to_array(tensor, specs[tensor.name]) for tensor in request.inputs}


def select_outputs(request: InferenceRequest, available: Sequence[str], model: str) -> list[str]:
    """The names of the outputs to return: those asked for, or all of them in model order."""
    wanted = list(dict.fromkeys(o.name for o in request.outputs or ())) or list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise InferenceRequestError(
            f"model {model} has no output {unknown[0]!r}; its outputs are {_names(available)}"
        )
    return wanted


def encode_output(name: str, array: np.ndarray) -> ResponseOutput:
    data = array.reshape(-1).tolist()
    datatype = datatype_of(array.dtype)
    return ResponseOutput(name=name, shape=list(array.shape), datatype=datatype, data=data)


# --- requests and responses, as a client writes and reads them ------------------------------


def encode_inputs(inputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The ``inputs`` of a request, each tensor sent in its own datatype."""
    encoded = []
    for name, value in inputs.items():
        array = np.asarray(value)
        encoded.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype_of(array.dtype),
                "data": array.reshape(-1).tolist(),
            }
        )
    return encoded


def decode_output(output: ResponseOutput) -> np.ndarray:
    """A response's tensor as NumPy (``null`` → NaN); ``ValueError`` if it does not fit."""
    dtype = DATATYPES.get(output.datatype)
    if dtype is None:
        raise ValueError(f"output {output.name!r} has the unsupported datatype {output.datatype}")
    try:
        array = np.asarray(output.data, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"output {output.name!r}: data is not {output.datatype}: {e}") from None
    if array.size != math.prod(output.shape):
        raise ValueError(
            f"output {output.name!r}: shape {output.shape} holds {math.prod(output.shape)} "
            f"elements, but data has {array.size}"
        )
    return array.reshape(output.shape)


# --- tensors --------------------------------------------------------------------------------


def _names(names: Sequence[str] | Mapping[str, Any]) -> str:
    return ", ".join(repr(name) for name in names)


def _to_array(tensor: RequestInput, spec: TensorSpec) -> np.ndarray:
    """The tensor as the model takes it, or ``InferenceRequestError`` saying what does not fit."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    model_datatype = datatype_of(spec.dtype)
    declared, wanted = DATATYPES[datatype], DATATYPES[model_datatype]
    if declared != wanted and not np.can_cast(declared, wanted, "safe"):
        raise InferenceRequestError(
            f"input {name!r} is {datatype}, but the model takes {model_datatype} and converting "
            f"would change values: send {model_datatype}"
        )
    if len(shape) != len(spec.shape) or any(
        dim is not None and dim != got for dim, got in zip(spec.shape, shape, strict=True)
    ):
        model_shape = [-1 if dim is None else dim for dim in spec.shape]
        raise InferenceRequestError(
            f"input {name!r} has shape {list(shape)}, but the model takes {model_shape} "
            "(-1: any size)"
        )
    return _reshape(tensor, _parse_data(tensor, declared)).astype(wanted, copy=False)


def _reshape(tensor: RequestInput, array: np.ndarray) -> np.ndarray:
    if array.size != math.prod(tensor.shape):
        raise InferenceRequestError(
            f"input {tensor.name!r}: shape {tensor.shape} holds {math.prod(tensor.shape)} "
            f"elements, but data has {array.size}"
        )
    return array.reshape(tensor.shape)


def _parse_data(tensor: RequestInput, dtype: np.dtype[Any]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    try:
        raw = np.asarray(tensor.data)
    except ValueError as e:  # ragged nesting
        raise InferenceRequestError(f"input {name!r}: data is not a regular array: {e}") from None
    if raw.size == 0:
        return raw.astype(dtype)
    kinds = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in kinds:
        expected = {"b": "true or false", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InferenceRequestError(
            f"input {name!r} is {datatype}: its data must all be {expected}"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            raise InferenceRequestError(
                f"input {name!r}: {low if low < info.min else high} does not fit {datatype} "
                f"({info.min} to {info.max})"
            )
        return raw.astype(dtype)
    with np.errstate(over="ignore"):
        array = raw.astype(dtype)
    if dtype.kind == "f" and bool((np.isinf(array) & np.isfinite(raw)).any()):
        raise InferenceRequestError(f"input {name!r}: a value is too large for {datatype}")
    return array
