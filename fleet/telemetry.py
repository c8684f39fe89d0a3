"""Telemetry: idempotent ingest of device batches, and the health figures gates read.

Windows are on the fleet's clock (``received_at``): a record's ``ts`` is the device's
clock, which may be unset (1970) or lie, so it is kept as data and never decides whether a
record counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json
from sqlalchemy import Integer, Select, case, cast, func
from sqlalchemy import exc as sa_exc
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col

from contracts.mqtt import TelemetryRecord

from .models import HealthStats, TelemetryRecordRow

__all__ = [
    "COLUMN_OF_FIELD",
    "HealthPoint",
    "VersionHealth",
    "health_series",
    "health_stats",
    "ingest",
]


def ingest(session: Session, rows: Iterable[tuple[str, TelemetryRecord, dt.datetime]]) -> int:
    """Store ``(device_id, record, received_at)`` once each; returns how many were new.

    ``received_at``: when the fleet received the record, on its own clock. A record id
    already stored for that device (a resend after a lost PUBACK, a replayed queue) is
    skipped by the database itself. Every value fits its column on SQLite and PostgreSQL:
    the contract bounds counts to ``MAX_COUNT``, a 32-bit integer, and ``ts`` to before 2100.

    One statement for the lot, by each driver's fastest path: SQLite ``executemany`` of
    tuples (``INSERT OR IGNORE``); PostgreSQL ``COPY`` into a temporary staging table, then
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (triggers and constraints on
    ``telemetry`` act as on any insert). ``extra`` is written as the compact JSON of the
    document received.
    """
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        values = [_row(device_id, record, at, _sqlite_time) for device_id, record, at in rows]
        if not values:
            return 0
        result = connection.exec_driver_sql(_SQLITE_INSERT, values)
        return int(result.rowcount)
    values = [_row(device_id, record, at) for device_id, record, at in rows]
    if not values:
        return 0
    return _copy_into_postgresql(connection, values)


COLUMN_OF_FIELD = {"id": "record_id"}
"""The one message field whose column has another name; every other field of
:class:`~contracts.mqtt.TelemetryRecord` is stored under its own name."""

_FIELDS = tuple(TelemetryRecord.model_fields)
_COLUMNS = ("device_id", *(COLUMN_OF_FIELD.get(f, f) for f in _FIELDS), "received_at")
_TS, _EXTRA = 1 + _FIELDS.index("ts"), 1 + _FIELDS.index("extra")
_COLUMN_LIST = ", ".join(_COLUMNS)
_SQLITE_INSERT = (
    f"INSERT OR IGNORE INTO telemetry ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_STAGING = "telemetry_staging"
_POSTGRESQL_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGING} "
    "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_POSTGRESQL_COPY = f"COPY {_STAGING} ({_COLUMN_LIST}) FROM STDIN"
_POSTGRESQL_INSERT = (
    f"INSERT INTO telemetry ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGING} "
    "ON CONFLICT (device_id, record_id) DO NOTHING"
)
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy writes a ``DateTime`` into SQLite (UTC, microseconds always), which
every query of the table compares against."""


def _row(
    device_id: str,
    record: TelemetryRecord,
    received_at: dt.datetime,
    time: Callable[[dt.datetime], Any] = lambda value: value,
) -> tuple[Any, ...]:
    """The record as the table stores it, in :data:`_COLUMNS` order: who sent it, the
    message's fields (``ts`` as a UTC time, ``extra`` as JSON text), when it came; each
    time written by ``time``."""
    row = [device_id, *[getattr(record, f) for f in _FIELDS], time(received_at.astimezone(dt.UTC))]
    row[_TS] = time(dt.datetime.fromtimestamp(record.ts, dt.UTC))
    row[_EXTRA] = to_json(row[_EXTRA]).decode()
    return tuple(row)


def _sqlite_time(value: dt.datetime) -> str:
    return value.strftime(_SQLITE_TIME)


def _copy_into_postgresql(connection: Connection, values: Sequence[tuple[Any, ...]]) -> int:
    """COPY ``values`` into the session's staging table (emptied at commit), then insert
    what is new; the driver's errors come out as SQLAlchemy's, as any statement's would."""
    import psycopg

    raw: Any = connection.connection.driver_connection
    try:
        with raw.cursor() as cursor:
            cursor.execute(_POSTGRESQL_STAGE)
            with cursor.copy(_POSTGRESQL_COPY) as copy:
                for row in values:
                    copy.write_row(row)
    except psycopg.Error as error:
        raise sa_exc.DBAPIError.instance(_POSTGRESQL_COPY, None, error, psycopg.Error) from error
    return int(connection.exec_driver_sql(_POSTGRESQL_INSERT).rowcount)


def health_stats(
    session: Session,
    *,
    bundles: Sequence[str],
    since: dt.datetime,
    device_ids: Sequence[str] | Select[str] | None = None,
    shadow: bool = False,
) -> HealthStats:
    """Totals of records serving one of ``bundles`` (or shadowing it) that the fleet
    received since ``since``.

    ``device_ids``: only these devices' records; a query selecting the ids keeps a
    rollout's thousands of devices out of the statement's parameters.
    """
    t = TelemetryRecordRow
    bundle_column = col(t.shadow_bundle) if shadow else col(t.bundle)
    query = sa_select(
        func.count(),
        func.coalesce(func.sum(t.inferences), 0),
        func.coalesce(func.sum(t.errors), 0),
        func.coalesce(func.sum(t.fallbacks), 0),
        func.sum(col(t.latency_p95_ms) * t.inferences),
        func.sum(case((col(t.latency_p95_ms).is_not(None), t.inferences), else_=0)),
        func.coalesce(func.sum(t.shadow_compared), 0),
        func.coalesce(func.sum(t.shadow_agreed), 0),
    ).where(bundle_column.in_(list(bundles)), col(t.received_at) >= since)
    if device_ids is not None:
        ids = device_ids if isinstance(device_ids, Select) else list(device_ids)
        query = query.where(col(t.device_id).in_(ids))
    count, inferences, errors, fallbacks, weighted, weight, compared, agreed = session.execute(
        query
    ).one()
    return HealthStats(
        records=int(count),
        inferences=int(inferences),
        errors=int(errors),
        fallbacks=int(fallbacks),
        latency_p95_ms=float(weighted) / float(weight) if weighted is not None and weight else None,
        shadow_compared=int(compared),
        shadow_agreed=int(agreed),
    )


class HealthPoint(BaseModel):
    """One time bucket of one version's telemetry. Latencies are the records' per-interval
    percentiles averaged with their inferences as weights, as the gate reads p95."""

    start: dt.datetime
    records: int
    inferences: int
    error_rate: float | None
    fallback_rate: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    shadow_compared: int
    """Predictions compared while this version ran as a shadow."""
    agreement: float | None


class VersionHealth(BaseModel):
    version: str
    bundles: list[str]
    points: list[HealthPoint]
    """Only the buckets with records, oldest first."""


def health_series(
    session: Session,
    *,
    versions: Mapping[str, str],
    since: dt.datetime,
    until: dt.datetime,
    buckets: int,
) -> list[VersionHealth]:
    """``versions`` (bundle name → version) bucketed over ``[since, until)`` on the fleet's
    clock, in ``buckets`` equal slices, by the database: two grouped queries on the
    ``(bundle, received_at)`` index, whatever the number of records.

    Shadow agreement is counted for the version that ran as the shadow, from the records of
    devices serving one of ``versions``.
    """
    if not versions or buckets < 1 or until <= since:
        raise ValueError("health_series needs bundles, at least one bucket and since < until")
    t = TelemetryRecordRow
    width_s = (until - since).total_seconds() / buckets
    dialect = session.get_bind().dialect.name
    bucket = _bucket(col(t.received_at), since, width_s, dialect).label("bucket")
    window = (
        col(t.bundle).in_(list(versions)),
        col(t.received_at) >= since,
        col(t.received_at) < until,
    )
    figures: list[Any] = [
        func.count(),
        func.coalesce(func.sum(t.inferences), 0),
        func.coalesce(func.sum(t.errors), 0),
        func.coalesce(func.sum(t.fallbacks), 0),
        *_weighted(col(t.latency_p50_ms), col(t.inferences)),
        *_weighted(col(t.latency_p95_ms), col(t.inferences)),
    ]
    served = session.execute(
        sa_select(bucket, col(t.bundle), *figures).where(*window).group_by(bucket, col(t.bundle))
    ).all()
    shadowed = session.execute(
        sa_select(
            bucket,
            col(t.shadow_bundle),
            func.coalesce(func.sum(t.shadow_compared), 0),
            func.coalesce(func.sum(t.shadow_agreed), 0),
        )
        .where(*window, col(t.shadow_bundle).in_(list(versions)))
        .group_by(bucket, col(t.shadow_bundle))
    ).all()
    sums: dict[tuple[str, int], _Sums] = {}

    def at(bundle: str, index: Any) -> _Sums:
        return sums.setdefault((versions[bundle], min(int(index), buckets - 1)), _Sums())

    for index, bundle, *figures in served:
        at(bundle, index).add_served(*(float(f or 0) for f in figures))
    for index, bundle, compared, agreed in shadowed:
        at(bundle, index).add_shadowed(int(compared), int(agreed))
    found = []
    for version in sorted(set(versions.values())):
        points = [
            row.point(since + dt.timedelta(seconds=index * width_s))
            for (v, index), row in sorted(sums.items(), key=lambda item: item[0])
            if v == version
        ]
        bundles = sorted(b for b, v in versions.items() if v == version)
        found.append(VersionHealth(version=version, bundles=bundles, points=points))
    return found


@dataclass
class _Sums:
    """One version's sums in one bucket, over its bundles."""

    records: float = 0
    inferences: float = 0
    errors: float = 0
    fallbacks: float = 0
    p50: float = 0
    p50_weight: float = 0
    p95: float = 0
    p95_weight: float = 0
    compared: int = 0
    agreed: int = 0

    def add_served(self, *figures: float) -> None:
        """The served query's figures after bucket and bundle, in its order."""
        records, inferences, errors, fallbacks, p50, p50_weight, p95, p95_weight = figures
        self.records += records
        self.inferences += inferences
        self.errors += errors
        self.fallbacks += fallbacks
        self.p50 += p50
        self.p50_weight += p50_weight
        self.p95 += p95
        self.p95_weight += p95_weight

    def add_shadowed(self, compared: int, agreed: int) -> None:
        self.compared += compared
        self.agreed += agreed

    def point(self, start: dt.datetime) -> HealthPoint:
        inferences = self.inferences
        return HealthPoint(
            start=start,
            records=int(self.records),
            inferences=int(inferences),
            error_rate=self.errors / inferences if inferences else None,
            fallback_rate=self.fallbacks / inferences if inferences else None,
            latency_p50_ms=self.p50 / self.p50_weight if self.p50_weight else None,
            latency_p95_ms=self.p95 / self.p95_weight if self.p95_weight else None,
            shadow_compared=self.compared,
            agreement=self.agreed / self.compared if self.compared else None,
        )


def _weighted(value: Any, weight: Any) -> tuple[Any, Any]:
    """The sums that make an inference-weighted mean of ``value``: Σ value·w, Σ w where
    the value is reported."""
    return func.sum(value * weight), func.sum(case((value.is_not(None), weight), else_=0))


def _bucket(column: Any, since: dt.datetime, width_s: float, dialect: str) -> Any:
    """The 0-based bucket of a time column, computed in SQL (seconds since the epoch:
    SQLite's ``julianday``, PostgreSQL's ``extract``). SQLite's day fractions carry some
    50 µs of rounding: its seconds are rounded to the millisecond, so a record on a
    bucket's boundary is not put in the bucket before."""
    if dialect == "sqlite":
        seconds = (func.julianday(column) - 2440587.5) * 86400.0
        elapsed = func.round(seconds - since.timestamp(), 3)
        return cast(elapsed / width_s, Integer)  # >= 0: truncation floors
    seconds = func.extract("epoch", column)
    return func.floor((seconds - since.timestamp()) / width_s)
