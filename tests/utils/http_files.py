"""Serve a directory over real HTTP: uvicorn + Starlette's StaticFiles, which does Range,
or the standard library's threaded server, which starts and stops in milliseconds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from tests.utils.http import ServedApp, serve_app

FileServer = ServedApp
"""``url``, ``port`` and ``requests``: every request's ``(path, Range header)``."""


@contextmanager
def serve_directory(root: Path) -> Iterator[FileServer]:
    """``root`` at ``http://127.0.0.1:PORT/``; every request's path and Range are logged."""
    with serve_app(Starlette(routes=[Mount("/", StaticFiles(directory=root))])) as served:
        yield served


class _LoggedFiles(SimpleHTTPRequestHandler):
    """The directory's files; each request's path and Range go to ``served``, not stderr."""

    def __init__(self, *args: Any, served: FileServer, **kwargs: Any) -> None:
        self.served = served
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:
        self.served.requests.append((urlsplit(self.path).path, self.headers.get("Range")))
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_directory_threaded(root: Path) -> Iterator[FileServer]:
    """``root`` at ``http://127.0.0.1:PORT/`` from ``http.server`` on a thread: for tests
    that set a server up per run, where uvicorn's 0.2 s stop adds up. It ignores Range
    (every answer is the whole file), which a download must accept (ota/download.py)."""
    served = FileServer(url="", port=0)
    handler = partial(_LoggedFiles, served=served, directory=str(root))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        served.port = server.server_address[1]
        served.url = f"http://127.0.0.1:{served.port}"
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        try:
            yield served
        finally:
            server.shutdown()
            thread.join()
