"""``/api/v1/models``: the registry: versions, stages, bundles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel

from .. import registry
from ..errors import RequestError
from ..models import BundlePublic, ModelVersionCreate, ModelVersionPublic, Stage
from .deps import Operator, ServerDep, SessionDep, Viewer

router = APIRouter(prefix="/models", tags=["models"])

MAX_BUNDLE_BYTES = 8 << 30


class StageChange(BaseModel):
    stage: Stage


@router.post("", status_code=201)
def create_version(
    data: ModelVersionCreate, session: SessionDep, who: Operator
) -> ModelVersionPublic:
    version = registry.create_version(session, data=data, actor=who.name)
    session.commit()
    return registry.public_version(session, version)


@router.get("")
def list_versions(
    session: SessionDep, _: Viewer, name: str | None = None, stage: Stage | None = None
) -> list[ModelVersionPublic]:
    return [
        registry.public_version(session, v)
        for v in registry.list_versions(session, name=name, stage=stage)
    ]


@router.get("/{name}/versions/{version}")
def get_version(name: str, version: str, session: SessionDep, _: Viewer) -> ModelVersionPublic:
    return registry.public_version(
        session, registry.get_version(session, name=name, version=version)
    )


@router.get("/{name}/stages/{stage}")
def get_by_stage(
    name: str, stage: Stage, session: SessionDep, _: Viewer
) -> list[ModelVersionPublic]:
    return [
        registry.public_version(session, v)
        for v in registry.list_versions(session, name=name, stage=stage)
    ]


@router.put("/{name}/versions/{version}/stage")
def set_stage(
    name: str, version: str, change: StageChange, session: SessionDep, who: Operator
) -> ModelVersionPublic:
    found = registry.get_version(session, name=name, version=version)
    registry.set_stage(session, version=found, stage=change.stage, actor=who.name)
    session.commit()
    return registry.public_version(session, found)


@router.post("/{name}/versions/{version}/bundles", status_code=201)
async def attach_bundle(
    name: str,
    version: str,
    request: Request,
    server: ServerDep,
    session: SessionDep,
    who: Operator,
) -> BundlePublic:
    """Upload a ``.efb`` (the raw request body); it is verified and signed for devices."""
    found = registry.get_version(session, name=name, version=version)
    upload = await _receive(request, server.settings.data_dir / "uploads")
    try:
        bundle = registry.attach_bundle(
            session,
            version=found,
            bundle_file=upload,
            repository=server.repository,
            actor=who.name,
        )
        session.commit()
        return BundlePublic.model_validate(bundle)
    finally:
        upload.unlink(missing_ok=True)


async def _receive(request: Request, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=".efb")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BUNDLE_BYTES:
                    raise RequestError(f"bundle is over the {MAX_BUNDLE_BYTES >> 30} GiB limit")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise RequestError(
            "send the .efb file as the request body (Content-Type: application/octet-stream)"
        )
    return path
