"""The cloud inference endpoint: the Open Inference Protocol (v2) REST API on ONNX Runtime.

Agents fall back to it when they cannot run a model themselves; because it speaks the
protocol of KServe, Triton and MLServer, an agent can as well point at any of those. Only
the JSON tensor encoding is supported (no ``BYTES`` tensors, no binary data extension).

Tensors are read and written by the codec the agent shares (:mod:`contracts.oip`, whose
docstring says which datatypes convert into which).

Errors are ``{"error": MESSAGE}``: 404 for a model (or version) that is not served, 400 for
a request the model cannot run, 503 for a model file ONNX Runtime cannot load.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from contracts import oip
from contracts.errors import InferenceRequestError
from contracts.ids import check_name, check_version
from contracts.oip import (
    DATATYPES,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    RequestInput,
    RequestOutput,
    ResponseOutput,
    TensorMetadata,
)
from contracts.tensors import TensorSpec, dtype_of_onnxruntime_type

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


@contextmanager
def _bad_request() -> Iterator[None]:
    """The codec's errors, as this package's 400."""
    try:
        yield
    except InferenceRequestError as e:
        raise InferenceError(str(e)) from None


# --- models and their sessions ------------------------------------------------------------


@dataclass(frozen=True)
class CloudModel:
    """What the registry resolves a model name to: the version served and its ONNX file."""

    name: str
    version: str
    onnx_path: Path


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

    def _spec(self, arg: Any) -> TensorSpec:
        dtype = dtype_of_onnxruntime_type(arg.type)
        if dtype is None:
            raise ModelUnavailableError(
                f"model {self.model.name} {self.model.version}: {arg.name} is a {arg.type}, "
                f"which this endpoint cannot exchange (it takes {', '.join(DATATYPES)})"
            )
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in arg.shape)
        return TensorSpec(arg.name, shape, dtype)

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            name=self.model.name,
            versions=[self.model.version],
            platform=PLATFORM,
            inputs=[oip.tensor_metadata(spec) for spec in self.inputs.values()],
            outputs=[oip.tensor_metadata(spec) for spec in self.outputs.values()],
        )

    def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Check ``request`` against the model's signature, run it, convert the outputs."""
        with _bad_request():
            feeds = oip.decode_inputs(request, list(self.inputs.values()), self.model.name)
            wanted = oip.select_outputs(request, list(self.outputs), self.model.name)
        try:
            results = self._session.run(wanted, feeds)
        except Exception as e:  # onnxruntime's own exception types, all from bad inputs here
            raise InferenceError(f"model {self.model.name} failed on these inputs: {e}") from e
        return InferenceResponse(
            model_name=self.model.name,
            model_version=self.model.version,
            id=request.id if request.id is not None else str(uuid.uuid4()),
            outputs=[
                oip.encode_output(name, np.asarray(a))
                for name, a in zip(wanted, results, strict=True)
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


# --- the HTTP routes ----------------------------------------------------------------------


def _parse_request(body: bytes) -> InferenceRequest:
    with _bad_request():
        return oip.parse_request(body)


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
_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "the request is over max_inference_bytes"}
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
    guard_responses: dict[int | str, dict[str, Any]] | None = None,
    not_ready: Callable[[], str | None] = lambda: None,
) -> APIRouter:
    """The v2 routes. ``resolve`` names the version served for a model name (``None``: not
    served); ``dependencies`` guard the model routes, the health routes stay open, and
    ``guard_responses`` documents what the guard answers. ``not_ready`` says why the
    server is not ready (readiness answers 503 with it), or ``None``."""
    router = APIRouter(tags=["inference"])

    def served(name: str, version: str | None) -> CloudModel:
        try:
            check_name(name)
            if version is not None:
                check_version(version)
        except ValueError as e:  # no such name can be served
            raise NotFoundError(f"no such model is served: {e}") from None
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

    @router.get(
        "/v2/health/ready",
        response_model=dict[str, bool],
        responses={503: {"model": ErrorResponse, "description": "not ready: the reason"}},
    )
    def ready() -> JSONResponse:
        reason = not_ready()
        if reason is not None:
            return JSONResponse({"error": reason}, status_code=503)
        return JSONResponse({"ready": True})

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

    guarded = APIRouter(
        dependencies=list(dependencies), responses={**(guard_responses or {}), **_ERRORS}
    )

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

    @guarded.post(
        "/v2/models/{name}/infer",
        response_model=InferenceResponse,
        openapi_extra=_BODY,
        responses=_TOO_LARGE,
    )
    async def model_infer(request: Request, name: str) -> JSONResponse:
        return await infer(request, name, None)

    @guarded.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=InferenceResponse,
        openapi_extra=_BODY,
        responses=_TOO_LARGE,
    )
    async def version_infer(request: Request, name: str, version: str) -> JSONResponse:
        return await infer(request, name, version)

    router.include_router(guarded)
    return router
