"""Drift and live accuracy at the fleet (fleet/drift.py, fleet/model_health.py,
fleet/drift_alerts.py): telemetry goes through the MQTT bridge's batch writer (real paho
messages, never started, as tests/test_hostile_ingest.py drives it) into real SQLite and
PostgreSQL; devices' drift summaries are made by the agent's own
:class:`contracts.drift.SummaryBuilder` from shifted or reference inputs.

In-process and fast: no broker, no uvicorn (the webhook is a real local HTTP server).
"""

from __future__ import annotations

import datetime as dt
import http.server
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.drift import (
    DRIFT_REFERENCE_FILE,
    DriftThresholds,
    ReferenceProfile,
    SummaryBuilder,
    reference_from_samples,
)
from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import session_scope
from fleet.drift import read_reference
from fleet.drift_alerts import DriftWatch, judge_drift
from fleet.errors import RequestError
from fleet.metrics import FleetMetrics
from fleet.model_health import DriftVerdict, accuracy_report, drift_report, wilson_interval
from fleet.models import AuditEntry, Bundle, Device, ModelVersion, TelemetryRecordRow, utcnow
from tests.utils.postgres import migrated_engine

BUNDLE = "digits-1.0.0"
FEATURES = 3
THRESHOLDS = DriftThresholds()
"""contracts.drift's defaults: PSI 0.25, distance 0.1, 200 inferences."""
INFERENCES_PER_RECORD = 50
DRIFT_WITHIN = 400
"""The shifted cohort must be judged drifting once it sent this many inferences."""


def _engine(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    engine = migrated_engine(kind, lambda: request.getfixturevalue("postgres_url"), tmp_path)
    request.addfinalizer(engine.dispose)
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return _engine(request.param, request, tmp_path)


@pytest.fixture
def sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return _engine("sqlite", request, tmp_path)


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    rng = np.random.default_rng(16)
    return reference_from_samples({"x": rng.normal(size=(4000, FEATURES)).astype(np.float32)})


def _register(
    engine: Engine, reference: ReferenceProfile | None, tags: dict[str, list[str]]
) -> int:
    """A model version whose bundle carries ``reference``, and devices with ``tags``."""
    with session_scope(engine) as session:
        version = ModelVersion(name="digits", version="1.0.0")
        session.add(version)
        session.flush()
        document = json.loads(reference.to_json_bytes()) if reference is not None else None
        session.add(
            Bundle(
                model_version_id=version.id or 0,
                profile="host",
                runtime="onnxruntime",
                precision="fp32",
                version="1.0.0",
                version_number=1,
                target_path="host/digits-1.0.0.efb",
                sha256="0" * 64,
                length=1,
                bundle_name=BUNDLE,
                drift_reference=document,
            )
        )
        for device_id, device_tags in tags.items():
            session.add(Device(id=device_id, profile="host", tags=device_tags))
        return version.id or 0


class _Device:
    """A device folding its inferences into drift summaries, as the agent does."""

    def __init__(self, device_id: str, reference: ReferenceProfile, shift: float, seed: int):
        self.id = device_id
        self._reference = reference
        self._shift = shift
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self._sent = 0

    def record(self, inferences: int = INFERENCES_PER_RECORD, **extra: Any) -> TelemetryRecord:
        builder = SummaryBuilder(self._reference)
        for _ in range(inferences):
            values = self._rng.normal(size=(1, FEATURES)).astype(np.float32)
            values[0, 0] += self._shift
            builder.add({"x": values})
        self._sent += 1
        return TelemetryRecord(
            id=f"{self.id}-{self._seed}-{self._sent}",
            ts=time.time(),
            bundle=BUNDLE,
            inferences=inferences,
            extra={"drift": builder.summary().to_extra(), **extra},
        )


def _message(device_id: str, *records: TelemetryRecord | dict[str, Any]) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(topic=device_topic(device_id, "telemetry").encode())
    if all(isinstance(r, TelemetryRecord) for r in records):
        message.payload = encode_telemetry(TelemetryBatch(records=list(records)))  # type: ignore[arg-type]
    else:
        message.payload = json.dumps({"records": list(records)}).encode()
    return message


def _bridge(engine: Engine) -> MqttBridge:
    """Never started: the tests call its batch writer, the path every message takes."""
    return MqttBridge(MqttEndpoint(host="127.0.0.1", port=1), engine, FleetMetrics())


def _verdicts(engine: Engine, version_id: int) -> dict[str, tuple[DriftVerdict, int]]:
    with Session(engine) as session:
        version = session.get(ModelVersion, version_id)
        assert version is not None
        report = drift_report(
            session, version=version, thresholds=THRESHOLDS, until=utcnow(), window_s=24 * 3600
        )
    cohorts = [report.overall] if report.overall else []
    return {c.cohort: (c.verdict, c.samples) for c in [*cohorts, *report.cohorts]}


def test_shifted_inputs_raise_drift_for_their_cohort_only(
    engine: Engine, reference: ReferenceProfile
) -> None:
    """Four devices at site a see the reference distribution; two at site b see its first
    feature moved by one standard deviation. Site b drifts within DRIFT_WITHIN inferences;
    site a never does; and every record is stored once, resends included."""
    tags = {f"a-{i}": ["site-a"] for i in range(4)} | {f"b-{i}": ["site-b"] for i in range(2)}
    version_id = _register(engine, reference, tags)
    devices = [
        _Device(d, reference, shift=1.0 if d.startswith("b") else 0.0, seed=n)
        for n, d in enumerate(tags)
    ]
    bridge = _bridge(engine)
    first_drift = None
    sent: list[mqtt.MQTTMessage] = []
    for round_ in range(1, 7):
        messages = [_message(d.id, d.record()) for d in devices]
        bridge._write([*messages, *sent[-2:], *messages[-1:]])  # resends count once
        sent = messages
        verdicts = _verdicts(engine, version_id)
        sent_by_b = round_ * INFERENCES_PER_RECORD * 2
        assert verdicts["site-a"][0] is not DriftVerdict.DRIFT, f"round {round_}: {verdicts}"
        if verdicts["site-b"][0] is DriftVerdict.DRIFT and first_drift is None:
            first_drift = sent_by_b
        assert verdicts["site-b"][1] == sent_by_b
    assert first_drift is not None and first_drift <= DRIFT_WITHIN, first_drift
    assert verdicts["site-a"] == (DriftVerdict.OK, 6 * INFERENCES_PER_RECORD * 4)
    with Session(engine) as session:
        stored = session.exec(select(TelemetryRecordRow)).all()
    assert len(stored) == 6 * len(devices)


def test_devices_fed_the_reference_never_alert_in_a_long_run(
    sqlite: Engine, reference: ReferenceProfile
) -> None:
    """Twelve cohorts of two reference-fed devices, judged after each of 30 rounds (360
    judgements, each over at least 200 inferences once past the first rounds): no false
    alarm."""
    cohorts = 12
    tags = {f"d-{c}-{i}": [f"cohort-{c}"] for c in range(cohorts) for i in range(2)}
    version_id = _register(sqlite, reference, tags)
    devices = [_Device(d, reference, shift=0.0, seed=100 + n) for n, d in enumerate(tags)]
    bridge = _bridge(sqlite)
    judged = alarms = 0
    for _ in range(30):
        bridge._write([_message(d.id, d.record(inferences=20)) for d in devices])
        with session_scope(sqlite) as session:
            changes, seen = judge_drift(
                session, thresholds=THRESHOLDS, window_s=24 * 3600, now=utcnow(), actor="test"
            )
        judged += sum(1 for *_, c in seen if c.cohort)
        alarms += sum(1 for c in changes if c.drifting)
    assert judged >= 300, judged  # the figure the docstring states
    assert alarms == 0
    assert _verdicts(sqlite, version_id)["cohort-0"][0] is DriftVerdict.OK


HOSTILE_DRIFT: dict[str, Any] = {
    "not a summary": "drift!",
    "unknown feature": {"count": 10, "features": {"y:0": [5, 5]}},
    "other bins": {"count": 10, "features": {"x:0": [5, 5]}},
    "untracked class": {"count": 10, "classes": {"7": 10}},
    "counts past the interval's": {"count": 1, "features": {"x:0": [2**40] + [0] * 9}},
    "count past a record's": {"count": 2**52},
    "negative": {"count": -1},
    "a class key not an integer's own text": {"count": 1, "classes": {"-01": 1}},
    "classes not an object": {"count": 1, "classes": [1]},
    "a boolean for a count": {"count": True},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_DRIFT))
def test_a_hostile_summary_is_skipped_counted_and_costs_its_neighbours_nothing(
    sqlite: Engine, reference: ReferenceProfile, case: str
) -> None:
    version_id = _register(sqlite, reference, {"good": ["site"], "bad": ["site"]})
    good = _Device("good", reference, shift=0.0, seed=1)
    hostile = {
        "id": "bad-1",
        "ts": time.time(),
        "bundle": BUNDLE,
        "inferences": 10,
        "extra": {"drift": HOSTILE_DRIFT[case], "truth": {"labelled": 5, "correct": 6}},
    }
    bridge = _bridge(sqlite)

    bridge._write([_message("bad", hostile), _message("good", good.record(inferences=300))])
    bridge._write([_message("good", good.record(inferences=300))])

    assert _verdicts(sqlite, version_id)["site"] == (DriftVerdict.OK, 600)
    registry = bridge._metrics.registry
    assert registry.get_sample_value("edgefleet_model_health_skipped_total") == 1
    assert registry.get_sample_value("edgefleet_telemetry_records_total") == 3
    with Session(sqlite) as session:
        assert session.get(TelemetryRecordRow, ("bad", "bad-1")) is not None


def test_live_accuracy_per_cohort_with_a_wilson_interval(
    sqlite: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ground truth counts add per cohort and overall, once each when the batch comes
    again (looked up two records a statement here, so across statements); a record
    without a reference still counts its truth; a malformed truth is skipped."""
    monkeypatch.setattr("fleet.drift._KEYS_PER_QUERY", 2)
    version_id = _register(sqlite, None, {"a": ["site-a"], "b": ["site-b"], "c": []})

    def record(n: int, labelled: int, correct: int) -> TelemetryRecord:
        truth = {"labelled": labelled, "correct": correct}
        return TelemetryRecord(id=f"r{n}", ts=time.time(), bundle=BUNDLE, extra={"truth": truth})

    bridge = _bridge(sqlite)
    batch = [
        _message("a", record(1, 60, 50), record(2, 40, 31)),
        _message("b", record(3, 10, 2)),
        _message("c", record(4, 5, 5), record(5, 3, 4)),  # the second: more right than labelled
    ]
    bridge._write(batch)
    bridge._write(batch)  # a resend of it all
    with Session(sqlite) as session:
        version = session.get(ModelVersion, version_id)
        assert version is not None
        report = accuracy_report(session, version=version, until=utcnow(), window_s=3600)
    by_cohort = {c.cohort: c for c in report.cohorts}
    assert (by_cohort["site-a"].labelled, by_cohort["site-a"].correct) == (100, 81)
    # 81 of 100 at 95 %: Wilson's interval is 0.722 to 0.875 (E. B. Wilson, 1927).
    assert by_cohort["site-a"].low == pytest.approx(0.7222, abs=5e-4)
    assert by_cohort["site-a"].high == pytest.approx(0.8749, abs=5e-4)
    assert (by_cohort["site-b"].labelled, by_cohort["site-b"].correct) == (10, 2)
    assert report.overall is not None
    assert (report.overall.labelled, report.overall.correct) == (115, 88)


def test_wilson_interval_stays_within_zero_and_one() -> None:
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    low, _ = wilson_interval(10, 10)
    assert 0.69 < low < 0.73  # not the normal approximation's zero-width [1, 1]
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    status: ClassVar[int] = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[_Webhook]]]:
    handler = type("Hook", (_Webhook,), {"received": [], "status": 204})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()
    server.server_close()


def test_a_drift_alert_is_raised_once_per_crossing_audited_counted_and_posted(
    sqlite: Engine,
    reference: ReferenceProfile,
    webhook: tuple[str, type[_Webhook]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, hook = webhook
    _register(sqlite, reference, {"b": ["site-b"]})
    metrics = FleetMetrics()
    clock = [utcnow()]
    watch = DriftWatch(
        sqlite,
        metrics,
        thresholds=THRESHOLDS,
        window_s=3600,
        check_s=3600,
        webhook_url=url,
        webhook_timeout_s=5,
        actor="fleet:test",
        clock=lambda: clock[0],
    )
    bridge = _bridge(sqlite)
    shifted = _Device("b", reference, shift=2.0, seed=5)
    bridge._write([_message("b", shifted.record(inferences=300))])

    first, again = watch.check(), watch.check()

    assert [(c.cohort, c.drifting) for c in first] == [("", True), ("site-b", True)]
    assert again == []
    labels = {"model": "digits", "version": "1.0.0", "cohort": "site-b"}
    assert metrics.registry.get_sample_value("edgefleet_drift_alerts_total", labels) == 1
    assert metrics.registry.get_sample_value("edgefleet_drifting", labels) == 1
    assert [(h["event"], h["cohort"]) for h in hook.received] == [
        ("drift", ""),
        ("drift", "site-b"),
    ]
    assert "x:0" in " ".join(hook.received[1]["reasons"])
    with Session(sqlite) as session:
        entries = session.exec(
            select(AuditEntry).where(col(AuditEntry.action) == "model.drift")
        ).all()
    assert [e.after["cohort"] for e in entries if e.after] == ["", "site-b"]

    # Two hours on, the window holds only what a now reference-fed device sends: cleared,
    # once; the webhook now fails, which is counted and changes nothing else.
    hook.status = 500
    clock[0] += dt.timedelta(hours=2)
    calm = _Device("b", reference, shift=0.0, seed=6)
    record = calm.record(inferences=300)
    monkeypatch.setattr("fleet.bridge.utcnow", lambda: clock[0])  # the fleet's clock, later
    bridge._write([_message("b", record)])
    cleared = watch.check()
    assert [(c.cohort, c.drifting) for c in cleared] == [("", False), ("site-b", False)]
    assert watch.check() == []
    assert metrics.registry.get_sample_value("edgefleet_drifting", labels) == 0
    assert metrics.registry.get_sample_value("edgefleet_drift_webhook_failures_total") == 2


def _bundle_with(tmp_path: Path, reference: bytes | None) -> Path:
    path = tmp_path / "bundle.efb"
    with tarfile.open(path, mode="w") as tar:
        if reference is not None:
            info = tarfile.TarInfo(DRIFT_REFERENCE_FILE)
            info.size = len(reference)
            tar.addfile(info, io.BytesIO(reference))
    return path


def test_a_bundles_reference_is_read_strictly(tmp_path: Path, reference: ReferenceProfile) -> None:
    assert read_reference(_bundle_with(tmp_path, None)) is None
    stored = read_reference(_bundle_with(tmp_path, reference.to_json_bytes()))
    assert ReferenceProfile.model_validate_json(json.dumps(stored)) == reference
    broken = json.loads(reference.to_json_bytes())
    broken["features"][0]["fractions"][0] += 0.5  # no longer sums to 1
    for bad in (b"{", json.dumps(broken).encode(), b'{"samples": 1, "features": [], "x": 1}'):
        with pytest.raises(RequestError, match=DRIFT_REFERENCE_FILE):
            read_reference(_bundle_with(tmp_path, bad))
