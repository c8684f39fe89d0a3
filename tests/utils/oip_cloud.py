"""The fleet's cloud inference endpoint served for real (uvicorn on loopback), for agent tests.

:class:`CloudEndpoint` serves one ONNX model through ``fleet.inference.inference_router``
behind a bearer token. It can be stopped and started again on the same port (the cloud
going away and coming back), and told to answer the next requests with a 503 (a model
file that does not load, as the real endpoint answers then).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException

from fleet.inference import CloudModel, CloudModels, inference_router

TOKEN = "device-token"


@contextmanager
def running(server: uvicorn.Server, sock: socket.socket | None = None) -> Iterator[int]:
    """Run ``server`` in a thread (on ``sock`` if given); yields the port it listens on."""
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock] if sock else None}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class CloudEndpoint:
    """``model_name`` at ``version`` from ``onnx``; ``broken`` is a file that does not load."""

    def __init__(self, onnx: Path, broken: Path, model_name: str = "digits") -> None:
        self.model = CloudModel(model_name, "1.0.0", onnx)
        self._broken = CloudModel(model_name, "0.0.0-broken", broken)
        self.fail_next = 0
        """The next this many requests to the model are answered 503."""
        self.requests = 0
        """Requests that reached a model route (past the token check)."""
        self.port = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _resolve(self, name: str) -> CloudModel | None:
        with self._lock:
            self.requests += 1
            if name != self.model.name:
                return None
            if self.fail_next > 0:
                self.fail_next -= 1
                return self._broken
            return self.model

    @contextmanager
    def serving(self) -> Iterator[CloudEndpoint]:
        """Serve until the block ends; again on the same port when served before."""

        def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
            if authorization != f"Bearer {TOKEN}":
                raise HTTPException(401, "send the device token")

        app = FastAPI()
        app.include_router(
            inference_router(self._resolve, CloudModels(), dependencies=[Depends(require_token)])
        )
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        try:
            with running(server, sock):
                yield self
        finally:
            sock.close()
