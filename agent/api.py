"""The agent's local Open Inference Protocol (v2) HTTP API, on FastAPI.

Applications on the device call it as they would call KServe, Triton or the fleet's cloud
endpoint; every request goes through the :class:`~agent.inference.InferenceService`, so the
cloud fallback, shadow mode and telemetry apply to HTTP calls too.

Routes:

- ``GET /v2/health/live``: always ``{"live": true}``.
- ``GET /v2/health/ready``: 200 ``{"ready": true}`` when a model is installed, or when none
  is and the cloud fallback takes such requests (``fallback.url`` set, ``on_no_model`` on);
  otherwise 503 ``{"ready": false}``. Readiness is configuration: the cloud is not probed.
- ``GET /v2/models/{name}`` and ``GET /v2/models/{name}/ready``: the installed model's
  metadata (its versions, runtime platform, and input and output tensors) and readiness.
- ``POST /v2/models/{name}/infer``: the protocol's request and response; the response's
  ``parameters`` say who answered (``served_by``: ``local`` or ``cloud``), the local
  ``bundle`` and the ``fallback_reason``, if any. The answer is remembered by the
  response's ``id`` (the request's, or one made up) for its true label to come.
- ``POST /v2/ground-truth``: the true class of earlier answers, by request id: one
  ``{"request_id": ID, "label": CLASS}``, answered with that label's status (200 matched,
  404 unknown or forgotten, 409 labelled already or no class), or ``{"labels": [...]}``
  (at most ``contracts.mqtt.GROUND_TRUTH_MAX_LABELS``), answered 200 with
  ``{"results": [...]}`` in order, each with its own ``status``. See
  agent/ground_truth.py for what is remembered and for how long.

The model is served under ``model_name`` (``AgentConfig.model_name``), else the installed
bundle's model name, else, with no model installed, ``fallback.model``. With a model
installed, inputs are checked against its signature; without one they are decoded as they
declare themselves and the cloud checks them.

Errors are ``{"error": MESSAGE}``: 400 for a request the model cannot take (malformed JSON,
wrong input names, shapes or datatypes, or one the cloud refused as such), 404 for a model
name not served here, 503 when nothing can answer (no model and no fallback, or the
fallback failed or its breaker is open), 500 when the local runtime failed and no fallback
took the request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from contracts import oip
from contracts.errors import InferenceRequestError
from contracts.mqtt import GROUND_TRUTH_MAX_LABELS, GroundTruth, GroundTruthBatch

from .config import ApiConfig
from .errors import (
    FallbackError,
    FallbackRejectedError,
    LocalInferenceError,
    NoModelError,
)
from .ground_truth import PredictionLog
from .inference import InferenceResult, InferenceService, top1
from .model import LoadedModel

__all__ = ["create_local_app", "local_api_server"]

_MAX_TRUTH_BODY_BYTES = 1 << 20
"""A ground-truth body larger than this is refused (413): a full batch is far smaller."""
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "litert_tflite", "tvm": "tvm_relax"}
"""The protocol's free-form ``platform``, per runtime, in Triton's ``<runtime>_<format>`` style."""


class _Unavailable(Exception):
    """Nothing here can answer for this model now (HTTP 503)."""


class _NotServed(LookupError):
    """No model of this name is served here (HTTP 404)."""


def create_local_app(
    service: InferenceService,
    *,
    model_name: str | None = None,
    predictions: PredictionLog | None = None,
) -> FastAPI:
    """The local API over ``service``; ``model_name`` overrides the name it serves under;
    answers are remembered in ``predictions`` (a default :class:`PredictionLog` if none)."""
    log = predictions if predictions is not None else PredictionLog()
    app = FastAPI(
        title="edgefleet agent",
        summary="The device's local Open Inference Protocol (v2) endpoint.",
    )

    def served(name: str) -> LoadedModel | None:
        """The installed model if ``name`` is the name served; ``None`` when none is installed."""
        model = service.model
        serving = model_name or (model.model_name if model is not None else service.config.model)
        if serving is None:
            raise _Unavailable(
                "no model is installed here yet, and neither the agent's model_name nor "
                "fallback.model names one to serve"
            )
        if name != serving:
            raise _NotServed(f"no model named {name!r} is served here; {serving!r} is")
        return model

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> JSONResponse:
        is_ready = service.ready
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{name}")
    def metadata(name: str) -> JSONResponse:
        def work() -> dict[str, Any]:
            model = served(name)
            if model is None:
                raise _Unavailable(
                    f"no model is installed here; {name!r} is served by the cloud fallback"
                    if service.ready
                    else f"no model is installed here to serve {name!r}, and no cloud fallback"
                )
            return _metadata(name, model).model_dump(mode="json")

        return _answer(work)

    @app.get("/v2/models/{name}/ready")
    def model_ready(name: str) -> JSONResponse:
        def work() -> dict[str, Any]:
            served(name)
            if not service.ready:
                raise _Unavailable(f"model {name!r} is not ready: no model is installed here")
            return {"name": name, "ready": True}

        return _answer(work)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> JSONResponse:
        body = await request.body()
        return await run_in_threadpool(
            _answer, lambda: _infer(service, log, served(name), name, body)
        )

    @app.post("/v2/ground-truth")
    async def ground_truth(request: Request) -> JSONResponse:
        body = await _read_capped(request, _MAX_TRUTH_BODY_BYTES)
        if body is None:
            return JSONResponse(
                {"error": f"the body is over {_MAX_TRUTH_BODY_BYTES} bytes; send fewer labels"},
                status_code=413,
            )
        try:
            labels, single = _parse_truth(body)
        except ValueError as e:
            return _error(e, 400)
        outcomes = log.label(labels)
        if single:
            return JSONResponse(outcomes[0].as_json(), status_code=outcomes[0].status)
        return JSONResponse(
            {"results": [outcome.as_json() | {"status": outcome.status} for outcome in outcomes]}
        )

    return app


def local_api_server(
    service: InferenceService,
    config: ApiConfig,
    *,
    model_name: str | None = None,
    predictions: PredictionLog | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the local API on ``config.host:config.port`` (not started).

    Run it with ``server.run()`` (blocks) in a thread; set ``server.should_exit`` to stop.
    """
    app = create_local_app(service, model_name=model_name, predictions=predictions)
    return uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning")
    )


def _infer(
    service: InferenceService,
    predictions: PredictionLog,
    model: LoadedModel | None,
    name: str,
    body: bytes,
) -> dict[str, Any]:
    request = oip.parse_request(body)
    signature = model.inputs if model is not None else None
    result = service.infer(oip.decode_inputs(request, signature, name))
    wanted = oip.select_outputs(request, result.output_names, name)
    by_name = dict(zip(result.output_names, result.outputs, strict=True))
    response = oip.InferenceResponse(
        model_name=name,
        model_version=result.model_version,
        id=request.id if request.id is not None else str(uuid.uuid4()),
        outputs=[oip.encode_output(output, by_name[output]) for output in wanted],
    )
    classes = top1(result.outputs[0]) if result.outputs else None
    predictions.record(
        response.id,
        result.bundle if result.served_by == "local" else None,
        int(classes[0]) if classes is not None else None,
    )
    return response.model_dump(mode="json") | {"parameters": _parameters(result)}


def _parameters(result: InferenceResult) -> dict[str, Any]:
    parameters: dict[str, Any] = {"served_by": result.served_by, "bundle": result.bundle}
    if result.fallback_reason is not None:
        parameters["fallback_reason"] = result.fallback_reason
    return parameters


def _metadata(name: str, model: LoadedModel) -> oip.ModelMetadata:
    runtime = model.runtime
    return oip.ModelMetadata(
        name=name,
        versions=[model.manifest.model.version],
        platform=_PLATFORMS.get(runtime.name, runtime.name),
        inputs=[oip.tensor_metadata(spec) for spec in model.inputs],
        outputs=[oip.tensor_metadata(spec) for spec in model.outputs],
    )


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The request's body, or ``None`` as soon as it is over ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _parse_truth(body: bytes) -> tuple[list[GroundTruth], bool]:
    """The labels in ``body`` and whether it was a single one; ``ValueError`` saying what
    is wrong otherwise."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the body is not JSON: {e}") from None
    try:
        if isinstance(document, dict) and "labels" in document:
            return list(GroundTruthBatch.model_validate(document).labels), False
        return [GroundTruth.model_validate(document)], True
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the body"
        raise ValueError(
            f'{where}: {first["msg"]}; send {{"request_id": ID, "label": CLASS_INDEX}} '
            f'or {{"labels": [...]}} with 1 to {GROUND_TRUTH_MAX_LABELS} of them'
        ) from None


def _answer(work: Callable[[], dict[str, Any]]) -> JSONResponse:
    """``work()``'s JSON, or the protocol's ``{"error": ...}`` with the status it calls for."""
    try:
        return JSONResponse(work())
    except (InferenceRequestError, FallbackRejectedError) as e:
        status = 400
        if isinstance(e, FallbackRejectedError) and e.status_code != 400:
            status = 503  # the cloud refused our token or model name: not the caller's fault
        return _error(e, status)
    except _NotServed as e:
        return _error(e, 404)
    except (_Unavailable, NoModelError, FallbackError) as e:
        return _error(e, 503)
    except LocalInferenceError as e:
        return _error(e, 500)


def _error(error: Exception, status: int) -> JSONResponse:
    message = "; ".join([str(error), *getattr(error, "__notes__", ())])
    return JSONResponse({"error": message}, status_code=status)
