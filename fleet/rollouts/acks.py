"""Devices' acks: how each one moves its command and its place in a rollout."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from contracts.mqtt import Ack, AckState, CommandKind

from ..models import CommandRecord, RolloutDevice, RolloutDeviceState, utcnow

__all__ = ["handle_acks"]


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


def handle_acks(session: Session, acks: Sequence[tuple[str, Ack]]) -> int:
    """Record devices' progress on commands, in arrival order; returns how many acks were
    final answers to commands the fleet knows (those can move a rollout on).

    Two queries for the whole batch, however many acks: at 10,000 devices a wave's acks
    arrive by the thousand.
    """
    ids = {ack.command for _, ack in acks}
    commands = {
        c.id: c for c in session.exec(select(CommandRecord).where(col(CommandRecord.id).in_(ids)))
    }
    members = {
        m.command_id: m
        for m in session.exec(select(RolloutDevice).where(col(RolloutDevice.command_id).in_(ids)))
    }
    final = 0
    now = utcnow()
    for device_id, ack in acks:
        command = commands.get(ack.command)
        if command is None or command.device_id != device_id:
            continue  # unknown, or another device's command id: ignored
        command.last_ack = ack.state.value
        command.updated_at = now
        session.add(command)
        final += ack.state.final
        member = members.get(command.id)
        if member is None or member.device_id != device_id:
            continue  # not a rollout's, or the device has since been given another command
        _apply_ack(member, CommandKind(command.kind), ack)
        member.updated_at = now
        session.add(member)
    return final


def _apply_ack(member: RolloutDevice, kind: CommandKind, ack: Ack) -> None:
    """A rollback's (or shadow stop's) outcome ends the member there; a deploy's acks move
    it forward, and once it is healthy or failed only another final ack changes that."""
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
    member.detail = ack.detail
