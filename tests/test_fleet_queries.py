"""The dashboard's queries whose SQL differs by database, on SQLite and PostgreSQL: a tag
matched inside the JSON list of tags, and telemetry bucketed by time in SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.inventory import DeviceFilter, device_summary, find_devices
from fleet.models import Device, TelemetryRecordRow
from fleet.telemetry import health_series
from tests.utils.postgres import migrated_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database of each kind."""
    found = migrated_engine(
        request.param, lambda: request.getfixturevalue("postgres_url"), tmp_path
    )
    yield found
    found.dispose()


def test_a_tag_matches_whole_tags_only_and_filters_combine(engine: Engine) -> None:
    tags = [["eu", "lab"], ["eu_west"], ["eu-1"], ["lab"], [], ["x", "eu"]]
    with Session(engine) as session:
        for i, device_tags in enumerate(tags):
            profile = "rpi4" if i % 2 else "host"
            session.add(Device(id=f"d{i}", profile=profile, tags=device_tags, online=i < 3))
        session.commit()

        def ids(where: DeviceFilter, limit: int = 100, offset: int = 0) -> tuple[list[str], int]:
            page, total = find_devices(session, where, limit=limit, offset=offset)
            return [d.id for d in page], total

        assert ids(DeviceFilter(tags=["eu"])) == (["d0", "d5"], 2)
        assert ids(DeviceFilter(tags=["eu_west"])) == (["d1"], 1)  # "_" is no wildcard
        assert ids(DeviceFilter(tags=["eu", "lab"])) == (["d0"], 1)
        assert ids(DeviceFilter(tags=["lab"], online=True)) == (["d0"], 1)
        assert ids(DeviceFilter(profile="rpi4", id_contains="d")) == (["d1", "d3", "d5"], 3)
        assert ids(DeviceFilter(), limit=2, offset=2) == (["d2", "d3"], 6)
        summary = device_summary(session)
        assert (summary.total, summary.online) == (6, 3)
        assert summary.tags == {"eu": 2, "lab": 2, "eu-1": 1, "eu_west": 1, "x": 1}
        assert summary.profiles == {"host": 3, "rpi4": 3}


def test_telemetry_is_bucketed_by_the_fleets_clock_in_sql(engine: Engine) -> None:
    since = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    rows = [  # (seconds after since, bundle, inferences, errors, p95, shadow compared/agreed)
        (5, "m-1", 100, 1, 10.0, None),
        (59, "m-1", 100, 3, 20.0, None),
        (60, "m-2", 50, 5, 30.0, None),
        (119.9, "m-1", 0, 0, None, ("m-2", 10, 9)),
        (120, "m-1", 100, 0, 99.0, None),  # the window's end: left out
        (-1, "m-1", 100, 0, 99.0, None),  # before it: left out
    ]
    with Session(engine) as session:
        for i, (offset, bundle, inferences, errors, p95, shadow) in enumerate(rows):
            session.add(
                TelemetryRecordRow(
                    device_id="d",
                    record_id=f"r{i}",
                    ts=dt.datetime(1970, 1, 1, tzinfo=dt.UTC),  # a device clock never counts
                    received_at=since + dt.timedelta(seconds=offset),
                    bundle=bundle,
                    inferences=inferences,
                    errors=errors,
                    latency_p95_ms=p95,
                    shadow_bundle=shadow[0] if shadow else None,
                    shadow_compared=shadow[1] if shadow else 0,
                    shadow_agreed=shadow[2] if shadow else 0,
                )
            )
        session.commit()
        series = health_series(
            session,
            versions={"m-1": "1", "m-2": "2"},
            since=since,
            until=since + dt.timedelta(seconds=120),
            buckets=2,
        )
    one, two = series
    assert (one.version, two.version) == ("1", "2")
    [first, second] = one.points
    assert (first.start, first.records, first.inferences) == (since, 2, 200)
    assert first.error_rate == pytest.approx(0.02)
    assert first.latency_p95_ms == pytest.approx(15.0)  # weighted by inferences
    assert (second.records, second.inferences, second.error_rate) == (1, 0, None)
    [challenger] = two.points
    assert challenger.start == since + dt.timedelta(seconds=60)
    assert (challenger.inferences, challenger.error_rate) == (50, pytest.approx(0.1))
    assert (challenger.shadow_compared, challenger.agreement) == (10, pytest.approx(0.9))
