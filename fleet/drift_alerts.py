"""Drift alerts: a periodic look at every model version's cohorts, an alert per crossing.

Every ``drift_check_s`` the fleet judges the drift of each version that reported in the
window (:func:`fleet.model_health.drift_report`). A cohort whose verdict flips (``ok`` to
``drift``, or back) is an alert: ``driftalert`` records the new state, an audit entry
(``model.drift`` / ``model.drift_cleared``) says what passed which threshold, the metrics
count it, and the operator's webhook, if configured, is POSTed a JSON document. A cohort
with too few samples keeps its last state: silence is not a recovery.

The check runs on its own thread, never on the ingest path; every replica runs it, and
the flip is a compare-and-set on ``driftalert``, so one replica alerts per crossing.
A webhook that fails or times out is logged and counted; the alert stands.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from sqlalchemy import select as sa_select
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult, Engine
from sqlmodel import Session, col

from contracts.drift import DriftThresholds

from . import audit
from .db import session_scope
from .metrics import FleetMetrics
from .model_health import CohortDrift, DriftVerdict, drift_report, window_start
from .models import DriftAlert, ModelHealthRow, ModelVersion, utcnow

__all__ = ["DriftChange", "DriftWatch", "judge_drift"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftChange:
    """One cohort that started or stopped drifting: what the audit, the metrics and the
    webhook are told."""

    model: str
    version: str
    cohort: str
    """A device tag; ``""``: every device."""
    drifting: bool
    samples: int
    max_psi: float | None
    max_distance: float | None
    reasons: list[str]
    at: str
    """When the fleet judged it (ISO 8601, UTC)."""


def judge_drift(
    session: Session,
    *,
    thresholds: DriftThresholds,
    window_s: float,
    now: dt.datetime,
    actor: str,
) -> tuple[list[DriftChange], list[tuple[str, str, CohortDrift]]]:
    """Judge every version that reported in the window; record each cohort whose state
    flipped (``driftalert`` and the audit, in ``session``). Returns the flips, and every
    cohort judged with its model's name and version (for the metrics)."""
    since = window_start(now, window_s)
    version_ids = session.execute(
        sa_select(col(ModelHealthRow.model_version_id))
        .where(col(ModelHealthRow.hour) >= since)
        .group_by(col(ModelHealthRow.model_version_id))
    ).scalars()
    changes: list[DriftChange] = []
    judged: list[tuple[str, str, CohortDrift]] = []
    for version_id in list(version_ids):
        version = session.get(ModelVersion, version_id)
        if version is None:
            continue
        report = drift_report(
            session, version=version, thresholds=thresholds, until=now, window_s=window_s
        )
        if not report.reference:
            continue
        cohorts = [report.overall] if report.overall else []
        for cohort in [*cohorts, *report.cohorts]:
            if cohort.verdict is DriftVerdict.TOO_FEW_SAMPLES:
                continue
            judged.append((version.name, version.version, cohort))
            drifting = cohort.verdict is DriftVerdict.DRIFT
            if _flip(session, version_id, cohort, drifting=drifting, now=now):
                change = DriftChange(
                    model=version.name,
                    version=version.version,
                    cohort=cohort.cohort,
                    drifting=drifting,
                    samples=cohort.samples,
                    max_psi=cohort.max_psi,
                    max_distance=cohort.max_distance,
                    reasons=cohort.reasons,
                    at=now.isoformat(),
                )
                audit.record(
                    session,
                    actor=actor,
                    action="model.drift" if drifting else "model.drift_cleared",
                    target=f"model:{version.name}:{version.version}",
                    after=asdict(change),
                )
                changes.append(change)
    return changes, judged


def _flip(
    session: Session, version_id: int, cohort: CohortDrift, *, drifting: bool, now: dt.datetime
) -> bool:
    """Set the cohort's state to ``drifting`` if it is not already; whether this call did
    (a compare-and-set: of replicas judging at once, one wins)."""
    key = {"model_version_id": version_id, "cohort": cohort.cohort}
    if drifting:  # the first alert of a cohort makes its row; a cohort never seen is not
        table = DriftAlert.__table__  # type: ignore[attr-defined]
        dialect = session.get_bind().dialect.name
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        made: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            insert(table)
            .values(**key, drifting=True, score=cohort.max_psi, changed_at=now)
            .on_conflict_do_nothing()
        )
        if made.rowcount == 1:
            return True
    changed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(DriftAlert)
        .where(
            col(DriftAlert.model_version_id) == version_id,
            col(DriftAlert.cohort) == cohort.cohort,
            col(DriftAlert.drifting).is_(not drifting),
        )
        .values(drifting=drifting, score=cohort.max_psi, changed_at=now)
    )
    return bool(changed.rowcount == 1)


class DriftWatch:
    """The thread that runs :func:`judge_drift` every ``check_s`` and sends the alerts."""

    def __init__(
        self,
        db: Engine,
        metrics: FleetMetrics,
        *,
        thresholds: DriftThresholds,
        window_s: float,
        check_s: float,
        webhook_url: str | None,
        webhook_timeout_s: float,
        actor: str,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._thresholds = thresholds
        self._window_s = window_s
        self._check_s = check_s
        self._webhook_url = webhook_url
        self._webhook_timeout_s = webhook_timeout_s
        self._actor = actor
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drift-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._webhook_timeout_s + 30)

    def _run(self) -> None:
        while not self._stopping.wait(self._check_s):
            try:
                self.check()
            except Exception:  # the database away, a bug: the next look tries again
                log.exception("could not judge drift; trying again in %.0f s", self._check_s)

    def check(self) -> list[DriftChange]:
        """One look: judge, record, count, send. Returns the flips."""
        with session_scope(self._db) as session:
            changes, judged = judge_drift(
                session,
                thresholds=self._thresholds,
                window_s=self._window_s,
                now=self._clock(),
                actor=self._actor,
            )
        for name, version, cohort in judged:
            self._metrics.drifting.labels(name, version, cohort.cohort).set(
                1 if cohort.verdict is DriftVerdict.DRIFT else 0
            )
        for change in changes:
            if change.drifting:
                self._metrics.drift_alerts.labels(change.model, change.version, change.cohort).inc()
            log.warning(
                "model %s %s, cohort %r: %s (%s)",
                change.model,
                change.version,
                change.cohort or "every device",
                "drifting" if change.drifting else "back within thresholds",
                "; ".join(change.reasons) or "no threshold passed",
            )
            self._send(change)
        return changes

    def _send(self, change: DriftChange) -> None:
        if self._webhook_url is None:
            return
        try:
            response = httpx.post(
                self._webhook_url,
                json={"event": "drift" if change.drifting else "drift_cleared", **asdict(change)},
                timeout=self._webhook_timeout_s,
            )
            response.raise_for_status()
        except httpx.HTTPError as e:
            self._metrics.drift_webhook_failures.inc()
            log.error("the drift webhook did not take the alert: %s", e)
