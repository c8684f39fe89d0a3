"""``/api/v1/rollouts``: create, inspect and steer staged rollouts."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlmodel import col, select

from .. import rollouts
from ..bounds import MAX_ROW_ID, Name, Text
from ..models import (
    Bundle,
    ModelVersion,
    Rollout,
    RolloutCreate,
    RolloutDevice,
    RolloutDeviceState,
    RolloutPublic,
    RolloutState,
)
from ..rollouts.public import RolloutEvent, RolloutProgress, rollout_history, rollout_progress
from ..rollouts.waves import plan_rollout
from .deps import Operator, ServerDep, SessionDep, Viewer
from .responses import errors

router = APIRouter(prefix="/rollouts", tags=["rollouts"], responses=errors(401, 403))

Action = Literal["pause", "resume", "advance", "abort", "rollback"]


class ActionRequest(BaseModel):
    reason: Text = ""
    """Goes into the rollout's reason and the audit log."""


class RolloutDevicePublic(BaseModel):
    device_id: str
    wave: int
    state: str
    last_ack: str | None
    detail: str


class WavePreview(BaseModel):
    wave: int
    label: str
    devices: int
    sample: list[str]
    """The wave's first device ids in the order they are ranked, at most 100."""


class RolloutPreview(BaseModel):
    """Who would land in each wave. Nothing is stored; ``POST /rollouts`` with the same
    body and this ``id`` creates the rollout with exactly these waves."""

    id: str
    bundle_id: int
    profile: str
    selected: int
    """Active devices of the profile carrying every tag asked for."""
    unassigned: int
    """Selected devices that no wave takes."""
    waves: list[WavePreview]


_SAMPLE = 100


@router.post("/preview", responses=errors(400, 404, 409))
def preview(data: RolloutCreate, session: SessionDep, _: Operator) -> RolloutPreview:
    """A dry run of ``POST /rollouts``: the same selection, wave assignment and refusals
    (an unknown cohort, no device selected), nothing written."""
    plan = plan_rollout(session, data)
    return RolloutPreview(
        id=plan.rollout_id,
        bundle_id=plan.bundle.id or 0,
        profile=plan.profile,
        selected=plan.selected,
        unassigned=plan.unassigned,
        waves=[
            WavePreview(
                wave=i, label=label, devices=len(members), sample=[d.id for d in members[:_SAMPLE]]
            )
            for i, (label, members) in enumerate(zip(data.waves, plan.waves, strict=True))
        ],
    )


@router.post("", status_code=201, responses=errors(400, 404, 409))
def create(
    data: RolloutCreate, server: ServerDep, session: SessionDep, who: Operator
) -> RolloutPublic:
    rollout = rollouts.create_rollout(session, data=data, actor=who.name)
    session.commit()
    server.rollouts.wake()
    return rollouts.public_rollout(session, rollout)


@router.get("")
def list_rollouts(
    session: SessionDep,
    _: Viewer,
    state: RolloutState | None = None,
    model: Name | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RolloutPublic]:
    """The latest rollouts first; ``model``: only those of that model's bundles."""
    query = select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit)
    if state is not None:
        query = query.where(Rollout.state == state)
    if model is not None:
        query = (
            query.join(Bundle, col(Bundle.id) == col(Rollout.bundle_id))
            .join(ModelVersion, col(ModelVersion.id) == col(Bundle.model_version_id))
            .where(ModelVersion.name == model)
        )
    return [rollouts.public_rollout(session, r) for r in session.exec(query)]


@router.get("/{rollout_id}", responses=errors(404))
def get(rollout_id: Name, session: SessionDep, _: Viewer) -> RolloutPublic:
    return rollouts.public_rollout(session, rollouts.get_rollout(session, rollout_id))


@router.get("/{rollout_id}/progress", responses=errors(404))
def progress(rollout_id: Name, session: SessionDep, _: Viewer) -> RolloutProgress:
    """Each wave's devices by where they stand (pending, commanded, downloading,
    installed, healthy, failed, rolling back, rolled back) and the current wave's clock."""
    return rollout_progress(session, rollouts.get_rollout(session, rollout_id))


@router.get("/{rollout_id}/history", responses=errors(404))
def history(
    rollout_id: Name,
    session: SessionDep,
    _: Viewer,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[RolloutEvent]:
    """Its latest changes, oldest first, each with the reason it had then: a rollback's
    cause stays here after the rollout's own ``reason`` moved on."""
    rollouts.get_rollout(session, rollout_id)
    return rollout_history(session, [rollout_id], limit=limit)


@router.get("/{rollout_id}/devices", responses=errors(404))
def devices(
    rollout_id: Name,
    session: SessionDep,
    _: Viewer,
    wave: Annotated[int | None, Query(ge=0, le=99)] = None,
    state: RolloutDeviceState | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
) -> list[RolloutDevicePublic]:
    """Its devices by wave and rank, of one wave or state if asked."""
    rollouts.get_rollout(session, rollout_id)
    query = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
    if wave is not None:
        query = query.where(RolloutDevice.wave == wave)
    if state is not None:
        query = query.where(RolloutDevice.state == state)
    rows = session.exec(
        query.order_by(col(RolloutDevice.wave), col(RolloutDevice.rank)).offset(offset).limit(limit)
    ).all()
    return [
        RolloutDevicePublic(
            device_id=r.device_id,
            wave=r.wave,
            state=r.state.value,
            last_ack=r.last_ack,
            detail=r.detail,
        )
        for r in rows
    ]


@router.post("/{rollout_id}/{action}", responses=errors(400, 404, 409))
def act(
    rollout_id: Name,
    action: Action,
    server: ServerDep,
    session: SessionDep,
    who: Operator,
    request: ActionRequest | None = None,
) -> RolloutPublic:
    """pause, resume, advance (next wave now, past a held or failed gate), abort, rollback."""
    rollout = rollouts.get_rollout(session, rollout_id, for_update=True)
    reason = request.reason if request and request.reason else f"{action} by {who.name}"
    rollouts.apply_event(session, rollout, rollouts.Event(action), actor=who.name, reason=reason)
    session.commit()
    server.rollouts.wake()
    return rollouts.public_rollout(session, rollout)
