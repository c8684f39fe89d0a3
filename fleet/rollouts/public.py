"""Rollouts as the API shows them: the rollout, its progress wave by wave, its history."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import Session, col, select

from ..errors import NotFoundError
from ..models import (
    AuditEntry,
    Bundle,
    Gate,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutPublic,
    RolloutState,
    utcnow,
)
from .transitions import operator_actions
from .waves import is_cohort

__all__ = [
    "RolloutBundle",
    "RolloutEvent",
    "RolloutProgress",
    "WaveProgress",
    "get_rollout",
    "public_rollout",
    "rollout_history",
    "rollout_progress",
]


def get_rollout(session: Session, rollout_id: str, *, for_update: bool = False) -> Rollout:
    """``for_update``: lock its row to the end of the transaction (PostgreSQL), as the
    engine does for its step, so a change and a step on two replicas queue."""
    rollout = session.get(Rollout, rollout_id, with_for_update=for_update)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return rollout


def public_rollout(session: Session, rollout: Rollout) -> RolloutPublic:
    """The rollout with its gate and last verdict typed, its devices counted per wave and
    state, and the operator actions its state allows."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.exec(
        select(RolloutDevice.wave, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout.id)
        .group_by(col(RolloutDevice.wave), col(RolloutDevice.state))
    )
    for wave, state, count in rows:
        counts.setdefault(str(wave), {})[RolloutDeviceState(state).value] = count
    return RolloutPublic.model_validate(
        rollout,
        update={
            "gate": Gate.model_validate(rollout.gate),
            "devices": counts,
            "actions": [event.value for event in operator_actions(rollout.state)],
        },
    )


class WaveProgress(BaseModel):
    """One wave's devices by where they stand. ``downloading`` and ``installed`` split the
    members in progress by their last ack (``downloading``/``verified``, ``installed``)."""

    wave: int
    """0-based, as ``RolloutPublic.wave``."""
    label: str
    """The wave as given: a cumulative percentage (``10``) or a cohort tag (``canary``)."""
    cohort: bool
    members: int = 0
    pending: int = 0
    commanded: int = 0
    downloading: int = 0
    installed: int = 0
    healthy: int = 0
    failed: int = 0
    rolling_back: int = 0
    rolled_back: int = 0


class RolloutBundle(BaseModel):
    id: int
    name: str
    """``NAME-VERSION``, as devices report it."""
    model: str
    version: str
    profile: str
    runtime: str
    precision: str


class RolloutProgress(BaseModel):
    """Where a rollout stands now: every wave's devices and the current wave's clock."""

    id: str
    state: RolloutState
    wave: int
    bundle: RolloutBundle
    waves: list[WaveProgress]
    now: dt.datetime
    """The server's clock, to count down against."""
    wave_started_at: dt.datetime
    soak_started_at: dt.datetime | None
    soak_ends_at: dt.datetime | None
    """While soaking: when the soak is over and the full gate is judged."""
    deploy_timeout_s: float


class RolloutEvent(BaseModel):
    """One change of a rollout, from the audit log: what it became and why. Reasons are
    kept here after the rollout's own ``reason`` moved on (a rollback's cause, say)."""

    id: int
    rollout_id: str
    at: dt.datetime
    actor: str
    action: str
    """``create`` or the event applied (``pause``, ``passed``, ``rollback`` ...)."""
    state: str | None
    wave: int | None
    reason: str


_BY_STATE = {
    RolloutDeviceState.PENDING: "pending",
    RolloutDeviceState.COMMANDED: "commanded",
    RolloutDeviceState.HEALTHY: "healthy",
    RolloutDeviceState.FAILED: "failed",
    RolloutDeviceState.ROLLING_BACK: "rolling_back",
    RolloutDeviceState.ROLLED_BACK: "rolled_back",
}


def _progress_field(state: RolloutDeviceState, last_ack: str | None) -> str:
    if state is RolloutDeviceState.IN_PROGRESS:
        return "installed" if last_ack == "installed" else "downloading"
    return _BY_STATE[state]


def rollout_progress(session: Session, rollout: Rollout) -> RolloutProgress:
    """One aggregate query over the rollout's members, however many there are."""
    waves = [
        WaveProgress(wave=i, label=label, cohort=is_cohort(label))
        for i, label in enumerate(rollout.waves)
    ]
    rows = session.exec(
        select(RolloutDevice.wave, RolloutDevice.state, RolloutDevice.last_ack, func.count())
        .where(RolloutDevice.rollout_id == rollout.id)
        .group_by(col(RolloutDevice.wave), col(RolloutDevice.state), col(RolloutDevice.last_ack))
    )
    for wave, state, last_ack, count in rows:
        if not 0 <= wave < len(waves):
            continue
        progress = waves[wave]
        name = _progress_field(RolloutDeviceState(state), last_ack)
        setattr(progress, name, getattr(progress, name) + count)
        progress.members += count
    found = session.exec(
        select(Bundle, ModelVersion)
        .join(ModelVersion, col(ModelVersion.id) == Bundle.model_version_id)
        .where(Bundle.id == rollout.bundle_id)
    ).first()
    if found is None:
        raise NotFoundError(f"bundle {rollout.bundle_id} of rollout {rollout.id} is gone")
    bundle, version = found
    gate = Gate.model_validate(rollout.gate)
    soak_ends_at = None
    if rollout.state is RolloutState.SOAKING and rollout.soak_started_at is not None:
        soak_ends_at = _aware(rollout.soak_started_at) + dt.timedelta(seconds=gate.soak_s)
    return RolloutProgress(
        id=rollout.id,
        state=rollout.state,
        wave=rollout.wave,
        bundle=RolloutBundle(
            id=bundle.id or 0,
            name=bundle.bundle_name,
            model=version.name,
            version=version.version,
            profile=bundle.profile,
            runtime=bundle.runtime,
            precision=bundle.precision,
        ),
        waves=waves,
        now=utcnow(),
        wave_started_at=_aware(rollout.wave_started_at),
        soak_started_at=rollout.soak_started_at and _aware(rollout.soak_started_at),
        soak_ends_at=soak_ends_at,
        deploy_timeout_s=gate.deploy_timeout_s,
    )


def rollout_history(
    session: Session,
    rollout_ids: Sequence[str],
    *,
    since: dt.datetime | None = None,
    actions: Sequence[str] | None = None,
    limit: int = 200,
) -> list[RolloutEvent]:
    """The latest ``limit`` changes of these rollouts (since ``since``; of these
    ``actions`` only), oldest first."""
    query = select(AuditEntry).where(
        col(AuditEntry.target).in_([f"rollout:{r}" for r in rollout_ids])
    )
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    if actions is not None:
        query = query.where(col(AuditEntry.action).in_([f"rollout.{a}" for a in actions]))
    entries = session.exec(query.order_by(col(AuditEntry.id).desc()).limit(limit)).all()
    return [_event(entry) for entry in reversed(entries)]


def _event(entry: AuditEntry) -> RolloutEvent:
    after = entry.after or {}
    wave = after.get("wave")
    return RolloutEvent(
        id=entry.id or 0,
        rollout_id=entry.target.removeprefix("rollout:"),
        at=_aware(entry.at),
        actor=entry.actor,
        action=entry.action.removeprefix("rollout."),
        state=after.get("state"),
        wave=wave if isinstance(wave, int) else None,
        reason=str(after.get("reason") or ""),
    )


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
