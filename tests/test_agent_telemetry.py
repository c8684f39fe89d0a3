"""The agent's offline telemetry: the SQLite queue, inference stats, and the MQTT sender.

Against a real fleet (mosquitto + bridge + SQLite) and real paho clients. The key case
is the issue's: 10,000 records queued while the broker is down, the agent killed with
SIGKILL mid-way, restarted, the broker back: every record reaches the fleet once. A broker
that takes a batch and never acknowledges it (mosquitto stopped with SIGSTOP) must not cost
a record either. (A broker that refuses a batch: ``tests/test_hostile_agent.py``.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlmodel import Session, col, func, select

from agent.config import TelemetryConfig
from agent.errors import TelemetryQueueError
from agent.telemetry import LATENCY_BUCKETS_MS, InferenceOutcome, InferenceStats, TelemetrySender
from agent.telemetry_queue import MIN_QUEUE_BYTES, TelemetryQueue
from contracts.bounded import MAX_DOCUMENT_BYTES
from contracts.mqtt import MAX_PAYLOAD_BYTES, TelemetryBatch, TelemetryRecord, device_topic
from fleet.models import TelemetryRecordRow
from fleet.server import FLEET_MQTT_USER
from fleet.simulator import SimulatedDeviceSpec
from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.mqtt import free_port, mqtt_pub
from tests.utils.telemetry_agent import QUEUE_BYTES

REPO = Path(__file__).resolve().parents[1]
BIG_QUEUE = 64 << 20


def record(inferences: int = 1, *, pad_bytes: int = 0) -> TelemetryRecord:
    """A record; ``pad_bytes`` of incompressible hex in ``extra`` make it that much larger."""
    extra = {"pad": os.urandom(pad_bytes // 2).hex()} if pad_bytes else {}
    return TelemetryRecord(id=uuid.uuid4().hex, ts=time.time(), inferences=inferences, extra=extra)


def outcome(**overrides: object) -> InferenceOutcome:
    fields: dict[str, object] = {
        "bundle": "digits-1.0.0",
        "served_by": "local",
        "latency_ms": 3.0,
        "local_error": False,
        "fallback_reason": None,
        "predicted_class": 1,
    }
    fields.update(overrides)
    return InferenceOutcome(**fields)  # type: ignore[arg-type]


def files_bytes(path: Path) -> int:
    """Every file SQLite keeps for ``path`` (database, WAL, shared memory, journal)."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet", mqtt_port=free_port()) as running:
        yield running


def fleet_rows(fleet: RunningFleet, device_id: str) -> list[TelemetryRecordRow]:
    with Session(fleet.server.db) as session:
        query = select(TelemetryRecordRow).where(col(TelemetryRecordRow.device_id) == device_id)
        return list(session.exec(query).all())


def wait_rows(
    fleet: RunningFleet, device_id: str, count: int, *, fetch: bool = True
) -> list[TelemetryRecordRow]:
    """Wait for at least ``count`` rows of the device at the fleet; the rows if ``fetch``."""

    def stored() -> int:
        with Session(fleet.server.db) as session:
            query = select(func.count()).where(col(TelemetryRecordRow.device_id) == device_id)
            return session.exec(query).one()

    wait_for(lambda: stored() >= count, what=f"{count} telemetry rows of {device_id}")
    return fleet_rows(fleet, device_id) if fetch else []


@contextmanager
def connected_sender(
    fleet: RunningFleet, spec: SimulatedDeviceSpec, queue: TelemetryQueue, **timing: float
) -> Iterator[TelemetrySender]:
    """A paho client logged in as the device, and a started sender on it (``timing``: its
    ``retry_s``, ``ack_timeout_s``, ``receipt_timeout_s``), told each PUBACK's reason code
    and subscribed to its storage receipts on every connect, as the agent's is."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=spec.device_id, protocol=mqtt.MQTTv5
    )
    client.username_pw_set(spec.username, spec.password)
    sender = TelemetrySender(queue, spec.device_id, client, TelemetryConfig(), **timing)

    def on_publish(_c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        sender.published(mid, reason)

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe(sender.receipt_topic, qos=1)

    client.on_publish = on_publish
    client.on_connect = on_connect
    client.connect("127.0.0.1", fleet.mqtt_port)
    client.loop_start()
    try:
        wait_for(client.is_connected, timeout_s=10, what="the device's MQTT connection")
        sender.start()
        yield sender
    finally:
        sender.stop()
        client.disconnect()
        client.loop_stop()


# --- the queue ------------------------------------------------------------------------------


def test_queue_keeps_records_across_reopen_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    records = [record(i) for i in range(5)]
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        for r in records:
            queue.put(r)
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert len(queue) == 5
        assert queue.peek(10) == records
        assert queue.peek(2) == records[:2]
        assert queue.remove([records[0].id, records[1].id, "never-queued"]) == 2
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert queue.peek(10) == records[2:]
        assert queue.dropped == 0
        with pytest.raises(ValueError, match="already queued"):
            queue.put(records[2])


def test_disk_bound_drops_oldest_and_the_count_reaches_the_fleet(
    tmp_path: Path, fleet: RunningFleet
) -> None:
    path = tmp_path / "telemetry.db"
    bound = MIN_QUEUE_BYTES
    puts = [record(i, pad_bytes=300) for i in range(300)]
    with TelemetryQueue(path, bound) as queue:
        largest = 0
        for start in range(0, len(puts), 10):  # ten intervals per transaction: fewer fsyncs
            queue.put_many(puts[start : start + 10])
            largest = max(largest, files_bytes(path))
        # Written about three times the bound, the files never passed it.
        assert largest <= bound
        kept = queue.peek(len(puts))
        assert 0 < len(kept) < len(puts) // 2
        assert [r.inferences for r in kept] == [r.inferences for r in puts[-len(kept) :]]
        # Every dropped record is counted exactly once: on a kept record, or still pending.
        assert sum(r.dropped for r in kept) + queue.dropped + len(kept) == len(puts)

        last = queue.put(record(len(puts)))
        assert last is not None
        assert queue.dropped == 0
        (spec,) = fleet.enroll(1, prefix="bound")
        with connected_sender(fleet, spec, queue) as sender:
            assert sender.flush(timeout_s=30)
        assert files_bytes(path) <= bound

    rows = wait_rows(fleet, spec.device_id, len(kept) + 1)
    assert {row.record_id for row in rows} == {r.id for r in kept} | {last.id}
    assert len(rows) + sum(row.dropped for row in rows) == len(puts) + 1


def test_record_over_the_queue_share_is_dropped_and_counted(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "telemetry.db", MIN_QUEUE_BYTES) as queue:
        assert queue.put(record(pad_bytes=queue.max_record_bytes)) is None
        assert len(queue) == 0
        assert queue.dropped == 1
        stored = queue.put(record())
        assert stored is not None and stored.dropped == 1
        assert queue.peek(1)[0].dropped == 1


def test_unreadable_stored_record_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    records = [record(i) for i in range(3)]
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        for r in records:
            queue.put(r)
    with sqlite3.connect(path) as db:  # another version, or a damaged row
        db.execute('UPDATE records SET body = \'{"ts": "soon"}\' WHERE id = ?', (records[1].id,))
    db.close()
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert queue.peek(10) == [records[0], records[2]]
        assert len(queue) == 2
        assert queue.dropped == 1


def damage_a_page(path: Path) -> None:
    """Records written, then one page of the file overwritten: a bad sector, a torn write."""
    with TelemetryQueue(path, BIG_QUEUE) as queue:
        queue.put_many(record(i) for i in range(300))
    with path.open("r+b") as f:
        f.seek(4 * 4096)
        f.write(os.urandom(4096))


@pytest.mark.parametrize(
    "damage",
    [lambda path: path.write_bytes(b"not a database " * 1000), damage_a_page],
    ids=["not-a-database", "damaged-page"],
)
def test_corrupt_queue_file_is_moved_aside_and_a_fresh_queue_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "telemetry.db"
    damage(path)
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR), TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert len(queue) == 0
        r = record()
        queue.put(r)
        assert queue.peek(1) == [r]
    # Kept for inspection as it was (SQLite may have touched its 100-byte header).
    assert (tmp_path / "telemetry.db.corrupt").read_bytes()[100:] == damaged[100:]
    assert "was corrupt" in caplog.text and "moved it aside" in caplog.text


def test_a_second_queue_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        queue.put(record())
        with pytest.raises(TelemetryQueueError, match="second agent"):
            TelemetryQueue(path, MIN_QUEUE_BYTES)


# --- inference stats ------------------------------------------------------------------------


def test_inference_stats_sum_an_interval_into_a_record() -> None:
    stats = InferenceStats()
    shadow = "digits-2.0.0"
    for i in range(100):
        stats.observe(
            outcome(
                latency_ms=float(i + 1),
                predicted_class=i % 3,
                shadow_bundle=shadow,
                shadow_agreed=i % 4 != 0,
            )
        )
    stats.observe(
        outcome(
            served_by="cloud",
            local_error=True,
            fallback_reason="error",
            predicted_class=7,
            shadow_bundle=shadow,
        )
    )
    stats.observe(
        outcome(
            served_by="none", fallback_reason="no_model", predicted_class=None, shadow_bundle=shadow
        )
    )
    latencies = [float(i + 1) for i in range(100)] + [3.0, 3.0]

    (r,) = stats.report()
    assert (r.bundle, r.shadow_bundle) == ("digits-1.0.0", shadow)
    assert (r.inferences, r.errors, r.fallbacks) == (102, 1, 2)
    assert (r.shadow_compared, r.shadow_agreed) == (100, 75)
    assert r.latency_p50_ms == pytest.approx(np.percentile(latencies, 50))
    assert r.latency_p95_ms == pytest.approx(np.percentile(latencies, 95))
    histogram = r.extra["latency_histogram_ms"]
    assert histogram["edges"] == list(LATENCY_BUCKETS_MS)
    assert sum(histogram["counts"]) == 102
    assert histogram["counts"][LATENCY_BUCKETS_MS.index(5)] == 5  # 2 < ms <= 5: 3, 3, 3, 4, 5
    assert histogram["counts"][-1] == 0
    assert r.extra["predictions"] == {"0": 34, "1": 33, "2": 33, "7": 1}
    assert r.extra["served_by"] == {"local": 100, "cloud": 1, "none": 1}
    assert r.extra["fallback_reasons"] == {"error": 1, "no_model": 1}
    assert stats.report() == []


def test_inference_stats_keep_bundles_apart_across_threads() -> None:
    stats = InferenceStats()

    def serve(bundle: str) -> None:
        for i in range(2000):
            stats.observe(outcome(bundle=bundle, local_error=i % 10 == 0))

    threads = [threading.Thread(target=serve, args=(f"m-{i % 2}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_bundle = {r.bundle: r for r in stats.report()}
    assert set(by_bundle) == {"m-0", "m-1"}
    assert {b: (r.inferences, r.errors) for b, r in by_bundle.items()} == {
        "m-0": (8000, 800),
        "m-1": (8000, 800),
    }
    assert len({r.id for r in by_bundle.values()}) == 2


@pytest.mark.parametrize(
    "bad",
    [{"served_by": "edge"}, {"fallback_reason": "bored"}, {"latency_ms": -1.0}],
)
def test_inference_outcome_refuses_values_the_report_cannot_hold(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        outcome(**bad)


# --- sending --------------------------------------------------------------------------------


def test_a_queued_record_the_contract_no_longer_allows_is_dropped_without_wedging_the_queue(
    tmp_path: Path, fleet: RunningFleet, caplog: pytest.LogCaptureFixture
) -> None:
    """An older agent could queue a record with a 4 MiB ``extra``, too large for any payload;
    ``extra`` is now bounded, so it is no record any more: dropped, counted, and the
    records around it are sent."""
    (spec,) = fleet.enroll(1, prefix="oversize")
    with TelemetryQueue(tmp_path / "telemetry.db", BIG_QUEUE) as queue:
        before = queue.put(record(1))
        pad = os.urandom((MAX_PAYLOAD_BYTES + 1024) // 2).hex()
        older = TelemetryRecord.model_construct(
            id=uuid.uuid4().hex, ts=time.time(), inferences=2, extra={"pad": pad}
        )
        huge = queue.put(older)
        after = queue.put(record(3))
        assert before and huge and after
        with caplog.at_level(logging.WARNING), connected_sender(fleet, spec, queue) as sender:
            assert sender.flush(timeout_s=30)
            reporter = queue.put(record(4))
            assert reporter is not None and reporter.dropped == 1
            sender.wake()
            assert sender.flush(timeout_s=30)
    rows = wait_rows(fleet, spec.device_id, 3)
    assert {row.record_id for row in rows} == {before.id, after.id, reporter.id}
    assert "not a valid record" in caplog.text and huge.id in caplog.text


def test_records_over_one_payload_are_split_into_batches_that_all_arrive(
    tmp_path: Path, fleet: RunningFleet
) -> None:
    (spec,) = fleet.enroll(1, prefix="split")
    with TelemetryQueue(tmp_path / "telemetry.db", BIG_QUEUE) as queue:
        # Each record's extra is near its 256 KiB bound: 15 fill one payload, 20 need two.
        records = queue.put_many(record(i, pad_bytes=MAX_DOCUMENT_BYTES - 64) for i in range(20))
        sizes = [len(r.model_dump_json(exclude_defaults=True)) for r in records]
        assert len(records) == 20 and sum(sizes) > MAX_PAYLOAD_BYTES > 15 * max(sizes)
        with connected_sender(fleet, spec, queue) as sender:
            assert sender.flush(timeout_s=60)
    rows = wait_rows(fleet, spec.device_id, 20)
    assert {row.record_id for row in rows} == {r.id for r in records}
    malformed = fleet.server.metrics.registry.get_sample_value(
        "edgefleet_mqtt_malformed_total", {"channel": "telemetry"}
    )
    assert not malformed


def test_a_batch_the_broker_never_acknowledges_stays_queued_until_it_does(
    tmp_path: Path, fleet: RunningFleet
) -> None:
    """The broker takes the batch but sends no PUBACK (mosquitto stopped with SIGSTOP once
    the device is connected): nothing leaves the queue, the sender publishes the batch
    again after each ``ack_timeout_s``, and once the broker runs again the records arrive.
    A sender that removed records before the PUBACK came would empty the queue here."""
    broker = fleet.server.broker
    assert broker is not None and broker.pid is not None
    (spec,) = fleet.enroll(1, prefix="silent")
    with (
        TelemetryQueue(tmp_path / "telemetry.db", BIG_QUEUE) as queue,
        connected_sender(fleet, spec, queue, retry_s=0.1, ack_timeout_s=0.5) as sender,
    ):
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            records = queue.put_many(record(i) for i in range(5))
            sender.wake()
            time.sleep(2.0)  # three ack timeouts: published three times, never acknowledged
            assert [r.id for r in queue.peek(10)] == [r.id for r in records]
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert sender.flush(timeout_s=30)
    rows = wait_rows(fleet, spec.device_id, 5)
    assert {row.record_id for row in rows} == {r.id for r in records}

    def duplicates() -> float:  # the copies published while the broker was stopped
        value = fleet.server.metrics.registry.get_sample_value(
            "edgefleet_telemetry_duplicates_total"
        )
        return value or 0.0

    wait_for(lambda: duplicates() >= len(records), what="the batch's earlier copies")


# --- the case: offline, SIGKILL, restart, broker back ------------------------------


class AgentProcess:
    """``tests/utils/telemetry_agent.py`` in its own process, output kept in a file."""

    def __init__(self, out: Path, queue: Path, spec: SimulatedDeviceSpec, port: int, *args: str):
        self.out = out
        with out.open("w") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.utils.telemetry_agent",
                    str(queue),
                    "--device-id",
                    spec.device_id,
                    f"--username={spec.username or ''}",
                    f"--password={spec.password or ''}",  # it may start with "-"
                    "--port",
                    str(port),
                    *args,
                ],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )

    @property
    def output(self) -> str:
        return self.out.read_text()

    def wait_output(self, text: str, timeout_s: float = 60) -> None:
        def seen() -> bool:
            assert self.process.poll() is None or text in self.output, self.output[-3000:]
            return text in self.output

        wait_for(seen, timeout_s=timeout_s, what=f"{text!r} from the agent")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def test_offline_records_survive_sigkill_and_arrive_exactly_once(
    tmp_path: Path, fleet: RunningFleet
) -> None:
    broker, supervisor = fleet.server.broker, fleet.server.supervisor
    assert broker is not None and supervisor is not None
    (spec,) = fleet.enroll(1, prefix="offline")
    queue_path = tmp_path / "agent" / "telemetry.db"
    port = fleet.mqtt_port
    total = 10_000

    # The broker is down while the agent queues (its supervisor stopped with it, so nothing
    # restarts it but this test); the agent dies by SIGKILL.
    supervisor.stop()
    a = AgentProcess(tmp_path / "a.out", queue_path, spec, port, "--enqueue", str(total))
    a.wait_output(f"queued {total}")
    a.kill()
    with TelemetryQueue(queue_path, QUEUE_BYTES) as queue:
        queued = {r.id for r in queue.peek(2 * total)}
    assert len(queued) == total

    # Restarted, the agent waits: the broker is back but refuses every device until the
    # fleet's bridge has subscribed again (it would otherwise drop what arrives before).
    b = AgentProcess(tmp_path / "b.out", queue_path, spec, port, "--batch-records", "10")
    b.wait_output(f"queued {total}")
    password = (fleet.server.settings.data_dir / "mqtt-fleet.password").read_text().strip()
    broker.start(fleet_username=FLEET_MQTT_USER, fleet_password=password, devices=[])
    broker.add_device("probe", password="probe-pw")
    as_probe = dataclasses.replace(broker.endpoint, username="probe", password="probe-pw")

    def bridge_ingests() -> bool:
        probe = TelemetryBatch(records=[record()]).model_dump_json()
        mqtt_pub(as_probe, device_topic("probe", "telemetry"), probe)
        return bool(fleet_rows(fleet, "probe"))

    wait_for(bridge_ingests, timeout_s=60, what="the fleet's bridge back on the broker")
    broker.add_device(spec.device_id, password=spec.password)

    # Killed again while sending (small batches: it is very likely not done), then run to
    # the end.
    wait_rows(fleet, spec.device_id, 1, fetch=False)
    b.kill()
    c = AgentProcess(tmp_path / "c.out", queue_path, spec, port, "--exit-when-drained")
    assert c.process.wait(120) == 0, c.output[-3000:]
    assert "drained" in c.output

    wait_rows(fleet, spec.device_id, total, fetch=False)
    wait_for(lambda: fleet.server.bridge.pending() == 0, what="the bridge's inbox to empty")
    with Session(fleet.server.db) as session:
        query = select(TelemetryRecordRow.record_id).where(
            col(TelemetryRecordRow.device_id) == spec.device_id
        )
        stored = session.exec(query).all()
    assert len(stored) == total
    assert set(stored) == queued
    # Only the records sent and not yet receipted when the agent was killed may have been
    # received twice: at most four batches of 10 (agent/telemetry.py, _IN_FLIGHT_BATCHES).
    duplicates = fleet.server.metrics.registry.get_sample_value(
        "edgefleet_telemetry_duplicates_total"
    )
    assert duplicates is not None and duplicates <= 4 * 10
    with TelemetryQueue(queue_path, QUEUE_BYTES) as queue:
        assert len(queue) == 0
