"""Model health benchmark: what drift summaries and ground truth cost the fleet's ingest.

    python bench/model_health_bench.py [--databases sqlite,postgresql] [--devices 1000]
        [--messages 400] [--per-write 40] [--repeat 5] [--json FILE]

The MQTT bridge's batch writer (``fleet.bridge.MqttBridge._write``, the path every
message takes after paho, never started here: no broker in the figure) stores the same
telemetry, 50 records a message (zstd, as agents send), from ``--devices`` devices with
two tags each, on a fresh database per run, three ways:

- **plain**: records without ``extra`` (the peer);
- **summaries, not folded**: each record with a drift summary (a classifier with a
  3-channel image input: 3 features of 10 bins and 17 class counts) and a ground-truth
  count, ``fleet.drift.fold`` switched off: the cost of carrying them (decoding, storing
  the JSON);
- **summaries, folded**: the same, as the fleet runs: the cost above plus keeping
  ``modelhealth`` (fleet/drift.py).

Each figure is the median of ``--repeat`` runs, in records per second, with its ratio to
the plain run measured in the same process. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from sqlalchemy.engine import Engine
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fleet.bridge
from contracts.drift import ReferenceProfile, SummaryBuilder, reference_from_samples
from contracts.mqtt import (
    TelemetryBatch,
    TelemetryRecord,
    device_topic,
    encode_telemetry,
)
from fleet.broker import MqttEndpoint
from fleet.db import make_engine, session_scope
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import Bundle, Device, ModelVersion

BUNDLE = "bench-1.0.0"
RECORDS_PER_MESSAGE = 50


def _reference() -> ReferenceProfile:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(500, 3, 16, 16)).astype(np.float32)
    scores = rng.normal(size=(500, 20))
    return reference_from_samples({"image": images}, scores, classifier=True)


def _summaries(reference: ReferenceProfile, count: int) -> list[dict[str, Any]]:
    """``count`` summaries of 20 inferences each, as a device would send."""
    rng = np.random.default_rng(1)
    made = []
    for _ in range(count):
        builder = SummaryBuilder(reference)
        for _ in range(20):
            builder.add(
                {"image": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)},
                predicted_class=int(rng.integers(0, 20)),
            )
        made.append(builder.summary().to_extra())
    return made


def _messages(
    devices: int, messages: int, summaries: list[dict[str, Any]] | None
) -> list[mqtt.MQTTMessage]:
    made = []
    for n in range(messages):
        device = f"dev-{n % devices:05d}"
        records = [
            TelemetryRecord(
                id=f"{n}-{i}",
                ts=time.time(),
                bundle=BUNDLE,
                inferences=20,
                extra={}
                if summaries is None
                else {
                    "drift": summaries[(n + i) % len(summaries)],
                    "truth": {"labelled": 2, "correct": 1},
                },
            )
            for i in range(RECORDS_PER_MESSAGE)
        ]
        message = mqtt.MQTTMessage(topic=device_topic(device, "telemetry").encode())
        message.payload = encode_telemetry(TelemetryBatch(records=records))
        made.append(message)
    return made


def _prepare(engine: Engine, reference: ReferenceProfile, devices: int) -> None:
    upgrade(engine)
    with session_scope(engine) as session:
        version = ModelVersion(name="bench", version="1.0.0")
        session.add(version)
        session.flush()
        session.add(
            Bundle(
                model_version_id=version.id or 0,
                profile="host",
                runtime="onnxruntime",
                precision="fp32",
                version="1.0.0",
                version_number=1,
                target_path="host/bench-1.0.0.efb",
                sha256="0" * 64,
                length=1,
                bundle_name=BUNDLE,
                drift_reference=json.loads(reference.to_json_bytes()),
            )
        )
        for d in range(devices):
            tags = [f"site-{d % 7}", f"batch-{d % 3}"]
            session.add(Device(id=f"dev-{d:05d}", profile="host", tags=tags))


def _no_fold(session: Session, rows: Sequence[tuple[str, TelemetryRecord, dt.datetime]]) -> int:
    return 0


@contextmanager
def _fold_off() -> Iterator[None]:
    saved = fleet.bridge.fold
    fleet.bridge.fold = _no_fold
    try:
        yield
    finally:
        fleet.bridge.fold = saved


def _run(
    new_engine: Callable[[], Engine],
    reference: ReferenceProfile,
    devices: int,
    messages: list[mqtt.MQTTMessage],
    per_write: int,
) -> float:
    """Records per second the bridge's writer stores ``messages`` at, ``per_write`` a batch."""
    engine = new_engine()
    try:
        _prepare(engine, reference, devices)
        bridge = fleet.bridge.MqttBridge(
            MqttEndpoint(host="127.0.0.1", port=1), engine, FleetMetrics()
        )
        start = time.perf_counter()
        for i in range(0, len(messages), per_write):
            bridge._write(messages[i : i + per_write])
        elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    return len(messages) * RECORDS_PER_MESSAGE / elapsed


@contextmanager
def _databases(kinds: list[str], workdir: Path) -> Iterator[dict[str, Callable[[], Engine]]]:
    found: dict[str, Callable[[], Engine]] = {}

    def sqlite() -> Engine:
        return make_engine(f"sqlite:///{workdir / f'{uuid.uuid4().hex}.db'}")

    if "sqlite" in kinds:
        found["sqlite"] = sqlite
    if "postgresql" not in kinds:
        yield found
        return
    from tests.utils.postgres import postgres_available, postgres_server

    if not postgres_available():
        print("PostgreSQL binaries not found: sqlite only", file=sys.stderr)
        yield found
        return
    with postgres_server(workdir) as url:

        def postgresql() -> Engine:
            name = f"bench_{uuid.uuid4().hex}"
            server = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
            with server.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            server.dispose()
            return make_engine(f"{url.rsplit('/', 1)[0]}/{name}")

        found["postgresql"] = postgresql
        yield found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=400, help="50-record messages")
    parser.add_argument("--per-write", type=int, default=40, help="messages per batch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reference = _reference()
    summaries = _summaries(reference, 200)
    size = statistics.median(len(json.dumps(s)) for s in summaries)
    plain = _messages(args.devices, args.messages, None)
    carrying = _messages(args.devices, args.messages, summaries)
    variants: list[tuple[str, list[mqtt.MQTTMessage], bool]] = [
        ("plain", plain, True),
        ("summaries, not folded", carrying, False),
        ("summaries, folded", carrying, True),
    ]
    figures: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        _databases(args.databases.split(","), Path(tmp)) as databases,
    ):
        for kind, new_engine in databases.items():
            runs: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            for r in range(args.repeat):
                for name, messages, folding in variants[r % 3 :] + variants[: r % 3]:
                    print(f"{kind} run {r + 1}: {name}", file=sys.stderr)
                    if folding:
                        rate = _run(new_engine, reference, args.devices, messages, args.per_write)
                    else:
                        with _fold_off():
                            rate = _run(
                                new_engine, reference, args.devices, messages, args.per_write
                            )
                    runs[name].append(rate)
            figures[kind] = {name: statistics.median(rates) for name, rates in runs.items()}
    print(f"\nA drift summary: {size:.0f} bytes of JSON (median of 200).\n")
    print("| database | plain (records/s) | summaries, not folded | summaries, folded |")
    print("| --- | --- | --- | --- |")
    for kind, found in figures.items():
        peer = found["plain"]
        cells = [f"{found[name]:,.0f} ({found[name] / peer:.2f}x)" for name, _, _ in variants[1:]]
        print(f"| {kind} | {peer:,.0f} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"summary_bytes": size, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
