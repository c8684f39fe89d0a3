"""Staged rollouts: a persisted state machine that walks a bundle through device waves.

Every transition is in ``TRANSITIONS``; :func:`apply_event` is the only place a rollout's
state changes, and it writes the audit entry in the same transaction. The engine
(:class:`RolloutEngine`) keeps nothing in memory: each tick reads the rollouts from the
database and moves them on, so a server killed mid-rollout resumes where it stopped.

```
 DEPLOYING --installed--> SOAKING --passed--> DEPLOYING (next wave)
     |                      |   \\--hold----> AWAITING_APPROVAL --advance--> DEPLOYING
     |                      |   \\--complete-> COMPLETED
     +--pause (gate failed or operator)--> PAUSED --resume--> DEPLOYING (same wave)
     +--rollback----------------------------> ROLLING_BACK --rolled_back--> ROLLED_BACK
     +--abort--> ABORTED
```

Waves are cumulative percentages of the selected devices (``1, 10, 50, 100``) or cohort
tags (``canary``: every selected device with that tag not already in an earlier wave).
Devices are ordered by ``sha256(rollout id : device id)``, so a wave's members are
deterministic and stay the same for the whole rollout, and differ between rollouts.
Commands carry ids derived from the rollout, the kind and the device, so a resend after a
crash is recognised by the device rather than acted on twice.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.mqtt import Ack, AckState, BundleRef, Command, CommandKind

from . import audit
from .db import session_scope
from .errors import InvalidTransitionError, NotFoundError, RequestError
from .models import (
    Bundle,
    CommandRecord,
    Device,
    DeviceState,
    Gate,
    Rollout,
    RolloutCreate,
    RolloutDevice,
    RolloutDeviceState,
    RolloutMode,
    RolloutPublic,
    RolloutState,
    utcnow,
)
from .telemetry import health_stats

__all__ = [
    "TRANSITIONS",
    "CommandSink",
    "Event",
    "RolloutEngine",
    "apply_event",
    "create_rollout",
    "get_rollout",
    "handle_acks",
    "public_rollout",
]

log = logging.getLogger(__name__)

CommandSink = Callable[[str, Command], None]
"""Sends one command to one device (the MQTT bridge's ``send``)."""


class Event(enum.StrEnum):
    INSTALLED = "installed"
    """Every device of the wave has answered (or timed out)."""
    PASSED = "passed"
    """The gate passed and the next wave starts on its own."""
    HOLD = "hold"
    """The gate passed; the next wave waits for an operator (``auto_advance`` off)."""
    COMPLETE = "complete"
    PAUSE = "pause"
    RESUME = "resume"
    ADVANCE = "advance"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    ABORT = "abort"


S = RolloutState
_ACTIVE = (S.DEPLOYING, S.SOAKING, S.AWAITING_APPROVAL, S.PAUSED)

TRANSITIONS: dict[tuple[RolloutState, Event], RolloutState] = {
    (S.DEPLOYING, Event.INSTALLED): S.SOAKING,
    (S.SOAKING, Event.PASSED): S.DEPLOYING,
    (S.SOAKING, Event.HOLD): S.AWAITING_APPROVAL,
    (S.SOAKING, Event.COMPLETE): S.COMPLETED,
    (S.AWAITING_APPROVAL, Event.ADVANCE): S.DEPLOYING,
    (S.PAUSED, Event.ADVANCE): S.DEPLOYING,
    (S.PAUSED, Event.RESUME): S.DEPLOYING,
    (S.ROLLING_BACK, Event.ROLLED_BACK): S.ROLLED_BACK,
    **{(state, Event.PAUSE): S.PAUSED for state in (S.DEPLOYING, S.SOAKING, S.AWAITING_APPROVAL)},
    **{(state, Event.ABORT): S.ABORTED for state in (*_ACTIVE, S.ROLLING_BACK)},
    **{(state, Event.ROLLBACK): S.ROLLING_BACK for state in (*_ACTIVE, S.COMPLETED)},
}
"""Every allowed (state, event) → next state. Terminal states have no way out except
rolling back a completed rollout."""

_NEXT_WAVE = {Event.PASSED, Event.ADVANCE}


# ---------------------------------------------------------------------------- creation


def create_rollout(session: Session, *, data: RolloutCreate, actor: str) -> Rollout:
    """Select the devices, order them into waves, persist everything, start wave 0."""
    bundle = session.get(Bundle, data.bundle_id)
    if bundle is None:
        raise NotFoundError(f"no bundle with id {data.bundle_id}")
    profile = data.profile or bundle.profile
    if profile != bundle.profile:
        raise RequestError(
            f"bundle {bundle.target_path} is built for {bundle.profile}, not {profile}"
        )
    if not data.waves:
        raise RequestError("a rollout needs at least one wave")
    _check_waves(data.waves)
    rollout = Rollout(
        id=f"r-{secrets.token_hex(6)}",
        bundle_id=bundle.id or 0,
        profile=profile,
        tags=data.tags,
        waves=data.waves,
        gate=data.gate.model_dump(),
        auto_advance=data.auto_advance,
        on_failure=data.on_failure,
        mode=data.mode,
        created_by=actor,
    )
    devices = [
        d
        for d in session.exec(
            select(Device).where(Device.profile == profile, Device.state == DeviceState.ACTIVE)
        )
        if set(data.tags) <= set(d.tags)
    ]
    if not devices:
        raise RequestError(
            f"no active device has profile {profile}"
            + (f" and tags {', '.join(data.tags)}" if data.tags else "")
        )
    bundle_ids = {
        b.bundle_name: b.id for b in session.exec(select(Bundle).where(Bundle.profile == profile))
    }
    session.add(rollout)
    session.flush()
    for device, wave in _assign_waves(rollout.id, devices, data.waves):
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device.id,
                wave=wave,
                rank=_rank(rollout.id, device.id),
                previous_bundle_id=bundle_ids.get(device.bundle or ""),
            )
        )
    audit.record(
        session,
        actor=actor,
        action="rollout.create",
        target=f"rollout:{rollout.id}",
        after=audit.snapshot(rollout),
    )
    return rollout


def _check_waves(waves: Sequence[str]) -> None:
    last = 0.0
    for wave in waves:
        try:
            percent = float(wave)
        except ValueError:
            continue  # a cohort tag
        if not last < percent <= 100:
            raise RequestError(
                f"wave {wave!r}: percentages must increase and lie in (0, 100], e.g. 1,10,50,100"
            )
        last = percent


def _rank(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def _assign_waves(
    rollout_id: str, devices: Sequence[Device], waves: Sequence[str]
) -> list[tuple[Device, int]]:
    remaining = sorted(devices, key=lambda d: _rank(rollout_id, d.id))
    assigned: list[tuple[Device, int]] = []
    for index, wave in enumerate(waves):
        try:
            percent = float(wave)
        except ValueError:
            members = [d for d in remaining if wave in d.tags]
        else:
            wanted = math.ceil(len(devices) * percent / 100) - len(assigned)
            members = remaining[: max(wanted, 0)]
        taken = {d.id for d in members}
        remaining = [d for d in remaining if d.id not in taken]
        assigned.extend((d, index) for d in members)
    return assigned


# ---------------------------------------------------------------------------- transitions


def apply_event(
    session: Session, rollout: Rollout, event: Event, *, actor: str, reason: str = ""
) -> None:
    """Move ``rollout`` along ``TRANSITIONS`` (or raise ``InvalidTransitionError``)."""
    target = TRANSITIONS.get((rollout.state, event))
    if target is None:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == rollout.state)
        raise InvalidTransitionError(
            f"rollout {rollout.id} is {rollout.state.value}: cannot {event.value} "
            f"(possible: {', '.join(allowed) or 'nothing, it has finished'})"
        )
    before = audit.snapshot(rollout)
    now = utcnow()
    if event in _NEXT_WAVE:
        rollout.wave += 1
    if target == S.DEPLOYING:
        rollout.wave_started_at = now
        rollout.soak_started_at = None
    if target == S.SOAKING:
        rollout.soak_started_at = now
    rollout.state = target
    rollout.reason = reason or f"{event.value} by {actor}"
    rollout.updated_at = now
    session.add(rollout)
    audit.record(
        session,
        actor=actor,
        action=f"rollout.{event.value}",
        target=f"rollout:{rollout.id}",
        before=before,
        after=audit.snapshot(rollout),
    )


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return rollout


def public_rollout(session: Session, rollout: Rollout) -> RolloutPublic:
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


# ---------------------------------------------------------------------------- acks


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


# ---------------------------------------------------------------------------- engine


class RolloutEngine:
    """Moves every active rollout on, once per tick, from what the database holds.

    ``urls`` gives the TUF metadata and targets base URLs put into deploy commands.
    Run it in one replica only (it is the single writer of rollout state).
    """

    def __init__(
        self,
        db: Engine,
        send: CommandSink,
        *,
        metadata_url: str,
        targets_url: str,
        tick_s: float = 1.0,
        health_window_s: float = 3600.0,
    ) -> None:
        self._db = db
        self._send = send
        self._metadata_url = metadata_url
        self._targets_url = targets_url
        self._tick_s = tick_s
        self._health_window = dt.timedelta(seconds=health_window_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.errors = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Tick now rather than at the next interval (an ack finished a device)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not stop every rollout for good
                self.errors += 1
                log.exception("rollout engine tick failed; retrying next tick")
            self._wake.wait(self._tick_s)
            self._wake.clear()

    def tick(self) -> None:
        with session_scope(self._db) as session:
            active = session.exec(
                select(Rollout.id).where(
                    col(Rollout.state).in_([S.DEPLOYING, S.SOAKING, S.ROLLING_BACK])
                )
            ).all()
        for rollout_id in active:
            with session_scope(self._db) as session:
                rollout = session.get(Rollout, rollout_id)
                if rollout is not None:
                    self._step(session, rollout)
        self.ticks += 1

    def _step(self, session: Session, rollout: Rollout) -> None:
        gate = Gate.model_validate(rollout.gate)
        if rollout.state == S.ROLLING_BACK:
            self._step_rolling_back(session, rollout, gate)
            return
        if rollout.wave >= len(rollout.waves):
            apply_event(session, rollout, Event.COMPLETE, actor="fleet", reason="no waves left")
            return
        counts = self._wave_counts(session, rollout)
        size = sum(counts.values())
        if not size:  # an empty wave (a cohort nobody carries, 1 % of few devices)
            self._gate_passed(session, rollout, f"wave {rollout.wave} has no devices; skipped")
            return
        if rollout.state == S.DEPLOYING:
            if counts[RolloutDeviceState.PENDING]:
                pending = self._members(session, rollout, RolloutDeviceState.PENDING)
                self._command(session, rollout, pending, _deploy_kind(rollout))
            if _elapsed(rollout.wave_started_at) >= gate.deploy_timeout_s:
                self._time_out_silent(session, rollout, gate.deploy_timeout_s)
            counts = self._wave_counts(session, rollout)
        failed = counts[RolloutDeviceState.FAILED] / size
        if failed > gate.max_failure_ratio:
            self._gate_failed(
                session,
                rollout,
                f"wave {rollout.wave}: {counts[RolloutDeviceState.FAILED]} of {size} "
                f"devices failed ({failed:.0%} > max {gate.max_failure_ratio:.0%})",
            )
            return
        if rollout.state == S.DEPLOYING:
            final = counts[RolloutDeviceState.HEALTHY] + counts[RolloutDeviceState.FAILED]
            if final == size:
                apply_event(
                    session,
                    rollout,
                    Event.INSTALLED,
                    actor="fleet",
                    reason=f"wave {rollout.wave}: {final} devices answered; soaking",
                )
            return
        assert rollout.soak_started_at is not None
        if _elapsed(rollout.soak_started_at) < gate.soak_s:
            return
        verdict = self._evaluate(session, rollout, gate, self._members(session, rollout))
        rollout.last_gate = verdict
        if verdict["waiting"]:
            if _elapsed(rollout.soak_started_at) > gate.soak_s + gate.deploy_timeout_s:
                self._gate_failed(session, rollout, f"wave {rollout.wave}: {verdict['waiting']}")
            return
        if verdict["failures"]:
            self._gate_failed(
                session, rollout, f"wave {rollout.wave}: " + "; ".join(verdict["failures"])
            )
        else:
            self._gate_passed(session, rollout, f"wave {rollout.wave} passed its gate")

    def _gate_passed(self, session: Session, rollout: Rollout, reason: str) -> None:
        if rollout.wave + 1 >= len(rollout.waves):
            event = Event.COMPLETE
        elif rollout.auto_advance:
            event = Event.PASSED
        else:
            event = Event.HOLD
        if rollout.state == S.DEPLOYING:  # an empty wave: installed at once
            apply_event(session, rollout, Event.INSTALLED, actor="fleet", reason=reason)
        apply_event(session, rollout, event, actor="fleet", reason=reason)

    def _gate_failed(self, session: Session, rollout: Rollout, reason: str) -> None:
        event = Event.ROLLBACK if rollout.on_failure == "rollback" else Event.PAUSE
        log.warning("rollout %s: gate failed (%s): %s", rollout.id, event.value, reason)
        apply_event(session, rollout, event, actor="fleet", reason=f"gate failed: {reason}")

    @staticmethod
    def _members(
        session: Session, rollout: Rollout, state: RolloutDeviceState | None = None
    ) -> list[RolloutDevice]:
        """The current wave's devices (in ``state`` only, when given)."""
        query = select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == rollout.wave
        )
        if state is not None:
            query = query.where(RolloutDevice.state == state)
        return list(session.exec(query))

    @staticmethod
    def _wave_counts(session: Session, rollout: Rollout) -> Counter[RolloutDeviceState]:
        """How many of the current wave's devices are in each state: one aggregate query,
        so a tick costs the same for a wave of 5 devices as for one of 5,000."""
        rows = session.exec(
            select(RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == rollout.wave)
            .group_by(col(RolloutDevice.state))
        ).all()
        return Counter({RolloutDeviceState(state): int(n) for state, n in rows})

    def _command(
        self,
        session: Session,
        rollout: Rollout,
        members: Sequence[RolloutDevice],
        kind: CommandKind,
        *,
        bundle: Bundle | None = None,
    ) -> None:
        """Send ``kind`` to members not yet given it; persisted first, resent if unacked."""
        pending = [m for m in members if m.state == RolloutDeviceState.PENDING]
        if not pending:
            return
        bundle = bundle or session.get(Bundle, rollout.bundle_id)
        assert bundle is not None
        now = utcnow()
        targets = [m.device_id for m in pending]  # read now: the commit expires the rows
        commands = [self._build(rollout, device, kind, bundle) for device in targets]
        ids = [c.id for c in commands]
        sent_before = set(  # only after an operator undid and redid a step: rare
            session.exec(select(CommandRecord.id).where(col(CommandRecord.id).in_(ids)))
        )
        for member, command in zip(pending, commands, strict=True):
            member.command_id = command.id
            member.state = RolloutDeviceState.COMMANDED
            member.commanded_at = member.updated_at = now
            session.add(member)
            record = CommandRecord(
                id=command.id,
                device_id=member.device_id,
                kind=kind.value,
                rollout_id=rollout.id,
                payload=command.model_dump(mode="json"),
            )
            if command.id in sent_before:
                session.merge(record)
            else:
                session.add(record)
        session.commit()  # persisted before any is sent: a crash now means resend, not loss
        for device, command in zip(targets, commands, strict=True):
            self._send(device, command)

    def resend_unacknowledged(self, device_ids: Sequence[str] | None = None) -> int:
        """Send again the commands no device has acked yet: those lost in a fleet crash,
        or published while their device was offline (its session starts clean).

        Called at start for every device and whenever devices come online; devices
        recognise a command id they already handled, so a resend is never installed twice.
        """
        query = (
            select(CommandRecord)
            .join(RolloutDevice, col(RolloutDevice.command_id) == CommandRecord.id)
            .where(
                col(CommandRecord.last_ack).is_(None),
                col(RolloutDevice.state).in_(
                    [RolloutDeviceState.COMMANDED, RolloutDeviceState.ROLLING_BACK]
                ),
            )
        )
        if device_ids is not None:
            query = query.where(col(CommandRecord.device_id).in_(device_ids))
        with session_scope(self._db) as session:
            waiting = session.exec(query).all()
            for record in waiting:
                self._send(record.device_id, Command.model_validate(record.payload))
        return len(waiting)

    def _build(
        self, rollout: Rollout, device_id: str, kind: CommandKind, bundle: Bundle
    ) -> Command:
        return Command(
            id=f"{rollout.id}:{kind.value}:{device_id}",
            kind=kind,
            rollout=rollout.id,
            bundle=BundleRef(
                target_path=bundle.target_path,
                name=bundle.bundle_name.rsplit("-", 1)[0],
                version=bundle.version,
                version_number=bundle.version_number,
                sha256=bundle.sha256,
                length=bundle.length,
            ),
            metadata_url=self._metadata_url,
            targets_url=self._targets_url,
            issued_at=time.time(),
        )

    @staticmethod
    def _time_out_silent(session: Session, rollout: Rollout, timeout_s: float) -> None:
        """Devices of the wave still without a final answer count as failed."""
        session.exec(
            update(RolloutDevice)
            .where(
                col(RolloutDevice.rollout_id) == rollout.id,
                col(RolloutDevice.wave) == rollout.wave,
                col(RolloutDevice.state).in_(
                    [RolloutDeviceState.COMMANDED, RolloutDeviceState.IN_PROGRESS]
                ),
            )
            .values(
                state=RolloutDeviceState.FAILED,
                detail=f"no final answer within {timeout_s:.0f} s",
                updated_at=utcnow(),
            )
        )

    def _evaluate(
        self, session: Session, rollout: Rollout, gate: Gate, members: Sequence[RolloutDevice]
    ) -> dict[str, Any]:
        """The gate's verdict: failures (empty: passed) or what it is still waiting for."""
        bundle = session.get(Bundle, rollout.bundle_id)
        assert bundle is not None and rollout.soak_started_at is not None
        failures: list[str] = []
        healthy = sum(m.state == RolloutDeviceState.HEALTHY for m in members) / len(members)
        if healthy < gate.min_healthy_ratio:
            failures.append(f"{healthy:.0%} healthy < {gate.min_healthy_ratio:.0%} required")
        ids = [m.device_id for m in members]
        shadow = rollout.mode == RolloutMode.SHADOW
        new = health_stats(
            session,
            bundles=[bundle.bundle_name],
            since=rollout.soak_started_at,
            device_ids=ids,
            shadow=shadow,
        )
        previous_names = [
            b.bundle_name
            for b in session.exec(
                select(Bundle).where(
                    col(Bundle.id).in_({m.previous_bundle_id for m in members} - {None})
                )
            )
        ]
        baseline = health_stats(
            session, bundles=previous_names, since=utcnow() - self._health_window
        )
        verdict: dict[str, Any] = {
            "healthy_ratio": healthy,
            "new": new.as_dict(),
            "baseline": baseline.as_dict(),
            "failures": failures,
            "waiting": "",
        }
        seen = new.shadow_compared if shadow else new.inferences
        if seen < gate.min_inferences:
            verdict["waiting"] = (
                f"{seen} of the {gate.min_inferences} {'compared' if shadow else ''} "
                "inferences the gate needs have been reported"
            )
            return verdict
        if shadow:
            if new.agreement is not None and new.agreement < gate.min_agreement:
                failures.append(f"agreement {new.agreement:.1%} < {gate.min_agreement:.1%}")
            return verdict
        _compare_rate(
            failures,
            "error rate",
            new.error_rate,
            baseline.error_rate,
            gate.max_error_rate_increase,
        )
        _compare_rate(
            failures,
            "fallback rate",
            new.fallback_rate,
            baseline.fallback_rate,
            gate.max_fallback_rate_increase,
        )
        if new.latency_p95_ms is not None and baseline.latency_p95_ms:
            ratio = new.latency_p95_ms / baseline.latency_p95_ms
            if ratio > gate.max_latency_ratio:
                failures.append(
                    f"p95 latency {new.latency_p95_ms:.1f} ms is {ratio:.2f}x the previous "
                    f"version's {baseline.latency_p95_ms:.1f} ms (max {gate.max_latency_ratio}x)"
                )
        return verdict

    def _step_rolling_back(self, session: Session, rollout: Rollout, gate: Gate) -> None:
        """Tell every device that took the bundle to go back; done when all have answered."""
        took = session.exec(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id,
                col(RolloutDevice.state).in_(
                    [
                        RolloutDeviceState.COMMANDED,
                        RolloutDeviceState.IN_PROGRESS,
                        RolloutDeviceState.HEALTHY,
                    ]
                ),
            )
        ).all()
        kind = (
            CommandKind.SHADOW_STOP if rollout.mode == RolloutMode.SHADOW else CommandKind.ROLLBACK
        )
        by_previous: dict[int | None, list[RolloutDevice]] = {}
        for member in took:
            member.state = RolloutDeviceState.PENDING
            by_previous.setdefault(member.previous_bundle_id, []).append(member)
        for previous_id, members in by_previous.items():
            previous = session.get(Bundle, previous_id) if previous_id is not None else None
            if previous is None and kind == CommandKind.ROLLBACK:
                for member in members:  # nothing to go back to: the device keeps what it has
                    member.state = RolloutDeviceState.FAILED
                    member.detail = "no earlier bundle known for this device to roll back to"
                continue
            self._command(session, rollout, members, kind, bundle=previous)
            for member in members:
                member.state = RolloutDeviceState.ROLLING_BACK
                session.add(member)
        waiting = session.exec(
            select(func.count()).where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.state == RolloutDeviceState.ROLLING_BACK,
            )
        ).one()
        if waiting and _elapsed(rollout.updated_at) < gate.deploy_timeout_s:
            return
        apply_event(
            session,
            rollout,
            Event.ROLLED_BACK,
            actor="fleet",
            reason="every device that took the bundle answered the rollback"
            if not waiting
            else f"{waiting} devices did not answer the rollback within the deploy timeout",
        )


def _deploy_kind(rollout: Rollout) -> CommandKind:
    return CommandKind.SHADOW if rollout.mode == RolloutMode.SHADOW else CommandKind.DEPLOY


def _compare_rate(
    failures: list[str], label: str, new: float | None, baseline: float | None, allowed: float
) -> None:
    if new is None:
        return
    reference = baseline or 0.0
    if new > reference + allowed:
        failures.append(
            f"{label} {new:.1%} > previous version's {reference:.1%} + {allowed:.1%} allowed"
        )


def _elapsed(since: dt.datetime) -> float:
    if since.tzinfo is None:  # SQLite hands back naive UTC
        since = since.replace(tzinfo=dt.UTC)
    return (utcnow() - since).total_seconds()
