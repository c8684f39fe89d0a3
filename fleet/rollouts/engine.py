"""The rollout engine: the I/O around the pure parts, once per tick for every rollout.

Each tick reads the rollouts to move on from the database, and for each, in its own
transaction: sends the current wave's commands, reads its counts and telemetry, has the
gate judge them (:mod:`.gate`) and the next step decided (:mod:`.decision`), and applies
that step's events (:mod:`.transitions`). A rollout whose step raises is left as it was
and the others go on; after ``max_step_failures`` failed steps in a row (counted in the
database) it is paused with the error as its reason, as the agent's updater gives up a
deployment that keeps crashing. A ROLLING_BACK rollout is never paused (it is the way
out): it keeps trying, its count growing.

Commands carry ids derived from the rollout, the kind and the device, so a resend after a
crash is recognised by the device rather than acted on twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from sqlalchemy import func, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.mqtt import BundleRef, Command, CommandKind

from ..db import session_scope
from ..errors import NotFoundError
from ..models import (
    Bundle,
    CommandRecord,
    Gate,
    GateOutcome,
    HealthStats,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutMode,
    RolloutState,
    utcnow,
)
from ..telemetry import health_stats
from .decision import Decision, decide, decide_rollback
from .gate import WaveCounts, check_failures, evaluate
from .transitions import TRANSITIONS, Event, apply_event

__all__ = ["CommandSink", "RolloutEngine"]

log = logging.getLogger(__name__)

CommandSink = Callable[[str, Command], None]
"""Sends one command to one device (the MQTT bridge's ``send``)."""

S = RolloutState
_MOVED = (S.DEPLOYING, S.SOAKING, S.ROLLING_BACK)
"""The states the engine moves on by itself; the others wait for an operator, or ended."""
_MAX_ERROR_CHARS = 500


class RolloutEngine:
    """Moves every active rollout on, once per tick, from what the database holds.

    ``metadata_url`` and ``targets_url`` are the TUF base URLs put into deploy commands.
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
        max_step_failures: int = 5,
    ) -> None:
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures must be at least 1, got {max_step_failures}")
        self._db = db
        self._send = send
        self._metadata_url = metadata_url
        self._targets_url = targets_url
        self._tick_s = tick_s
        self._health_window = dt.timedelta(seconds=health_window_s)
        self._max_step_failures = max_step_failures
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
            except Exception:  # the database is gone, say: try again next tick
                self.errors += 1
                log.exception("rollout engine tick failed; retrying next tick")
            self._wake.wait(self._tick_s)
            self._wake.clear()

    def tick(self) -> None:
        """One step for every rollout the engine moves on, oldest first, each in its own
        transaction: one that fails is counted and the others still take their step."""
        with session_scope(self._db) as session:
            moving = session.exec(
                select(Rollout.id)
                .where(col(Rollout.state).in_(_MOVED))
                .order_by(col(Rollout.created_at))
            ).all()
        for rollout_id in moving:
            try:
                self._step_one(rollout_id)
            except Exception as error:
                self.errors += 1
                log.exception("rollout %s: its step failed", rollout_id)
                self._count_failure(rollout_id, error)
        self.ticks += 1

    def _step_one(self, rollout_id: str) -> None:
        with session_scope(self._db) as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.state not in _MOVED:
                return
            self._step(session, rollout, utcnow())
            if rollout.step_failures:
                rollout.step_failures = 0
                session.add(rollout)

    def _count_failure(self, rollout_id: str, error: Exception) -> None:
        """One more failed step, persisted; at ``max_step_failures`` in a row the rollout
        is paused with the error as its reason, where its state can be paused."""
        try:
            with session_scope(self._db) as session:
                rollout = session.get(Rollout, rollout_id)
                if rollout is None or rollout.state not in _MOVED:
                    return
                rollout.step_failures += 1
                session.add(rollout)
                failures = rollout.step_failures
                if failures < self._max_step_failures:
                    return
                if (rollout.state, Event.PAUSE) not in TRANSITIONS:
                    log.error(
                        "rollout %s: %d failed steps in a row; %s cannot be paused, so the "
                        "engine keeps trying",
                        rollout_id,
                        failures,
                        rollout.state.value,
                    )
                    return
                message = f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
                apply_event(
                    session,
                    rollout,
                    Event.PAUSE,
                    actor="fleet",
                    reason=f"paused after {failures} failed steps in a row: {message}",
                )
        except Exception:
            log.exception("rollout %s: could not record its failed step", rollout_id)

    def _step(self, session: Session, rollout: Rollout, now: dt.datetime) -> None:
        gate = Gate.model_validate(rollout.gate)
        if rollout.state is S.ROLLING_BACK:
            decision = self._roll_back(session, rollout, gate, now)
        else:
            decision = self._advance(session, rollout, gate, now)
        if decision.record is not None:
            rollout.last_gate = decision.record.model_dump(mode="json")
            session.add(rollout)
            if decision.record.outcome is GateOutcome.FAILED:
                log.warning("rollout %s: %s", rollout.id, decision.reason)
        for event in decision.events:
            apply_event(session, rollout, event, actor="fleet", reason=decision.reason)

    def _advance(
        self, session: Session, rollout: Rollout, gate: Gate, now: dt.datetime
    ) -> Decision:
        """A DEPLOYING or SOAKING rollout: command the wave, judge it, decide."""
        in_waves = rollout.wave < len(rollout.waves)
        states = self._wave_states(session, rollout)
        if rollout.state is S.DEPLOYING and in_waves:
            if states[RolloutDeviceState.PENDING]:
                self._command(
                    session, rollout, self._pending(session, rollout), _deploy_kind(rollout)
                )
            if _seconds_since(rollout.wave_started_at, now) >= gate.deploy_timeout_s:
                self._time_out_silent(session, rollout, gate.deploy_timeout_s, now)
            states = self._wave_states(session, rollout)
        counts = WaveCounts.of(rollout.wave, states)
        soaked_s = self._soaked_s(rollout, now)
        soaked = soaked_s is not None and soaked_s >= gate.soak_s
        verdict = None
        if in_waves and counts.members:
            if soaked and soaked_s is not None:
                new, baseline = self._health(session, rollout, soaked_s, now)
                shadow = rollout.mode is RolloutMode.SHADOW
                verdict = evaluate(counts, new, baseline, gate, shadow=shadow, soaked_s=soaked_s)
            else:
                verdict = check_failures(counts, gate)
        return decide(
            rollout.state,
            counts,
            verdict,
            waves=len(rollout.waves),
            soaked=soaked,
            auto_advance=rollout.auto_advance,
            rollback_on_failure=rollout.on_failure == "rollback",
        )

    @staticmethod
    def _soaked_s(rollout: Rollout, now: dt.datetime) -> float | None:
        """How long a SOAKING rollout's wave has soaked; ``None`` in any other state."""
        if rollout.state is not S.SOAKING:
            return None
        if rollout.soak_started_at is None:
            raise RuntimeError(f"rollout {rollout.id} is soaking but has no soak start time")
        return _seconds_since(rollout.soak_started_at, now)

    def _roll_back(
        self, session: Session, rollout: Rollout, gate: Gate, now: dt.datetime
    ) -> Decision:
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
        return decide_rollback(
            waiting=waiting,
            waited_s=_seconds_since(rollout.updated_at, now),
            timeout_s=gate.deploy_timeout_s,
        )

    def _health(
        self, session: Session, rollout: Rollout, soaked_s: float, now: dt.datetime
    ) -> tuple[HealthStats, HealthStats]:
        """The gate's telemetry: the new version's from the current wave's members since
        the soak began, and the previous version's (the bundles the wave's members served
        before) from this rollout's members, in any wave, over the health window. Devices
        outside the rollout never weigh in."""
        bundle = _bundle(session, rollout)
        members = sa_select(col(RolloutDevice.device_id)).where(
            col(RolloutDevice.rollout_id) == rollout.id
        )
        wave = members.where(col(RolloutDevice.wave) == rollout.wave)
        new = health_stats(
            session,
            bundles=[bundle.bundle_name],
            since=now - dt.timedelta(seconds=soaked_s),
            device_ids=wave,
            shadow=rollout.mode is RolloutMode.SHADOW,
        )
        previous = session.exec(
            select(Bundle.bundle_name).where(
                col(Bundle.id).in_(
                    select(RolloutDevice.previous_bundle_id).where(
                        RolloutDevice.rollout_id == rollout.id,
                        RolloutDevice.wave == rollout.wave,
                    )
                )
            )
        ).all()
        baseline = health_stats(
            session, bundles=previous, since=now - self._health_window, device_ids=members
        )
        return new, baseline

    @staticmethod
    def _pending(session: Session, rollout: Rollout) -> list[RolloutDevice]:
        """The current wave's devices not yet commanded."""
        return list(
            session.exec(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rollout.id,
                    RolloutDevice.wave == rollout.wave,
                    RolloutDevice.state == RolloutDeviceState.PENDING,
                )
            )
        )

    @staticmethod
    def _wave_states(session: Session, rollout: Rollout) -> Counter[RolloutDeviceState]:
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
        bundle = bundle or _bundle(session, rollout)
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
    def _time_out_silent(
        session: Session, rollout: Rollout, timeout_s: float, now: dt.datetime
    ) -> None:
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
                updated_at=now,
            )
        )


def _bundle(session: Session, rollout: Rollout) -> Bundle:
    bundle = session.get(Bundle, rollout.bundle_id)
    if bundle is None:
        raise NotFoundError(
            f"bundle {rollout.bundle_id} of rollout {rollout.id} is no longer in the database"
        )
    return bundle


def _deploy_kind(rollout: Rollout) -> CommandKind:
    return CommandKind.SHADOW if rollout.mode == RolloutMode.SHADOW else CommandKind.DEPLOY


def _seconds_since(since: dt.datetime, now: dt.datetime) -> float:
    if since.tzinfo is None:  # SQLite hands back naive UTC
        since = since.replace(tzinfo=dt.UTC)
    return (now - since).total_seconds()
