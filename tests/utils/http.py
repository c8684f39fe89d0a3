"""Serve an ASGI app (the fleet's FastAPI app, say) on a real loopback port with uvicorn.

``serve_app(app)`` runs uvicorn in a background thread on a free port, without the app's
lifespan (the caller has started it already, e.g. through ``running_fleet``), and logs
every HTTP request's path and ``Range`` header, so a test can see a download resume.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class ServedApp:
    url: str
    port: int
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """``(path, Range header)`` of every request, in arrival order."""


@contextmanager
def serve_app(app: Any, port: int = 0) -> Iterator[ServedApp]:
    """``app`` at ``http://127.0.0.1:PORT`` until the block ends (``port`` 0: a free one)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    served = ServedApp(url=f"http://127.0.0.1:{port}", port=port)

    async def logged(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            served.requests.append((scope["path"], (headers.get(b"range") or b"").decode() or None))
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(logged, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.01)
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
