"""Bursts lose nothing: the broker holds what the fleet has not taken yet, bounded in bytes
only, and the fleet raises its queue alarm long before that bound (docs/fleet.md, "Bursts").

Real parts: the fleet's own mosquitto (``MosquittoBroker``, its config and dynamic
security), a publisher with a broker account made through the admin path, the fleet's
``MqttBridge`` storing into SQLite. The bridge holds few messages at a time (a small
``max_held_bytes``, or a receive maximum of one), so nearly the whole burst waits in the
broker's queue for it. (mosquitto 2.0.11 does not hold to a larger receive maximum once
the subscriber acknowledges: fleet/bridge.py.)
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from sqlalchemy.engine import Engine

from contracts.mqtt import (
    TOPIC_PREFIX,
    CommandKind,
    Receipt,
    TelemetryBatch,
    TelemetryRecord,
    encode_telemetry,
)
from fleet.bridge import RECEIPT_PACKET_IDS, MqttBridge
from fleet.broker import MosquittoBroker, MqttEndpoint
from fleet.broker.credential import replica_username
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from tests.utils.fleet import wait_for

PUBLISHER = "burst-publisher"


@dataclass(frozen=True)
class Setup:
    broker: MosquittoBroker
    fleet: MqttEndpoint
    publisher: MqttEndpoint
    db: Engine


@contextmanager
def _start(tmp_path: Path, **broker_options: int) -> Iterator[Setup]:
    broker = MosquittoBroker(tmp_path / "mosquitto", **broker_options)
    fleet = broker.start(
        fleet_username=replica_username("burst"),
        fleet_password=secrets.token_urlsafe(24),
        devices=[],
    )
    password = secrets.token_urlsafe(24)
    broker.control(
        [
            {
                "command": "createRole",
                "rolename": "publisher",
                "acls": [
                    {
                        "acltype": "publishClientSend",
                        "topic": f"{TOPIC_PREFIX}/+/telemetry",
                        "allow": True,
                    }
                ],
            },
            {
                "command": "createClient",
                "username": PUBLISHER,
                "password": password,
                "roles": [{"rolename": "publisher"}],
            },
        ]
    )
    db = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    try:
        yield Setup(
            broker,
            fleet,
            MqttEndpoint(fleet.host, fleet.port, username=PUBLISHER, password=password),
            db,
        )
    finally:
        broker.stop()
        db.dispose()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with _start(tmp_path) as started:
        yield started


def _stored(db: Engine) -> int:
    with db.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM telemetry")).scalar_one())


def _payload(n: int, padding: int = 0) -> bytes:
    record = TelemetryRecord(
        id=f"r{n}", ts=1_790_000_000.0, inferences=1, extra={"pad": "x" * padding}
    )
    return encode_telemetry(TelemetryBatch(records=[record]), compress=False)


def _publish(endpoint: MqttEndpoint, payloads: list[bytes], timeout_s: float = 300) -> int:
    """Publish ``payloads`` QoS 1 as fast as the broker takes them (devices ``burst-N``);
    how many the broker acknowledged."""
    acked = 0
    done = threading.Event()
    lock = threading.Lock()

    def on_publish(*_: object) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked == len(payloads):
                done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=PUBLISHER, protocol=mqtt.MQTTv311)
    client.username_pw_set(endpoint.username, endpoint.password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        for n, payload in enumerate(payloads):
            client.publish(f"{TOPIC_PREFIX}/burst-{n % 100}/telemetry", payload, qos=1)
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return acked


def test_a_burst_far_above_what_the_bridge_holds_waits_in_the_broker_and_is_stored_whole(
    setup: Setup,
) -> None:
    """30,000 messages acknowledged by the broker while the bridge may hold 50 unstored: at
    its bound it stops reading rather than dropping (none shed, never more than 50 held and
    one waiting), the broker's queue for the fleet holds the rest (mosquitto's default
    bound, 1,000 messages, would drop nearly all of it) and every record is stored."""
    count, holds = 30_000, 50
    metrics = FleetMetrics()
    bridge = MqttBridge(
        setup.fleet,
        setup.db,
        metrics,
        client_id=setup.fleet.username,
        max_held_bytes=holds * (len(_payload(count)) + 1024),
        batch_size=holds // 2,
    )
    most_held = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_held
        while not done.wait(0.0005):
            most_held = max(most_held, bridge.pending())

    watcher = threading.Thread(target=watch, daemon=True)
    bridge.start()
    watcher.start()
    try:
        acked = _publish(setup.publisher, [_payload(n) for n in range(count)])
        assert acked == count
        wait_for(
            lambda: _stored(setup.db) >= count or bridge.quiet_s() > 15,
            timeout_s=600,
            what="every record stored, or nothing more coming",
        )
        assert _stored(setup.db) == count
    finally:
        done.set()
        bridge.stop()
    assert metrics.shed.labels("telemetry")._value.get() == 0
    assert 0 < most_held <= holds + 1  # and one waiting for room
    assert "are being dropped" not in setup.broker.log_path.read_text()


def test_a_bridge_stopped_while_it_waits_for_room_disconnects_at_once_and_loses_nothing(
    setup: Setup,
) -> None:
    """The database hangs (another connection holds SQLite's write lock and the bridge's
    busy wait is a minute: no error, a write that does not return) with the bridge full:
    ``stop`` still sends the DISCONNECT at once (paho's thread, waiting for room, is
    woken), and a bridge started afterwards on the same session gets what the first one
    never acknowledged: every record is stored."""
    count, holds = 200, 5
    path = setup.db.url.database
    assert path is not None
    hanging = sa.create_engine(
        f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 60}
    )
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    first = MqttBridge(
        setup.fleet,
        hanging,
        FleetMetrics(),
        client_id=setup.fleet.username,
        max_held_bytes=holds * (len(_payload(count)) + 1024),
    )
    first.start()
    stopping = threading.Thread(target=first.stop)
    try:
        assert _publish(setup.publisher, [_payload(n) for n in range(count)]) == count
        # full, and paho's thread waits with the next (counted: a drain is not done)
        wait_for(lambda: first.pending() == holds + 1, what="the bridge full")
        stopping.start()
        disconnected = f"Client {setup.fleet.username} disconnected"
        wait_for(
            lambda: disconnected in setup.broker.log_path.read_text(),
            timeout_s=10,
            what="the DISCONNECT, the database still hanging",
        )
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        if stopping.ident is None:  # failed before the stop
            first.stop()
        else:
            stopping.join(60)
        hanging.dispose()
    assert not stopping.is_alive()
    second = MqttBridge(setup.fleet, setup.db, FleetMetrics(), client_id=setup.fleet.username)
    second.start()
    try:
        wait_for(lambda: _stored(setup.db) >= count, timeout_s=60, what="every record stored")
    finally:
        second.stop()
    assert _stored(setup.db) == count


def test_the_queue_alarm_fires_long_before_the_broker_would_drop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker bounded at 8 MiB per client, an alarm at 1 MiB, and a fleet taking one
    message at a time: 2.5 MiB waiting in the broker raises the alarm (metric and log),
    nothing is dropped, and the alarm clears once the fleet has caught up."""
    with _start(tmp_path, max_queued_bytes=8 << 20) as setup:
        _alarm_and_recovery(setup, caplog)


def _alarm_and_recovery(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    metrics = FleetMetrics()
    bridge = MqttBridge(
        setup.fleet,
        setup.db,
        metrics,
        client_id=setup.fleet.username,
        receive_maximum=1,
        queue_alarm_bytes=1 << 20,
    )
    caplog.set_level(logging.WARNING, logger="fleet.bridge")
    bridge.start()
    try:
        count = 250
        assert _publish(setup.publisher, [_payload(n, 10_000) for n in range(count)]) == count
        wait_for(
            lambda: metrics.broker_queue_alarm._value.get() == 1,
            timeout_s=60,
            what="the queue alarm",
        )
        assert metrics.broker_stored_bytes._value.get() > 1 << 20
        assert "the fleet stores less than devices send" in caplog.text
        wait_for(lambda: _stored(setup.db) >= count, timeout_s=600, what="every record stored")
        wait_for(
            lambda: metrics.broker_queue_alarm._value.get() == 0,
            timeout_s=60,
            what="the alarm to clear",
        )
        assert "alarm cleared" in caplog.text
        assert _stored(setup.db) == count
    finally:
        bridge.stop()


def test_receipts_give_way_to_commands_when_pubacks_are_held_up_and_are_logged_once(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """With the broker stopped (SIGSTOP: no PUBACK comes, as for receipts written behind a
    backlog) receipts take at most ``RECEIPT_PACKET_IDS`` of paho's 65,535 packet ids;
    past them each is counted unqueued, and a wave of 10,000 commands still goes out. The
    stretch is logged once as it starts and once as it ends."""
    metrics = FleetMetrics()
    bridge = MqttBridge(setup.fleet, setup.db, metrics, client_id=setup.fleet.username)
    bridge.start()
    pid = setup.broker.pid
    assert pid is not None

    def receipts(count: int) -> list[tuple[str, Receipt]]:
        return [(f"burst-{n % 100}", Receipt(stored=[f"r{n}"])) for n in range(count)]

    caplog.set_level(logging.INFO, logger="fleet.bridge")
    os.kill(pid, signal.SIGSTOP)
    try:
        bridge._send_receipts(receipts(RECEIPT_PACKET_IDS + 65))
        bridge._send_receipts(receipts(100))
        assert metrics.receipts_unqueued._value.get() == 165
        wave = [(f"burst-{n}", b'{"kind": "deploy"}') for n in range(10_000)]
        bridge.send_encoded(CommandKind.DEPLOY, wave)  # BrokerError if it found no id
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        wait_for(
            lambda: bridge._send_receipts(receipts(1)) or "queued again" in caplog.text,
            what="a receipt queued again once the broker acknowledges",
        )
    finally:
        bridge.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not queue storage receipts" in m for m in messages) == 1
    assert sum("storage receipts are queued again" in m for m in messages) == 1
