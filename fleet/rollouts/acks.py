"""Devices' acks and statuses: how each moves a command and the device's place in a rollout.

An ack can be lost (the fleet's session was gone when the device sent it), so a member is
also finished from its device's status: the last command the device finished and how, or,
from a device that does not say, the bundle it serves with its updater idle
(:func:`reconcile_statuses`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, or_, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, SQLModel, col, select

from contracts.bounded import DETAIL_MAX_CHARS
from contracts.mqtt import UPDATER_IDLE, Ack, AckState, CommandKind, Status

from ..models import CommandRecord, RolloutDevice, RolloutDeviceState, utcnow

__all__ = ["handle_acks", "lock_answered", "reconcile_statuses"]


_ACK_TO_STATE = {
    AckState.DOWNLOADING: RolloutDeviceState.IN_PROGRESS,
    AckState.VERIFIED: RolloutDeviceState.IN_PROGRESS,
    AckState.INSTALLED: RolloutDeviceState.IN_PROGRESS,
    AckState.HEALTHY: RolloutDeviceState.HEALTHY,
    AckState.FAILED: RolloutDeviceState.FAILED,
    AckState.ROLLED_BACK: RolloutDeviceState.FAILED,
}
"""A deploy command's acks. ``rolled_back`` here means the device's own health check
failed and it went back by itself: for the rollout, a failure."""
_UNFINISHED = (
    RolloutDeviceState.COMMANDED,
    RolloutDeviceState.IN_PROGRESS,
    RolloutDeviceState.ROLLING_BACK,
)
_SERVING_MEANS = {CommandKind.DEPLOY: AckState.HEALTHY, CommandKind.ROLLBACK: AckState.ROLLED_BACK}
"""What a device idle and serving a command's bundle says of that command."""


def lock_answered(
    session: Session, *, device_ids: Collection[str], command_ids: Collection[str]
) -> None:
    """Lock (PostgreSQL), in one statement and in id order, every command that these acks
    name or that these devices' statuses may finish. Replicas split a device's answers
    between them; taking the locks in one order, first, keeps two replicas' batches from
    deadlocking on each other's rows in :func:`reconcile_statuses` and :func:`handle_acks`.
    SQLite has no row locks (``FOR UPDATE`` is not even rendered) and one writer at a
    time: there the query would only read, so it is not run."""
    if session.get_bind().dialect.name == "sqlite":
        return
    unfinished = select(RolloutDevice.command_id).where(
        col(RolloutDevice.device_id).in_(device_ids),
        col(RolloutDevice.state).in_(_UNFINISHED),
    )
    session.exec(
        select(CommandRecord.id)
        .where(or_(col(CommandRecord.id).in_(command_ids), col(CommandRecord.id).in_(unfinished)))
        .order_by(col(CommandRecord.id))
        .with_for_update()
    ).all()


@dataclass
class _Member:
    """A rollout member's row as a batch of answers finds it, and leaves it."""

    rollout_id: str
    device_id: str
    state: RolloutDeviceState
    detail: str
    last_ack: str | None

    @classmethod
    def of(cls, row: Row[*tuple[Any, ...]]) -> _Member:
        """From a row with :data:`_MEMBER_COLUMNS`."""
        return cls(row.rollout_id, row.device_id, row.state, row.detail, row.last_ack)


_MEMBER_COLUMNS = (
    col(RolloutDevice.rollout_id),
    col(RolloutDevice.device_id),
    col(RolloutDevice.state),
    col(RolloutDevice.detail),
    col(RolloutDevice.last_ack),
)


def handle_acks(session: Session, acks: Sequence[tuple[str, Ack]]) -> int:
    """Record devices' progress on commands, in arrival order; returns how many acks were
    final answers to commands the fleet knows (those can move a rollout on).

    Set-based, however many acks (at 10,000 devices a wave's acks arrive by the
    thousand): one query reads the commands they name, one their members, both locking
    their rows (PostgreSQL: replicas split a device's acks between them, and a final ack
    must not be overwritten by an earlier progress ack another replica read before it
    landed; :func:`lock_answered` takes the locks first, in one order); each row's acks
    are folded in order in memory, and each table is written with one ``executemany``.
    """
    ids = {ack.command for _, ack in acks}
    commands = {
        command: (device_id, CommandKind(kind))
        for command, device_id, kind in session.connection().execute(
            sa_select(col(CommandRecord.id), col(CommandRecord.device_id), col(CommandRecord.kind))
            .where(col(CommandRecord.id).in_(ids))
            .order_by(col(CommandRecord.id))
            .with_for_update()
        )
    }
    members = {
        row.command_id: _Member.of(row)
        for row in session.connection().execute(
            sa_select(col(RolloutDevice.command_id), *_MEMBER_COLUMNS)
            .where(col(RolloutDevice.command_id).in_(ids))
            .order_by(col(RolloutDevice.rollout_id), col(RolloutDevice.device_id))
            .with_for_update()
        )
    }
    final = 0
    acked: dict[str, str] = {}
    moved: dict[str, _Member] = {}
    for device_id, ack in acks:
        command = commands.get(ack.command)
        if command is None or command[0] != device_id:
            continue  # unknown, or another device's command id: ignored
        acked[ack.command] = ack.state.value
        final += ack.state.final
        member = members.get(ack.command)
        if member is None or member.device_id != device_id:
            continue  # not a rollout's, or the device has since been given another command
        _apply_ack(member, command[1], ack)
        moved[ack.command] = member
    _store(session, acked, moved.values())
    return final


def reconcile_statuses(session: Session, statuses: Sequence[tuple[str, Status]]) -> int:
    """Finish the unfinished rollout members of devices whose status shows their command
    done, as the lost final ack would have; returns how many it finished.

    A status finishes its device's member when it names the member's command as the last
    one finished (with that command's final ack state), or when the command is a deploy
    or a rollback, the device's updater is idle and it serves the command's bundle. Give
    only active devices' online statuses; the last of each device counts. One query
    reads (and locks) the unfinished members with their commands; each table is written
    with one ``executemany``.
    """
    latest = {device_id: status for device_id, status in statuses}
    rows = (
        session.connection()
        .execute(
            sa_select(
                col(CommandRecord.id).label("command"),
                col(CommandRecord.device_id).label("commanded"),
                col(CommandRecord.kind),
                col(CommandRecord.payload),
                *_MEMBER_COLUMNS,
            )
            .join(RolloutDevice, col(CommandRecord.id) == RolloutDevice.command_id)
            .where(
                col(RolloutDevice.device_id).in_(latest),
                col(RolloutDevice.state).in_(_UNFINISHED),
            )
            .order_by(col(CommandRecord.id))
            .with_for_update()
        )
        .all()
    )
    acked: dict[str, str] = {}
    moved: list[_Member] = []
    for row in rows:
        member = _Member.of(row)
        if row.commanded != member.device_id:
            continue
        kind = CommandKind(row.kind)
        ack = _ack_from_status(row.command, kind, row.payload, latest[member.device_id])
        if ack is None:
            continue
        acked[row.command] = ack.state.value
        _apply_ack(member, kind, ack)
        moved.append(member)
    _store(session, acked, moved)
    return sum(member.state not in _UNFINISHED for member in moved)


def _store(session: Session, acked: Mapping[str, str], moved: Iterable[_Member]) -> None:
    """Write what a batch of answers changed: each command's last ack, each member's
    place, one ``executemany`` (an UPDATE by primary key) per table."""
    now = utcnow()
    connection = session.connection()
    if acked:
        commands = _table(CommandRecord)
        connection.execute(
            update(commands)
            .where(commands.c.id == bindparam("b_id"))
            .values(last_ack=bindparam("b_last_ack"), updated_at=now),
            [{"b_id": command, "b_last_ack": state} for command, state in acked.items()],
        )
    members = [
        {
            "b_rollout_id": m.rollout_id,
            "b_device_id": m.device_id,
            "b_state": m.state,
            "b_detail": m.detail,
            "b_last_ack": m.last_ack,
        }
        for m in moved
    ]
    if members:
        table = _table(RolloutDevice)
        connection.execute(
            update(table)
            .where(
                table.c.rollout_id == bindparam("b_rollout_id"),
                table.c.device_id == bindparam("b_device_id"),
            )
            .values(
                state=bindparam("b_state"),
                detail=bindparam("b_detail"),
                last_ack=bindparam("b_last_ack"),
                updated_at=now,
            ),
            members,
        )


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


def _ack_from_status(
    command: str, kind: CommandKind, payload: Mapping[str, Any], status: Status
) -> Ack | None:
    """The final ack ``status`` vouches for, or ``None`` if it shows ``command`` (of
    ``kind``, stored as ``payload``) unfinished."""
    if status.last_command == command and status.last_command_state is not None:
        state = status.last_command_state
        detail = f"from the device's status: it finished this command {state}"
    else:
        serving = _SERVING_MEANS.get(kind)
        ref = payload.get("bundle")
        bundle = f"{ref.get('name')}-{ref.get('version')}" if isinstance(ref, dict) else None
        if serving is None or status.state != UPDATER_IDLE or status.bundle != bundle:
            return None
        state = serving
        detail = f"from the device's status: it serves {bundle} and has no update in progress"
    return Ack(
        command=command,
        state=state,
        detail=detail,
        bundle_version=status.bundle,
        ts=status.ts or time.time(),
    )


_THEN = "; then "
"""Joins the reason a device failed and what a rollback did after it, in a member's detail."""


def _apply_ack(member: _Member, kind: CommandKind, ack: Ack) -> None:
    """A rollback's (or shadow stop's) outcome ends the member there; a deploy's acks move
    it forward, and once it is healthy or failed only another final ack changes that."""
    failed_before = member.state == RolloutDeviceState.FAILED or _THEN in member.detail
    why_it_failed = member.detail.split(_THEN, 1)[0] if failed_before else ""
    if kind in (CommandKind.ROLLBACK, CommandKind.SHADOW_STOP):
        if ack.state in (AckState.ROLLED_BACK, AckState.HEALTHY):
            member.state = RolloutDeviceState.ROLLED_BACK
        elif ack.state == AckState.FAILED:
            member.state = RolloutDeviceState.FAILED
    elif (
        member.state not in (RolloutDeviceState.HEALTHY, RolloutDeviceState.FAILED)
        or ack.state.final
    ):
        member.state = _ACK_TO_STATE[ack.state]
    member.last_ack = ack.state.value
    member.detail = _kept_detail(why_it_failed, kind, ack)


def _kept_detail(why_it_failed: str, kind: CommandKind, ack: Ack) -> str:
    """The member's reason after ``ack``: a rollback's answer is added to the reason a
    device gave for failing, never put in its place."""
    if kind not in (CommandKind.ROLLBACK, CommandKind.SHADOW_STOP) or not why_it_failed:
        return ack.detail
    after = f"{ack.state.value}: {ack.detail}" if ack.detail else ack.state.value
    return f"{why_it_failed}{_THEN}{after}"[:DETAIL_MAX_CHARS]
