"""Storage receipts (issue 12): a device keeps telemetry until the fleet has stored it.

In-process and fast: the resend schedule's table (``agent/telemetry_resend.py``), the
queue's sequence numbers (``agent/telemetry_queue.py``), the receipts the fleet builds
(``fleet/receipts.py``). Two with a real mosquitto: the bridge's receipts (stored, a
duplicate named again, a malformed batch refused by id); and mosquitto killed with SIGKILL
while it holds a backlog of telemetry it has PUBACKed to a device and not yet delivered to
a fleet that is away: every record still reaches the database once.
"""

from __future__ import annotations

import os
import queue
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError
from sqlmodel import Session, col, select

from agent.config import TelemetryConfig
from agent.telemetry import TelemetrySender
from agent.telemetry_queue import MIN_QUEUE_BYTES, TelemetryQueue
from agent.telemetry_resend import ResendSchedule
from contracts.mqtt import (
    RECEIPT_MAX_IDS,
    Receipt,
    TelemetryBatch,
    TelemetryRecord,
    device_topic,
    encode_telemetry,
)
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import TelemetryRecordRow
from fleet.receipts import receipts, refused_receipts
from tests.utils.fleet import wait_for
from tests.utils.mqtt import free_port


def record(n: int = 0) -> TelemetryRecord:
    return TelemetryRecord(id=uuid.uuid4().hex, ts=time.time(), inferences=n)


# --- the resend schedule: a table of (steps) -> what it says ---------------------------------


def test_resend_schedule_waits_from_the_oldest_record_backs_off_and_resets_on_a_receipt() -> None:
    s = ResendSchedule(10.0, 35.0)
    assert (s.cursor, s.due(1e9, oldest_seq=None), s.due(1e9, oldest_seq=1)) == (0, False, False)
    s.sent(5, now=100.0)  # records 1..5
    s.sent(9, now=104.0)  # records 6..9
    assert s.cursor == 9
    assert not s.due(109.9, oldest_seq=1) and s.due(110.0, oldest_seq=1)
    s.receipted()  # receipts for newer records do not put off the oldest one's resend
    assert s.due(110.0, oldest_seq=3)
    assert s.due(110.0, oldest_seq=5)  # the first batch's last record still waits
    assert not s.due(110.0, oldest_seq=6)  # the first batch all receipted: the second's wait
    assert s.due(114.0, oldest_seq=6)
    assert not s.due(1e9, oldest_seq=None)  # everything receipted
    s.sent(12, now=200.0)
    rounds = []
    for _ in range(3):  # no receipt: every round starts over at 0 with a doubled wait, bounded
        s.resend()
        rounds.append((s.cursor, s.due(1e9, oldest_seq=1), s.timeout_s))
    assert rounds == [(0, False, 20.0), (0, False, 35.0), (0, False, 35.0)]
    s.sent(3, now=300.0)
    assert not s.due(334.9, oldest_seq=1) and s.due(335.0, oldest_seq=1)
    s.receipted()
    assert (s.timeout_s, s.due(310.0, oldest_seq=1)) == (10.0, True)


@pytest.mark.parametrize(("timeout_s", "max_s"), [(0, 1), (-1, 1), (2, 1)])
def test_resend_schedule_refuses_timeouts_that_cannot_work(timeout_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ResendSchedule(timeout_s, max_s)


@pytest.mark.parametrize(("timeout_s", "max_s"), [(0.5, 1), (1, 1)])
def test_resend_schedule_takes_a_short_timeout_and_one_equal_to_its_bound(
    timeout_s: float, max_s: float
) -> None:
    s = ResendSchedule(timeout_s, max_s)
    s.resend()
    assert s.timeout_s == min(2 * timeout_s, max_s)


# --- the queue: numbers never reused, what is in flight counted -------------------------------


def test_queue_numbers_are_never_reused_once_the_newest_records_are_receipted(
    tmp_path: Path,
) -> None:
    """A record put after everything sent was receipted must still count as not sent:
    were its number reused, a sender past that number would skip it."""
    with TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES) as queue:
        first = queue.put_many([record(i) for i in range(3)])
        sent = queue.peek_after(0, 10)
        assert [q.record for q in sent] == first
        cursor = sent[-1].seq
        assert queue.count_through(cursor) == 3
        assert queue.remove(r.id for r in first) == 3
        assert queue.count_through(cursor) == 0
        later = queue.put(record(9))
    with TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES) as queue:  # across a reopen too
        assert [q.record for q in queue.peek_after(cursor, 10)] == [later]
        assert queue.peek_after(cursor, 10)[0].seq > cursor


def test_a_queue_from_before_receipts_is_renumbered_without_losing_a_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    old = [record(i) for i in range(3)]
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
        "dropped INTEGER NOT NULL, body TEXT NOT NULL);"
    )
    conn.executemany(
        "INSERT INTO records (id, dropped, body) VALUES (?, 0, ?)",
        [(r.id, r.model_dump_json()) for r in old],
    )
    conn.commit()
    conn.close()
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert queue.peek(10) == old
        queue.remove([old[-1].id])
        new = queue.put(record(7))
        assert [q.seq for q in queue.peek_after(0, 10)] == [1, 2, 4]
        assert queue.peek(10) == [*old[:2], new]


# --- the fleet's receipts -------------------------------------------------------------------


def test_receipts_name_each_stored_id_once_per_device_and_split_past_the_bound() -> None:
    many = [("dev-b", f"r{i}") for i in range(RECEIPT_MAX_IDS + 5)]
    settled = receipts([("dev-a", "x"), ("dev-a", "y"), ("dev-a", "x"), *many])
    assert [(d, r.stored) for d, r in settled[:1]] == [("dev-a", ["x", "y"])]
    assert [(d, len(r.stored)) for d, r in settled[1:]] == [
        ("dev-b", RECEIPT_MAX_IDS),
        ("dev-b", 5),
    ]
    assert all(not r.refused for _, r in settled)


def test_a_malformed_batch_is_refused_by_id_and_garbage_gets_no_receipt() -> None:
    good, bad = record(1), {"id": "bad-1", "ts": 1.0, "inferences": 1, "errors": 5}
    payload = TelemetryBatch(records=[good]).model_dump_json()[:-2] + f",{_json(bad)}]}}"
    ((device, receipt),) = refused_receipts("dev-a", payload.encode(), "malformed:\n errors")
    assert (device, receipt.refused, receipt.stored) == ("dev-a", [good.id, "bad-1"], [])
    assert receipt.reason == "malformed:  errors"  # control characters made printable
    zstd = encode_telemetry(TelemetryBatch(records=[good]))
    assert refused_receipts("dev-a", zstd, "quarantined")[0][1].refused == [good.id]
    for garbage in (b"", b"\xff\xfe", b'{"records": "no"}', b'{"records": [{"id": "../x"}]}'):
        assert refused_receipts("dev-a", garbage, "malformed") == []


def test_a_receipt_is_bounded() -> None:
    with pytest.raises(ValidationError, match="at most"):
        Receipt(stored=["a"] * RECEIPT_MAX_IDS, refused=["b"])
    with pytest.raises(ValidationError):
        Receipt(stored=["not an id!"])


def _json(value: object) -> str:
    import json

    return json.dumps(value)


# --- a broker killed with a backlog it had PUBACKed ------------------------------------------


class _Mosquitto:
    """A plain mosquitto (anonymous, sessions in memory) that the test kills and restarts
    on the same port."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\nlog_dest file {directory / 'mosquitto.log'}\n"
            + ("user root\n" if os.getuid() == 0 else "")
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._listens, timeout_s=10, what="mosquitto to listen")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def _listens(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0


@contextmanager
def _device(port: int, queue: TelemetryQueue, pubacks: list[int]) -> Iterator[TelemetrySender]:
    """A paho client as the agent's: reconnecting, subscribed to its receipts on every
    connect, each PUBACK's reason code told to the sender (and its message id appended
    to ``pubacks``)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    sender = TelemetrySender(
        queue,
        "dev-1",
        client,
        TelemetryConfig(batch_records=20),
        retry_s=0.2,
        receipt_timeout_s=2.0,
    )

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe(sender.receipt_topic, qos=1)
        sender.wake()

    def on_publish(_c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        sender.published(mid, reason)
        pubacks.append(mid)

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    sender.start()
    try:
        yield sender
    finally:
        sender.stop()
        client.disconnect()
        client.loop_stop()


def test_a_broker_killed_with_a_backlog_for_a_lagging_fleet_loses_no_record(
    tmp_path: Path,
) -> None:
    """The fleet's bridge is away (stopped; its session kept by the broker), so mosquitto
    queues what the device sends and PUBACKs it; mosquitto is then killed with SIGKILL,
    the backlog with it. Back up, with the bridge back: no receipt named those records,
    so the device sends them again, and every record it made is stored exactly once. A
    device that let go of records at the PUBACK loses the whole backlog here."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    broker = _Mosquitto(tmp_path / "broker")
    broker.start()
    endpoint = MqttEndpoint("127.0.0.1", broker.port)
    metrics = FleetMetrics()

    def stored() -> list[str]:
        with Session(engine) as session:
            query = select(TelemetryRecordRow.record_id).where(
                col(TelemetryRecordRow.device_id) == "dev-1"
            )
            return list(session.exec(query).all())

    bridge = MqttBridge(endpoint, engine, metrics, client_id="edgefleet-fleet-test")
    bridge.start()
    try:
        with TelemetryQueue(tmp_path / "telemetry.db", MIN_QUEUE_BYTES * 16) as queue:
            pubacks: list[int] = []
            with _device(broker.port, queue, pubacks) as sender:
                first = queue.put(record())
                assert first is not None
                sender.wake()
                wait_for(lambda: len(queue) == 0, what="the first record receipted")
                bridge.stop()  # the fleet lags: the broker queues for its session

                made = queue.put_many(record(i) for i in range(200))
                acked = len(pubacks)
                sender.wake()
                # batches of 20 reach the broker, PUBACKed; no receipt comes
                wait_for(lambda: len(pubacks) >= acked + 4, what="4 batches at the broker")
                broker.kill()
                assert sender.in_flight() == 80  # four batches, then it waits for receipts
                broker.start()
                bridge = MqttBridge(endpoint, engine, metrics, client_id="edgefleet-fleet-test")
                bridge.start()
                assert sender.flush(timeout_s=90), f"{len(queue)} records never receipted"
        ids = stored()
        assert len(ids) == len(set(ids)) == 201
        assert set(ids) == {first.id, *(r.id for r in made)}
    finally:
        bridge.stop()
        if broker.process is not None and broker.process.poll() is None:
            broker.process.terminate()
            broker.process.wait(10)
        engine.dispose()


def test_the_bridge_receipts_what_it_stored_again_for_a_duplicate_and_refuses_the_malformed(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    broker = _Mosquitto(tmp_path / "broker")
    broker.start()
    bridge = MqttBridge(MqttEndpoint("127.0.0.1", broker.port), engine, FleetMetrics())
    bridge.start()
    inbox: queue.Queue[Receipt] = queue.Queue()
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
    device.on_message = lambda _c, _u, m: inbox.put(Receipt.model_validate_json(m.payload))
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        device.subscribe(device_topic("dev-1", "receipt"), qos=1)
        good = [record(i) for i in range(3)]
        batch = encode_telemetry(TelemetryBatch(records=good))
        for _ in range(2):  # the second time, a duplicate: named again
            device.publish(device_topic("dev-1", "telemetry"), batch, qos=1)
            assert inbox.get(timeout=30) == Receipt(stored=[r.id for r in good])
        bad = b'{"records": [{"id": "bad-1", "ts": 1, "inferences": 1, "errors": 2}]}'
        device.publish(device_topic("dev-1", "telemetry"), bad, qos=1)
        refused = inbox.get(timeout=30)
        assert (refused.stored, refused.refused) == ([], ["bad-1"])
        assert "errors (2) is more than inferences (1)" in refused.reason
        assert inbox.empty()
    finally:
        device.disconnect()
        device.loop_stop()
        bridge.stop()
        assert broker.process is not None
        broker.process.terminate()
        broker.process.wait(10)
        engine.dispose()
