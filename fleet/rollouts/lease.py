"""The rollout lease: exactly one replica drives rollouts, and a stale one applies nothing.

Several ``fleet serve`` processes share one database; each runs a rollout engine, but an
engine ticks only while its replica holds the lease, one row of ``rolloutlease``: its
holder, the term's **epoch** (one higher at every new term) and its expiry, on the
database's clock (PostgreSQL's ``clock_timestamp()``; SQLite is one machine's file, so
this machine's clock). A thread of each replica (:class:`LeaseKeeper`) keeps it, every
``lease_s / 4``, in one transaction with the row locked (``FOR UPDATE`` on PostgreSQL; on
SQLite the replica's heartbeat written first takes the database's one write lock):

- the holder renews it (expiry pushed ``lease_s`` ahead);
- anyone takes it once it has expired or was released, with the epoch one higher; a
  replica also takes at once a lease its own id holds in another term (the same replica
  id restarted: a replica id runs in one process at a time);
- everyone else follows, and looks again when it expires;
- a replica that cannot drive rollouts now (``ready()`` false: no connection to the
  broker) takes nothing, and a holder in that state releases it, so one that can takes
  over at once.

The lease's life in this process is one table, :data:`TRANSITIONS` (follower → leader →
follower); :func:`decide` is the pure part. A leader that cannot renew (the database is
gone) steps down at once; it holds a term only until ``lease_s`` after the start of its
last renewal, by its own monotonic clock, so it stops before anyone can take over.

**Fencing.** A leader can still be late: paused (SIGSTOP, a long GC, a VM migration) or
cut off in the middle of a tick, it may wake after another took over, holding decisions
made on what it read before. So every transaction the engine commits first runs
:meth:`LeaseKeeper.fence`: a conditional ``UPDATE`` of the lease row that matches only
while this replica holds the term the tick started with and it has not expired. It locks
the row until the commit (PostgreSQL: as ``FOR UPDATE``; a takeover waits for it, and an
``UPDATE`` waiting for a takeover sees the new holder); on SQLite it takes the write lock.
If it matches nothing the transaction is rolled back (:class:`~fleet.errors.LeaseLost`): a
stale leader's step, commands included (they are sent after their commit), never lands.

The holder also notices replicas whose heartbeat (``fleetreplica.seen_at``) is older than
``lease_s`` and hands them to ``on_orphans``: the server takes over their MQTT sessions and
stores what the broker kept there for them (:mod:`fleet.bridge`).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ..db import session_scope
from ..errors import LeaseLost
from ..models import FleetReplica, RolloutLease, utcnow

__all__ = [
    "TRANSITIONS",
    "LeaseEvent",
    "LeaseKeeper",
    "LeaseRole",
    "LeaseView",
    "Term",
    "database_now",
    "decide",
]

log = logging.getLogger(__name__)

_ROW = 1
"""The lease's one row (created by migration 0005)."""


class LeaseRole(enum.StrEnum):
    FOLLOWER = "follower"
    LEADER = "leader"


class LeaseEvent(enum.StrEnum):
    ACQUIRED = "acquired"
    """A new term: the lease was free, expired, or this replica id's from another term."""
    RENEWED = "renewed"
    """This term goes on, ``lease_s`` from now."""
    HELD_ELSEWHERE = "held_elsewhere"
    """Another replica (or another process of this one) holds it."""
    LOST = "lost"
    """A fenced write found the term over."""
    FAILED = "failed"
    """The database did not answer: nothing is known, so nothing is held."""
    RELEASED = "released"
    """Given up (a clean stop, or not ready), so another takes over at once."""
    UNREADY = "unready"
    """Free or expired, but this replica cannot drive rollouts now: left to others."""


R, E = LeaseRole, LeaseEvent

TRANSITIONS: Final[Mapping[tuple[LeaseRole, LeaseEvent], LeaseRole]] = {
    (R.FOLLOWER, E.ACQUIRED): R.LEADER,
    # the database said the term it held goes on (it stepped down on a failure meanwhile)
    (R.FOLLOWER, E.RENEWED): R.LEADER,
    (R.FOLLOWER, E.HELD_ELSEWHERE): R.FOLLOWER,
    (R.FOLLOWER, E.LOST): R.FOLLOWER,
    (R.FOLLOWER, E.FAILED): R.FOLLOWER,
    (R.FOLLOWER, E.RELEASED): R.FOLLOWER,
    (R.FOLLOWER, E.UNREADY): R.FOLLOWER,
    (R.LEADER, E.RENEWED): R.LEADER,
    # its term had expired with nobody taking over: a new term, a new epoch
    (R.LEADER, E.ACQUIRED): R.LEADER,
    (R.LEADER, E.HELD_ELSEWHERE): R.FOLLOWER,
    (R.LEADER, E.LOST): R.FOLLOWER,
    (R.LEADER, E.FAILED): R.FOLLOWER,
    (R.LEADER, E.RELEASED): R.FOLLOWER,
}
"""Every (role, event) → next role. Both roles can fail (the database is gone) and end up
following; a follower has nothing to lose, a leader steps down."""


@dataclass(frozen=True)
class LeaseView:
    """The lease row as read."""

    holder: str | None
    epoch: int
    expires_at: dt.datetime


@dataclass(frozen=True)
class Term:
    """This replica's current term."""

    epoch: int
    began: dt.datetime
    """When this process took it, on its own clock (as the bridge's link times)."""


def decide(lease: LeaseView, *, me: str, epoch: int | None, now: dt.datetime) -> LeaseEvent:
    """What this replica's attempt at ``now`` does: ``epoch`` is the term it holds (or
    last held), ``None`` in a process that never held one."""
    if lease.holder == me and epoch == lease.epoch and lease.expires_at > now:
        return E.RENEWED
    if lease.holder is None or lease.expires_at <= now:
        return E.ACQUIRED
    if lease.holder == me and epoch is None:  # this replica id, restarted
        return E.ACQUIRED
    return E.HELD_ELSEWHERE


def database_now(session: Session) -> dt.datetime:
    """Now on the database's clock: PostgreSQL's, else (SQLite) this machine's."""
    if session.get_bind().dialect.name == "postgresql":
        now = session.scalar(sa.select(sa.func.clock_timestamp()))
        if not isinstance(now, dt.datetime):
            raise RuntimeError(f"clock_timestamp() returned {now!r}")
        return now
    return utcnow()


class LeaseKeeper:
    """Keeps (or waits for) the rollout lease for replica ``replica_id``; see the module.

    ``ready()`` says whether this replica can drive rollouts now; ``on_change(role)`` runs
    when the role changes; ``on_orphans(replica_ids)``, on the holder, with the replicas
    whose heartbeat is older than ``lease_s`` and whose session was not taken over since
    (the server marks one done with :meth:`drained`). :meth:`register` records the replica,
    with ``ingest_workers``, its worker count (:mod:`fleet.ingest_workers`), for whoever
    empties its sessions once it dies; :meth:`start` keeps the lease from then on.
    """

    def __init__(
        self,
        db: Engine,
        replica_id: str,
        *,
        lease_s: float = 10.0,
        ready: Callable[[], bool] = lambda: True,
        on_change: Callable[[LeaseRole], None] = lambda _role: None,
        on_orphans: Callable[[list[str]], None] = lambda _replicas: None,
        ingest_workers: int = 0,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        if ingest_workers < 0:
            raise ValueError(f"ingest_workers must be 0 or more, not {ingest_workers}")
        self._db = db
        self.replica_id = replica_id
        self._ingest_workers = ingest_workers
        self.lease_s = lease_s
        self._ready = ready
        self._on_change = on_change
        self._on_orphans = on_orphans
        self._lock = threading.Lock()
        self._role = R.FOLLOWER
        self._epoch: int | None = None
        self._term: Term | None = None
        self._valid_until = 0.0
        self._next_look_s = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the thread -----------------------------------------------------------------------

    def register(self) -> None:
        """Record this replica's start (and heartbeat) in the database."""
        with session_scope(self._db) as session:
            now = database_now(session)
            replica = session.get(FleetReplica, self.replica_id)
            if replica is None:
                replica = FleetReplica(id=self.replica_id, started_at=now, seen_at=now)
            replica.started_at = replica.seen_at = now
            replica.ingest_workers = self._ingest_workers
            session.add(replica)

    def start(self) -> None:
        """Try once for the lease, then keep trying."""
        self.keep()
        self._thread = threading.Thread(target=self._run, name="rollout-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop keeping it and release it if held, so another replica takes over at once."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._role is R.LEADER:
            try:
                self._release()
            except Exception:  # the lease then expires by itself
                log.exception(
                    "could not release the rollout lease; it expires in %.0f s", self.lease_s
                )

    def _run(self) -> None:
        while True:
            self._wake.wait(self._next_look_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.keep()

    def keep(self) -> LeaseEvent:
        """One attempt: heartbeat, renew, take or follow; the event it was."""
        started = time.monotonic()
        renew_s = self.lease_s / 4
        orphans: list[str] = []
        try:
            with session_scope(self._db) as session:
                now = database_now(session)
                self._heartbeat(session, now)
                row = session.exec(
                    select(RolloutLease).where(RolloutLease.id == _ROW).with_for_update()
                ).one()
                view = LeaseView(row.holder, row.epoch, row.expires_at)
                event = decide(view, me=self.replica_id, epoch=self._epoch, now=now)
                if event in (E.ACQUIRED, E.RENEWED) and not self._ready():
                    event = E.RELEASED if event is E.RENEWED else E.UNREADY
                    if event is E.RELEASED:
                        row.holder, row.expires_at = None, now
                        session.add(row)
                if event is E.ACQUIRED:
                    row.holder, row.epoch, row.acquired_at = self.replica_id, row.epoch + 1, now
                if event in (E.ACQUIRED, E.RENEWED):
                    row.expires_at = now + dt.timedelta(seconds=self.lease_s)
                    session.add(row)
                    orphans = self._orphans(session, now)
                epoch = row.epoch
        except Exception as error:
            self._next_look_s = renew_s
            self._apply(E.FAILED, None, started, why=str(error)[:300])
            return E.FAILED
        self._apply(event, epoch, started)
        if event is E.HELD_ELSEWHERE:
            wait = (view.expires_at - now).total_seconds() + 0.05
            self._next_look_s = min(renew_s, max(0.05, wait))
        else:
            self._next_look_s = renew_s
        if orphans:
            self._call(self._on_orphans, orphans)
        return event

    # --- what the engine and the API use ---------------------------------------------------

    def term(self) -> Term | None:
        """The term this replica holds now, or ``None`` (following, or past ``lease_s``
        since its last renewal began)."""
        with self._lock:
            if self._role is R.LEADER and time.monotonic() < self._valid_until:
                return self._term
            return None

    @property
    def role(self) -> LeaseRole:
        return self._role

    def fence(self, session: Session, epoch: int) -> None:
        """Check, in ``session``'s transaction and locking the lease row until it ends,
        that this replica still holds term ``epoch``; ``LeaseLost`` if not."""
        now = database_now(session)
        held = session.exec(
            update(RolloutLease)
            .where(
                col(RolloutLease.id) == _ROW,
                col(RolloutLease.holder) == self.replica_id,
                col(RolloutLease.epoch) == epoch,
                col(RolloutLease.expires_at) > now,
            )
            .values(holder=self.replica_id)
            .execution_options(synchronize_session=False)
        )
        if held.rowcount != 1:
            self._apply(E.LOST, epoch, time.monotonic())
            raise LeaseLost(
                f"replica {self.replica_id} no longer holds rollout term {epoch} (another "
                "replica took over, or it expired while this one was paused or cut off): "
                "this transaction is rolled back and the new leader carries on"
            )

    def drained(self, replica_id: str) -> None:
        """Record that ``replica_id``'s MQTT session was taken over and emptied."""
        with session_scope(self._db) as session:
            replica = session.get(FleetReplica, replica_id)
            if replica is not None:
                replica.drained_at = database_now(session)
                session.add(replica)

    # --- internals ------------------------------------------------------------------------

    def _heartbeat(self, session: Session, now: dt.datetime) -> None:
        beat = session.exec(
            update(FleetReplica)
            .where(col(FleetReplica.id) == self.replica_id)
            .values(seen_at=now)
            .execution_options(synchronize_session=False)
        )
        if beat.rowcount == 0:  # its row was deleted meanwhile
            session.add(
                FleetReplica(
                    id=self.replica_id,
                    started_at=now,
                    seen_at=now,
                    ingest_workers=self._ingest_workers,
                )
            )

    def _orphans(self, session: Session, now: dt.datetime) -> list[str]:
        stale = now - dt.timedelta(seconds=self.lease_s)
        return list(
            session.exec(
                select(FleetReplica.id).where(
                    col(FleetReplica.id) != self.replica_id,
                    col(FleetReplica.seen_at) < stale,
                    or_(
                        col(FleetReplica.drained_at).is_(None),
                        col(FleetReplica.drained_at) < col(FleetReplica.seen_at),
                    ),
                )
            )
        )

    def _release(self) -> None:
        with session_scope(self._db) as session:
            now = database_now(session)
            session.exec(
                update(RolloutLease)
                .where(
                    col(RolloutLease.id) == _ROW,
                    col(RolloutLease.holder) == self.replica_id,
                    col(RolloutLease.epoch) == self._epoch,
                )
                .values(holder=None, expires_at=now)
                .execution_options(synchronize_session=False)
            )
        self._apply(E.RELEASED, self._epoch, time.monotonic())

    def _apply(self, event: LeaseEvent, epoch: int | None, started: float, why: str = "") -> None:
        """The one place the role changes."""
        with self._lock:
            if event is E.LOST and epoch != self._epoch:
                return  # a term that already ended
            before = self._role
            self._role = TRANSITIONS[(before, event)]
            if event in (E.ACQUIRED, E.RENEWED) and epoch is not None:
                if self._term is None or self._term.epoch != epoch:
                    self._term = Term(epoch, utcnow())
                self._epoch = epoch
                self._valid_until = started + self.lease_s
            elif self._role is R.FOLLOWER:
                self._term = None
        if before is self._role:
            return
        if self._role is R.LEADER:
            log.warning(
                "replica %s drives rollouts now (term %d)", self.replica_id, self._epoch or 0
            )
        else:
            log.warning(
                "replica %s stopped driving rollouts: %s%s",
                self.replica_id,
                event.value.replace("_", " "),
                f" ({why})" if why else "",
            )
        self._call(self._on_change, self._role)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("the fleet failed to act on the rollout lease's news")
