"""Serve a directory over real HTTP (uvicorn + Starlette's StaticFiles, which does Range)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles


@dataclass
class FileServer:
    url: str
    port: int
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


@contextmanager
def serve_directory(root: Path) -> Iterator[FileServer]:
    """``root`` at ``http://127.0.0.1:PORT/``; every request's path and Range are logged."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server_info = FileServer(url=f"http://127.0.0.1:{port}", port=port)

    async def log(request: Request, call_next: RequestResponseEndpoint) -> Response:
        server_info.requests.append((request.url.path, request.headers.get("range")))
        return await call_next(request)

    app = Starlette(routes=[Mount("/", StaticFiles(directory=root))])
    app.add_middleware(BaseHTTPMiddleware, dispatch=log)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield server_info
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
