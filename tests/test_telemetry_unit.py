"""``agent.telemetry`` in one process, fast: what :class:`InferenceStats` makes of the outcomes
it sees (counts per bundle pair, latency percentiles and histogram, predictions, truth,
drift), the checks on an :class:`InferenceOutcome`, how a batch is cut to fit a payload, and
the :class:`TelemetrySender`'s thread against one real mosquitto (receipts, the in-flight
window, resends, held batches, a stalled link, queue failures). The agent SIGKILLed with a
backlog is in tests/test_agent_telemetry.py. ``make mutate`` runs these (.ci/mutate.py)."""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import TelemetryConfig
from agent.telemetry import (
    FALLBACK_REASONS,
    LATENCY_BUCKETS_MS,
    DriftObservation,
    InferenceOutcome,
    InferenceStats,
    TelemetrySender,
    _fit,
    _percentile,
)
from agent.telemetry_queue import TelemetryQueue
from contracts.bounded import MAX_MILLISECONDS
from contracts.drift import (
    DriftSummary,
    ReferenceProfile,
    SummaryBuilder,
    drift_sample,
    reference_from_samples,
)
from contracts.mqtt import (
    MAX_PAYLOAD_BYTES,
    Receipt,
    TelemetryBatch,
    TelemetryRecord,
    decode_payload,
    device_topic,
)
from fleet.broker import MqttEndpoint
from tests.utils.mqtt import PahoClient, plain_mosquitto
from tests.utils.tcp_proxy import LinkProxy

V1, V2, SHADOW = "digits-host-1.0.0", "digits-host-1.1.0", "digits-host-2.0.0"


def _outcome(**fields: Any) -> InferenceOutcome:
    values: dict[str, Any] = {
        "bundle": V1,
        "served_by": "local",
        "latency_ms": 3.0,
        "local_error": False,
        "fallback_reason": None,
        "predicted_class": 7,
    }
    return InferenceOutcome(**(values | fields))


def test_an_idle_interval_reports_nothing() -> None:
    stats = InferenceStats()
    assert stats.report() == []
    stats.observe(_outcome())
    assert len(stats.report()) == 1
    assert stats.report() == []  # the interval started over


def test_one_record_per_bundle_pair_with_its_own_counts() -> None:
    stats = InferenceStats()
    before = time.time()
    stats.observe(_outcome(latency_ms=1.0, predicted_class=3))
    stats.observe(
        _outcome(
            latency_ms=4.0,
            local_error=True,
            predicted_class=None,
            served_by="cloud",
            fallback_reason="error",
        )
    )
    stats.observe(
        _outcome(latency_ms=2.0, served_by="cloud", fallback_reason="confidence", predicted_class=3)
    )
    stats.observe(
        _outcome(
            bundle=V2,
            latency_ms=700.0,
            served_by="none",
            fallback_reason="no_model",
            predicted_class=None,
        )
    )
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=True, predicted_class=1))
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=False, predicted_class=1))
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=None, predicted_class=12))
    records = {(r.bundle, r.shadow_bundle): r for r in stats.report()}
    assert set(records) == {(V1, None), (V2, None), (V1, SHADOW)}
    plain = records[(V1, None)]
    assert (plain.inferences, plain.errors, plain.fallbacks) == (3, 1, 2)
    assert (plain.shadow_compared, plain.shadow_agreed) == (0, 0)
    assert plain.latency_p50_ms == 2.0
    assert plain.latency_p95_ms == pytest.approx(3.8)
    assert plain.extra["predictions"] == {"3": 2}
    assert plain.extra["served_by"] == {"local": 1, "cloud": 2}
    assert plain.extra["fallback_reasons"] == {"error": 1, "confidence": 1}
    assert plain.extra["latency_histogram_ms"] == {
        "edges": list(LATENCY_BUCKETS_MS),
        "counts": [1, 1, 1] + [0] * (len(LATENCY_BUCKETS_MS) - 2),
    }
    assert "truth" not in plain.extra and "drift" not in plain.extra
    assert before <= plain.ts <= time.time()
    other = records[(V2, None)]
    assert (other.inferences, other.errors, other.fallbacks) == (1, 0, 1)
    assert other.latency_p50_ms == other.latency_p95_ms == 700.0
    assert other.extra["served_by"] == {"none": 1}
    assert other.extra["predictions"] == {}
    assert other.extra["latency_histogram_ms"]["counts"][9] == 1  # 500 < 700 <= 1000
    shadowed = records[(V1, SHADOW)]
    assert (shadowed.inferences, shadowed.shadow_compared, shadowed.shadow_agreed) == (3, 2, 1)
    assert shadowed.extra["predictions"] == {"1": 2, "12": 1}  # sorted by class, not text
    assert list(shadowed.extra["predictions"]) == ["1", "12"]
    assert len({r.id for r in records.values()}) == 3
    assert all(len(r.id) == 32 for r in records.values())
    TelemetryBatch(records=list(records.values()))  # what the fleet accepts


def test_latencies_fall_in_the_bucket_whose_edge_they_do_not_pass() -> None:
    stats = InferenceStats()
    for latency in (0.0, 1.0, 1.5, 5000.0, 5000.1, 1e6):
        stats.observe(_outcome(latency_ms=latency))
    (record,) = stats.report()
    counts = record.extra["latency_histogram_ms"]["counts"]
    assert len(counts) == len(LATENCY_BUCKETS_MS) + 1
    assert counts[0] == 2 and counts[1] == 1  # <= 1 ms, then (1, 2]
    assert counts[len(LATENCY_BUCKETS_MS) - 1] == 1  # (2000, 5000]
    assert counts[-1] == 2  # slower than every edge
    assert sum(counts) == 6


def test_a_call_that_hung_past_a_day_counts_as_a_day_and_the_record_is_still_made() -> None:
    stats = InferenceStats()
    for latency in (2.0, 1e12):
        stats.observe(_outcome(latency_ms=latency))
    (record,) = stats.report()
    assert record.inferences == 2
    assert record.latency_p95_ms == pytest.approx(0.95 * MAX_MILLISECONDS, rel=0.06)


def test_truth_is_counted_with_the_bundles_inferences() -> None:
    stats = InferenceStats()
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=True))
    stats.observe_truth(V1, correct=True)
    stats.observe_truth(V1, correct=False)
    stats.observe_truth(V1, correct=True)
    stats.observe_truth(V2, correct=False)
    records = {(r.bundle, r.shadow_bundle): r for r in stats.report()}
    assert set(records) == {(V1, SHADOW), (V2, None)}
    assert records[(V1, SHADOW)].extra["truth"] == {"labelled": 3, "correct": 2}
    assert records[(V1, SHADOW)].inferences == 1
    lone = records[(V2, None)]
    assert lone.extra["truth"] == {"labelled": 1, "correct": 0}
    assert (lone.inferences, lone.latency_p50_ms, lone.latency_p95_ms) == (0, None, None)


def test_past_the_sample_cap_latencies_are_a_uniform_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agent.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_MAX_LATENCY_SAMPLES", 100)
    stats = InferenceStats()
    for n in range(1000):  # the first half fast, the second half slow
        stats.observe(_outcome(latency_ms=1.0 if n < 500 else 100.0))
    (record,) = stats.report()
    assert record.inferences == 1000
    assert sum(record.extra["latency_histogram_ms"]["counts"]) == 1000
    # a reservoir keeps later samples too: the median is not stuck on the first 100
    assert record.latency_p95_ms == 100.0
    kept = stats._tallies  # reset by report
    assert kept == {}


def test_percentiles_interpolate_as_numpy_does() -> None:
    assert _percentile([], 0.5) is None
    assert _percentile([4.0], 0.95) == 4.0
    for values in ([1.0, 2.0], [1.0, 2.0, 3.0, 10.0], [float(v) for v in range(1, 21)], [0.5] * 3):
        for q in (0.0, 0.5, 0.95, 1.0):
            expected = float(np.percentile(values, q * 100))
            assert _percentile(values, q) == pytest.approx(expected), (values, q)
    assert _percentile([1.0, 2.0, 3.0, 10.0], 0.95) == pytest.approx(8.95)
    assert _percentile([1.0, 3.0], 0.5) == 2.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"served_by": "edge"}, "served_by must be one of ('local', 'cloud', 'none'), got 'edge'"),
        (
            {"fallback_reason": "slow"},
            f"fallback_reason must be one of {sorted(FALLBACK_REASONS)} or None, got 'slow'",
        ),
        ({"latency_ms": -0.5}, "latency_ms must be a finite number >= 0, got -0.5"),
        ({"latency_ms": math.inf}, "latency_ms must be a finite number >= 0, got inf"),
        ({"latency_ms": math.nan}, "latency_ms must be a finite number >= 0, got nan"),
    ],
)
def test_an_outcome_that_makes_no_sense_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        _outcome(**fields)
    assert str(raised.value) == message


def test_every_fallback_reason_and_zero_latency_are_accepted() -> None:
    for reason in FALLBACK_REASONS:
        assert _outcome(fallback_reason=reason, latency_ms=0.0).fallback_reason == reason
    assert {"no_model", "error", "latency", "confidence"} == FALLBACK_REASONS


def _sized(n: int, extra_bytes: int) -> TelemetryRecord:
    return TelemetryRecord(id=f"r{n}", ts=1.0, extra={"p": "x" * extra_bytes})


def test_a_batch_is_cut_to_the_longest_prefix_that_fits_a_payload() -> None:
    small = [_sized(n, 10) for n in range(5)]
    assert _fit(small) == small
    assert _fit([]) == []
    big = [_sized(n, 200_000) for n in range(40)]
    kept = _fit(big)
    assert 0 < len(kept) < len(big) and kept == big[: len(kept)]
    size = len(TelemetryBatch(records=kept).model_dump_json(exclude_defaults=True).encode())
    assert size <= MAX_PAYLOAD_BYTES
    one_more = TelemetryBatch(records=big[: len(kept) + 1])
    assert len(one_more.model_dump_json(exclude_defaults=True).encode()) > MAX_PAYLOAD_BYTES


def _json_bytes(records: list[TelemetryRecord]) -> int:
    return len(TelemetryBatch(records=records).model_dump_json(exclude_defaults=True).encode())


def test_a_batch_that_fits_to_the_byte_is_kept_whole() -> None:
    base = 100_000  # an extra string may hold 256 KiB: room for the padding
    records = [_sized(n, base) for n in range(MAX_PAYLOAD_BYTES // (base + 100))]
    pad = MAX_PAYLOAD_BYTES - _json_bytes(records)
    assert 0 < pad < base
    exact = [*records[:-1], _sized(len(records) - 1, base + pad)]
    assert _json_bytes(exact) == MAX_PAYLOAD_BYTES
    assert _fit(exact) == exact
    over = [*records[:-1], _sized(len(records) - 1, base + pad + 1)]
    assert _fit(over) == records[:-1]


# --- the sender, against a real mosquitto --------------------------------------------------
#
# One plain mosquitto for the module; each test its own device id (so its own topics), a
# queue on disk, the device's paho client wired as agent/daemon.py wires it, and a paho
# client standing in for the fleet: it sees each batch and publishes the receipts the test
# chooses to send.


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttEndpoint]:
    with plain_mosquitto(tmp_path_factory.mktemp("mqtt") / "broker") as port:
        yield MqttEndpoint("127.0.0.1", port)


class _Device:
    """A queue, a paho client and a :class:`TelemetrySender`, wired as the daemon does
    (receipt subscription on connect, PUBACKs to :meth:`TelemetrySender.published`)."""

    def __init__(
        self, endpoint: MqttEndpoint, directory: Path, *, connect: bool = True, **options: Any
    ) -> None:
        self.id = f"dev-{directory.name[-40:]}".replace("_", "-")
        config = TelemetryConfig(
            batch_records=options.pop("batch_records", 500),
            compress=options.pop("compress", False),
        )
        self.queue = TelemetryQueue(directory / "telemetry.db", options.pop("max_bytes", 1 << 24))
        self.endpoint = endpoint
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        options.setdefault("retry_s", 0.05)
        options.setdefault("receipt_timeout_s", 60.0)
        self.sender = TelemetrySender(self.queue, self.id, self.client, config, **options)
        self.client.on_connect = lambda c, *_: c.subscribe(self.sender.receipt_topic, qos=1)
        self.subscribed = threading.Event()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.sender.published(mid, reason)
        if connect:
            self.connect()

    def _on_subscribe(self, *_: Any) -> None:
        self.subscribed.set()
        self.sender.wake()

    def connect(self, port: int | None = None) -> None:
        self.client.connect(self.endpoint.host, port or self.endpoint.port)
        self.client.loop_start()

    def put(self, *numbers: int, padding: int = 0) -> None:
        self.queue.put_many(
            TelemetryRecord(id=f"r{n}", ts=1.0, extra={"p": "x" * padding} if padding else {})
            for n in numbers
        )

    def queued(self) -> list[str]:
        return [r.id for r in self.queue.peek(10_000)]

    def close(self) -> None:
        self.sender.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.queue.close()


class _Fleet:
    """The fleet's side of one device's topics: batches as they come, receipts on demand."""

    def __init__(self, endpoint: MqttEndpoint, device: _Device) -> None:
        self.device = device
        self.client = PahoClient(endpoint, f"fleet-{device.id}")
        assert self.client.subscribe(device_topic(device.id, "telemetry")) == 1

    def batch(self, timeout_s: float = 5.0) -> list[str]:
        _, payload = self.client.next_message(timeout_s)
        return [r.id for r in decode_payload(payload, TelemetryBatch).records]

    def payload(self, timeout_s: float = 5.0) -> bytes:
        return self.client.next_message(timeout_s)[1]

    def quiet(self, wait_s: float = 0.2) -> bool:
        """Whether no batch comes in ``wait_s`` (a sender that stopped, not a timing)."""
        time.sleep(wait_s)
        return self.client.messages.empty()

    def receipt(
        self, stored: Sequence[str] = (), refused: Sequence[str] = (), **fields: Any
    ) -> None:
        payload = Receipt(stored=list(stored), refused=list(refused), **fields).model_dump_json()
        self.send_receipt(payload.encode())

    def send_receipt(self, payload: bytes) -> None:
        assert self.client.publish(device_topic(self.device.id, "receipt"), payload) in (0, 16)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def device(
    broker: MqttEndpoint, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[_Device]:
    made = _Device(broker, tmp_path, **getattr(request, "param", {}))
    yield made
    made.close()


@pytest.fixture
def fleet(broker: MqttEndpoint, device: _Device) -> Iterator[_Fleet]:
    made = _Fleet(broker, device)
    yield made
    made.close()


def _until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.01)


def _ids(*numbers: int) -> list[str]:
    return [f"r{n}" for n in numbers]


@pytest.mark.parametrize("device", [{"batch_records": 3}], indirect=True)
def test_records_go_oldest_first_in_batches_and_leave_only_when_a_receipt_names_them(
    device: _Device, fleet: _Fleet
) -> None:
    device.put(*range(7))
    device.sender.start()
    assert [fleet.batch(), fleet.batch(), fleet.batch()] == [_ids(0, 1, 2), _ids(3, 4, 5), _ids(6)]
    _until(lambda: device.sender.in_flight() == 7)
    assert device.queued() == _ids(*range(7))  # PUBACKed is only "sent"
    assert not device.sender.flush(0.2)
    fleet.receipt(stored=_ids(0, 1, 2), refused=_ids(3), reason="quarantined")
    _until(lambda: device.queued() == _ids(4, 5, 6))
    assert device.sender.in_flight() == 3
    device.put(7)  # put after the others were sent: goes alone, in flight at once
    device.sender.wake()
    assert fleet.batch() == _ids(7)
    fleet.receipt(stored=_ids(4, 5, 6, 7))
    assert device.sender.flush(10)
    assert fleet.quiet()  # nothing was sent twice


def test_a_malformed_receipt_or_one_naming_unknown_ids_removes_nothing(
    device: _Device, fleet: _Fleet
) -> None:
    device.put(0, 1)
    device.sender.start()
    assert fleet.batch() == _ids(0, 1)
    for payload in (b"not json", b'{"stored": ["r0", "a b"]}', b'{"stored": "r0"}'):
        fleet.send_receipt(payload)
    fleet.receipt(stored=["r9"], refused=["r8"])
    device.sender.receipt(b"\xff" * 10)  # as the callback hands it on
    fleet.receipt(stored=_ids(1))  # receipts are applied in order: these came first
    _until(lambda: device.queued() == _ids(0))
    assert device.sender.in_flight() == 1


@pytest.mark.parametrize("device", [{"batch_records": 2}], indirect=True)
def test_at_most_four_batches_wait_for_receipts_then_the_sender_waits(
    device: _Device, fleet: _Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agent.telemetry")
    device.put(*range(20))
    device.sender.start()
    assert [fleet.batch() for _ in range(4)] == [_ids(n, n + 1) for n in range(0, 8, 2)]
    _until(lambda: device.sender.in_flight() == 8)
    assert fleet.quiet()
    fleet.receipt(stored=_ids(0))  # one record: room for one more, not a batch of two
    assert fleet.batch() == _ids(8)
    assert fleet.quiet()
    fleet.receipt(stored=_ids(1, 2, 3))
    assert [fleet.batch(), fleet.batch()] == [_ids(9, 10), _ids(11)]
    assert fleet.quiet()
    assert device.sender.in_flight() == 8
    assert not caplog.records  # a full window is a wait, not a failure


class _Clock:
    """``time`` for agent.telemetry alone (``monkeypatch``): its ``monotonic`` stands still
    but for what the test adds to ``now`` and what the code sleeps, which is recorded in
    ``slept`` and not waited. So a test jumps over a wait, and sees each step of one.
    (``time.time``, the records' timestamps, is the real one.)"""

    def __init__(self) -> None:
        self.now = 1000.0  # as time since boot: the agent never runs in its first second
        self.slept: list[float] = []
        self.time = time.time

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert len(self.slept) < 1000, "a wait whose time never runs out"
        self.slept.append(seconds)
        self.now += seconds


def _stepped_clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    import agent.telemetry as telemetry

    clock = _Clock()
    monkeypatch.setattr(telemetry, "time", clock)
    return clock


@pytest.mark.parametrize("device", [{"batch_records": 2}], indirect=True)
def test_records_no_receipt_names_in_time_are_sent_again_oldest_first(
    device: _Device, fleet: _Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``_send_batch`` at a time, the receipt wait (60 s) jumped over on a clock."""
    clock = _stepped_clock(monkeypatch)
    device.put(0, 1, 2)
    assert device.subscribed.wait(5)
    assert [device.sender._send_batch(), device.sender._send_batch()] == [0.0, 0.0]
    assert [fleet.batch(), fleet.batch()] == [_ids(0, 1), _ids(2)]
    fleet.receipt(stored=_ids(1))  # a receipt for a later record does not put r0 off
    _until(lambda: device.queued() == _ids(0, 2))
    clock.now += 59.0
    assert device.sender._send_batch() == 0.05  # not yet: nothing to send
    clock.now += 1.0
    assert device.sender._send_batch() == 0.0
    assert fleet.batch() == _ids(0, 2)  # one round: everything still queued, oldest first
    fleet.receipt(stored=_ids(0, 2))
    _until(lambda: device.queued() == [])
    clock.now += 1000.0
    assert device.sender._send_batch() == 0.05
    assert fleet.quiet()


@pytest.mark.parametrize("device", [{"receipt_timeout_s": 700.0}], indirect=True)
def test_a_receipt_wait_past_ten_minutes_is_taken_as_given(device: _Device) -> None:
    assert device.sender.in_flight() == 0  # built: the longest wait grows to match


@pytest.mark.parametrize("device", [{"retry_s": 0.1}], indirect=True)
def test_with_nobody_subscribed_a_batch_stays_queued_until_the_fleet_takes_it(
    broker: MqttEndpoint, device: _Device
) -> None:
    """PUBACK 0x10 "no matching subscribers": the broker took the batch and gave it to
    nobody, so it is not in flight; the sender holds it back and tries again."""
    device.put(0, 1)
    device.sender.start()
    time.sleep(0.3)  # a few refused tries (0.1 s, doubling)
    assert device.sender.in_flight() == 0
    fleet = _Fleet(broker, device)
    try:
        assert fleet.batch() == _ids(0, 1)
        _until(lambda: device.sender.in_flight() == 2)
        assert device.queued() == _ids(0, 1)
    finally:
        fleet.close()


@pytest.mark.parametrize("device", [{"connect": False, "retry_s": 0.1}], indirect=True)
def test_nothing_is_published_while_the_client_is_not_connected(
    device: _Device, fleet: _Fleet
) -> None:
    device.put(0)
    device.sender.start()
    assert fleet.quiet(0.3)
    device.connect()
    assert fleet.batch() == _ids(0)


def _puback_steps(
    monkeypatch: pytest.MonkeyPatch, device: _Device, link: LinkProxy, lasting: Container[int]
) -> list[float | None]:
    """The waits of ``device``'s sender for its batches' PUBACKs (the steps of
    ``_await_puback``), in order, each as long as asked; a step numbered in ``lasting``
    (from 1, over every batch) releases ``link`` and lasts until the PUBACK comes: the
    test, not the machine's speed, says in which step a PUBACK lands."""
    batches: list[mqtt.MQTTMessageInfo] = []
    steps: list[float | None] = []
    publish = device.client.publish

    def publish_and_keep(topic: str, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        info = publish(topic, *args, **kwargs)
        if topic == device_topic(device.id, "telemetry"):
            batches.append(info)
        return info

    wait = mqtt.MQTTMessageInfo.wait_for_publish

    def step(info: mqtt.MQTTMessageInfo, timeout_s: float | None = None) -> None:
        if any(info is batch for batch in batches):
            steps.append(timeout_s)
            if len(steps) in lasting:
                link.release()
                timeout_s = 10.0
        wait(info, timeout_s)

    monkeypatch.setattr(device.client, "publish", publish_and_keep)
    monkeypatch.setattr(mqtt.MQTTMessageInfo, "wait_for_publish", step)
    return steps


@pytest.mark.parametrize("puback_in_step", [None, 4])
def test_a_batch_is_published_again_after_ack_timeout_s_connected_without_its_puback(
    broker: MqttEndpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    puback_in_step: int | None,
) -> None:
    """One ``_send_batch`` at a time (the thread is not started) over a stalled link: the
    wait for a PUBACK is counted in steps of ``retry_s`` while connected, whatever the
    machine's speed, so exactly ``ack_timeout_s / retry_s`` of them (binary fractions:
    no rounding) come before the batch is given up; a PUBACK in the last one is in time."""
    with LinkProxy(broker.port) as link:
        device = _Device(broker, tmp_path, connect=False, retry_s=0.125, ack_timeout_s=0.5)
        fleet = _Fleet(broker, device)
        try:
            device.connect(link.port)
            assert device.subscribed.wait(5)  # the receipt subscription
            lasting = {5} if puback_in_step is None else {puback_in_step}
            steps = _puback_steps(monkeypatch, device, link, lasting)
            link.hold()  # a stalled link: the broker gets nothing, the client sees no error
            device.put(0)
            if puback_in_step is not None:
                assert device.sender._send_batch() == 0.0  # PUBACKed in time: in flight
                assert steps == [0.125] * 4
                assert fleet.batch() == _ids(0)
                assert device.sender.in_flight() == 1
                assert device.sender._send_batch() == 0.125  # nothing left to send
                assert fleet.quiet()
                return
            assert device.sender._send_batch() == 0.125  # given up: sent again after a pause
            assert steps == [0.125] * 4
            assert device.sender.in_flight() == 0
            link.release()
            assert fleet.batch() == _ids(0)  # the first copy, its PUBACK too late to count
            assert device.sender._send_batch() == 0.0  # the second copy, PUBACKed (step 5)
            assert fleet.batch() == _ids(0)
            assert device.sender.in_flight() == 1
        finally:
            device.close()
            fleet.close()


def test_the_sender_publishes_a_batch_again_when_its_puback_does_not_come(
    broker: MqttEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The thread, over a stalled link, with seconds of slack either way: a PUBACK that
    comes counts; one that does not within ``ack_timeout_s`` has the batch sent again.
    (How the wait is counted is the stepped test's above.)"""
    caplog.set_level(logging.WARNING, logger="agent.telemetry")
    with LinkProxy(broker.port) as link:
        device = _Device(broker, tmp_path, connect=False, retry_s=0.1, ack_timeout_s=3.0)
        fleet = _Fleet(broker, device)
        try:
            device.connect(link.port)
            assert device.subscribed.wait(5)
            link.hold()
            device.put(0)
            device.sender.start()
            _until(lambda: link.held_bytes() > 0)  # published, its PUBACK held back
            link.release()
            assert fleet.batch() == _ids(0)
            _until(lambda: device.sender.in_flight() == 1)  # the late PUBACK counted
            assert fleet.quiet()
            link.hold()
            device.put(1)
            device.sender.wake()
            _until(lambda: "no PUBACK" in caplog.text, timeout_s=30.0)  # given up on it
            link.release()
            assert [fleet.batch(), fleet.batch()] == [_ids(1), _ids(1)]
        finally:
            device.close()
            fleet.close()


@pytest.mark.parametrize("device", [{"compress": True}], indirect=True)
def test_batches_are_compressed_when_the_config_says_so(device: _Device, fleet: _Fleet) -> None:
    device.put(0, padding=1000)
    device.sender.start()
    payload = fleet.payload()
    assert payload.startswith(b"\x28\xb5\x2f\xfd") and len(payload) < 1000  # zstd
    assert [r.id for r in decode_payload(payload, TelemetryBatch).records] == _ids(0)


def test_an_uncompressed_batch_is_the_records_json(device: _Device, fleet: _Fleet) -> None:
    device.put(0)
    device.sender.start()
    assert (
        fleet.payload()
        == TelemetryBatch(records=[TelemetryRecord(id="r0", ts=1.0)])
        .model_dump_json(exclude_defaults=True)
        .encode()
    )


def test_a_batch_is_cut_where_the_next_record_would_pass_the_payload_bound(
    device: _Device, fleet: _Fleet
) -> None:
    device.put(*range(20), padding=250_000)  # 16 fit 4 MiB of JSON, a 17th does not
    device.sender.start()
    assert [fleet.batch(), fleet.batch()] == [_ids(*range(16)), _ids(*range(16, 20))]


def test_a_batch_holds_at_most_what_the_contract_allows(device: _Device) -> None:
    limit = TelemetryBatch.model_fields["records"].metadata[0].max_length
    for asked, used in ((limit * 5, limit), (limit, limit), (7, 7)):
        config = TelemetryConfig(batch_records=asked)
        sender = TelemetrySender(device.queue, device.id, device.client, config)
        assert sender._batch_records == used  # (sending 10 000 records takes a second)


def test_the_sender_refuses_pauses_that_are_not_positive_and_a_second_start(
    device: _Device,
) -> None:
    config = TelemetryConfig()
    for bad in ({"retry_s": 0.0}, {"ack_timeout_s": 0.0}, {"retry_s": -1.0}):
        with pytest.raises(ValueError) as raised:
            TelemetrySender(device.queue, "dev-x", device.client, config, **bad)
        assert str(raised.value) == "retry_s and ack_timeout_s must be > 0"
    TelemetrySender(device.queue, "dev-x", device.client, config, retry_s=0.1, ack_timeout_s=0.5)
    device.sender.start()
    with pytest.raises(RuntimeError) as started:
        device.sender.start()
    assert str(started.value) == "the telemetry sender is already started"
    (thread,) = [t for t in threading.enumerate() if t.name == "telemetry-sender"]
    assert thread.daemon  # never keeps the agent's process alive at exit


def test_flush_says_whether_the_queue_emptied_and_stop_keeps_what_is_queued(
    device: _Device, fleet: _Fleet
) -> None:
    assert device.sender.flush(0)  # an empty queue is flushed
    device.put(0)
    device.sender.start()
    assert fleet.batch() == _ids(0)
    started = time.monotonic()
    assert not device.sender.flush(0.3)
    assert time.monotonic() - started >= 0.3
    device.sender.stop()
    device.sender.stop()  # twice is fine
    assert device.queued() == _ids(0)
    fleet.receipt(stored=_ids(0))  # receipts are still applied by the client's callback
    _until(lambda: device.queued() == [])


def test_flush_looks_at_the_queue_every_50_ms_and_never_waits_past_its_deadline(
    device: _Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _stepped_clock(monkeypatch)
    device.put(0)  # never sent: the sender is not started
    assert not device.sender.flush(0.12)
    assert clock.slept[:2] == [0.05, 0.05]
    assert len(clock.slept) == 3 and 0 < clock.slept[2] < 0.05  # the rest, to the deadline
    assert clock.now == 1000.0 + 0.12  # the deadline, not later
    clock.slept.clear()
    assert not device.sender.flush(0)
    device.queue.remove(_ids(0))
    assert device.sender.flush(0.12)
    assert clock.slept == []


@pytest.mark.parametrize("device", [{"retry_s": 1.0}], indirect=True)
def test_a_batch_nobody_took_is_held_back_for_a_pause_that_doubles_up_to_a_minute(
    broker: MqttEndpoint, device: _Device
) -> None:
    """One step of the sender at a time (its thread is not started): what each returns is
    the pause before the next."""
    device.put(0)
    _until(device.client.is_connected)
    assert device.sender._send_batch() == 1.0  # PUBACK 0x10: held back
    held = device.sender._send_batch()  # within the pause: no publish, the rest of it
    assert 0 < held <= 1.0
    device.sender._held_until = 0.0  # each pause is over (not waited for)
    assert device.sender._send_batch() == 2.0
    device.sender._held_until = 0.0
    assert device.sender._send_batch() == pytest.approx(4.0)
    assert device.sender.in_flight() == 0
    fleet = _Fleet(broker, device)
    try:
        device.sender._held_until = 0.0
        assert device.sender._send_batch() == 0.0  # taken: in flight, the pause forgotten
        assert fleet.batch() == _ids(0)
        assert device.sender.in_flight() == 1
    finally:
        fleet.close()
    device.put(1)
    _until(lambda: device.sender._send_batch() == 1.0)  # once the fleet's subscription is gone


def test_the_pause_after_refusals_stops_growing_at_a_minute(device: _Device) -> None:
    sender = TelemetrySender(
        device.queue, device.id, device.client, TelemetryConfig(), retry_s=40.0
    )
    device.client.on_publish = lambda _c, _u, mid, reason, _p: sender.published(mid, reason)
    device.put(0)
    _until(device.client.is_connected)
    assert sender._send_batch() == 40.0
    sender._held_until = 0.0  # the pause is over (not waited for: 40 s)
    assert sender._send_batch() == 60.0


def _drift_reference() -> ReferenceProfile:
    rng = np.random.default_rng(7)
    scores = np.eye(3)[rng.integers(0, 3, 60)]
    return reference_from_samples({"x": rng.normal(size=(60, 8))}, scores, classifier=True)


def test_drift_is_summed_per_bundle_with_the_local_models_classes_only() -> None:
    reference = _drift_reference()
    rng = np.random.default_rng(8)
    calls = [("local", 0), ("local", 1), ("local", 1), ("cloud", 2)]
    samples = [drift_sample({"x": rng.normal(size=(1, 8))}) for _ in calls]
    stats = InferenceStats()
    expected = SummaryBuilder(reference)
    for (served_by, cls), sample in zip(calls, samples, strict=True):
        stats.observe(
            _outcome(
                served_by=served_by,
                fallback_reason=None if served_by == "local" else "confidence",
                predicted_class=cls,
                drift=DriftObservation(reference, sample),
            )
        )
        expected.add_sample(sample, cls if served_by == "local" else None)
    stats.observe(_outcome(bundle=V2))  # no reference: no summary
    records = {r.bundle: r for r in stats.report()}
    summary = DriftSummary.from_extra(records[V1].extra["drift"])
    assert summary == expected.summary()
    assert summary.count == 4 and summary.classes == {0: 1, 1: 2}
    assert "drift" not in records[V2].extra


def test_fallback_reasons_are_counted_not_just_named() -> None:
    stats = InferenceStats()
    for reason in ("latency", "latency", "error"):
        stats.observe(_outcome(served_by="cloud", fallback_reason=reason))
    (record,) = stats.report()
    assert record.extra["fallback_reasons"] == {"latency": 2, "error": 1}


def test_the_sample_cap_is_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_MAX_LATENCY_SAMPLES", 3)
    for _ in range(40):  # the reservoir's draws are random: every slot is drawn in 40 tries
        stats = InferenceStats()
        for latency in (1.0, 2.0, 3.0, 100.0):
            stats.observe(_outcome(latency_ms=latency))
        (record,) = stats.report()
        # three of the four are kept: the median is one of them, never 2.5 (mean of two)
        assert record.latency_p50_ms in (2.0, 3.0)


def test_stop_gives_up_on_a_thread_stuck_in_the_queue(device: _Device) -> None:
    """A queue stuck on a slow disk (its lock held here) must not hang the agent's stop."""
    device.put(0)
    _until(device.client.is_connected)
    with device.queue._lock:
        device.sender.start()
        stopping = threading.Thread(target=device.sender.stop, args=(0.2,), daemon=True)
        stopping.start()
        stopping.join(5)
        assert not stopping.is_alive()


def _queue_fails(queue: TelemetryQueue, how: Literal["storage", "closed"]) -> sqlite3.Connection:
    """A fault injected under the queue until the connection returned is put back: a
    storage failure (a closed SQLite connection: TelemetryQueueError), or a queue that
    says it is closed (RuntimeError)."""
    assert queue._conn is not None
    real = queue._conn
    if how == "storage":
        broken = sqlite3.connect(":memory:")
        broken.close()
        queue._conn = broken
    else:
        queue._conn = None
    return real


@pytest.mark.parametrize("how", ["storage", "closed"])
def test_after_a_queue_failure_the_sender_pauses_and_goes_on_when_woken(
    device: _Device,
    fleet: _Fleet,
    how: Literal["storage", "closed"],
    caplog: pytest.LogCaptureFixture,
) -> None:
    device.put(0)
    assert device.subscribed.wait(5)  # its wake comes before the failure
    real = _queue_fails(device.queue, how)
    with caplog.at_level(logging.ERROR, logger="agent.telemetry"):
        device.sender.start()
        _until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
        assert fleet.quiet(0.3)  # six retry_s: a sender that did not pause fails again
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1  # one failure, then a pause (30 s): not one a loop
    device.queue._conn = real
    device.sender.wake()
    assert fleet.batch() == _ids(0)


def test_a_batch_awaiting_its_puback_when_the_sender_stops_is_not_in_flight(
    broker: MqttEndpoint, tmp_path: Path
) -> None:
    with LinkProxy(broker.port) as link:
        device = _Device(broker, tmp_path, connect=False)
        try:
            device.connect(link.port)
            assert device.subscribed.wait(5)
            link.hold()
            device.put(0)
            device.sender.start()
            _until(lambda: link.held_bytes() > 0)  # published, its PUBACK held back
            device.sender.stop()
            assert device.sender.in_flight() == 0  # sent again by the next agent, at once
        finally:
            link.release()
            device.close()


def test_pubacks_of_the_agents_other_publishes_are_ignored(device: _Device, fleet: _Fleet) -> None:
    """The client's ``on_publish`` hands the sender every PUBACK, its status messages' too;
    one that comes while no batch waits (here 0x10: nobody subscribed) changes nothing."""

    def other_publish() -> None:
        info = device.client.publish(device_topic(device.id, "status"), b"{}", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()

    other_publish()
    device.put(0)
    device.sender.start()
    assert fleet.batch() == _ids(0)
    _until(lambda: device.sender.in_flight() == 1)
    other_publish()
    device.put(1)
    device.sender.wake()
    assert fleet.batch() == _ids(1)
    _until(lambda: device.sender.in_flight() == 2)
