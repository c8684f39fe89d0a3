"""Ingest workers: more processes storing the devices' telemetry (``fleet serve
--ingest-workers N``).

One bridge stores in one thread, so one ``fleet serve`` stores on about one core. Each
ingest worker is an OS process of its own with an :class:`~fleet.bridge.MqttBridge` that
subscribes to the devices' telemetry alone, in the same shared-subscription group as the
replica's bridge: the broker splits telemetry between the replica's bridge and its workers
(and other replicas), and every one of them writes to the same database. Acks and statuses,
and so everything that wakes the rollout engine, stay with the replica's own bridge.

Each worker ``k`` (1 to N) connects as ``edgefleet-fleet-REPLICA-ingest-k``
(:func:`~fleet.broker.credential.ingest_username`: its client id and its broker account,
the fleet's password) with clean start off and a session expiry, like the replica's bridge:
a worker killed and restarted takes its session back, and the broker delivers again what
the worker had not acknowledged (a message is acknowledged once stored). Nothing the
broker acknowledged to a device is lost.

:class:`IngestWorkers` runs in ``fleet serve`` and supervises them: a worker that exits (or
cannot be started, or heard) is logged and restarted, after 0.5 s doubling to 30 s while it
keeps dying (``edgefleet_ingest_worker_restarts_total``). A worker stops when its parent does
(SIGTERM: it stores what it holds, then leaves its session unsubscribed so the broker
queues nothing for a worker a later start may not run; the replica's own session keeps
the whole share meanwhile), and exits by itself within a second when its parent dies
(``fleet serve`` killed: the worker's session stays subscribed, for the restart; a restart
with fewer workers empties the sessions of those it no longer runs, workers N+1 to the
count it recorded, :func:`drain_ingest_sessions` with ``beyond=N``).

A replica that dies whole (on a broker shared by replicas that asks the fleet who may
connect, docs/scale.md step 4) leaves its workers' sessions subscribed, queueing their share
of telemetry: the lease holder empties them after the replica's own session
(:func:`drain_ingest_sessions`), workers 1 to the count the replica recorded when it
started (``fleetreplica.ingest_workers``, :class:`~fleet.rollouts.lease.LeaseKeeper`).

Metrics: each worker sends the counters its bridge keeps (records stored, duplicates,
messages by channel, malformed, quarantined, shed, retries) to ``fleet serve`` once a
second, which adds them to its own, so ``/metrics`` counts what the whole replica stored;
``edgefleet_ingest_worker_records_total{worker}`` says what each worker stored. A worker's
gauges (the database unavailable) are not relayed: its log says so.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from .bridge import MqttBridge, drain_session
from .broker import MqttEndpoint
from .broker.credential import ingest_username
from .db import make_engine, session_scope
from .errors import BrokerError
from .gc_tuning import tune_for_serving
from .metrics import FleetMetrics
from .models import FleetReplica

__all__ = [
    "IngestWorkerSpec",
    "IngestWorkers",
    "add_counts",
    "counter_totals",
    "drain_ingest_sessions",
    "record_ingest_workers",
    "recorded_ingest_workers",
]

log = logging.getLogger(__name__)

_RELAY_S = 1.0
"""How often a worker sends its counters to ``fleet serve``."""
_STOP_S = 30.0
"""How long a worker has to stop once told to (it stores what it holds); then SIGKILL."""
_RELAYED = (
    "messages",
    "malformed",
    "quarantined",
    "shed",
    "store_retries",
    "telemetry_records",
    "telemetry_duplicates",
    "model_health_skipped",
    "receipts_unqueued",
)
"""The :class:`FleetMetrics` counters a worker's bridge keeps, by attribute."""

Counts = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Counter values by ``(FleetMetrics attribute, sorted labels)``."""


def recorded_ingest_workers(db: Engine, replica_id: str) -> int:
    """The worker count in replica ``replica_id``'s row (0 without a row); the database's
    error as it comes (``SQLAlchemyError``)."""
    with session_scope(db) as session:
        replica = session.get(FleetReplica, replica_id)
        return replica.ingest_workers if replica is not None else 0


def record_ingest_workers(db: Engine, replica_id: str, workers: int) -> None:
    """Write ``workers`` into the replica's row (once the sessions of the workers beyond
    it are emptied, :func:`drain_ingest_sessions`)."""
    with session_scope(db) as session:
        session.exec(
            update(FleetReplica)
            .where(col(FleetReplica.id) == replica_id)
            .values(ingest_workers=workers)
            .execution_options(synchronize_session=False)
        )


def drain_ingest_sessions(
    endpoint: MqttEndpoint,
    db: Engine,
    metrics: FleetMetrics,
    *,
    replica_id: str,
    session_expiry_s: int,
    beyond: int = 0,
) -> bool:
    """Take over and empty the sessions a replica's ingest workers left, as
    :func:`~fleet.bridge.drain_session` does the replica's own; ``endpoint`` holds the
    replicas' shared password. Workers ``beyond`` + 1 to the count in the replica's row:
    all of a dead replica's; those a replica restarted with ``beyond`` workers no longer
    runs. One the broker holds no session for (it stopped cleanly, or never connected)
    costs a connection. ``False`` if the count could not be read or one did not finish
    (it is tried again later)."""
    try:
        workers = recorded_ingest_workers(db, replica_id)
    except SQLAlchemyError as e:
        log.warning("could not read replica %s's ingest worker count: %s", replica_id, e)
        return False
    done = True
    for index in range(beyond + 1, workers + 1):
        client_id = ingest_username(replica_id, index)
        done &= drain_session(
            replace(endpoint, username=client_id),
            db,
            metrics,
            client_id=client_id,
            session_expiry_s=session_expiry_s,
            if_present=True,
        )
    return done


@dataclass(frozen=True)
class IngestWorkerSpec:
    """What one worker process needs (pickled to it, not on its command line)."""

    index: int
    endpoint: MqttEndpoint
    """The broker, with the worker's own account (its username is its client id)."""
    db_url: str
    session_expiry_s: int
    idle_in_transaction_s: float


def counter_totals(metrics: FleetMetrics) -> Counts:
    """The relayed counters' values now."""
    totals: Counts = {}
    for attribute in _RELAYED:
        for family in getattr(metrics, attribute).collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[(attribute, tuple(sorted(sample.labels.items())))] = sample.value
    return totals


def add_counts(metrics: FleetMetrics, counts: Counts) -> None:
    """Add a worker's increments to ``metrics``'s counters."""
    for (attribute, labels), increment in counts.items():
        if attribute not in _RELAYED or increment <= 0:
            continue  # our own child sent it, but a counter only goes up
        counter = getattr(metrics, attribute)
        (counter.labels(**dict(labels)) if labels else counter).inc(increment)


def run_worker(spec: IngestWorkerSpec, relay: Connection) -> None:
    """A worker process's life: store telemetry until SIGTERM or the parent's death."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[ingest-{spec.index}]: %(message)s",
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: ``fleet serve`` stops it
    tune_for_serving()
    parent = os.getppid()
    db = make_engine(spec.db_url, idle_in_transaction_s=spec.idle_in_transaction_s)
    metrics = FleetMetrics()
    client_id = spec.endpoint.username or ""
    bridge = MqttBridge(
        spec.endpoint,
        db,
        metrics,
        client_id=client_id,
        session_expiry_s=spec.session_expiry_s,
        channels=("telemetry",),
    )
    try:
        bridge.start()
    except BrokerError as e:
        log.error("ingest worker %d cannot start: %s", spec.index, e)
        db.dispose()
        raise SystemExit(1) from None
    log.info("ingest worker %d (pid %d) stores telemetry as %s", spec.index, os.getpid(), client_id)
    sent: Counts = {}
    while not stopping.wait(_RELAY_S) and os.getppid() == parent:
        sent = _relay(metrics, sent, relay)
    bridge.stop()
    if stopping.is_set():  # told to stop: leave no subscription to queue for it
        drain_session(
            spec.endpoint,
            db,
            metrics,
            client_id=client_id,
            session_expiry_s=spec.session_expiry_s,
            timeout_s=_STOP_S / 2,
        )
        log.info("ingest worker %d stopped; its session is left unsubscribed", spec.index)
    _relay(metrics, sent, relay)
    db.dispose()


def _relay(metrics: FleetMetrics, sent: Counts, relay: Connection) -> Counts:
    """Send what the counters gained since ``sent``; the totals now."""
    totals = counter_totals(metrics)
    increments = {key: value - sent.get(key, 0.0) for key, value in totals.items()}
    increments = {key: value for key, value in increments.items() if value}
    if increments:
        try:
            relay.send(increments)
        except OSError:  # the parent is gone; it exits with us
            return sent
    return totals


class IngestWorkers:
    """Starts the worker processes and keeps them running (see the module's docstring)."""

    def __init__(
        self,
        specs: Sequence[IngestWorkerSpec],
        metrics: FleetMetrics,
        *,
        restart_min_s: float = 0.5,
        restart_max_s: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        self._specs = list(specs)
        self._metrics = metrics
        self._restart_min_s = restart_min_s
        self._restart_max_s = restart_max_s
        self._stable_s = stable_s
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._processes: dict[int, BaseProcess] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for spec in self._specs:
            thread = threading.Thread(
                target=self._supervise, args=(spec,), name=f"ingest-{spec.index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Tell every worker to stop, and wait for them (SIGKILL past 30 s)."""
        with self._lock:
            self._stopping.set()
            for process in self._processes.values():
                if process.is_alive():
                    process.terminate()
        for thread in self._threads:
            thread.join(timeout=_STOP_S + 5)

    def pids(self) -> dict[int, int]:
        """The process id of each worker running now (one being restarted is left out)."""
        with self._lock:
            return {
                index: process.pid
                for index, process in self._processes.items()
                if process.pid is not None and process.is_alive()
            }

    def _supervise(self, spec: IngestWorkerSpec) -> None:
        """Run worker ``spec.index`` until :meth:`stop`, starting it again after it exits
        or after anything fails here (its start, its relay), with a growing delay."""
        delay_s = self._restart_min_s
        while True:
            started = time.monotonic()
            try:
                ended = self._run_once(spec)
            except Exception:
                log.exception("ingest worker %d could not be started or heard", spec.index)
                ended = "failed"
            if ended is None or self._stopping.is_set():
                return
            if time.monotonic() - started >= self._stable_s:
                delay_s = self._restart_min_s
            self._metrics.ingest_worker_restarts.labels(str(spec.index)).inc()
            log.error("ingest worker %d %s; restarting it in %.1f s", spec.index, ended, delay_s)
            if self._stopping.wait(delay_s):
                return
            delay_s = min(delay_s * 2, self._restart_max_s)

    def _run_once(self, spec: IngestWorkerSpec) -> str | None:
        """Start the worker and relay its counts until it exits; how it ended, or ``None``
        when told to stop before it started."""
        with self._lock:
            if self._stopping.is_set():
                return None
            relay, child_end = self._context.Pipe(duplex=False)
            try:
                process = self._context.Process(
                    target=run_worker, args=(spec, child_end), name=f"ingest-{spec.index}"
                )
                process.start()
            except BaseException:
                relay.close()
                raise
            finally:
                child_end.close()
            self._processes[spec.index] = process
        self._relay_until_exit(spec.index, process, relay)
        return f"(pid {process.pid}) exited with {process.exitcode}"

    def _relay_until_exit(self, index: int, process: BaseProcess, relay: Connection) -> None:
        """Add what the worker sends to the metrics until it exits (it was told to stop:
        SIGKILL past ``_STOP_S``). Whatever ends this early (a garbled relay, a count that
        cannot be added) stops the worker too, so that it is not run twice."""
        told_at: float | None = None
        try:
            while True:
                if relay.poll(0.2):
                    try:
                        counts = relay.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        break  # the worker is gone (or cannot be heard: it is stopped below)
                    add_counts(self._metrics, counts)
                    self._count_records(index, counts)
                elif not process.is_alive():
                    break
                if self._stopping.is_set():
                    told_at = told_at or time.monotonic()
                    if time.monotonic() - told_at > _STOP_S:
                        log.error("ingest worker %d did not stop in time: killed", index)
                        process.kill()
                        break
        finally:
            relay.close()
            if process.is_alive():
                process.terminate()  # it stores what it holds and leaves
            process.join(timeout=_STOP_S)
            if process.is_alive():
                log.error("ingest worker %d did not stop in time: killed", index)
                process.kill()
                process.join()

    def _count_records(self, index: int, counts: Counts) -> None:
        stored = counts.get(("telemetry_records", ()), 0.0)
        if stored > 0:
            self._metrics.ingest_worker_records.labels(str(index)).inc(stored)
