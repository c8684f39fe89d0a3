"""Telemetry ingest's bulk paths (SQLite ``executemany``, PostgreSQL ``COPY`` into a
staging table) store what the ORM reads back as the records received, once each, and
in the windows the health queries cut on the fleet's clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contracts.mqtt import TelemetryRecord
from fleet.models import TelemetryRecordRow
from fleet.telemetry import health_stats, ingest
from tests.utils.postgres import migrated_engine

BUNDLE = "digits-host-1.0.0"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    engine = migrated_engine(
        request.param, lambda: request.getfixturevalue("postgres_url"), tmp_path
    )
    request.addfinalizer(engine.dispose)
    return engine


def test_records_read_back_as_received_once_each_in_the_fleets_windows(engine: Engine) -> None:
    received = dt.datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=dt.UTC)
    records = [
        TelemetryRecord(
            id=f"r{n}",
            ts=1_790_000_000.25 + n,
            bundle=BUNDLE,
            inferences=10 + n,
            errors=n,
            latency_p95_ms=4.5,
            shadow_bundle="digits-host-1.1.0" if n else None,
            extra={"classes": {"cat": n, "dog": [1, 2.5, None, True]}, "note": "é\t"},
        )
        for n in range(3)
    ]
    with Session(engine) as session:
        assert ingest(session, [("dev-a", r, received) for r in records]) == 3
        session.commit()
    with Session(engine) as session:  # a resend: nothing new, nothing changed
        again = [*records[1:], records[0].model_copy(update={"id": "r3"})]
        assert ingest(session, [("dev-a", r, received) for r in again]) == 1
        session.commit()
    with Session(engine) as session:
        rows = session.exec(select(TelemetryRecordRow).order_by(TelemetryRecordRow.record_id))
        stored = {row.record_id: row for row in rows}
        assert sorted(stored) == ["r0", "r1", "r2", "r3"]
        for record in records:
            row = stored[record.id]
            assert row.device_id == "dev-a"
            assert row.received_at == received
            assert row.ts == dt.datetime.fromtimestamp(record.ts, dt.UTC)
            assert row.extra == record.extra
            as_received = {
                "id" if k == "record_id" else k: v
                for k, v in row.model_dump().items()
                if k not in ("device_id", "received_at", "ts")
            }
            assert as_received == record.model_dump(exclude={"ts"})
        stats = health_stats(session, bundles=[BUNDLE], since=received)
        assert stats.records == 4 and stats.inferences == 10 + 11 + 12 + 10
        later = received + dt.timedelta(microseconds=1)
        assert health_stats(session, bundles=[BUNDLE], since=later).records == 0
