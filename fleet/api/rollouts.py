"""``/api/v1/rollouts``: create, inspect and steer staged rollouts."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlmodel import col, select

from .. import rollouts
from ..bounds import Name, Text
from ..models import Rollout, RolloutCreate, RolloutDevice, RolloutPublic
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


@router.post("", status_code=201, responses=errors(400, 404))
def create(
    data: RolloutCreate, server: ServerDep, session: SessionDep, who: Operator
) -> RolloutPublic:
    rollout = rollouts.create_rollout(session, data=data, actor=who.name)
    session.commit()
    server.rollouts.wake()
    return rollouts.public_rollout(session, rollout)


@router.get("")
def list_rollouts(session: SessionDep, _: Viewer) -> list[RolloutPublic]:
    found = session.exec(select(Rollout).order_by(col(Rollout.created_at).desc())).all()
    return [rollouts.public_rollout(session, r) for r in found]


@router.get("/{rollout_id}", responses=errors(404))
def get(rollout_id: Name, session: SessionDep, _: Viewer) -> RolloutPublic:
    return rollouts.public_rollout(session, rollouts.get_rollout(session, rollout_id))


@router.get("/{rollout_id}/devices", responses=errors(404))
def devices(rollout_id: Name, session: SessionDep, _: Viewer) -> list[RolloutDevicePublic]:
    rollouts.get_rollout(session, rollout_id)
    rows = session.exec(
        select(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id)
        .order_by(col(RolloutDevice.wave), col(RolloutDevice.rank))
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
    rollout = rollouts.get_rollout(session, rollout_id)
    reason = request.reason if request and request.reason else f"{action} by {who.name}"
    rollouts.apply_event(session, rollout, rollouts.Event(action), actor=who.name, reason=reason)
    session.commit()
    server.rollouts.wake()
    return rollouts.public_rollout(session, rollout)
