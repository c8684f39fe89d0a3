"""Devices as operators look them up: filtered pages, the fleet at a glance, one device's
history.

Every filter runs in SQL, so a page of a 10,000-device fleet costs two queries (the page
and its count). Tags are a JSON list per device; a tag is matched as its quoted JSON string
in the column's text (``"lab"``), which is exact because a tag holds no quote or backslash
(``contracts.ids.TAG``), and reads the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import String, cast, func
from sqlmodel import Session, col, select

from .models import (
    AuditEntry,
    Bundle,
    CommandRecord,
    Device,
    DeviceState,
    Rollout,
    RolloutDevice,
)

__all__ = [
    "DeviceAuditEntry",
    "DeviceCommandEntry",
    "DeviceFilter",
    "DeviceHistory",
    "DeviceRolloutEntry",
    "DeviceSummary",
    "device_history",
    "device_summary",
    "find_devices",
]

_MAX_FACETS = 500
"""Values listed per facet of the summary, the most common first."""


@dataclass(frozen=True)
class DeviceFilter:
    """Devices matching every field given (``None``: any)."""

    profile: str | None = None
    tags: Sequence[str] = ()
    """Every one of these."""
    bundle: str | None = None
    """``NAME-VERSION`` the device reports serving."""
    online: bool | None = None
    agent_state: str | None = None
    """The updater's state the device last reported (``idle``, ``downloading`` ...)."""
    state: DeviceState | None = None
    id_contains: str | None = None


def find_devices(
    session: Session, where: DeviceFilter, *, limit: int, offset: int
) -> tuple[list[Device], int]:
    """One page of the matching devices by id, and how many match in all."""
    conditions: list[Any] = []
    if where.profile is not None:
        conditions.append(col(Device.profile) == where.profile)
    if where.bundle is not None:
        conditions.append(col(Device.bundle) == where.bundle)
    if where.online is not None:
        conditions.append(col(Device.online) == where.online)
    if where.agent_state is not None:
        conditions.append(col(Device.agent_state) == where.agent_state)
    if where.state is not None:
        conditions.append(col(Device.state) == where.state)
    if where.id_contains:
        conditions.append(col(Device.id).contains(where.id_contains, autoescape=True))
    tags_text = cast(col(Device.tags), String)
    conditions += [tags_text.contains(f'"{tag}"', autoescape=True) for tag in where.tags]
    total = session.exec(select(func.count()).select_from(Device).where(*conditions)).one()
    page = session.exec(
        select(Device).where(*conditions).order_by(col(Device.id)).offset(offset).limit(limit)
    ).all()
    return list(page), int(total)


class DeviceSummary(BaseModel):
    """The fleet at a glance, and the values each filter can take, with their counts (the
    most common first, at most 500 each)."""

    total: int
    online: int
    revoked: int
    profiles: dict[str, int]
    bundles: dict[str, int]
    agent_states: dict[str, int]
    tags: dict[str, int]


def device_summary(session: Session) -> DeviceSummary:
    def facet(column: Any) -> dict[str, int]:
        rows = session.exec(
            select(column, func.count())
            .where(column.is_not(None))
            .group_by(column)
            .order_by(func.count().desc(), column)
            .limit(_MAX_FACETS)
        ).all()
        return {str(value): int(count) for value, count in rows}

    tags: Counter[str] = Counter()
    for device_tags in session.exec(select(Device.tags)):
        tags.update(set(device_tags))
    online = col(Device.online).is_(True)
    revoked = col(Device.state) == DeviceState.REVOKED
    return DeviceSummary(
        total=session.exec(select(func.count()).select_from(Device)).one(),
        online=session.exec(select(func.count()).select_from(Device).where(online)).one(),
        revoked=session.exec(select(func.count()).select_from(Device).where(revoked)).one(),
        profiles=facet(col(Device.profile)),
        bundles=facet(col(Device.bundle)),
        agent_states=facet(col(Device.agent_state)),
        tags=dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_FACETS]),
    )


class DeviceRolloutEntry(BaseModel):
    """The device's place in one rollout: how far it got, and why it failed if it did."""

    rollout_id: str
    rollout_state: str
    bundle: str | None
    wave: int
    state: str
    last_ack: str | None
    detail: str
    commanded_at: dt.datetime | None
    updated_at: dt.datetime


class DeviceCommandEntry(BaseModel):
    id: str
    kind: str
    rollout_id: str | None
    bundle: str | None
    """``NAME-VERSION`` the command named."""
    last_ack: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class DeviceAuditEntry(BaseModel):
    """Who did what to the device (enrolled, tagged, revoked); the records before and
    after stay in the audit log, which only admins read."""

    id: int
    at: dt.datetime
    actor: str
    action: str


class DeviceHistory(BaseModel):
    """The latest of each, newest first."""

    rollouts: list[DeviceRolloutEntry]
    commands: list[DeviceCommandEntry]
    audit: list[DeviceAuditEntry]


def device_history(session: Session, device_id: str, *, limit: int) -> DeviceHistory:
    """The device's rollouts, the commands it was sent and the audit entries about it."""
    memberships = session.exec(
        select(RolloutDevice, Rollout, Bundle)
        .join(Rollout, col(Rollout.id) == RolloutDevice.rollout_id)
        .join(Bundle, col(Bundle.id) == Rollout.bundle_id, isouter=True)
        .where(RolloutDevice.device_id == device_id)
        .order_by(col(Rollout.created_at).desc())
        .limit(limit)
    ).all()
    commands = session.exec(
        select(CommandRecord)
        .where(CommandRecord.device_id == device_id)
        .order_by(col(CommandRecord.created_at).desc())
        .limit(limit)
    ).all()
    audit = session.exec(
        select(AuditEntry)
        .where(AuditEntry.target == f"device:{device_id}")
        .order_by(col(AuditEntry.id).desc())
        .limit(limit)
    ).all()
    return DeviceHistory(
        rollouts=[
            DeviceRolloutEntry(
                rollout_id=member.rollout_id,
                rollout_state=rollout.state.value,
                bundle=bundle.bundle_name if bundle else None,
                wave=member.wave,
                state=member.state.value,
                last_ack=member.last_ack,
                detail=member.detail,
                commanded_at=member.commanded_at,
                updated_at=member.updated_at,
            )
            for member, rollout, bundle in memberships
        ],
        commands=[
            DeviceCommandEntry(
                id=command.id,
                kind=command.kind,
                rollout_id=command.rollout_id,
                bundle=_bundle_of(command.payload),
                last_ack=command.last_ack,
                created_at=command.created_at,
                updated_at=command.updated_at,
            )
            for command in commands
        ],
        audit=[
            DeviceAuditEntry(id=entry.id or 0, at=entry.at, actor=entry.actor, action=entry.action)
            for entry in audit
        ],
    )


def _bundle_of(payload: dict[str, Any]) -> str | None:
    bundle = payload.get("bundle")
    if not isinstance(bundle, dict) or "name" not in bundle or "version" not in bundle:
        return None
    return f"{bundle['name']}-{bundle['version']}"
