"""The OTA repository over HTTP, and the timer that keeps its timestamp fresh.

``/ota/metadata/NAME`` serves the signed TUF metadata. It is public (every file is signed,
and devices need root before they can check anything) and never cached: ``timestamp.json``
and ``root.json`` change in place. Each file is read whole at once, so a client never gets
the head of one version and the tail of the next while the refresher replaces it.

``/ota/targets/PATH`` serves bundles with ``Range`` support (Starlette's ``FileResponse``:
206 with ``Content-Range``, 416 past the end, multipart for several ranges), which is how
devices resume a cut download. Their names hold their SHA-256 (consistent snapshots), so
they are cacheable for a year; without ``public``, shared caches do not keep responses to
requests that carried a token.

Paths that would leave the directory (``..``, absolute paths, symlinks pointing out) and
hidden files (the repository's temporary files) are answered 404, like missing ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, Response

from ota.repository import OtaRepository

from .api.responses import errors

__all__ = ["METADATA_CACHE_CONTROL", "TARGETS_CACHE_CONTROL", "TimestampRefresher", "ota_router"]

log = logging.getLogger(__name__)

METADATA_CACHE_CONTROL = "no-store"
TARGETS_CACHE_CONTROL = "max-age=31536000, immutable"


def _not_found(path: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{path!r} is not in the repository")


def _inside(directory: Path, path: str) -> Path:
    """``directory / path`` if that is a regular file inside ``directory``, else 404."""
    not_found = _not_found(path)
    if any(part.startswith(".") for part in PurePosixPath(path).parts):
        raise not_found
    try:
        root = directory.resolve()
        candidate = (root / path).resolve()
        inside = candidate.is_relative_to(root) and candidate.is_file()
    except (OSError, ValueError):  # a NUL byte, a symlink loop, a name too long
        raise not_found from None
    if not inside:
        raise not_found
    return candidate


def ota_router(
    repository_dir: Path,
    *,
    dependencies: Sequence[Any] = (),
    metadata_dependencies: Sequence[Any] = (),
) -> APIRouter:
    """``GET``/``HEAD`` of ``repository_dir``'s metadata and targets. ``dependencies`` guard
    the targets (bundles need a token); ``metadata_dependencies`` the metadata (none by
    default: it is signed)."""
    router = APIRouter(tags=["ota"])

    def metadata(name: str) -> Response:
        path = _inside(repository_dir / "metadata", name)
        try:
            data = path.read_bytes()
        except OSError:  # removed since it was found
            raise _not_found(name) from None
        return Response(
            data,
            media_type="application/json",
            headers={"Cache-Control": METADATA_CACHE_CONTROL},
        )

    def targets(path: str) -> FileResponse:
        return FileResponse(
            _inside(repository_dir / "targets", path),
            media_type="application/octet-stream",
            headers={"Cache-Control": TARGETS_CACHE_CONTROL},
        )

    for method in ("GET", "HEAD"):  # one route each, so each has its own operation id
        router.add_api_route(
            "/ota/metadata/{name}",
            metadata,
            methods=[method],
            name=f"ota_metadata_{method.lower()}",
            dependencies=list(metadata_dependencies),
            response_class=Response,
            responses={
                200: {"content": {"application/json": {}}, "description": "a signed file"},
                **errors(*((401, 404) if metadata_dependencies else (404,))),
            },
        )
        router.add_api_route(
            "/ota/targets/{path:path}",
            targets,
            methods=[method],
            name=f"ota_targets_{method.lower()}",
            dependencies=list(dependencies),
            response_class=FileResponse,
            responses={
                200: {"content": {"application/octet-stream": {}}, "description": "a bundle"},
                206: {"description": "the requested Range (multipart for several ranges)"},
                416: {"description": "a Range past the end of the file"},
                **errors(*((401, 404) if dependencies else (404,))),
            },
        )
    return router


class TimestampRefresher:
    """Re-signs the repository's timestamp before it expires, forever, as an asyncio task.

    Every ``interval_s`` it calls ``OtaRepository.refresh_timestamp`` in a thread, which
    publishes a new timestamp only once the current one is past half its lifetime. A
    failure (keys missing, disk full) is logged and counted and the loop goes on: devices
    keep their last timestamp until it expires, so an operator has until then to fix it.
    Run it from a FastAPI lifespan with ``asyncio.create_task(refresher.run())``.

    ``refreshed`` counts the timestamps published, ``failures`` the failed attempts, and
    ``last_error`` says why the latest attempt failed (``None`` once one succeeds).
    """

    def __init__(self, repository: OtaRepository, *, interval_s: float = 60.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be above 0, not {interval_s}")
        self.repository = repository
        self.interval_s = interval_s
        self.refreshed = 0
        self.failures = 0
        self.last_error: str | None = None

    async def refresh(self) -> bool:
        """One attempt; whether a new timestamp was published. Never raises."""
        try:
            published = await asyncio.to_thread(self.repository.refresh_timestamp)
        except Exception as e:  # anything: the loop must outlive a bad repository
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error(
                "re-signing the OTA timestamp failed (%d failures so far): %s",
                self.failures,
                self.last_error,
            )
            return False
        self.last_error = None
        if published:
            self.refreshed += 1
            log.info("re-signed the OTA timestamp of %s", self.repository.path)
        return published

    async def run(self) -> None:
        """Refresh now and every ``interval_s`` until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)
