"""The cloud inference endpoint: the Open Inference Protocol (v2) REST API on ONNX Runtime.

Agents fall back to it when they cannot run a model themselves; because it speaks the
protocol of KServe, Triton and MLServer, an agent can as well point at any of those. Only
the JSON tensor encoding is supported (no ``BYTES`` tensors, no binary data extension).

Datatypes: the data of an input is read as the ``datatype`` it declares; integers must fit
it (a ``UINT8`` of 300 is refused) and ``BOOL`` takes only ``true``/``false``. When the
model takes another type, the tensor is converted only where NumPy calls the conversion
*safe* (every value is kept: ``UINT8`` pixels or ``FP16`` into an ``FP32`` model, ``INT32``
into ``INT64``); a narrowing conversion (``FP64`` into ``FP32``) would silently change
values, so it is refused with a 400 naming the type to send. Outputs are returned in the
model's own types; NaN and infinities, which JSON cannot carry, become ``null``, as in
KServe and MLServer.

Errors are ``{"error": MESSAGE}``: 404 for a model (or version) that is not served, 400 for
a request the model cannot run, 503 for a model file ONNX Runtime cannot load.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InferenceError, ModelUnavailableError, NotFoundError, RequestError

__all__ = [
    "DATATYPES",
    "CloudModel",
    "CloudModels",
    "ErrorResponse",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "ModelReady",
    "ModelSession",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "TensorMetadata",
    "inference_router",
]

PLATFORM = "onnxruntime_onnx"

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
"""The protocol's datatypes this endpoint takes and returns, as NumPy types."""

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}


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


# --- models and their sessions ------------------------------------------------------------


@dataclass(frozen=True)
class CloudModel:
    """What the registry resolves a model name to: the version served and its ONNX file."""

    name: str
    version: str
    onnx_path: Path


@dataclass(frozen=True)
class _Spec:
    name: str
    datatype: str
    shape: tuple[int | None, ...]

    def metadata(self) -> TensorMetadata:
        shape = [-1 if dim is None else dim for dim in self.shape]
        return TensorMetadata(name=self.name, datatype=self.datatype, shape=shape)


class ModelSession:
    """One ONNX Runtime session and the signature of its model."""

    def __init__(self, model: CloudModel) -> None:
        self.model = model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(model.onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped exceptions for bad files
            reason = str(e).replace(str(model.onnx_path), model.onnx_path.name)
            raise ModelUnavailableError(
                f"model {model.name} {model.version} cannot be loaded by ONNX Runtime: {reason}"
            ) from e
        self.inputs = {arg.name: self._spec(arg) for arg in self._session.get_inputs()}
        self.outputs = {arg.name: self._spec(arg) for arg in self._session.get_outputs()}

    def _spec(self, arg: Any) -> _Spec:
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise ModelUnavailableError(
                f"model {self.model.name} {self.model.version}: {arg.name} is a {arg.type}, "
                f"which this endpoint cannot exchange (it takes {', '.join(DATATYPES)})"
            )
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in arg.shape)
        return _Spec(arg.name, datatype, shape)

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            name=self.model.name,
            versions=[self.model.version],
            platform=PLATFORM,
            inputs=[spec.metadata() for spec in self.inputs.values()],
            outputs=[spec.metadata() for spec in self.outputs.values()],
        )

    def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Check ``request`` against the model's signature, run it, convert the outputs."""
        names = [tensor.name for tensor in request.inputs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InferenceError(f"input {duplicates[0]!r} is given more than once")
        unknown = [name for name in names if name not in self.inputs]
        missing = [name for name in self.inputs if name not in names]
        if unknown or missing:
            raise InferenceError(
                f"model {self.model.name} takes the inputs {_names(self.inputs)}; "
                + "; ".join(
                    part
                    for part in (
                        unknown and f"unknown: {_names(unknown)}",
                        missing and f"missing: {_names(missing)}",
                    )
                    if part
                )
            )
        feeds = {t.name: _to_array(t, self.inputs[t.name]) for t in request.inputs}
        wanted = list(dict.fromkeys(o.name for o in request.outputs or ())) or list(self.outputs)
        unknown = [name for name in wanted if name not in self.outputs]
        if unknown:
            raise InferenceError(
                f"model {self.model.name} has no output {unknown[0]!r}; "
                f"its outputs are {_names(self.outputs)}"
            )
        try:
            results = self._session.run(wanted, feeds)
        except Exception as e:  # onnxruntime's own exception types, all from bad inputs here
            raise InferenceError(f"model {self.model.name} failed on these inputs: {e}") from e
        return InferenceResponse(
            model_name=self.model.name,
            model_version=self.model.version,
            id=request.id if request.id is not None else str(uuid.uuid4()),
            outputs=[
                _to_output(name, np.asarray(a)) for name, a in zip(wanted, results, strict=True)
            ],
        )


@dataclass
class _Slot:
    model: CloudModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    session: ModelSession | None = None


class CloudModels:
    """ONNX Runtime sessions of the served models, loaded on first use, shared by threads.

    One session is kept per model name: when the registry resolves a name to another
    version (or file), the next request loads it and the old session is dropped once the
    requests still using it are done. A file that fails to load is retried on the next
    request rather than remembered, so a replaced file is picked up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def get(self, model: CloudModel) -> ModelSession:
        """The session of ``model``; ``ModelUnavailableError`` if its file does not load."""
        with self._lock:
            slot = self._slots.get(model.name)
            if slot is None or slot.model != model:
                slot = self._slots[model.name] = _Slot(model)
        with slot.lock:  # one load per model; other models are not held up meanwhile
            if slot.session is None:
                slot.session = ModelSession(model)
            return slot.session

    def metadata(self, model: CloudModel) -> ModelMetadata:
        return self.get(model).metadata()

    def infer(self, model: CloudModel, request: InferenceRequest) -> InferenceResponse:
        return self.get(model).infer(request)


# --- tensors ------------------------------------------------------------------------------


def _names(names: Sequence[str] | dict[str, Any]) -> str:
    return ", ".join(repr(name) for name in names)


def _to_array(tensor: RequestInput, spec: _Spec) -> np.ndarray:
    """The tensor as the model takes it, or ``InferenceError`` saying what does not fit."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    declared, wanted = DATATYPES[datatype], DATATYPES[spec.datatype]
    if declared != wanted and not np.can_cast(declared, wanted, "safe"):
        raise InferenceError(
            f"input {name!r} is {datatype}, but the model takes {spec.datatype} and converting "
            f"would change values: send {spec.datatype}"
        )
    if len(shape) != len(spec.shape) or any(
        dim is not None and dim != got for dim, got in zip(spec.shape, shape, strict=True)
    ):
        model_shape = [-1 if dim is None else dim for dim in spec.shape]
        raise InferenceError(
            f"input {name!r} has shape {list(shape)}, but the model takes {model_shape} "
            "(-1: any size)"
        )
    array = _parse_data(tensor, declared)
    if array.size != math.prod(shape):
        raise InferenceError(
            f"input {name!r}: shape {list(shape)} holds {math.prod(shape)} elements, "
            f"but data has {array.size}"
        )
    return array.reshape(shape).astype(wanted, copy=False)


def _parse_data(tensor: RequestInput, dtype: np.dtype[Any]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    try:
        raw = np.asarray(tensor.data)
    except ValueError as e:  # ragged nesting
        raise InferenceError(f"input {name!r}: data is not a regular array: {e}") from None
    if raw.size == 0:
        return raw.astype(dtype)
    kinds = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in kinds:
        expected = {"b": "true or false", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InferenceError(f"input {name!r} is {datatype}: its data must all be {expected}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            raise InferenceError(
                f"input {name!r}: {low if low < info.min else high} does not fit {datatype} "
                f"({info.min} to {info.max})"
            )
        return raw.astype(dtype)
    with np.errstate(over="ignore"):
        array = raw.astype(dtype)
    if dtype.kind == "f" and bool((np.isinf(array) & np.isfinite(raw)).any()):
        raise InferenceError(f"input {name!r}: a value is too large for {datatype}")
    return array


def _to_output(name: str, array: np.ndarray) -> ResponseOutput:
    datatype = _DATATYPE_OF[array.dtype]  # the session's types were all checked at load
    data = array.reshape(-1).tolist()
    return ResponseOutput(name=name, shape=list(array.shape), datatype=datatype, data=data)


# --- the HTTP routes ----------------------------------------------------------------------


def _parse_request(body: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
            for err in e.errors(include_url=False)[:5]
        )
        raise InferenceError(f"not an inference request: {problems}") from None


def _answer(work: Callable[[], BaseModel]) -> JSONResponse:
    try:
        result = work()
    except (RequestError, ModelUnavailableError) as e:
        return JSONResponse({"error": str(e)}, status_code=e.status_code)
    return JSONResponse(result.model_dump(mode="json"))  # NaN and infinities: null


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "a request the model cannot run"),
        (404, "no such model or version is served"),
        (503, "the model file cannot be loaded"),
    )
}


_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
        "description": "an Open Inference Protocol v2 request: "
        '{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"}], '
        '"outputs"?: [{"name"}]}',
    }
}


def inference_router(
    resolve: Callable[[str], CloudModel | None],
    models: CloudModels,
    *,
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """The v2 routes. ``resolve`` names the version served for a model name (``None``: not
    served); ``dependencies`` guard the model routes, the health routes stay open."""
    router = APIRouter(tags=["inference"])

    def served(name: str, version: str | None) -> CloudModel:
        model = resolve(name)
        if model is None:
            raise NotFoundError(f"no model named {name!r} is served")
        if version is not None and version != model.version:
            raise NotFoundError(
                f"model {name!r} version {version!r} is not served; {model.version} is"
            )
        return model

    @router.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    def metadata(name: str, version: str | None) -> JSONResponse:
        return _answer(lambda: models.metadata(served(name, version)))

    def model_ready(name: str, version: str | None) -> JSONResponse:
        def check() -> ModelReady:
            models.get(served(name, version))
            return ModelReady(name=name, ready=True)

        return _answer(check)

    async def infer(request: Request, name: str, version: str | None) -> JSONResponse:
        body = await request.body()

        def run() -> InferenceResponse:
            return models.infer(served(name, version), _parse_request(body))

        return await run_in_threadpool(_answer, run)

    guarded = APIRouter(dependencies=list(dependencies), responses=_ERRORS)

    @guarded.get("/v2/models/{name}", response_model=ModelMetadata)
    def model_metadata(name: str) -> JSONResponse:
        return metadata(name, None)

    @guarded.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata)
    def version_metadata(name: str, version: str) -> JSONResponse:
        return metadata(name, version)

    @guarded.get("/v2/models/{name}/ready", response_model=ModelReady)
    def model_is_ready(name: str) -> JSONResponse:
        return model_ready(name, None)

    @guarded.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady)
    def version_is_ready(name: str, version: str) -> JSONResponse:
        return model_ready(name, version)

    @guarded.post("/v2/models/{name}/infer", response_model=InferenceResponse, openapi_extra=_BODY)
    async def model_infer(request: Request, name: str) -> JSONResponse:
        return await infer(request, name, None)

    @guarded.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=InferenceResponse,
        openapi_extra=_BODY,
    )
    async def version_infer(request: Request, name: str, version: str) -> JSONResponse:
        return await infer(request, name, version)

    router.include_router(guarded)
    return router
