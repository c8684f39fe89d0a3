"""The FastAPI application: routers, error answers, metrics, dashboard, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .api import admin, broker, devices, registry, replicas, rollouts
from .api.deps import _device_or_viewer, require
from .api.responses import errors
from .config import FleetSettings
from .dashboard import add_dashboard
from .errors import RequestError
from .inference import inference_router
from .limits import BodyLimit, BodyLimitMiddleware
from .models import Role
from .ota_files import TimestampRefresher, ota_router
from .server import FleetServer

__all__ = ["create_app"]

_BUNDLE_UPLOAD = re.compile(r"/api/v1/models/[^/]+/versions/[^/]+/bundles")
_INFERENCE = re.compile(r"/v2/models/.+/infer")


def create_app(
    settings: FleetSettings, *, on_started: Callable[[FleetServer], None] = lambda _server: None
) -> FastAPI:
    """The app of one fleet server; ``on_started`` runs once the server is up (``fleet
    serve`` prints its addresses)."""
    server = FleetServer(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(server.start)
        except BaseException:  # stop what did start: a mosquitto must not outlive it
            await asyncio.to_thread(server.stop)
            raise
        on_started(server)
        refresher = TimestampRefresher(
            server.repository, interval_s=settings.timestamp_refresh_interval_s
        )
        task = asyncio.create_task(refresher.run())
        app.state.refresher = refresher
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(server.stop)

    app = FastAPI(
        title="edgefleet fleet server",
        summary="Model registry, device enrollment, staged rollouts, OTA and cloud inference.",
        version="0.1.0",
        lifespan=lifespan,
        responses=errors(413),
        docs_url=None,  # served by add_dashboard, from the package rather than a CDN
        redoc_url=None,
    )
    app.state.fleet = server
    app.add_middleware(
        BodyLimitMiddleware,
        default_max_bytes=settings.max_json_bytes,
        limits=[
            BodyLimit(_BUNDLE_UPLOAD, settings.max_bundle_bytes),
            BodyLimit(_INFERENCE, settings.max_inference_bytes, error_field="error"),
        ],
    )

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_errors(error.errors())}, status_code=422)

    for router in (
        registry.router,
        devices.router,
        rollouts.router,
        admin.router,
        replicas.router,
        broker.router,
    ):
        app.include_router(router, prefix="/api/v1")
    device_or_viewer = [Depends(_device_or_viewer)]
    app.include_router(ota_router(settings.ota_dir, dependencies=device_or_viewer))
    app.include_router(
        inference_router(
            server.cloud_model,
            server.cloud_models,
            dependencies=device_or_viewer,
            guard_responses=errors(401),
            not_ready=server.not_ready,
        )
    )

    metrics_guard = [] if settings.metrics_public else [Depends(require(Role.VIEWER))]

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_guard)
    def metrics() -> Response:
        """Prometheus exposition; an API token of any role unless ``metrics_public``."""
        refresher = getattr(app.state, "refresher", None)
        body = server.render_metrics(refresher.failures if refresher else 0)
        return Response(body, media_type="text/plain; version=0.0.4")

    add_dashboard(app)
    return app


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` (``loc``, ``msg``, ``type``), echoing only a scalar
    ``input``: a rejected NaN or a 900-deep document must not break the answer itself."""
    found = []
    for error in errors:
        item = {key: error[key] for key in ("loc", "msg", "type") if key in error}
        if "input" in error:
            value = error["input"]
            if isinstance(value, float) and not math.isfinite(value):
                item["input"] = str(value)
            elif value is None or isinstance(value, str | int | float):
                item["input"] = value
        found.append(item)
    return found
