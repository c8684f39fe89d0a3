"""Telemetry: idempotent ingest of device batches, and the health figures gates read.

Windows are on the fleet's clock (``received_at``): a record's ``ts`` is the device's
clock, which may be unset (1970) or lie, so it is kept as data and never decides whether a
record counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, case, func
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from contracts.mqtt import TelemetryRecord

from .models import HealthStats, TelemetryRecordRow

__all__ = ["COLUMN_OF_FIELD", "health_stats", "ingest"]


def ingest(session: Session, rows: Iterable[tuple[str, TelemetryRecord, dt.datetime]]) -> int:
    """Store ``(device_id, record, received_at)`` once each; returns how many were new.

    ``received_at``: when the fleet received the record, on its own clock. A record id
    already stored for that device (a resend after a lost PUBACK, a replayed queue) is
    skipped by the database itself (``ON CONFLICT DO NOTHING``). Every value fits its
    column on SQLite and PostgreSQL: the contract bounds counts to ``MAX_COUNT``, a 32-bit
    integer, and ``ts`` to before 2100.
    """
    values = [_row(device_id, record, at) for device_id, record, at in rows]
    if not values:
        return 0
    dialect = session.get_bind().dialect.name
    insert: Any = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    table: Any = TelemetryRecordRow.__table__  # type: ignore[attr-defined]
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["device_id", "record_id"])
        .returning(table.c.record_id)
    )
    return len(session.execute(statement, values).all())


COLUMN_OF_FIELD = {"id": "record_id"}
"""The one message field whose column has another name; every other field of
:class:`~contracts.mqtt.TelemetryRecord` is stored under its own name."""


def _row(device_id: str, record: TelemetryRecord, received_at: dt.datetime) -> dict[str, Any]:
    """The record as the table stores it: the message's fields, ``ts`` as a UTC time, and
    who sent it when."""
    row = {COLUMN_OF_FIELD.get(k, k): v for k, v in record.model_dump().items()}
    row.update(
        device_id=device_id,
        ts=dt.datetime.fromtimestamp(record.ts, dt.UTC),
        received_at=received_at,
    )
    return row


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
