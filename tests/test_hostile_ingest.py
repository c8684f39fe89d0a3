"""Hostile devices against the MQTT bridge's write path: a bad message never costs a good one.

The bridge's batch writer is driven with real ``paho`` ``MQTTMessage`` objects against real
SQLite and PostgreSQL databases brought to head by the packaged migrations (the outage test
goes through a real mosquitto). After the contract's bounds, no message that decodes makes
either database refuse it, so the quarantine path is provoked with real triggers created in
the test database: they refuse every row of devices whose id starts with ``poison``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.bounded import MAX_COUNT, MAX_VERSION_NUMBER, TS_MAX
from contracts.mqtt import (
    MAX_PAYLOAD_BYTES,
    Ack,
    PayloadError,
    Status,
    TelemetryBatch,
    TelemetryRecord,
    decode_payload,
    device_id_from_topic,
    device_topic,
    encode_telemetry,
)
from fleet.bridge import QUARANTINE_PAYLOAD_BYTES, MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import CommandRecord, Device, Quarantine, TelemetryRecordRow, utcnow
from fleet.telemetry import health_stats, ingest
from tests.utils.fleet import wait_for
from tests.utils.mqtt import free_port
from tests.utils.postgres import migrated_engine

GOOD = ("good-0", "good-1", "good-2")
HOSTILE = "hostile-1"
"""Sends anything; the database takes whatever of it decodes."""
POISON = "poison-1"
"""Sends anything too; the test database's triggers refuse every row it would write."""
COMMANDS = {device: f"cmd-{device}" for device in (*GOOD, HOSTILE, POISON)}

_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER refuse_poison_{table} BEFORE {event} ON {table} "
    f"WHEN NEW.{column} LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'poisoned device'); END"
    for table, event, column in (
        ("telemetry", "INSERT", "device_id"),
        ("device", "UPDATE", "id"),
        ("commandrecord", "UPDATE", "device_id"),
    )
]
_POSTGRES_TRIGGERS = [
    "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'poisoned device'; END $$",
    *(
        f"CREATE TRIGGER refuse_poison_{table} BEFORE {event} ON {table} FOR EACH ROW "
        f"WHEN (NEW.{column} LIKE 'poison%') EXECUTE FUNCTION refuse_poison()"
        for table, event, column in (
            ("telemetry", "INSERT", "device_id"),
            ("device", "UPDATE", "id"),
            ("commandrecord", "UPDATE", "device_id"),
        )
    ),
]


# --- databases ----------------------------------------------------------------------------


def _fresh_engine(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """An empty database of ``kind`` at head, with the devices, their commands and the
    triggers that refuse the poisoned device's rows."""
    engine = migrated_engine(kind, lambda: request.getfixturevalue("postgres_url"), tmp_path)
    triggers = _SQLITE_TRIGGERS if kind == "sqlite" else _POSTGRES_TRIGGERS
    with Session(engine) as session:
        for device, command in COMMANDS.items():
            session.add(Device(id=device, profile="host"))
            session.add(CommandRecord(id=command, device_id=device, kind="deploy"))
        session.commit()
    with engine.begin() as connection:
        for trigger in triggers:
            connection.execute(sa.text(trigger))
    return engine


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    made = _fresh_engine(request.param, request, tmp_path)
    yield made
    made.dispose()


def _bridge(engine: Engine, **options: Any) -> MqttBridge:
    """A bridge that is never started: tests call its batch writer themselves."""
    return MqttBridge(MqttEndpoint(host="127.0.0.1", port=1), engine, FleetMetrics(), **options)


def _metric(bridge: MqttBridge, name: str, **labels: str) -> float:
    registry = bridge._metrics.registry
    if labels:
        return registry.get_sample_value(name, labels) or 0.0
    samples = [s for m in registry.collect() for s in m.samples if s.name == name]
    return sum(s.value for s in samples)


def _message(topic: str | bytes, payload: bytes) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(topic=topic if isinstance(topic, bytes) else topic.encode())
    message.payload = payload
    return message


def _telemetry(device: str, *ids: str, compress: bool = False, **fields: Any) -> mqtt.MQTTMessage:
    records = [TelemetryRecord(id=i, ts=time.time(), bundle="m-1.0", **fields) for i in ids]
    return _message(
        device_topic(device, "telemetry"),
        encode_telemetry(TelemetryBatch(records=records), compress=compress),
    )


def _json_message(device: str, channel: str, body: dict[str, Any]) -> mqtt.MQTTMessage:
    return _message(f"edgefleet/v1/devices/{device}/{channel}", json.dumps(body).encode())


def _rows(engine: Engine, device: str) -> list[str]:
    with Session(engine) as session:
        query = select(TelemetryRecordRow.record_id).where(
            col(TelemetryRecordRow.device_id) == device
        )
        return sorted(session.exec(query).all())


def _quarantined(engine: Engine) -> list[Quarantine]:
    with Session(engine) as session:
        return list(session.exec(select(Quarantine).order_by(col(Quarantine.id))).all())


# --- the original report ------------------------------------------------------------------

POISONS = {
    "ts 1e20": (
        "malformed",
        _json_message(HOSTILE, "telemetry", {"records": [{"id": "p", "ts": 1e20}]}),
    ),
    "ts NaN": (
        "malformed",
        _message(device_topic(HOSTILE, "telemetry"), b'{"records": [{"id": "p", "ts": NaN}]}'),
    ),
    "a count of 2^63": (
        "malformed",
        _json_message(
            HOSTILE, "telemetry", {"records": [{"id": "p", "ts": 1.0, "inferences": 2**63}]}
        ),
    ),
    "a version number of 2^64": (
        "malformed",
        _json_message(HOSTILE, "status", {"online": True, "bundle_version_number": 2**64}),
    ),
    "refused by the database": ("quarantined", _telemetry(POISON, "p", inferences=1)),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_one_poisoned_message_among_twenty_good_ones_costs_nothing(
    engine: Engine, poison: str
) -> None:
    """The issue's report: 20 good messages and one poisoned message in one batch. Before,
    the bridge dropped all 21 and counted none; now 20 are stored and 1 counted."""
    counted_as, bad = POISONS[poison]
    good = [_telemetry(f"dev-{i:02d}", f"rec-{i}", inferences=3) for i in range(20)]
    bridge = _bridge(engine)

    bridge._write([*good[:10], bad, *good[10:]])

    for i in range(20):
        assert _rows(engine, f"dev-{i:02d}") == [f"rec-{i}"]
    assert _metric(bridge, "edgefleet_telemetry_records_total") == 20
    assert _metric(bridge, f"edgefleet_mqtt_{counted_as}_total") == 1
    assert (
        _metric(bridge, "edgefleet_mqtt_malformed_total")
        + _metric(bridge, "edgefleet_mqtt_quarantined_total")
        == 1
    )
    assert len(_quarantined(engine)) == (counted_as == "quarantined")


# --- the quarantine ------------------------------------------------------------------------


def test_a_refused_message_is_quarantined_whole_and_its_neighbours_stored(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A message the database refuses lands in ``quarantine`` with its error, size, hash and
    its first 64 KiB, one log line and one count; its neighbours of every channel are
    stored, in arrival order."""
    big = _telemetry(POISON, "p-1", extra={"pad": "x" * (100 << 10)})
    batch = [
        _json_message(GOOD[0], "status", {"online": True, "agent_version": "1.0"}),
        _telemetry(GOOD[0], "a", "b"),
        big,
        _json_message(GOOD[1], "ack", {"command": COMMANDS[GOOD[1]], "state": "healthy", "ts": 1}),
        _json_message(POISON, "status", {"online": True}),
        _json_message(GOOD[0], "status", {"online": True, "agent_version": "1.1"}),
        _telemetry(GOOD[2], "c", compress=True),
    ]
    bridge = _bridge(engine)
    before = utcnow()

    with caplog.at_level(logging.INFO, logger="fleet.bridge"):
        bridge._write(batch)

    assert (_rows(engine, GOOD[0]), _rows(engine, GOOD[2])) == (["a", "b"], ["c"])
    with Session(engine) as session:
        assert session.get_one(Device, GOOD[0]).agent_version == "1.1"  # the later status
        assert session.get_one(CommandRecord, COMMANDS[GOOD[1]]).last_ack == "healthy"
    rows = _quarantined(engine)
    assert [(r.device_id, r.channel) for r in rows] == [(POISON, "telemetry"), (POISON, "status")]
    payload = bytes(big.payload)
    assert len(payload) > QUARANTINE_PAYLOAD_BYTES
    first = rows[0]
    assert first.topic == device_topic(POISON, "telemetry")
    assert (first.payload_size, first.payload_sha256) == (
        len(payload),
        hashlib.sha256(payload).hexdigest(),
    )
    assert first.payload == payload[:QUARANTINE_PAYLOAD_BYTES]
    assert "poisoned device" in first.error and len(first.error) <= 2000
    assert before <= first.received_at <= utcnow()
    assert _metric(bridge, "edgefleet_mqtt_quarantined_total", channel="telemetry") == 1
    assert _metric(bridge, "edgefleet_mqtt_quarantined_total", channel="status") == 1
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 2 and POISON in lines[0]


# --- the handlers at the contract's limits --------------------------------------------------


def test_values_at_the_contracts_maxima_are_stored_and_summed_exactly(engine: Engine) -> None:
    """Every handler stores what the contract allows at its maxima, on both databases:
    1,000 records of 2^31 - 1 inferences each sum exactly, a status's version number of
    2^53 - 1 fits its column, an ack's detail of 2,000 characters is kept."""
    maximal = {
        "inferences": MAX_COUNT,
        "errors": MAX_COUNT,
        "fallbacks": MAX_COUNT,
        "shadow_bundle": "m-2.0",
        "shadow_compared": MAX_COUNT,
        "shadow_agreed": MAX_COUNT,
        "dropped": MAX_COUNT,
        "latency_p50_ms": 86_400_000.0,
        "latency_p95_ms": 86_400_000.0,
    }
    ids = [f"max-{i}" for i in range(1000)]
    bridge = _bridge(engine)
    bridge._write(
        [
            _telemetry(GOOD[0], *ids, compress=True, **maximal),
            _json_message(
                GOOD[1],
                "status",
                {"online": True, "bundle": "m-1.0", "bundle_version_number": MAX_VERSION_NUMBER},
            ),
            _json_message(
                GOOD[1],
                "ack",
                {"command": COMMANDS[GOOD[1]], "state": "failed", "detail": "d" * 2000, "ts": 1},
            ),
        ]
    )

    assert _metric(bridge, "edgefleet_mqtt_quarantined_total") == 0
    since = utcnow() - dt.timedelta(minutes=5)
    with Session(engine) as session:
        stats = health_stats(session, bundles=["m-1.0"], since=since)
        shadow = health_stats(session, bundles=["m-2.0"], since=since, shadow=True)
        device = session.get_one(Device, GOOD[1])
        command = session.get_one(CommandRecord, COMMANDS[GOOD[1]])
    assert stats.records == 1000
    assert stats.inferences == stats.errors == stats.fallbacks == 1000 * MAX_COUNT
    assert stats.latency_p95_ms == pytest.approx(86_400_000.0)
    assert shadow.shadow_compared == shadow.shadow_agreed == 1000 * MAX_COUNT
    assert device.bundle_version_number == MAX_VERSION_NUMBER
    assert command.last_ack == "failed"


def test_health_windows_follow_the_fleets_clock_not_the_devices(engine: Engine) -> None:
    """A device whose clock is unset (1970) or ahead (2099) still counts in the window it
    reported in; a record received two hours ago does not, whatever its ``ts`` says."""
    now = utcnow()
    rows = [
        ("unset-clock", TelemetryRecord(id="a", ts=0.0, bundle="m-1.0", inferences=1), now),
        ("fast-clock", TelemetryRecord(id="b", ts=TS_MAX, bundle="m-1.0", inferences=2), now),
        (
            "old",
            TelemetryRecord(id="c", ts=now.timestamp(), bundle="m-1.0", inferences=4),
            now - dt.timedelta(hours=2),
        ),
    ]
    with Session(engine) as session:
        assert ingest(session, rows) == 3
        session.commit()
        stats = health_stats(session, bundles=["m-1.0"], since=now - dt.timedelta(hours=1))
        record = session.get_one(TelemetryRecordRow, ("fast-clock", "b"))
    assert (stats.records, stats.inferences) == (2, 3)
    assert record.ts == dt.datetime.fromtimestamp(TS_MAX, dt.UTC)  # kept as data


# --- a failing database: held, retried, never quarantined -----------------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MqttEndpoint]:
    """A bare mosquitto on a loopback port, anonymous clients allowed."""
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout_s=10, what="mosquitto to listen")
        yield MqttEndpoint(host="127.0.0.1", port=port)
    finally:
        broker.terminate()
        broker.wait(10)


def test_while_the_database_is_down_messages_are_held_then_stored(
    tmp_path: Path, mosquitto: MqttEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds SQLite's write lock (a real ``database is locked``, after
    a busy wait of 1 s): the bridge quarantines nothing, holds what arrives up to
    ``max_held_bytes``, waits for room there while the database may yet answer, and once
    it has failed drops and counts what comes; it retries with backoff, logs the outage
    once, and stores everything it held once the lock is gone."""
    path = tmp_path / "fleet.db"
    migrated = make_engine(f"sqlite:///{path}")
    upgrade(migrated)
    migrated.dispose()
    engine = sa.create_engine(
        f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 1.0}
    )
    payload_bytes = len(bytes(_telemetry(GOOD[0], "r-00").payload))
    holds = 20
    bridge = MqttBridge(
        mosquitto,
        engine,
        FleetMetrics(),
        max_held_bytes=holds * (payload_bytes + 1024),
        retry_min_s=0.05,
        retry_max_s=0.2,
    )

    def shed() -> float:
        return _metric(bridge, "edgefleet_mqtt_shed_total", channel="telemetry")

    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device", protocol=mqtt.MQTTv5)
    device.connect(mosquitto.host, mosquitto.port)
    device.loop_start()
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        with caplog.at_level(logging.INFO, logger="fleet.bridge"):
            bridge.start()
            lock.execute("BEGIN EXCLUSIVE")
            for i in range(60):
                message = _telemetry(GOOD[0], f"r-{i:02d}")
                device.publish(message.topic, bytes(message.payload), qos=1).wait_for_publish(5)
            wait_for(lambda: bridge.pending() + shed() == 60, what="60 messages held or shed")
            wait_for(
                lambda: _metric(bridge, "edgefleet_ingest_store_retries_total") >= 2,
                what="retries",
            )
            assert _metric(bridge, "edgefleet_ingest_database_unavailable") == 1
            assert 0 < bridge.pending() <= holds
            assert _rows(engine, GOOD[0]) == []

            lock.execute("ROLLBACK")
            wait_for(lambda: bridge.pending() == 0, what="the held messages stored")
            bridge.stop()
    finally:
        lock.close()
        device.disconnect()
        device.loop_stop()
    assert len(_rows(engine, GOOD[0])) == 60 - shed() > 0
    assert _metric(bridge, "edgefleet_telemetry_records_total") == 60 - shed()
    assert _metric(bridge, "edgefleet_ingest_database_unavailable") == 0
    assert _metric(bridge, "edgefleet_mqtt_quarantined_total") == 0
    assert _quarantined(engine) == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the database failed" in m for m in messages) == 1
    assert sum("the database is back" in m for m in messages) == 1
    engine.dispose()


# --- Hypothesis: any mix of hostile messages among good ones --------------------------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# Values on the contract's bounds, which it accepts...
_ids = st.sampled_from(["r-1", "r-2", "r:3", "r" * 128])
_timestamps = st.sampled_from([0.0, 1.7e9, TS_MAX])
_counts = st.sampled_from([0, 1, MAX_COUNT])
_labels = st.sampled_from(["m-1.0", "m" * 193])
_extras = st.sampled_from(
    [
        {},
        {"deep": _nested(7)},
        {"lone surrogate": "\ud800", "\udc00": 1},
        {"n": 2**63 - 1, "f": 1e308, "tiny": 5e-324, "rtl": "\u202e", "tab": "a\tb"},
        {"pad": "x" * (255 << 10)},
    ]
)
# ...and values past them, or of another type.
_bad: st.SearchStrategy[Any] = (
    st.sampled_from(
        [
            -1,
            MAX_COUNT + 1,
            MAX_VERSION_NUMBER + 1,
            2**63,
            2**64,
            -(2**63) - 1,
            1e20,
            1e308,
            math.nan,
            math.inf,
            -math.inf,
            TS_MAX + 1,
            "",
            "\x00",
            "a\x00b",
            "\ud800",
            "a/b",
            "#",
            "x" * 300,
            "d" * 2001,
            None,
            True,
            [],
            {"deep": _nested(9)},
            {"pad": "x" * (257 << 10)},
        ]
    )
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
)


@st.composite
def _records(draw: st.DrawFn) -> dict[str, Any]:
    inferences, compared = draw(_counts), draw(_counts)
    return {
        "id": draw(_ids),
        "ts": draw(_timestamps),
        "bundle": draw(_labels),
        "inferences": inferences,
        "errors": draw(st.sampled_from([0, inferences])),
        "fallbacks": draw(st.sampled_from([0, inferences])),
        "latency_p95_ms": draw(st.sampled_from([0.0, 86_400_000.0])),
        "shadow_bundle": draw(_labels),
        "shadow_compared": compared,
        "shadow_agreed": draw(st.sampled_from([0, compared])),
        "dropped": draw(_counts),
        "extra": draw(_extras),
    }


_VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "telemetry": st.fixed_dictionaries({"records": st.lists(_records(), max_size=3)}),
    "status": st.fixed_dictionaries(
        {
            "online": st.booleans(),
            "agent_version": st.sampled_from(["2.0", "v" * 64]),
            "bundle": _labels,
            "bundle_version_number": st.sampled_from([1, MAX_VERSION_NUMBER]),
            "state": st.sampled_from(["idle", "s" * 64]),
            "ts": _timestamps,
        }
    ),
    "ack": st.fixed_dictionaries(
        {
            "command": st.sampled_from([*sorted(COMMANDS.values()), "cmd-unknown"]),
            "state": st.sampled_from(["downloading", "installed", "healthy", "failed"]),
            "detail": st.sampled_from(["", "d" * 2000, "line\nand\ttab"]),
            "bundle_version": _labels,
            "ts": _timestamps,
        }
    ),
}


@st.composite
def _bodies(draw: st.DrawFn, channel: str) -> dict[str, Any]:
    """A message of ``channel``'s shape with every value on a bound, and a third of the
    time one value (a record's, or the message's own) past its bound or of another type."""
    body = draw(_VALID[channel])
    if draw(st.integers(0, 2)) == 0:
        target = body
        if body.get("records") and draw(st.booleans()):
            target = draw(st.sampled_from(body["records"]))
        target[draw(st.sampled_from(sorted(target)))] = draw(_bad)
    return body


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_BOMB = zstandard.ZstdCompressor().compress(b'{"records": [' + b" " * (MAX_PAYLOAD_BYTES + 1))
_CRAFTED = [
    b"",
    b"null",
    b"NaN",
    b'{"records": [{"id": "r", "ts": Infinity}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b"\x28\xb5\x2f\xfd" + b"\x00" * 64,
    _BOMB,
    b" " * (MAX_PAYLOAD_BYTES + 1),
    zstandard.ZstdCompressor().compress(
        json.dumps({"records": [{"id": f"r{i}", "ts": 1} for i in range(10_001)]}).encode()
    ),
]
_BAD_TOPICS = [
    b"edgefleet/v1/devices/hostile-1/cmd",
    b"edgefleet/v1/devices/hostile-1/telemetry/x",
    b"edgefleet/v1/devices/../telemetry",
    b"edgefleet/v1/devices//status",
    b"edgefleet/v1/devices/" + b"h" * 65 + b"/ack",
    b"edgefleet/v1/devices/hostile 1/status",
    b"edgefleet/v1/devices/\xff\xfe/telemetry",
    b"$SYS/broker/uptime",
]


def _encoded(body: Any, compress: bool) -> bytes:
    data = json.dumps(body, allow_nan=True).encode()
    return zstandard.ZstdCompressor().compress(data) if compress else data


@st.composite
def _hostile_messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(topic, payload)``: mostly the hostile or the poisoned device's topic with a
    message on and past the bounds, else no device's topic, arbitrary bytes, arbitrary
    JSON, or a crafted payload (zstd bombs, deep nesting, oversize)."""
    channel = draw(st.sampled_from(sorted(_VALID)))
    topic = draw(
        {
            "device": st.sampled_from([HOSTILE, POISON]).map(
                lambda d: f"edgefleet/v1/devices/{d}/{channel}".encode()
            ),
            "not a device's": st.sampled_from(_BAD_TOPICS),
            "bytes": st.binary(max_size=40),
        }[draw(st.sampled_from(["device"] * 6 + ["not a device's", "bytes"]))]
    )
    payload = draw(
        {
            "shaped": st.tuples(_bodies(channel), st.booleans()).map(lambda b: _encoded(*b)),
            "bytes": st.binary(max_size=64),
            "json": st.tuples(_json_values, st.booleans()).map(lambda b: _encoded(*b)),
            "crafted": st.sampled_from(_CRAFTED),
        }[draw(st.sampled_from(["shaped"] * 6 + ["bytes", "json", "crafted"]))]
    )
    return topic, payload


@dataclass(frozen=True)
class _Verdict:
    """What the contract makes of a message: ``None`` fields when it refuses it."""

    device: str | None = None
    channel: str | None = None
    body: Any = None


_MODELS: dict[str, type[BaseModel]] = {"telemetry": TelemetryBatch, "status": Status, "ack": Ack}


def _contract(topic: bytes, payload: bytes) -> _Verdict:
    """The oracle: the contract's own topic and payload rules."""
    try:
        device, channel = device_id_from_topic(topic.decode())
        return _Verdict(device, channel, decode_payload(payload, _MODELS[channel]))
    except (UnicodeDecodeError, KeyError, PayloadError):
        return _Verdict()


def _writes_a_row(verdict: _Verdict) -> bool:
    """Whether storing the decoded message touches a row (which the triggers refuse for
    the poisoned device): any record, a status of a known device, an ack of its own
    command."""
    body = verdict.body
    if isinstance(body, TelemetryBatch):
        return bool(body.records)
    if isinstance(body, Ack):
        return body.command == COMMANDS[str(verdict.device)]
    return isinstance(body, Status)


def _reset(engine: Engine) -> None:
    with engine.begin() as connection:
        for statement in (
            "DELETE FROM telemetry",
            "DELETE FROM quarantine",
            "UPDATE device SET online = false, agent_version = NULL WHERE id NOT LIKE 'poison%'",
            "UPDATE commandrecord SET last_ack = NULL WHERE device_id NOT LIKE 'poison%'",
        ):
            connection.execute(sa.text(statement))


@pytest.mark.parametrize(("database", "examples"), [("sqlite", 60), ("postgres", 15)])
def test_hostile_messages_never_cost_a_good_one(
    database: str, examples: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Any mix of hostile messages among good ones from other devices, in any order: the
    bridge raises nothing, stores every good message once, counts every message the
    contract refuses as malformed, quarantines exactly the decoded messages the database
    refuses, and stores every other decoded one."""
    engine = _fresh_engine(database, request, tmp_path)
    bridge = _bridge(engine)
    counter = iter(range(1_000_000))

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile=st.lists(_hostile_messages(), min_size=1, max_size=6), data=st.data())
    def check(hostile: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
        _reset(engine)
        n = next(counter)
        batch: list[mqtt.MQTTMessage] = []
        for i, device in enumerate(GOOD):
            batch += [
                _telemetry(device, f"{n}-a", f"{n}-b", compress=i == 0, inferences=2),
                _json_message(device, "status", {"online": True, "agent_version": f"2.{n}"}),
                _json_message(
                    device, "ack", {"command": COMMANDS[device], "state": "healthy", "ts": 1}
                ),
            ]
        verdict_of: dict[int, _Verdict] = {}  # by id(): paho's messages compare by mid
        for topic, payload in hostile:
            message = _message(topic, payload)
            verdict_of[id(message)] = _contract(topic, payload)
            batch.insert(data.draw(st.integers(0, len(batch))), message)
        verdicts = [verdict_of[id(m)] for m in batch if id(m) in verdict_of]  # in batch order
        malformed = _metric(bridge, "edgefleet_mqtt_malformed_total")
        quarantined = _metric(bridge, "edgefleet_mqtt_quarantined_total")

        bridge._write(batch)

        for device in GOOD:
            assert _rows(engine, device) == [f"{n}-a", f"{n}-b"]
        poisoned = [v for v in verdicts if v.device == POISON and _writes_a_row(v)]
        assert _metric(bridge, "edgefleet_mqtt_malformed_total") - malformed == sum(
            v.body is None for v in verdicts
        )
        assert _metric(bridge, "edgefleet_mqtt_quarantined_total") - quarantined == len(poisoned)
        assert [(q.device_id, q.channel) for q in _quarantined(engine)] == [
            (POISON, v.channel) for v in poisoned
        ]
        hostile_records = {
            record.id
            for v in verdicts
            if v.device == HOSTILE and isinstance(v.body, TelemetryBatch)
            for record in v.body.records
        }
        assert _rows(engine, HOSTILE) == sorted(hostile_records)
        assert _rows(engine, POISON) == []
        statuses = [v.body for v in verdicts if v.device == HOSTILE and isinstance(v.body, Status)]
        with Session(engine) as session:
            for device in GOOD:
                assert session.get_one(Device, device).agent_version == f"2.{n}"
                assert session.get_one(CommandRecord, COMMANDS[device]).last_ack == "healthy"
            if statuses:  # the hostile device's own statuses took effect, the last one last
                assert session.get_one(Device, HOSTILE).online == statuses[-1].online

    try:
        check()
    finally:
        engine.dispose()
