"""Fleet benchmark: the fleet's ingest against its peers measured in the same run, a burst,
and a rollout, on this machine.

    python bench/fleet_bench.py [--databases sqlite,postgresql] [--shapes single,batch50]
        [--messages 60000] [--batches 4000] [--publishers 2] [--repeat 3]
        [--burst 150000] [--rollout-devices 2000[,10000...]] [--waves 100 [--waves ...]]
        [--ingest-workers 2[,4...]] [--simulator-processes 2] [--json FILE]

Everything runs on a fresh mosquitto started as the fleet starts it (``MosquittoBroker``:
the fleet's config, dynamic-security). The bench adds its own accounts through the
broker's admin path (``MosquittoBroker.control``): ``bench-load-N`` (publish telemetry
on any device's topic) for the load generator, and a second fleet account for the C
subscriber. Per payload shape (``single``: one record per message, JSON; ``batch50``: 50
records per message, zstd, as agents send):

- **load alone**: ``--publishers`` processes (``bench/fleet_load.py``) publish pre-encoded
  QoS 1 messages with no subscriber: the rate the broker acknowledges them at, which must
  stay well above every rate below, or the generator would be what is measured;
- **broker → mosquitto_sub**: the same publishes delivered to ``mosquitto_sub`` (C, QoS 1,
  MQTT 5, the fleet's ``$share/fleet/...`` filter): the broker's delivery, the peer for
  the fleet's messages per second;
- per database (SQLite file; PostgreSQL when its server binaries are installed, a
  throwaway cluster as the tests make, durability off): **database bulk insert**, the same
  rows written by the driver's fastest path (SQLite ``executemany`` of tuples, ``INSERT OR
  IGNORE``; PostgreSQL ``COPY`` into a staging table, then ``INSERT ... ON CONFLICT DO
  NOTHING``), 5,000 rows a transaction, the peer for the fleet's records per second; and
  **fleet**, the fleet's MQTT bridge (``fleet.bridge.MqttBridge``, its own process, its
  replica account and persistent session) storing the same publishes: timed from the first
  publish to the last record committed, with the bridge process's CPU time; and with
  each of ``--ingest-workers`` N, **fleet with N ingest workers**: the same bridge plus N
  worker processes as ``fleet serve --ingest-workers N`` runs them
  (``fleet.ingest_workers.IngestWorkers``, each with its own account), measured right
  after the bridge alone, with the ratio to it and the CPU time of all the processes.
  And **decoding alone**: the contract's decoding of the same messages (``decode_payload``)
  on one core, per record; with the database's bulk insert it bounds the fleet/database
  ratio whatever else the fleet did (a fleet that only decoded and inserted).

Then a **burst** (``--burst`` one-record messages as fast as the generator goes, SQLite):
sent, acknowledged by the broker, stored by the fleet, lost (acknowledged and never
stored), what the broker logged about dropping, and what the bridge shed and the storage
receipts it could not queue; and **rollouts**: ``edgefleet fleet
serve`` with each of ``--rollout-devices`` simulated devices (``fleet.simulator``, split
over ``--simulator-processes`` processes, each driving its share on one thread), for each
``--waves`` (default one wave of 100 %), soak 0: devices per second from ``POST /rollouts``
to every device healthy, with the CPU time per device over that span of the fleet process,
of the simulator processes (the load side: if one of them neared a core, the load would be
what is measured) and of mosquitto.

Each figure is the median of ``--repeat`` runs (the burst and each rollout run once).
Everything started is stopped on the way out, Ctrl-C included. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import multiprocessing
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import col, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleet_load import SHAPES, PublishResult, Shape, device_of, publish, records_of
from contracts.mqtt import (
    TOPIC_PREFIX,
    TelemetryBatch,
    decode_payload,
    encode_telemetry,
    shared_subscription,
)
from fleet import devices as device_service
from fleet.broker import MosquittoBroker, MqttEndpoint
from fleet.broker.access import AccountKind
from fleet.broker.credential import ingest_username, replica_username
from fleet.broker.security import service_account_commands
from fleet.db import make_engine, session_scope
from fleet.gc_tuning import tune_for_serving
from fleet.ingest_workers import IngestWorkers, IngestWorkerSpec, counter_totals
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import Device, EnrollmentTokenCreate, Rollout
from fleet.server import ADMIN_TOKEN_FILE
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from ota.archive import write_bundle
from ota.manifest import BundleFile, GoldenVectors, Manifest, ModelInfo
from tests.utils.postgres import postgres_available, postgres_server

_SPAWN = multiprocessing.get_context("spawn")
_DEVICES_PER_PUBLISHER = 500
_DATABASE_CHUNK_ROWS = 5000
_COLUMNS = (
    "device_id",
    "record_id",
    "ts",
    "received_at",
    "bundle",
    "inferences",
    "errors",
    "fallbacks",
    "latency_p50_ms",
    "latency_p95_ms",
    "shadow_bundle",
    "shadow_compared",
    "shadow_agreed",
    "dropped",
    "extra",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``probe()`` held; ``RuntimeError`` after ``timeout_s``."""
    start = time.perf_counter()
    while not probe():
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)
    return time.perf_counter() - start


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# --- the broker and its accounts ---------------------------------------------------------


@dataclass(frozen=True)
class BenchBroker:
    broker: MosquittoBroker
    fleet: MqttEndpoint
    """The fleet replica's account (client id ``edgefleet-fleet-bench``)."""
    load_password: str
    peer: MqttEndpoint
    """A second fleet account, for ``mosquitto_sub``."""


@contextmanager
def bench_broker(directory: Path, publishers: int) -> Iterator[BenchBroker]:
    """A fresh mosquitto on the fleet's config, with the bench's accounts added through
    its admin path; stopped on the way out."""
    broker = MosquittoBroker(directory)
    try:
        fleet = broker.start(
            fleet_username=replica_username("bench"),
            fleet_password=secrets.token_urlsafe(24),
            devices=[],
        )
        load_password, peer_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        peer = replica_username("peer")
        broker.control(
            [
                {
                    "command": "createRole",
                    "rolename": "bench-load",
                    "acls": [
                        {
                            "acltype": "publishClientSend",
                            "topic": f"{TOPIC_PREFIX}/+/telemetry",
                            "allow": True,
                        }
                    ],
                },
                *(
                    {
                        "command": "createClient",
                        "username": f"bench-load-{i}",
                        "password": load_password,
                        "roles": [{"rolename": "bench-load"}],
                    }
                    for i in range(publishers)
                ),
                *service_account_commands(peer, AccountKind.FLEET, peer_password),
            ]
        )
        yield BenchBroker(
            broker,
            fleet,
            load_password,
            MqttEndpoint(fleet.host, fleet.port, username=peer, password=peer_password),
        )
    finally:
        broker.stop()


# --- the load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    sent: int
    acked: int
    started: float
    acked_by: float
    """``time.monotonic()`` of the last PUBACK."""

    @property
    def rate(self) -> float:
        return self.acked / (self.acked_by - self.started)


@contextmanager
def publishers(
    bench: BenchBroker, shape: str, messages: int, count: int, timeout_s: float = 600
) -> Iterator[Callable[[], Load]]:
    """``count`` publisher processes, connected and holding ``messages`` pre-encoded
    messages between them; the ``with`` body gets a function that starts them and waits
    for their last PUBACK. Killed on the way out if still running."""
    results: Any = _SPAWN.Queue()
    go = _SPAWN.Event()
    host, port = bench.fleet.host, bench.fleet.port
    share = [messages // count + (i < messages % count) for i in range(count)]
    processes = [
        _SPAWN.Process(
            target=publish,
            args=(
                i,
                f"bench-load-{i}",
                bench.load_password,
                host,
                port,
                shape,
                share[i],
                _DEVICES_PER_PUBLISHER,
                results,
                go,
                timeout_s,
            ),
            daemon=True,
        )
        for i in range(count)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            item = results.get(timeout=600)
            if item[0] != "ready":
                raise RuntimeError(f"a publisher failed: {item}")

        def run() -> Load:
            go.set()
            done: list[PublishResult] = [results.get(timeout=timeout_s + 60) for _ in processes]
            return Load(
                sum(r.sent for r in done),
                sum(r.acked for r in done),
                min(r.started for r in done),
                max(r.finished for r in done),
            )

        yield run
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


def load_alone(work: Path, shape: str, args: argparse.Namespace) -> float:
    """Messages per second the broker acknowledges with no subscriber."""
    with (
        bench_broker(
            Path(tempfile.mkdtemp(prefix="broker-load-", dir=work)), args.publishers
        ) as bench,
        publishers(bench, shape, _messages(shape, args), args.publishers) as run,
    ):
        return run().rate


def _messages(shape: str, args: argparse.Namespace) -> int:
    return int(args.messages if SHAPES[shape].records == 1 else args.batches)


# --- the broker's delivery to a C subscriber ---------------------------------------------


def broker_to_mosquitto_sub(work: Path, shape: str, args: argparse.Namespace) -> float:
    """Messages per second from the first publish to ``mosquitto_sub`` holding them all."""
    messages = _messages(shape, args)
    with (
        bench_broker(
            Path(tempfile.mkdtemp(prefix="broker-peer-", dir=work)), args.publishers
        ) as bench,
        publishers(bench, shape, messages, args.publishers) as run,
    ):
        peer = bench.peer
        connected = f" as {peer.username} "
        offset = bench.broker.log_path.stat().st_size
        command = [
            "mosquitto_sub",
            "-h",
            peer.host,
            "-p",
            str(peer.port),
            "-u",
            str(peer.username),
            "-P",
            str(peer.password),
            "-i",
            str(peer.username),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            shared_subscription("telemetry"),
            "-C",
            str(messages),
            "-N",
        ]
        with subprocess.Popen(command, stdout=subprocess.DEVNULL) as sub:
            try:
                wait_until(
                    lambda: connected in bench.broker.log_path.read_text()[offset:],
                    30,
                    "mosquitto_sub to connect",
                )
                time.sleep(1.0)  # its SUBSCRIBE follows the CONNECT at once
                load = run()
                wait_until(lambda: sub.poll() is not None, 600, "mosquitto_sub's last message")
                done = time.monotonic()
            finally:
                if sub.poll() is None:
                    sub.kill()
        if sub.returncode != 0:
            raise RuntimeError(f"mosquitto_sub exited {sub.returncode}")
        return messages / (done - load.started)


# --- the database's own bulk insert ------------------------------------------------------


def table_rows(shape: Shape, args: argparse.Namespace) -> list[tuple[Any, ...]]:
    """The rows the load's messages hold, in :data:`_COLUMNS` order, as the bench's
    publishers make them (``received_at``: now)."""
    now = dt.datetime.now(dt.UTC)
    key = next(k for k, s in SHAPES.items() if s == shape)
    messages = _messages(key, args)
    share = [
        messages // args.publishers + (i < messages % args.publishers)
        for i in range(args.publishers)
    ]
    rows = []
    for p, count in enumerate(share):
        for n in range(count):
            device = device_of(p, n, _DEVICES_PER_PUBLISHER)
            for r in records_of(p, n, shape):
                rows.append(
                    (
                        device,
                        r.id,
                        dt.datetime.fromtimestamp(r.ts, dt.UTC),
                        now,
                        r.bundle,
                        r.inferences,
                        r.errors,
                        r.fallbacks,
                        r.latency_p50_ms,
                        r.latency_p95_ms,
                        r.shadow_bundle,
                        r.shadow_compared,
                        r.shadow_agreed,
                        r.dropped,
                        json.dumps(r.extra),
                    )
                )
    return rows


def database_bulk_insert(url: str, db: Engine, rows: Sequence[tuple[Any, ...]]) -> float:
    """Rows per second the driver's fastest path writes into ``telemetry``, emptied first."""
    empty(db)
    chunks = [rows[i : i + _DATABASE_CHUNK_ROWS] for i in range(0, len(rows), _DATABASE_CHUNK_ROWS)]
    columns = ", ".join(_COLUMNS)
    if url.startswith("sqlite"):
        import sqlite3

        def text_time(value: dt.datetime) -> str:
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")

        chunks = [[(*r[:2], text_time(r[2]), text_time(r[3]), *r[4:]) for r in c] for c in chunks]
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        marks = ", ".join("?" * len(_COLUMNS))
        start = time.perf_counter()
        for chunk in chunks:
            with connection:
                connection.executemany(
                    f"INSERT OR IGNORE INTO telemetry ({columns}) VALUES ({marks})", chunk
                )
        elapsed = time.perf_counter() - start
        connection.close()
        return len(rows) / elapsed
    import psycopg

    with psycopg.connect(url) as connection:
        connection.execute(
            "CREATE TEMP TABLE staging (LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        connection.commit()
        start = time.perf_counter()
        for chunk in chunks:
            with connection.cursor() as cursor:
                with cursor.copy(f"COPY staging ({columns}) FROM STDIN") as copy:
                    for row in chunk:
                        copy.write_row(row)
                cursor.execute(
                    f"INSERT INTO telemetry ({columns}) SELECT {columns} FROM staging "
                    "ON CONFLICT DO NOTHING"
                )
            connection.commit()
        return len(rows) / (time.perf_counter() - start)


def decoding_alone(shape: Shape, count: int = 2000) -> float:
    """Seconds per record of the contract's decoding alone (``decode_payload`` into a
    ``TelemetryBatch``: decompress, parse, validate), on one core: what the fleet does for
    every message whatever else it does, so with the database's bulk insert it bounds the
    fleet/database ratio."""
    payloads = [
        encode_telemetry(
            TelemetryBatch(records=list(records_of(0, n, shape))), compress=shape.compress
        )
        for n in range(count)
    ]
    start = time.perf_counter()
    for payload in payloads:
        decode_payload(payload, TelemetryBatch)
    return (time.perf_counter() - start) / (count * shape.records)


def stored(db: Engine) -> int:
    with db.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM telemetry")).scalar_one())


def empty(db: Engine) -> None:
    with db.begin() as connection:
        connection.execute(text("DELETE FROM telemetry"))


# --- the fleet ---------------------------------------------------------------------------


def _bridge_process(
    database_url: str, endpoint: MqttEndpoint, ready: Any, stop: Any, counts: Any
) -> None:
    """A child process: the fleet's MQTT bridge storing into ``database_url`` until
    ``stop`` is set, its garbage collector set as ``fleet serve`` sets it; then its
    :class:`BridgeCounts` go on ``counts`` (a queue)."""
    tune_for_serving()
    from fleet.bridge import MqttBridge
    from fleet.metrics import FleetMetrics

    db = make_engine(database_url)
    metrics = FleetMetrics()
    bridge = MqttBridge(endpoint, db, metrics, client_id=endpoint.username)
    bridge.start(timeout_s=60)
    ready.set()
    stop.wait()
    bridge.stop()
    db.dispose()
    totals = counter_totals(metrics)
    counts.put(
        BridgeCounts(
            shed=int(sum(v for (counter, _), v in totals.items() if counter == "shed")),
            receipts_unqueued=int(totals.get(("receipts_unqueued", ()), 0)),
        )
    )


@dataclass
class BridgeCounts:
    """What the bench's bridge process counted, known once it stopped (``None``: it did
    not report)."""

    shed: int | None = None
    receipts_unqueued: int | None = None


@contextmanager
def fleet_bridge(
    database_url: str, endpoint: MqttEndpoint, counts: BridgeCounts | None = None
) -> Iterator[int]:
    """The bridge in a process of its own, subscribed; yields its pid. ``counts`` is
    filled on the way out."""
    ready, stop, counted = _SPAWN.Event(), _SPAWN.Event(), _SPAWN.Queue()
    process = _SPAWN.Process(
        target=_bridge_process, args=(database_url, endpoint, ready, stop, counted), daemon=True
    )
    process.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the fleet's bridge did not connect")
        assert process.pid is not None
        yield process.pid
    finally:
        stop.set()
        with suppress(queue.Empty):
            final = counted.get(timeout=90)
            if counts is not None:
                counts.shed, counts.receipts_unqueued = final.shed, final.receipts_unqueued
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()


@contextmanager
def ingest_workers(bench: BenchBroker, database_url: str, count: int) -> Iterator[list[int]]:
    """``count`` ingest worker processes as ``fleet serve --ingest-workers`` runs them,
    each with its account added to the broker, connected and subscribed; their pids."""
    if not count:
        yield []
        return
    password = secrets.token_urlsafe(24)
    names = [ingest_username("bench", k) for k in range(1, count + 1)]
    bench.broker.control(
        [c for n in names for c in service_account_commands(n, AccountKind.FLEET, password)]
    )
    offset = bench.broker.log_path.stat().st_size
    specs = [
        IngestWorkerSpec(k, replace(bench.fleet, username=name, password=password), database_url,
                         session_expiry_s=3600, idle_in_transaction_s=60.0)
        for k, name in enumerate(names, start=1)
    ]  # fmt: skip
    workers = IngestWorkers(specs, FleetMetrics())
    workers.start()
    try:
        wait_until(
            lambda: all(f" as {n} " in bench.broker.log_path.read_text()[offset:] for n in names),
            120,
            "the ingest workers to connect",
        )
        time.sleep(1.0)  # their SUBSCRIBE follows the CONNECT at once
        yield list(workers.pids().values())
    finally:
        workers.stop()


@dataclass(frozen=True)
class FleetRun:
    messages_per_s: float
    records_per_s: float
    cpu_per_message_s: float
    """Of the bridge's process and every ingest worker's."""


def fleet_ingest(
    work: Path, url: str, db: Engine, shape: str, args: argparse.Namespace, workers: int = 0
) -> FleetRun:
    """The fleet (its bridge and ``workers`` ingest workers) storing every message of the
    load: from the first publish to the last record committed."""
    messages = _messages(shape, args)
    records = messages * SHAPES[shape].records
    empty(db)
    with (
        bench_broker(
            Path(tempfile.mkdtemp(prefix="broker-fleet-", dir=work)), args.publishers
        ) as bench,
        fleet_bridge(url, bench.fleet) as pid,
        ingest_workers(bench, url, workers) as worker_pids,
        publishers(bench, shape, messages, args.publishers) as run,
    ):
        pids = [pid, *worker_pids]
        cpu_before = sum(map(cpu_s, pids))
        load = run()
        wait_until(lambda: stored(db) >= records, 900, "the fleet to store every record")
        elapsed = time.monotonic() - load.started
        cpu = sum(map(cpu_s, pids)) - cpu_before
    return FleetRun(messages / elapsed, records / elapsed, cpu / messages)


@dataclass(frozen=True)
class Burst:
    sent: int
    acked: int
    stored: int
    acked_s: float
    stored_s: float
    dropped_lines: int
    shed: int | None
    receipts_unqueued: int | None

    @property
    def lost(self) -> int:
        return self.acked - self.stored


def burst(work: Path, args: argparse.Namespace) -> Burst:
    """``--burst`` one-record messages as fast as the generator goes into the fleet on
    SQLite; stored is counted once the count has not moved for 20 s."""
    url = f"sqlite:///{work / 'burst.db'}"
    db = make_engine(url)
    upgrade(db)
    counts = BridgeCounts()
    with (
        bench_broker(work / "broker-burst", args.publishers) as bench,
        fleet_bridge(url, bench.fleet, counts),
        publishers(bench, "single", args.burst, args.publishers) as run,
    ):
        load = run()
        acked_s = load.acked_by - load.started
        last, moved = -1, time.monotonic()
        while time.monotonic() - moved < 20:
            count = stored(db)
            if count != last:
                last, moved = count, time.monotonic()
            if count >= load.acked:
                break
            time.sleep(0.2)
        stored_s = moved - load.started
        dropped = bench.broker.log_path.read_text().count("are being dropped")
    db.dispose()
    return Burst(
        load.sent,
        load.acked,
        last,
        acked_s,
        stored_s,
        dropped,
        counts.shed,
        counts.receipts_unqueued,
    )


# --- a rollout ---------------------------------------------------------------------------


def synthetic_bundle(work: Path, version: str) -> Path:
    """A small valid bundle; the simulated devices never run it."""
    src = work / f"src-{version}"
    src.mkdir()
    artifact, golden = src / "model.onnx", src / "golden.npz"
    artifact.write_bytes(version.encode() * 1000)
    np.savez(golden, **{"input:x": np.zeros((1, 4), np.float32), "output:0": np.zeros((1, 2))})
    sources = {p.name: p for p in (artifact, golden)}
    files = [
        BundleFile(path=n, sha256=hashlib.sha256(p.read_bytes()).hexdigest(), size=p.stat().st_size)
        for n, p in sorted(sources.items())
    ]
    major, minor, patch = (int(x) for x in version.split("."))
    manifest = Manifest(
        name="bench-host",
        version=version,
        version_number=major * 1_000_000 + minor * 1_000 + patch,
        model=ModelInfo(name="bench", version=version),
        profile="host",
        runtime="onnxruntime",
        precision="fp32",
        device="cpu",
        artifact=artifact.name,
        files=files,
        min_agent_version="0.1.0",
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        golden_vectors=GoldenVectors(path=golden.name, count=1, atol=0, rtol=0, top1=False),
    )
    return write_bundle(manifest, sources, work / f"bench-{version}.efb")


@contextmanager
def fleet_server(data_dir: Path, port: int, mqtt_port: int) -> Iterator[tuple[httpx.Client, int]]:
    """``edgefleet fleet serve`` on ``data_dir`` (SQLite), an API client and its pid; it and
    its mosquitto are stopped on the way out."""
    command = [
        str(Path(sys.executable).parent / "edgefleet"),
        "fleet",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--mqtt-port",
        str(mqtt_port),
        "--rollout-tick",
        "0.2",
    ]
    with (data_dir / "serve.log").open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_until(lambda: _answers(client) or process.poll() is not None, 120, "fleet start")
        if process.poll() is not None:
            raise RuntimeError(f"the fleet server exited; see {data_dir / 'serve.log'}")
        token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, process.pid
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _stop_orphan_broker(data_dir / "mosquitto")


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/v2/health/live").status_code == 200
    except httpx.HTTPError:
        return False


def _stop_orphan_broker(broker_dir: Path) -> None:
    """Stop a mosquitto the fleet server left running (its pid file says which, and only
    if its command line names this directory)."""
    try:
        pid = int((broker_dir / "mosquitto.pid").read_text())
        if str(broker_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, f"/api/v1{path}", **kwargs)
    if response.status_code >= 400:
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
    return response.json()


def enroll_in_bulk(db: Engine, count: int, bundle: str) -> list[SimulatedDeviceSpec]:
    specs = []
    with session_scope(db) as session:
        _, token = device_service.create_enrollment_token(
            session, data=EnrollmentTokenCreate(profile="host", uses=count), actor="bench"
        )
        for i in range(count):
            enrolled = device_service.enroll(
                session,
                token=token,
                device_id=f"sim-{i:05d}",
                csr_pem=None,
                ca=None,
                broker=None,  # the server's first start writes every account
            )
            assert enrolled.mqtt_password is not None
            specs.append(
                SimulatedDeviceSpec(
                    device_id=enrolled.device.id,
                    username=enrolled.device.id,
                    password=enrolled.mqtt_password,
                    bundle=bundle,
                    bundle_version_number=1_000_000,
                )
            )
    return specs


def _simulator_process(
    port: int, specs: list[SimulatedDeviceSpec], ready: Any, stop: Any, answers: Any
) -> None:
    """A child process: ``specs`` simulated devices on one thread, connected before
    ``ready`` is set; once ``stop`` is, it answers which bundle each device runs. Its
    garbage collector is set as the fleet's (``fleet.gc_tuning``): a simulator's heap is
    as large and its allocations as fast."""
    tune_for_serving()
    simulator = FleetSimulator("127.0.0.1", port, specs, Behaviour())
    with simulator:
        simulator.start(connect_timeout_s=300)
        ready.set()
        stop.wait()
        answers.put({s.device_id: simulator.current_bundle(s.device_id) for s in specs})


class SimulatorProcesses:
    """The simulated devices split over ``processes`` child processes (so they are not
    limited to one core, as one simulator's thread is)."""

    def __init__(self, port: int, specs: Sequence[SimulatedDeviceSpec], processes: int) -> None:
        self._stop = _SPAWN.Event()
        self._answers: Any = _SPAWN.Queue()
        self._ready = [_SPAWN.Event() for _ in range(processes)]
        self._children = [
            _SPAWN.Process(
                target=_simulator_process,
                args=(port, list(specs[k::processes]), ready, self._stop, self._answers),
                daemon=True,
            )
            for k, ready in enumerate(self._ready)
        ]

    def __enter__(self) -> SimulatorProcesses:
        for child in self._children:
            child.start()
        try:
            wait_until(
                lambda: all(r.is_set() or not c.is_alive() for r, c in self._started()),
                600,
                "the simulators to connect",
            )
            for ready, child in self._started():
                if not ready.is_set():
                    raise RuntimeError(f"a simulator process exited ({child.exitcode})")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _started(self) -> list[tuple[Any, Any]]:
        return list(zip(self._ready, self._children, strict=True))

    def pids(self) -> list[int]:
        return [child.pid for child in self._children if child.pid is not None]

    def bundles(self) -> dict[str, str | None]:
        """Which bundle each device runs; the processes end after answering."""
        self._stop.set()
        answers: dict[str, str | None] = {}
        for _ in self._children:
            answers.update(self._answers.get(timeout=120))
        return answers

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for child in self._children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()


@dataclass(frozen=True)
class RolloutRun:
    devices: int
    waves: list[str]
    simulator_processes: int
    seconds: float
    """From ``POST /rollouts`` to every device healthy on the new bundle."""
    fleet_cpu_s: float
    """The fleet server's CPU time over those seconds."""
    simulator_cpu_s: float
    """The simulator processes' (the load side's) over those seconds."""
    busiest_simulator_cpu_s: float
    """The busiest simulator process's: were it near the seconds themselves, the load
    would be what limits."""
    broker_cpu_s: float
    """mosquitto's CPU time over those seconds."""

    @property
    def devices_per_s(self) -> float:
        return self.devices / self.seconds


def rollout(work: Path, devices: int, waves: list[str], simulators: int) -> RolloutRun:
    """A rollout to ``devices`` simulated devices in ``waves``, soak 0, timed."""
    data_dir = work / f"fleet-rollout-{devices}-{len(waves)}-{simulators}"
    data_dir.mkdir(mode=0o700)
    db = make_engine(f"sqlite:///{data_dir / 'fleet.db'}")
    upgrade(db)
    specs = enroll_in_bulk(db, devices, "bench-host-1.0.0")
    mqtt_port = free_port()
    with ExitStack() as stack:
        client, fleet_pid = stack.enter_context(fleet_server(data_dir, free_port(), mqtt_port))
        attached: dict[str, Any] = {}
        for version in ("1.0.0", "1.1.0"):
            bundle = synthetic_bundle(data_dir, version)
            api(client, "POST", "/models", json={"name": "bench", "version": version})
            attached = api(
                client,
                "POST",
                f"/models/bench/versions/{version}/bundles",
                content=bundle.read_bytes(),
            )
        simulator = stack.enter_context(SimulatorProcesses(mqtt_port, specs, simulators))
        wait_until(lambda: online(db) == devices, 300, "every device online")
        broker_pid = int((data_dir / "mosquitto" / "mosquitto.pid").read_text())
        pids = (fleet_pid, broker_pid, *simulator.pids())
        cpu_before = [cpu_s(pid) for pid in pids]
        start = time.perf_counter()
        created = api(
            client,
            "POST",
            "/rollouts",
            json={"bundle_id": attached["id"], "waves": waves, "gate": {"soak_s": 0}},
        )
        wait_until(  # read from the database: polling the API would load the fleet
            lambda: rollout_state(db, created["id"]) in ("completed", "paused", "rolled_back"),
            900,
            "the rollout to finish",
        )
        elapsed = time.perf_counter() - start
        fleet_cpu, broker_cpu, *simulator_cpu = (
            cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)
        )
        final = api(client, "GET", f"/rollouts/{created['id']}")
        if final["state"] != "completed":
            raise RuntimeError(f"the rollout ended {final['state']}: {final['reason']}")
        on_new = sum(b == "bench-host-1.1.0" for b in simulator.bundles().values())
        if on_new != devices:
            raise RuntimeError(f"only {on_new} of {devices} devices run the new bundle")
    db.dispose()
    return RolloutRun(
        devices,
        waves,
        simulators,
        elapsed,
        fleet_cpu,
        sum(simulator_cpu),
        max(simulator_cpu),
        broker_cpu,
    )


def rollout_state(db: Engine, rollout_id: str) -> str:
    with session_scope(db) as session:
        return session.get_one(Rollout, rollout_id).state.value


def online(db: Engine) -> int:
    query = select(func.count()).select_from(Device).where(col(Device.online).is_(True))
    with session_scope(db) as session:
        return int(session.exec(query).one())


# --- the report --------------------------------------------------------------------------


def median_of(repeat: int, measure: Callable[[], Any]) -> Any:
    """The median run of ``repeat`` runs of ``measure`` (the lower one of an even count),
    by messages per second."""
    runs = [measure() for _ in range(repeat)]
    runs.sort(key=lambda r: r.messages_per_s if isinstance(r, FleetRun) else r)
    return runs[(len(runs) - 1) // 2]


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Load generator ({args.publishers} processes, pre-encoded QoS 1) with no subscriber: "
        + ", ".join(f"{SHAPES[s].name}: {r:,.0f} msgs/s" for s, r in results["load"].items()),
        "",
        "| database | payload | broker → mosquitto_sub | database bulk insert | fleet stores "
        "| fleet / broker | fleet / database | fleet CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["ingest"]:
        shape = SHAPES[row["shape"]]
        broker = results["broker"][row["shape"]]
        fleet = row["fleet"]
        per = "msg" if shape.records == 1 else "rec"
        cpu = fleet["cpu_per_message_s"] / shape.records * 1e6
        lines.append(
            f"| {row['database']} | {shape.name} | {broker:,.0f} msgs/s "
            f"({broker * shape.records:,.0f} rec/s) | {row['database_rows_per_s']:,.0f} rec/s "
            f"| {fleet['messages_per_s']:,.0f} msgs/s ({fleet['records_per_s']:,.0f} rec/s) "
            f"| {fleet['messages_per_s'] / broker:.3f} "
            f"| {fleet['records_per_s'] / row['database_rows_per_s']:.3f} "
            f"| {cpu:,.0f} µs/{per} |"
        )
    if results.get("ingest"):
        lines += ["", "Decoding alone, on one core (`decode_payload`, the contract's checks):"]
        for key, seconds in results["decoding"].items():
            lines.append(f"- {SHAPES[key].name}: {seconds * 1e6:.1f} µs/rec")
        for row in results["ingest"]:
            insert_s = 1 / row["database_rows_per_s"]
            decode_s = results["decoding"][row["shape"]]
            lines.append(
                f"- {row['database']}, {SHAPES[row['shape']].name}: a fleet that only decoded "
                f"and bulk-inserted would reach at most {insert_s / (insert_s + decode_s):.2f} "
                "of the database's rate"
            )
    if results.get("ingest_workers"):
        lines += [
            "",
            "Machine load (1, 5, 15 min) at the start: "
            f"{results['load_average'][0]}; at the end: {results['load_average'][1]}",
            "",
            "| database | payload | ingest workers | fleet stores | ratio to the bridge alone "
            "| fleet CPU (all processes) |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        shown = set()
        for row in results["ingest_workers"]:
            shape = SHAPES[row["shape"]]
            fleet, alone = row["fleet"], row["alone"]
            per = "msg" if shape.records == 1 else "rec"
            peer = [] if (row["database"], row["shape"]) in shown else [(0, alone)]
            shown.add((row["database"], row["shape"]))
            for workers, measured in (*peer, (row["workers"], fleet)):
                lines.append(
                    f"| {row['database']} | {shape.name} | {workers} "
                    f"| {measured['messages_per_s']:,.0f} msgs/s "
                    f"({measured['records_per_s']:,.0f} rec/s) "
                    f"| {measured['records_per_s'] / alone['records_per_s']:.2f} "
                    f"| {measured['cpu_per_message_s'] / shape.records * 1e6:,.0f} µs/{per} |"
                )
    if "burst" in results:
        b = results["burst"]
        lines += [
            "",
            f"Burst into the fleet (SQLite): {b['sent']:,} one-record messages sent, "
            f"{b['acked']:,} acknowledged by the broker in {b['acked_s']:.1f} s, "
            f"{b['stored']:,} stored by the fleet within {b['stored_s']:.1f} s, "
            f"**{b['acked'] - b['stored']:,} lost**; mosquitto logged dropping "
            f"{b['dropped_lines']} time(s); "
            + (
                "the bridge did not report what it shed."
                if b["shed"] is None
                else f"the bridge shed {b['shed']:,} and could not queue "
                f"{b['receipts_unqueued']:,} storage receipts."
            ),
        ]
    if results.get("rollouts"):
        lines += [
            "",
            "| rollout (SQLite, `fleet serve`, soak 0) | devices | simulator processes "
            "| seconds | devices/s | fleet CPU | simulator CPU | busiest simulator "
            "| mosquitto CPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in results["rollouts"]:
            per_device = {
                side: f"{run[f'{side}_cpu_s'] / run['devices'] * 1e6:,.0f} µs/device"
                for side in ("fleet", "simulator", "busiest_simulator", "broker")
            }
            lines.append(
                f"| waves {','.join(run['waves'])} | {run['devices']:,} "
                f"| {run['simulator_processes']} | {run['seconds']:.1f} "
                f"| {run['devices'] / run['seconds']:,.0f} | {per_device['fleet']} "
                f"| {per_device['simulator']} | {per_device['busiest_simulator']} "
                f"| {per_device['broker']} |"
            )
    return "\n".join(lines)


def run(work: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    shapes = [s for s in args.shapes.split(",") if s]
    results["load"] = {}
    results["broker"] = {}
    for shape in shapes:
        log(f"load generator alone, {SHAPES[shape].name}")
        results["load"][shape] = median_of(args.repeat, partial(load_alone, work, shape, args))
        log(f"  {results['load'][shape]:,.0f} msgs/s; broker → mosquitto_sub")
        results["broker"][shape] = median_of(
            args.repeat, partial(broker_to_mosquitto_sub, work, shape, args)
        )
        log(f"  {results['broker'][shape]:,.0f} msgs/s")
    results["ingest"] = []
    results["ingest_workers"] = []
    results["decoding"] = {}
    for shape in shapes:
        log(f"{SHAPES[shape].name}: decoding alone")
        results["decoding"][shape] = median_of(args.repeat, partial(decoding_alone, SHAPES[shape]))
    for database in filter(None, args.databases.split(",")):
        with ExitStack() as stack:
            if database == "sqlite":
                url = f"sqlite:///{work / 'fleet.db'}"
            elif database == "postgresql":
                if not postgres_available():
                    log("PostgreSQL server binaries not found: skipping PostgreSQL")
                    continue
                (work / "postgresql").mkdir()
                url = stack.enter_context(postgres_server(work / "postgresql"))
            else:
                raise SystemExit(f"unknown database {database!r}")
            db = make_engine(url)
            stack.callback(db.dispose)
            upgrade(db)
            for shape in shapes:
                rows = table_rows(SHAPES[shape], args)
                log(f"[{database}] {SHAPES[shape].name}: database bulk insert")
                database_rate = median_of(args.repeat, partial(database_bulk_insert, url, db, rows))
                log(f"  {database_rate:,.0f} rec/s; fleet")
                fleet = median_of(args.repeat, partial(fleet_ingest, work, url, db, shape, args))
                log(f"  {fleet}")
                results["ingest"].append(
                    {
                        "database": database,
                        "shape": shape,
                        "database_rows_per_s": database_rate,
                        "fleet": fleet.__dict__,
                    }
                )
                for workers in args.ingest_workers:
                    log(f"[{database}] {SHAPES[shape].name}: fleet with {workers} ingest workers")
                    scaled = median_of(
                        args.repeat, partial(fleet_ingest, work, url, db, shape, args, workers)
                    )
                    log(f"  {scaled}")
                    results["ingest_workers"].append(
                        {
                            "database": database,
                            "shape": shape,
                            "workers": workers,
                            "fleet": scaled.__dict__,
                            "alone": fleet.__dict__,
                        }
                    )
    if args.burst:
        log(f"burst of {args.burst:,} messages into the fleet")
        results["burst"] = {**burst(work, args).__dict__}
        log(f"  {results['burst']}")
    results["rollouts"] = []
    for devices in args.rollout_devices:
        for waves, simulators in itertools.product(args.waves, args.simulator_processes):
            log(
                f"rollout to {devices:,} simulated devices in {simulators} processes, "
                f"waves {','.join(waves)}"
            )
            run = rollout(work, devices, waves, simulators)
            log(f"  {run.seconds:.1f} s, {run.devices_per_s:,.0f} devices/s")
            results["rollouts"].append(run.__dict__)


def _load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--shapes", default="single,batch50")
    parser.add_argument("--messages", type=int, default=60_000, help="one-record messages")
    parser.add_argument("--batches", type=int, default=4_000, help="50-record messages")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burst", type=int, default=150_000, help="0: no burst")
    parser.add_argument(
        "--rollout-devices", default="2000", help="comma-separated device counts; 0: no rollout"
    )
    parser.add_argument(
        "--waves", action="append", help="a rollout's waves, e.g. 25,50,75,100 (repeat for more)"
    )
    parser.add_argument(
        "--ingest-workers",
        default="",
        help="comma-separated worker counts measured against the bridge alone, e.g. 2,4",
    )
    parser.add_argument(
        "--simulator-processes",
        default="2",
        help="comma-separated counts of processes the simulated devices are split over",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    args.ingest_workers = [int(n) for n in args.ingest_workers.split(",") if n and int(n)]
    args.rollout_devices = [int(n) for n in args.rollout_devices.split(",") if int(n)]
    args.simulator_processes = [int(n) for n in args.simulator_processes.split(",")]
    if not args.simulator_processes or min(args.simulator_processes) < 1:
        parser.error("--simulator-processes: counts of at least 1")
    args.waves = [waves.split(",") for waves in args.waves or ["100"]]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind as on Ctrl-C
    results: dict[str, Any] = {"load_average": [_load_average()]}
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-bench-") as tmp:
        run(Path(tmp), args, results)
    results["load_average"].append(_load_average())
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
