"""Serve a directory over real HTTP (uvicorn + Starlette's StaticFiles, which does Range)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
