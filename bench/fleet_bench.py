"""Fleet benchmark: 10,000 simulated devices against one fleet server on this machine.

    python bench/fleet_bench.py [--devices 10000] [--rounds 5] [--waves 1,10,50,100]
                                [--databases sqlite,postgresql] [--json FILE]

For each database (SQLite file; PostgreSQL when its server binaries are installed: a
throwaway cluster, the test suite's, with durability off), a fresh fleet server process,
``edgefleet fleet serve`` on the embedded defaults (migrations, TUF repository, its own
mosquitto with per-device credentials and ACLs, MQTT bridge, rollout engine, HTTP on a
loopback port), and ``fleet.simulator.FleetSimulator`` devices in this process (one
selector thread), speaking the real protocol through the real broker:

- enroll: ``--devices`` devices enrolled in one database transaction (the service the
  ``/enroll`` route calls) before the server starts; the server's first start then writes
  every credential and ACL block into its broker's configuration;
- connect: every device's TCP + CONNECT + SUBSCRIBE until SUBACK (``FleetSimulator.start``);
- presence: until the fleet's database shows every device online (retained status);
- rollout: ``POST /rollouts`` with ``--waves`` and soak 0 until the rollout is completed,
  every device acked and healthy (the bundles are small synthetic ones: simulated devices
  do not run models);
- ingest: each device publishes ``--rounds`` telemetry batches (one zstd record each);
  time from the first publish until the fleet has stored every record;
- raw: the fleet server process is killed with SIGKILL, which leaves its mosquitto running
  with every device still connected, and a plain paho subscriber (the fleet's broker
  account, QoS 1, counting messages and doing nothing else) takes its place for the same
  publishes: the broker's delivery rate on this machine, the peer for ingest.

Simulator, broker and fleet share this machine's cores, as they would not in production;
the ratio ingest/raw says how close the fleet comes to what the broker delivers here.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlmodel import col, func, select

from contracts.mqtt import TOPIC_PREFIX
from fleet import devices as device_service
from fleet.db import make_engine, session_scope
from fleet.migrate import upgrade
from fleet.models import Device, EnrollmentTokenCreate, TelemetryRecordRow
from fleet.server import ADMIN_TOKEN_FILE, FLEET_MQTT_USER
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from ota.archive import write_bundle
from ota.manifest import BundleFile, GoldenVectors, Manifest, ModelInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.utils.postgres import postgres_available, postgres_server


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


def synthetic_bundle(work: Path, version: str) -> Path:
    """A small valid bundle; the simulated devices never run it."""
    import hashlib

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
def fleet_process(
    data_dir: Path, database_url: str | None, port: int, mqtt_port: int
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """``edgefleet fleet serve`` on ``data_dir``; its mosquitto is stopped on the way out."""
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
    if database_url:
        command += ["--database-url", database_url]
    with (data_dir / "serve.log").open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_until(lambda: _answers(client) or process.poll() is not None, 120, "fleet start")
        if process.poll() is not None:
            raise RuntimeError(f"the fleet server exited; see {data_dir / 'serve.log'}")
        token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        client.headers["Authorization"] = f"Bearer {token}"
        yield process, client
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            process.wait(60)
        _stop_broker(data_dir)


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/v2/health/live").status_code == 200
    except httpx.HTTPError:
        return False


def _stop_broker(data_dir: Path) -> None:
    """Stop the mosquitto a killed fleet server left behind (its pid file says which)."""
    try:
        pid = int((data_dir / "broker" / "mosquitto.pid").read_text())
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
                session, token=token, device_id=f"sim-{i:05d}", csr_pem=None, ca=None
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


def count_rows(db: Engine, query: Any) -> int:
    with session_scope(db) as session:
        return int(session.exec(query).one())


class RawSubscriber:
    """The broker's delivery rate: a paho client that only counts telemetry messages.

    It connects before the simulator opens its 10,000 sockets: paho's network loop uses
    ``select``, which cannot watch a descriptor numbered 1024 or above.
    """

    def __init__(self, host: str, port: int, password: str) -> None:
        self.received = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(FLEET_MQTT_USER, password)
        self._client.on_connect = lambda *_: self._connected.set()
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._count
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._connected.wait(15):
            raise RuntimeError("the raw subscriber could not connect")

    def subscribe(self) -> None:
        self._client.subscribe(f"{TOPIC_PREFIX}/+/telemetry", qos=1)
        if not self._subscribed.wait(15):
            raise RuntimeError("the raw subscriber could not subscribe")

    def _count(self, *_: Any) -> None:
        with self._lock:
            self.received += 1

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def publish_rounds(devices: FleetSimulator, rounds: int) -> int:
    return sum(devices.publish_telemetry() for _ in range(rounds))


def bench_database(
    label: str, database_url: str | None, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    result: dict[str, Any] = {"database": label, "devices": args.devices}
    data_dir = work / f"fleet-{label}"
    data_dir.mkdir(mode=0o700)
    db = make_engine(database_url or f"sqlite:///{data_dir / 'fleet.db'}")
    upgrade(db)
    log(f"[{label}] enrolling {args.devices} devices")
    start = time.perf_counter()
    specs = enroll_in_bulk(db, args.devices, "bench-host-1.0.0")
    result["enroll_s"] = time.perf_counter() - start

    with ExitStack() as stack:
        mqtt_port = free_port()
        start = time.perf_counter()
        process, client = stack.enter_context(
            fleet_process(data_dir, database_url, free_port(), mqtt_port)
        )
        result["fleet_start_s"] = time.perf_counter() - start
        for bundle in [synthetic_bundle(work / label, v) for v in ("1.0.0", "1.1.0")]:
            version = bundle.stem.split("-")[-1]
            api(client, "POST", "/models", json={"name": "bench", "version": version})
            attached = api(
                client,
                "POST",
                f"/models/bench/versions/{version}/bundles",
                content=bundle.read_bytes(),
            )
        password = (data_dir / "mqtt-fleet.password").read_text().strip()
        raw = RawSubscriber("127.0.0.1", mqtt_port, password)
        stack.callback(raw.close)
        devices = FleetSimulator("127.0.0.1", mqtt_port, specs, Behaviour())
        stack.enter_context(devices)
        log(f"[{label}] connecting {args.devices} simulated devices")
        result["connect_s"] = devices.start(connect_timeout_s=300)
        online = select(func.count()).select_from(Device).where(col(Device.online).is_(True))
        result["presence_s"] = wait_until(
            lambda: count_rows(db, online) == args.devices, 300, "every device online"
        )

        log(f"[{label}] rolling out in waves {args.waves}")
        start = time.perf_counter()
        rollout = api(
            client,
            "POST",
            "/rollouts",
            json={"bundle_id": attached["id"], "waves": args.waves, "gate": {"soak_s": 0}},
        )
        wait_until(
            lambda: (
                api(client, "GET", f"/rollouts/{rollout['id']}")["state"]
                in ("completed", "paused", "rolled_back")
            ),
            900,
            "the rollout to finish",
        )
        result["rollout_s"] = time.perf_counter() - start
        steps = [
            (dt.datetime.fromisoformat(e["at"]), e["action"], e["after"]["wave"])
            for e in reversed(api(client, "GET", "/audit?limit=100"))
            if e["target"] == f"rollout:{rollout['id']}"
        ]
        result["rollout_steps"] = [
            (action, wave, round((at - steps[0][0]).total_seconds(), 2))
            for at, action, wave in steps
        ]
        log(f"[{label}] rollout steps (action, wave, s): {result['rollout_steps']}")
        final = api(client, "GET", f"/rollouts/{rollout['id']}")
        if final["state"] != "completed":
            raise RuntimeError(f"rollout ended {final['state']}: {final['reason']}")
        on_new = sum(devices.current_bundle(s.device_id) == "bench-host-1.1.0" for s in specs)
        if on_new != args.devices:
            raise RuntimeError(f"only {on_new} of {args.devices} devices run the new bundle")

        log(f"[{label}] telemetry: {args.rounds} batches per device into the fleet")
        stored = select(func.count()).select_from(TelemetryRecordRow)
        before = count_rows(db, stored)
        start = time.perf_counter()
        sent = publish_rounds(devices, args.rounds)
        result["publish_s"] = time.perf_counter() - start
        wait_until(
            lambda: count_rows(db, stored) - before >= sent, 900, "the fleet to store telemetry"
        )
        result["ingest_s"] = time.perf_counter() - start
        result["records"] = sent

        log(f"[{label}] telemetry: the same into a plain subscriber")
        process.kill()  # its mosquitto stays up, every device still connected
        process.wait(30)
        raw.subscribe()
        start = time.perf_counter()
        sent = publish_rounds(devices, args.rounds)
        wait_until(lambda: raw.received >= sent, 900, "the raw subscriber")
        result["raw_s"] = time.perf_counter() - start
        result["raw_records"] = sent
    db.dispose()
    return result


def markdown(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"**{args.devices:,} simulated devices, one fleet server, one mosquitto, "
        f"{len(args.waves)}-wave rollout ({', '.join(args.waves)} %), soak 0**",
        "",
        "| database | enroll (1 tx) | fleet start | connect | presence | rollout to all "
        "| ingest rec/s | raw broker rec/s | ingest / raw |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ingest = r["records"] / r["ingest_s"]
        raw = r["raw_records"] / r["raw_s"]
        lines.append(
            f"| {r['database']} | {r['enroll_s']:.1f} s | {r['fleet_start_s']:.1f} s "
            f"| {r['connect_s']:.1f} s | {r['presence_s']:.1f} s | {r['rollout_s']:.1f} s "
            f"| {ingest:,.0f} | {raw:,.0f} | {ingest / raw:.2f} |"
        )
    lines += [
        "",
        f"Telemetry: {args.rounds} batches of one record per device "
        f"({args.rounds * args.devices:,} records), timed from the first publish to the last "
        "record stored (ingest) or received (raw).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5, help="telemetry batches per device")
    parser.add_argument("--waves", default="1,10,50,100")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    args.waves = args.waves.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-bench-") as tmp:
        work = Path(tmp)
        for label in args.databases.split(","):
            (work / label).mkdir()
            if label == "sqlite":
                results.append(bench_database(label, None, work, args))
            elif label == "postgresql":
                if not postgres_available():
                    log("PostgreSQL server binaries not found: skipping that row")
                    continue
                with postgres_server(work / label) as url:
                    results.append(bench_database(label, url, work, args))
            else:
                parser.error(f"unknown database {label!r}")
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
