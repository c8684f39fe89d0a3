"""``/api/v1/models``: the registry: versions, stages, bundles."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlmodel import col, select

from .. import registry
from ..bounds import Name, Version
from ..errors import NotFoundError, RequestError
from ..model_health import AccuracyReport, DriftReport, accuracy_report, drift_report
from ..models import (
    Bundle,
    BundlePublic,
    ModelVersionCreate,
    ModelVersionPublic,
    Rollout,
    Stage,
    utcnow,
)
from ..rollouts.public import RolloutEvent, rollout_history
from ..telemetry import VersionHealth, health_series
from .deps import Operator, ServerDep, SessionDep, Viewer
from .responses import errors

router = APIRouter(prefix="/models", tags=["models"], responses=errors(401, 403))


class StageChange(BaseModel):
    stage: Stage


@router.post("", status_code=201, responses=errors(400, 409))
def create_version(
    data: ModelVersionCreate, session: SessionDep, who: Operator
) -> ModelVersionPublic:
    version = registry.create_version(session, data=data, actor=who.name)
    session.commit()
    return registry.public_version(session, version)


@router.get("")
def list_versions(
    session: SessionDep, _: Viewer, name: Name | None = None, stage: Stage | None = None
) -> list[ModelVersionPublic]:
    return [
        registry.public_version(session, v)
        for v in registry.list_versions(session, name=name, stage=stage)
    ]


@router.get("/{name}/versions/{version}", responses=errors(404))
def get_version(name: Name, version: Version, session: SessionDep, _: Viewer) -> ModelVersionPublic:
    return registry.public_version(
        session, registry.get_version(session, name=name, version=version)
    )


@router.get("/{name}/stages/{stage}")
def get_by_stage(
    name: Name, stage: Stage, session: SessionDep, _: Viewer
) -> list[ModelVersionPublic]:
    return [
        registry.public_version(session, v)
        for v in registry.list_versions(session, name=name, stage=stage)
    ]


class ModelHealth(BaseModel):
    """A model's versions' health over a window ending now, and its rollouts' milestones."""

    name: str
    since: dt.datetime
    until: dt.datetime
    bucket_s: float
    versions: list[VersionHealth]
    markers: list[RolloutEvent]
    """The window's changes of rollouts of the model's bundles that start a wave or end
    the rollout (create, passed, advance, resume, rollback, rolled_back, complete, abort),
    oldest first, 200 at most."""


_MARKED = ("create", "passed", "advance", "resume", "rollback", "rolled_back", "complete", "abort")


@router.get("/{name}/health", responses=errors(404))
def health(
    name: Name,
    session: SessionDep,
    _: Viewer,
    window_s: Annotated[int, Query(ge=60, le=31 * 24 * 3600)] = 3600,
    buckets: Annotated[int, Query(ge=1, le=500)] = 60,
) -> ModelHealth:
    """Error rate, p50/p95 latency, fallback rate and shadow agreement per version of the
    model over the last ``window_s`` seconds, in ``buckets`` slices (fleet clock)."""
    found = registry.list_versions(session, name=name)
    if not found:
        raise NotFoundError(f"no model {name!r} in the registry")
    version_of = {v.id: v.version for v in found}
    bundles = session.exec(
        select(Bundle).where(col(Bundle.model_version_id).in_(list(version_of)))
    ).all()
    until = utcnow()
    since = until - dt.timedelta(seconds=window_s)
    versions = {b.bundle_name: version_of[b.model_version_id] for b in bundles}
    touched = session.exec(
        select(Rollout.id).where(
            col(Rollout.bundle_id).in_([b.id for b in bundles]), col(Rollout.updated_at) >= since
        )
    ).all()
    series = (
        health_series(session, versions=versions, since=since, until=until, buckets=buckets)
        if versions
        else []
    )
    return ModelHealth(
        name=name,
        since=since,
        until=until,
        bucket_s=window_s / buckets,
        versions=series,
        markers=rollout_history(session, touched, since=since, actions=_MARKED),
    )


_WINDOW_S = Annotated[
    int, Query(ge=3600, le=31 * 24 * 3600, description="seconds, rounded up to whole hours")
]


@router.get("/{name}/versions/{version}/drift", responses=errors(404))
def drift(
    name: Name,
    version: Version,
    session: SessionDep,
    server: ServerDep,
    _: Viewer,
    window_s: _WINDOW_S = 24 * 3600,
) -> DriftReport:
    """The version's input and output drift per cohort (device tag) and overall, against
    the reference profile its bundles carry, with the thresholds and each verdict
    (docs/model-health.md)."""
    found = registry.get_version(session, name=name, version=version)
    return drift_report(
        session,
        version=found,
        thresholds=server.settings.drift_thresholds,
        until=utcnow(),
        window_s=window_s,
    )


@router.get("/{name}/versions/{version}/accuracy", responses=errors(404))
def accuracy(
    name: Name,
    version: Version,
    session: SessionDep,
    _: Viewer,
    window_s: _WINDOW_S = 24 * 3600,
) -> AccuracyReport:
    """The version's live accuracy per cohort and overall, from the ground truth devices
    reported, with 95 % Wilson intervals (docs/model-health.md)."""
    found = registry.get_version(session, name=name, version=version)
    return accuracy_report(session, version=found, until=utcnow(), window_s=window_s)


@router.put("/{name}/versions/{version}/stage", responses=errors(400, 404))
def set_stage(
    name: Name, version: Version, change: StageChange, session: SessionDep, who: Operator
) -> ModelVersionPublic:
    found = registry.get_version(session, name=name, version=version)
    registry.set_stage(session, version=found, stage=change.stage, actor=who.name)
    session.commit()
    return registry.public_version(session, found)


@router.post(
    "/{name}/versions/{version}/bundles",
    status_code=201,
    responses=errors(400, 404, 409),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "the .efb file (edgefleet ota bundle), at most max_bundle_bytes",
        }
    },
)
async def attach_bundle(
    name: Name,
    version: Version,
    request: Request,
    server: ServerDep,
    session: SessionDep,
    who: Operator,
) -> BundlePublic:
    """Upload a ``.efb`` (the raw request body); it is verified and signed for devices.

    The body is streamed to disk; the body limit (``max_bundle_bytes``) bounds it."""
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
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=".efb")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
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
