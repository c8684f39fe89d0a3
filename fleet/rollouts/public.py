"""Rollouts as the API shows them."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, col, select

from ..errors import NotFoundError
from ..models import Gate, Rollout, RolloutDevice, RolloutDeviceState, RolloutPublic

__all__ = ["get_rollout", "public_rollout"]


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return rollout


def public_rollout(session: Session, rollout: Rollout) -> RolloutPublic:
    """The rollout with its gate and last verdict typed, and its devices counted per wave
    and state."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.exec(
        select(RolloutDevice.wave, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout.id)
        .group_by(col(RolloutDevice.wave), col(RolloutDevice.state))
    )
    for wave, state, count in rows:
        counts.setdefault(str(wave), {})[RolloutDeviceState(state).value] = count
    return RolloutPublic.model_validate(
        rollout, update={"gate": Gate.model_validate(rollout.gate), "devices": counts}
    )
