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
crash is recognised by the device rather than acted on twice, and an ``expires_at``
:attr:`command_ttl_s` ahead (fresh on every copy sent), after which a device ignores one
that sat in a queue.

The engine trusts no single message to arrive: it only works while the fleet is connected
to the broker (:class:`Link`), and after each (re)connection it first lets ``settle_s``
pass, for what the broker kept for the fleet's session (and the devices' retained
statuses) to be stored and reconciled (:func:`.acks.reconcile_statuses`); then it sends
again every command of a rollout in progress that has no final answer
(:meth:`RolloutEngine.resend_unfinished`), and judges waves again. A device counts as
silent only over time the fleet was listening: an outage of the fleet never fails a wave.

With several replicas on one database, each runs an engine and only the holder of the
rollout lease ticks (:mod:`.lease`); a new term counts as a new connection (it settles,
resends, and counts silence from its start), and every transaction a tick commits is
fenced: it lands only while the term it began in holds.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, func, literal, or_, update
from sqlalchemy import event as orm_events
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from contracts.mqtt import BundleRef, Command, CommandKind

from ..db import session_scope
from ..errors import LeaseLost, NotFoundError
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
from .commands import CommandTemplate, command_id, refreshed
from .decision import Decision, decide, decide_rollback
from .gate import WaveCounts, check_failures, evaluate
from .lease import LeaseKeeper, Term
from .transitions import TRANSITIONS, Event, apply_event

__all__ = ["CommandSink", "Link", "RolloutEngine"]

log = logging.getLogger(__name__)

CommandSink = Callable[[CommandKind, Sequence[tuple[str, bytes]]], None]
"""Publishes encoded commands of one kind, each ``(device id, payload)`` on its device's
own topic (the MQTT bridge's ``send_encoded``)."""


@dataclass(frozen=True)
class Link:
    """The fleet's connection to the broker, while it is up."""

    number: int
    """One more at every (re)connection."""
    since: dt.datetime
    """When it was made, on the fleet's clock."""


S = RolloutState
_MOVED = (S.DEPLOYING, S.SOAKING, S.ROLLING_BACK)
"""The states the engine moves on by itself; the others wait for an operator, or ended."""
_DEPLOY_UNFINISHED = (RolloutDeviceState.COMMANDED, RolloutDeviceState.IN_PROGRESS)
"""A member commanded that has given no final answer yet."""
_TOOK = (*_DEPLOY_UNFINISHED, RolloutDeviceState.HEALTHY)
"""A member that took (or may be taking) the rollout's bundle: what a rollback commands."""
_REST_PER_TICK = 10.0
"""After a tick the engine rests at least this many times as long as the tick took, however
often acks wake it: a tick reads the whole wave, so on a big one the engine takes at most
a tenth of a core from the bridge storing those acks, at the cost of moving on after the
last ack of a wave that much later (a tick at 10,000 devices: about 8 ms of CPU)."""
_MAX_ERROR_CHARS = 500
_UNLEASED = Term(epoch=0, began=dt.datetime.min.replace(tzinfo=dt.UTC))
"""The term of an engine without a lease: always, unfenced."""


class RolloutEngine:
    """Moves every active rollout on, once per tick, from what the database holds.

    ``metadata_url`` and ``targets_url`` are the TUF base URLs put into deploy commands.
    ``link`` says whether, and since when, the fleet is connected to the broker (the
    bridge's :meth:`~fleet.bridge.MqttBridge.link`); ``settle_s`` is how long after each
    connection the engine waits before it resends and judges (see the module's docstring).
    ``lease``: the replicas' rollout lease; the engine ticks only in this replica's terms,
    fenced (``None``: one engine alone on its database, unfenced). ``actor`` signs its
    transitions in the audit log.
    """

    def __init__(
        self,
        db: Engine,
        send: CommandSink,
        *,
        link: Callable[[], Link | None],
        metadata_url: str,
        targets_url: str,
        tick_s: float = 1.0,
        health_window_s: float = 3600.0,
        max_step_failures: int = 5,
        settle_s: float = 2.0,
        command_ttl_s: float = 3600.0,
        lease: LeaseKeeper | None = None,
        actor: str = "fleet",
    ) -> None:
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures must be at least 1, got {max_step_failures}")
        self._db = db
        self._send = send
        self._link = link
        self._settle_s = settle_s
        self.command_ttl_s = command_ttl_s
        self._lease = lease
        self._actor = actor
        self._resynced: tuple[int, int] | None = None
        self._resumes_resent: dict[str, tuple[int, dt.datetime]] = {}
        """Per rollout, the deploying phase (wave, start) whose resume was resent."""
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
            started = time.monotonic()
            try:
                if self.tick():  # the next step may follow at once (soak 0, a next wave)
                    self._wake.set()
            except Exception:  # the database is gone, say: try again next tick
                self.errors += 1
                log.exception("rollout engine tick failed; retrying next tick")
            rest_s = min(_REST_PER_TICK * (time.monotonic() - started), self._tick_s)
            self._stop.wait(rest_s)
            self._wake.wait(self._tick_s - rest_s)
            self._wake.clear()

    def tick(self) -> bool:
        """One step for every rollout the engine moves on, oldest first, each in its own
        transaction: one that fails is counted and the others still take their step.
        Returns whether a step changed a rollout's state (the engine then ticks again
        after its rest rather than at the next interval).

        Nothing while the fleet is not connected to the broker or this replica does not
        hold the lease, nor for ``settle_s`` after either began; the first tick after
        that resends every unfinished command. A step that finds the term over (fenced)
        ends the tick with nothing of it applied."""
        link = self._link()
        term = self._lease.term() if self._lease is not None else _UNLEASED
        if link is None or term is None:
            return False
        since = _latest(link.since, term.began)
        if _seconds_since(since, utcnow()) < self._settle_s:
            return False
        if (link.number, term.epoch) != self._resynced:
            resent = self.resend_unfinished()
            self._resynced = (link.number, term.epoch)
            if resent:
                log.info("resent %d unfinished commands after connecting to the broker", resent)
        with session_scope(self._db) as session:
            moving = session.exec(
                select(Rollout.id)
                .where(col(Rollout.state).in_(_MOVED))
                .order_by(col(Rollout.created_at))
            ).all()
        moved = False
        for rollout_id in moving:
            try:
                moved |= self._step_one(rollout_id, since, term)
            except LeaseLost as lost:
                log.warning("rollout %s: its step was not applied: %s", rollout_id, lost)
                return False
            except Exception as error:
                self.errors += 1
                log.exception("rollout %s: its step failed", rollout_id)
                self._count_failure(rollout_id, error, term)
        self.ticks += 1
        return moved

    @contextmanager
    def _fenced(self, term: Term) -> Iterator[Session]:
        """A transaction that commits (each time it commits) only while ``term`` holds."""
        with session_scope(self._db) as session:
            lease = self._lease
            if lease is not None:

                def fence(fenced: Session) -> None:
                    lease.fence(fenced, term.epoch)

                orm_events.listen(session, "before_commit", fence)
            yield session

    def _step_one(self, rollout_id: str, listening_since: dt.datetime, term: Term) -> bool:
        """The rollout's step, in a transaction of its own; whether its state changed."""
        with self._fenced(term) as session:
            rollout = session.get(Rollout, rollout_id, with_for_update=True)
            if rollout is None or rollout.state not in _MOVED:
                return False
            before = rollout.state, rollout.wave
            self._step(session, rollout, utcnow(), listening_since)
            changed = (rollout.state, rollout.wave) != before
            if rollout.step_failures:
                rollout.step_failures = 0
                session.add(rollout)
        return changed

    def _count_failure(self, rollout_id: str, error: Exception, term: Term) -> None:
        """One more failed step, persisted; at ``max_step_failures`` in a row the rollout
        is paused with the error as its reason, where its state can be paused."""
        try:
            with self._fenced(term) as session:
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
                    actor=self._actor,
                    reason=f"paused after {failures} failed steps in a row: {message}",
                )
        except Exception:
            log.exception("rollout %s: could not record its failed step", rollout_id)

    def _step(
        self, session: Session, rollout: Rollout, now: dt.datetime, listening_since: dt.datetime
    ) -> None:
        """``listening_since``: when the fleet's connection to the broker began; devices
        count as silent from then at the earliest."""
        gate = Gate.model_validate(rollout.gate)
        if rollout.state is S.ROLLING_BACK:
            decision = self._roll_back(session, rollout, gate, now, listening_since)
        else:
            decision = self._advance(session, rollout, gate, now, listening_since)
        if decision.record is not None:
            rollout.last_gate = decision.record.model_dump(mode="json")
            session.add(rollout)
            if decision.record.outcome is GateOutcome.FAILED:
                log.warning("rollout %s: %s", rollout.id, decision.reason)
        for event in decision.events:
            apply_event(session, rollout, event, actor=self._actor, reason=decision.reason)

    def _advance(
        self,
        session: Session,
        rollout: Rollout,
        gate: Gate,
        now: dt.datetime,
        listening_since: dt.datetime,
    ) -> Decision:
        """A DEPLOYING or SOAKING rollout: command the wave, judge it, decide."""
        in_waves = rollout.wave < len(rollout.waves)
        states = self._wave_states(session, rollout)
        if rollout.state is S.DEPLOYING and in_waves:
            if states[RolloutDeviceState.PENDING]:
                commanded = self._command(
                    session,
                    rollout,
                    _deploy_kind(rollout),
                    members=(
                        col(RolloutDevice.wave) == rollout.wave,
                        col(RolloutDevice.state) == RolloutDeviceState.PENDING,
                    ),
                    to_state=RolloutDeviceState.COMMANDED,
                )
                states[RolloutDeviceState.PENDING] -= commanded
                states[RolloutDeviceState.COMMANDED] += commanded
            self._resend_after_resume(session, rollout)
            silent_since = _latest(rollout.wave_started_at, listening_since)
            if _seconds_since(silent_since, now) >= gate.deploy_timeout_s:
                self._time_out_silent(session, rollout, gate.deploy_timeout_s, now)
                states = self._wave_states(session, rollout)
        counts = WaveCounts.of(rollout.wave, states)
        soaked_s = self._soaked_s(rollout, now)
        soaked = soaked_s is not None and soaked_s >= gate.soak_s
        verdict = None
        if in_waves and counts.members:
            if soaked and soaked_s is not None:
                new, baseline = self._health(session, rollout, gate, soaked_s, now)
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
        self,
        session: Session,
        rollout: Rollout,
        gate: Gate,
        now: dt.datetime,
        listening_since: dt.datetime,
    ) -> Decision:
        """Tell every device that took the bundle to go back; done when all have answered."""
        took = col(RolloutDevice.state).in_(_TOOK)
        previous_ids = session.exec(
            select(RolloutDevice.previous_bundle_id)
            .where(col(RolloutDevice.rollout_id) == rollout.id, took)
            .distinct()
        ).all()
        kind = (
            CommandKind.SHADOW_STOP if rollout.mode == RolloutMode.SHADOW else CommandKind.ROLLBACK
        )
        for previous_id in previous_ids:
            went_on = (
                col(RolloutDevice.previous_bundle_id) == previous_id
                if previous_id is not None
                else col(RolloutDevice.previous_bundle_id).is_(None)
            )
            previous = session.get(Bundle, previous_id) if previous_id is not None else None
            if previous is None and kind == CommandKind.ROLLBACK:
                session.exec(  # nothing to go back to: the device keeps what it has
                    update(RolloutDevice)
                    .where(col(RolloutDevice.rollout_id) == rollout.id, took, went_on)
                    .values(
                        state=RolloutDeviceState.FAILED,
                        detail="no earlier bundle known for this device to roll back to",
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                continue
            self._command(
                session,
                rollout,
                kind,
                members=(took, went_on),
                to_state=RolloutDeviceState.ROLLING_BACK,
                bundle=previous,
            )
        waiting = session.exec(
            select(func.count()).where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.state == RolloutDeviceState.ROLLING_BACK,
            )
        ).one()
        return decide_rollback(
            waiting=waiting,
            waited_s=_seconds_since(_latest(rollout.updated_at, listening_since), now),
            timeout_s=gate.deploy_timeout_s,
        )

    def _health(
        self, session: Session, rollout: Rollout, gate: Gate, soaked_s: float, now: dt.datetime
    ) -> tuple[HealthStats, HealthStats]:
        """The gate's telemetry: the new version's from the current wave's members since
        the soak began, and the previous version's (the bundles the wave's members served
        before) from this rollout's members, in any wave, over the health window (with
        ``compare: baseline``, since the soak began too: the sequential test compares
        the two over the same window, unless no member served it since, as in the last
        wave). Devices outside the rollout never weigh in."""
        bundle = _bundle(session, rollout)
        members = sa_select(col(RolloutDevice.device_id)).where(
            col(RolloutDevice.rollout_id) == rollout.id
        )
        wave = members.where(col(RolloutDevice.wave) == rollout.wave)
        soak_began = now - dt.timedelta(seconds=soaked_s)
        new = health_stats(
            session,
            bundles=[bundle.bundle_name],
            since=soak_began,
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
        same_window = gate.compare == "baseline"
        baseline = health_stats(
            session,
            bundles=previous,
            since=soak_began if same_window else now - self._health_window,
            device_ids=members,
        )
        if same_window and not baseline.inferences:  # the last wave: nobody left on it
            baseline = health_stats(
                session, bundles=previous, since=now - self._health_window, device_ids=members
            )
        return new, baseline

    def _resend_after_resume(self, session: Session, rollout: Rollout) -> None:
        """Send again, once, the unfinished commands of the wave's members commanded before
        its current deploying phase began: while it was paused, they were not resent. Once
        per phase: any member commanded later in it was commanded after it began."""
        phase = (rollout.wave, _aware(rollout.wave_started_at))
        if self._resumes_resent.get(rollout.id) == phase:
            return
        resumed = (
            col(RolloutDevice.rollout_id) == rollout.id,
            col(RolloutDevice.wave) == rollout.wave,
            col(RolloutDevice.state).in_(_DEPLOY_UNFINISHED),
            col(RolloutDevice.commanded_at) < rollout.wave_started_at,
        )
        rows = session.exec(
            select(CommandRecord.device_id, CommandRecord.kind, CommandRecord.payload)
            .join(RolloutDevice, col(CommandRecord.id) == RolloutDevice.command_id)
            .where(*resumed)
        ).all()
        if not rows:
            self._resumes_resent[rollout.id] = phase
            return
        session.exec(
            update(RolloutDevice)
            .where(*resumed)
            .values(commanded_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()  # marked first: a crash now means the next connection's resend
        self._resumes_resent[rollout.id] = phase
        self._resend(rows)

    def _resend(self, rows: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Send stored commands (device id, kind, payload) again, each with a fresh
        ``expires_at``."""
        expires_at = time.time() + self.command_ttl_s
        by_kind: dict[CommandKind, list[tuple[str, bytes]]] = {}
        for device_id, kind, payload in rows:
            by_kind.setdefault(CommandKind(kind), []).append(
                (device_id, refreshed(payload, expires_at))
            )
        for kind, messages in by_kind.items():
            self._send(kind, messages)

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
        kind: CommandKind,
        *,
        members: Sequence[ColumnElement[bool]],
        to_state: RolloutDeviceState,
        bundle: Bundle | None = None,
    ) -> int:
        """Send ``kind`` to the rollout's ``members`` (conditions on their rows), which move
        to ``to_state``: one statement marks them all and names the devices it marked, one
        stores their commands, all committed before any is sent (a crash then means a
        resend, never a loss); then one message per device, from one template. Resent
        until the device gives a final answer. How many were sent."""
        template = self._template(rollout, kind, bundle or _bundle(session, rollout))
        now = utcnow()
        prefix = command_id(rollout.id, kind, "")
        marked = session.exec(
            update(RolloutDevice)
            .where(col(RolloutDevice.rollout_id) == rollout.id, *members)
            .values(
                state=to_state,
                command_id=literal(prefix) + col(RolloutDevice.device_id),
                commanded_at=now,
                updated_at=now,
            )
            .returning(col(RolloutDevice.device_id))
            .execution_options(synchronize_session=False)
        )
        targets = [device_id for (device_id,) in marked]
        if not targets:
            return 0
        records = [
            {
                "id": template.command_id(device_id),
                "device_id": device_id,
                "kind": kind.value,
                "rollout_id": rollout.id,
                "payload": template.payload(device_id),
                "last_ack": None,
                "created_at": now,
                "updated_at": now,
            }
            for device_id in targets
        ]
        session.connection().execute(_upsert_records(session), records)
        session.commit()
        self._send(kind, [(device_id, template.encoded(device_id)) for device_id in targets])
        return len(targets)

    def resend_unfinished(self, device_ids: Sequence[str] | None = None) -> int:
        """Send again every command of a rollout in progress whose device has given no
        final answer (acked nothing, or only progress): lost in a fleet crash, published
        while the device was offline (its session starts clean), or answered by an ack
        that was lost. Each copy carries a fresh ``expires_at``.

        The engine calls it after each connection to the broker has settled; the server
        whenever devices come online (after their statuses were reconciled). A finished,
        aborted or paused rollout's commands are never resent (a resumed one's are, once,
        as its wave resumes); a rolling-back one's deploys neither, only its rollbacks.
        Devices re-ack a command id they have seen, so a resend is never installed twice.
        """
        query = (
            select(CommandRecord.device_id, CommandRecord.kind, CommandRecord.payload)
            .join(RolloutDevice, col(RolloutDevice.command_id) == CommandRecord.id)
            .join(Rollout, col(Rollout.id) == RolloutDevice.rollout_id)
            .where(
                or_(
                    and_(
                        col(Rollout.state).in_([S.DEPLOYING, S.SOAKING]),
                        col(RolloutDevice.state).in_(_DEPLOY_UNFINISHED),
                    ),
                    and_(
                        col(Rollout.state) == S.ROLLING_BACK,
                        col(RolloutDevice.state) == RolloutDeviceState.ROLLING_BACK,
                    ),
                )
            )
        )
        if device_ids is not None:
            query = query.where(col(CommandRecord.device_id).in_(device_ids))
        with session_scope(self._db) as session:
            waiting = session.exec(query).all()
        self._resend(waiting)
        return len(waiting)

    def _template(self, rollout: Rollout, kind: CommandKind, bundle: Bundle) -> CommandTemplate:
        """The command every member gets (its id aside), valid as the contract says."""
        issued = time.time()
        command = Command(
            id=command_id(rollout.id, kind, "template"),
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
            issued_at=issued,
            expires_at=issued + self.command_ttl_s,
        )
        return CommandTemplate.of(command)

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


_REPLACED = ("device_id", "kind", "rollout_id", "payload", "last_ack", "created_at", "updated_at")
"""A command record's columns a command sent again under its id replaces."""


def _upsert_records(session: Session) -> UpdateBase:
    """An insert of command records that replaces one already there: an operator undid and
    redid a step (rare), and the command goes out again under its id."""
    dialect = session.get_bind().dialect.name
    table = cast(Table, CommandRecord.__table__)  # type: ignore[attr-defined]
    key = [table.c.id]
    if dialect == "sqlite":
        lite = sqlite_insert(table)
        return lite.on_conflict_do_update(
            index_elements=key, set_={name: lite.excluded[name] for name in _REPLACED}
        )
    if dialect == "postgresql":
        pg = postgresql_insert(table)
        return pg.on_conflict_do_update(
            index_elements=key, set_={name: pg.excluded[name] for name in _REPLACED}
        )
    raise RuntimeError(f"the fleet stores commands in SQLite or PostgreSQL, not {dialect}")


def _bundle(session: Session, rollout: Rollout) -> Bundle:
    bundle = session.get(Bundle, rollout.bundle_id)
    if bundle is None:
        raise NotFoundError(
            f"bundle {rollout.bundle_id} of rollout {rollout.id} is no longer in the database"
        )
    return bundle


def _deploy_kind(rollout: Rollout) -> CommandKind:
    return CommandKind.SHADOW if rollout.mode == RolloutMode.SHADOW else CommandKind.DEPLOY


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)  # SQLite: naive UTC


def _latest(*moments: dt.datetime) -> dt.datetime:
    return max(map(_aware, moments))


def _seconds_since(since: dt.datetime, now: dt.datetime) -> float:
    return (now - _aware(since)).total_seconds()
