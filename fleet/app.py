"""The FastAPI application: routers, error answers, metrics, dashboard, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .api import admin, devices, registry, rollouts
from .api.deps import _device_or_viewer
from .config import FleetSettings
from .errors import RequestError
from .inference import inference_router
from .ota_files import TimestampRefresher, ota_router
from .server import FleetServer

__all__ = ["create_app"]


def create_app(settings: FleetSettings) -> FastAPI:
    server = FleetServer(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(server.start)
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
    )
    app.state.fleet = server

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code)

    for router in (registry.router, devices.router, rollouts.router, admin.router):
        app.include_router(router, prefix="/api/v1")
    device_or_viewer = [Depends(_device_or_viewer)]
    app.include_router(ota_router(settings.ota_dir, dependencies=device_or_viewer))
    app.include_router(
        inference_router(server.cloud_model, server.cloud_models, dependencies=device_or_viewer)
    )

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        refresher = getattr(app.state, "refresher", None)
        body = server.render_metrics(refresher.failures if refresher else 0)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(resources.files("fleet").joinpath("dashboard.html").read_text())

    return app
