"""Chaos benchmark: processes killed with SIGKILL under a working fleet, again and again.

    python bench/chaos_bench.py [--iterations 100] [--kinds broker,fleet,replica,agent]
                                [--devices 12] [--seed 0] [--keep] [--json FILE]
                                [--no-receipts]

``--iterations`` is the total, split evenly across ``--kinds`` (the default 100 is 25 of
each; ``--iterations 8`` is a quick run of 2 each). Every kind has its own fleet, made
once and used for all its iterations, with ``--devices`` simulated devices
(``fleet.simulator.FleetSimulator``, reconnect backoff capped at 2 s, each reporting one
telemetry record every 0.5 s for the whole run) speaking the real protocol through a real
mosquitto. Each iteration publishes a new bundle version (a tiny real ONNX model: the
real agent installs and runs it), starts a rollout of it to every device, kills one
process with SIGKILL while that rollout is in flight, and waits until the rollout has
finished. The kinds, and what "recovered" means for each (the clock starts at the kill):

- ``broker``: the mosquitto that ``edgefleet fleet serve`` supervises is killed (0 to 1 s
  after the first device got the rollout's command, and at least 60 s after it last came
  back: kills closer together are a crash loop to the supervisor, which then waits up to
  30 s before each restart, by design). Recovered: ``/v2/health/ready`` answers 200 from a
  new mosquitto and the fleet shows every device online.
- ``broker-lag``: the broker while the fleet lags behind: ``edgefleet fleet serve`` is
  paused with SIGSTOP (0 to 1 s after the first device got the rollout's command), the
  devices keep publishing for ``LAG_S`` while mosquitto PUBACKs their telemetry and
  queues it for the fleet's session, then mosquitto is killed with SIGKILL (that backlog
  with it) and the fleet resumed with SIGCONT. Recovered: as ``broker``. Not in the
  default ``--kinds``: run it by name.
- ``fleet``: ``edgefleet fleet serve`` is killed (its mosquitto keeps running) and started
  again at once on the same data directory. Recovered: the new process answers ready and
  shows every device online.
- ``replica``: two ``fleet serve --replica-id`` replicas on one PostgreSQL (a throwaway
  cluster, durability off) and one ``edgefleet fleet broker``, ``--rollout-lease 3``; the
  replica holding the rollout lease is killed and started again at once with the same id.
  Recovered: the other replica holds the lease and the rollout has moved (its state, wave
  or per-wave device counts changed since the kill). Skipped without PostgreSQL's server.
- ``agent``: as ``fleet``'s setup plus one real ``edgefleet agent run`` process in the
  rollout (one wave of 100 %); it is killed 0 to 50 ms after it logs ``downloading``,
  ``verified`` or ``installed`` for the rollout's command (in turn: mid-download, before
  the install, during the health check) and started again at once. Recovered: the agent
  is online in the fleet again and its local API answers ready.

Columns: records sent (ids of the telemetry records the simulated devices published at
least once, counted by the simulator: each carries a unique id, ``fleet.simulator``'s
``record_id``), acknowledged (of those, the ones the devices let go of because the
fleet's storage receipt named them: the simulator keeps telemetry as the agent does, a
batch refused or answered "no matching subscribers" is sent again, and so is one no
receipt named within 30 s, see fleet/simulator/_protocol.py; with ``--no-receipts``
devices let go at the PUBACK, as they did before receipts, the peer this bench measures
receipts against), pending (not acknowledged when counted:
the devices stop reporting and re-send what they hold until nothing is pending, for at
most ``DRAIN_TIMEOUT_S``), stored (rows of the ``telemetry`` table with acknowledged
ids, read once the fleet drained), duplicates (rows beyond one per id; the table's key
is ``(device_id, record_id)``, so this checks the schema as much as ingest), lost
(acknowledged, never stored: what the fleet owed; each is logged with the times of the
records its device sent before and after it), rollouts completed, devices without a
working model (summed over iterations, counted when the rollout finished: a simulated
device serving no bundle; the agent's local API not answering an inference), devices on
another model (working, but not on the rollout's bundle: a rollout paused or rolled back,
or a device it left behind), time to recover (median and max), and timeouts (iterations
in which recovery or the rollout took over 180 s; the run goes on). The real agent's own
telemetry is not counted: its ids live in its queue.

Duration on a busy 2-core machine: about a minute per broker iteration (the 60 s spacing),
15 to 20 s per iteration of the other kinds, and a minute of setup per kind: the default
run takes about 45 minutes. Every process started here runs in its own session and
is killed (SIGTERM, then SIGKILL) on the way out, Ctrl-C included; the temp directory is
removed unless ``--keep``. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from sqlalchemy import text

from fleet.db import make_engine
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from fleet.simulator import loop as simulator_loop
from ota.archive import write_bundle
from ota.manifest import BundleFile, GoldenVectors, Manifest, ModelInfo

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
KINDS = ("broker", "fleet", "replica", "agent")
EXTRA_KINDS = ("broker-lag",)
"""Run only when named in ``--kinds``."""
LAG_S = 10.0
"""How long the fleet is paused before its mosquitto is killed (``broker-lag``)."""
MODEL = "chaos"
TAG = "chaos"
TELEMETRY_INTERVAL_S = 0.5
INSTALL_DELAY_S = 1.0
LEASE_S = 3.0
STEP_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 60.0
"""How long the devices may take, once they stop reporting, to get every record
acknowledged."""
BROKER_STABLE_S = 60.0
"""The broker supervisor's ``stable_s`` (fleet/broker/supervisor.py): a death sooner after
a restart counts as a crash loop and doubles the restart delay (up to 30 s)."""
UPDATE_STAGES = ("downloading", "verified", "installed")
"""The agent is killed 0 to 50 ms after it logs one of these for the rollout's command,
each in turn: mid-download, before the install, during the health check."""
_MQTT_LINE = re.compile(r"^MQTT listens on mqtts?://\S+:(\d+)", re.M)
T = TypeVar("T")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Timeout(Exception):
    """A wait ran past its limit: the iteration is counted as timed out."""


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


# --- processes --------------------------------------------------------------------------------


class Processes:
    """Every child this bench starts, each in its own session (its process group holds what
    it starts, mosquitto included): stopped, group and all, on the way out."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], out: Path, err: Path) -> subprocess.Popen[bytes]:
        with out.open("ab") as stdout, err.open("ab") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self._started:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self._started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(process.pid, signal.SIGKILL)  # and anything left in its group
            process.poll()


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Fleet:
    """One ``edgefleet fleet serve`` (a replica, when ``options`` name one)."""

    processes: Processes
    data_dir: Path
    options: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    name: str = "fleet"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> Path:
        return self.data_dir.parent / f"{self.name}.out"

    def start(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        command = [EDGEFLEET, "fleet", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--rollout-tick", "0.1", *self.options]  # fmt: skip
        self.stdout.write_text("")
        err = self.data_dir.parent / f"{self.name}.log"
        self.process = self.processes.start(command, self.stdout, err)
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"fleet serve exited; see {err}")
            return self.health("live") == 200

        wait_for(answers, 120, f"{self.name} to answer")

    def kill(self) -> None:
        """SIGKILL the server alone: what it started (its mosquitto) keeps running."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def health(self, which: str) -> int:
        try:
            return httpx.get(f"{self.url}/v2/health/{which}", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        token = (self.data_dir / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        response = httpx.request(
            method, f"{self.url}/api/v1{path}", headers=headers, timeout=60, **kwargs
        )
        if not response.is_success:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def online(self) -> set[str]:
        return {d["id"] for d in self.ok("GET", "/devices", params={"online": "true"})}

    def mqtt_port(self) -> int:
        found = _MQTT_LINE.search(self.stdout.read_text())
        if not found:
            raise RuntimeError(f"{self.name} printed no MQTT address; see {self.stdout}")
        return int(found.group(1))

    def publish(self, bundle: Path, version: str) -> int:
        self.ok("POST", "/models", json={"name": MODEL, "version": version})
        attached = self.ok(
            "POST",
            f"/models/{MODEL}/versions/{version}/bundles",
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        return int(attached["id"])

    def enroll(self, count: int, prefix: str) -> list[SimulatedDeviceSpec]:
        grant = self.ok(
            "POST", "/enrollment-tokens", json={"profile": "host", "tags": [TAG], "uses": count}
        )["token"]
        specs = []
        for i in range(count):
            body = self.ok(
                "POST", "/enroll", json={"token": grant, "device_id": f"{prefix}{i:03d}"}
            )
            mqtt = body["mqtt"]
            specs.append(SimulatedDeviceSpec(body["device_id"], mqtt["username"], mqtt["password"]))
        return specs


# --- bundles ----------------------------------------------------------------------------------


def tiny_bundle(work: Path, version: str) -> Path:
    """A real, valid bundle: a 4x3 MatMul in ONNX (weights differ per version) with its
    golden vector, which the agent loads with ONNX Runtime and checks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    major, minor, patch = (int(x) for x in version.split("."))
    number = major * 1_000_000 + minor * 1_000 + patch
    weights = (np.arange(12, dtype=np.float32).reshape(4, 3) + number % 97) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src = work / f"src-{version}"
    src.mkdir()
    artifact, golden = src / "model.onnx", src / "golden.npz"
    onnx.save(model, artifact)
    x = np.ones((1, 4), np.float32)
    vectors: dict[str, np.ndarray] = {"input:x": x, "output:0": x @ weights}
    np.savez(golden, **vectors)  # type: ignore[arg-type]
    sources = {p.name: p for p in (artifact, golden)}
    files = [
        BundleFile(path=n, sha256=hashlib.sha256(p.read_bytes()).hexdigest(), size=p.stat().st_size)
        for n, p in sorted(sources.items())
    ]
    manifest = Manifest(
        name=f"{MODEL}-host",
        version=version,
        version_number=number,
        model=ModelInfo(name=MODEL, version=version),
        profile="host",
        runtime="onnxruntime",
        precision="fp32",
        device="cpu",
        artifact=artifact.name,
        files=files,
        min_agent_version="0.1.0",
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        golden_vectors=GoldenVectors(path=golden.name, count=1, atol=1e-4, rtol=1e-4, top1=False),
    )
    return write_bundle(manifest, sources, work / f"{MODEL}-{version}.efb")


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin``, else where ``initdb`` on PATH lives."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()],
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway cluster on a loopback port, durability off (run as ``postgres`` when
    this runs as root: PostgreSQL refuses root); stopped and removed at exit."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb)")
    base = Path(tempfile.mkdtemp(prefix="edgefleet-chaos-pg-"))  # short: it holds a socket
    prefix: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*command: str | Path) -> None:
        done = subprocess.run(
            [*prefix, *map(str, command)], cwd=base, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} exited {done.returncode}: {done.stderr[-2000:]}")

    data, port = base / "data", free_port()
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{base}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
        run(bin_dir / "pg_ctl", "start", "-D", data, "-l", base / "log", "-w", "-o", f"-p {port}")
        try:
            run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "fleet")
            yield f"postgresql://postgres@127.0.0.1:{port}/fleet"
        finally:
            run(bin_dir / "pg_ctl", "stop", "-D", data, "-m", "immediate", "-w")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the measurement --------------------------------------------------------------------------


@dataclass
class Tally:
    kind: str
    iterations: int = 0
    sent: int = 0
    acknowledged: int = 0
    pending: int = 0
    refusals: int = 0
    """Batches a PUBACK refused or delivered to nobody (``0x10``), then sent again."""
    resent: int = 0
    """Records sent again because no storage receipt named them within 30 s."""
    stored: int = 0
    duplicates: int = 0
    lost: int = 0
    unexpected: int = 0
    rollouts_completed: int = 0
    without_model: int = 0
    behind: int = 0
    timeouts: int = 0
    recover_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Rig:
    """What one kind's iterations run on."""

    api: Callable[[], Fleet]
    """The server to ask (a replica that is up)."""
    database_url: str
    devices: FleetSimulator
    ids: list[str]
    kill_and_recover: Callable[[Fleet, str], float]
    """Kills, restarts what it killed, and returns seconds from the kill to recovery."""
    waves: list[str]
    before: Callable[[], None] = lambda: None
    """Runs before each measured rollout starts."""
    board: str | None = None
    agent_api: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, stack: ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.processes = Processes()
        stack.callback(self.processes.stop_all)
        self.random = random.Random(args.seed)
        self.version = 0
        self.bundles = work / "bundles"
        self.bundles.mkdir(parents=True)

    def next_bundle(self) -> tuple[Path, str]:
        self.version += 1
        version = f"1.0.{self.version}"
        return tiny_bundle(self.bundles, version), version

    # --- one kind's setups ---

    def simulate(self, port: int, specs: list[SimulatedDeviceSpec]) -> FleetSimulator:
        behaviour = Behaviour(
            install_delay_s=INSTALL_DELAY_S,
            telemetry_interval_s=TELEMETRY_INTERVAL_S,
            receipt_timeout_s=None if self.args.no_receipts else Behaviour.receipt_timeout_s,
        )
        devices = FleetSimulator("127.0.0.1", port, specs, behaviour, seed=self.args.seed)
        self.stack.callback(devices.stop)
        devices.start(connect_timeout_s=120)
        return devices

    def served_fleet(self, kind: str) -> Fleet:
        fleet = Fleet(self.processes, self.work / kind / "fleet", [], name=f"{kind}-serve")
        fleet.data_dir.parent.mkdir(parents=True)
        fleet.start()
        return fleet

    def broker_rig(self, *, lag: bool = False) -> Rig:
        fleet = self.served_fleet("broker-lag" if lag else "broker")
        specs = fleet.enroll(self.args.devices, "sim-")
        devices = self.simulate(fleet.mqtt_port(), specs)

        last_back = [time.monotonic()]

        def stable() -> None:
            """A single kill, not a crash loop: see BROKER_STABLE_S."""
            time.sleep(max(0.0, last_back[0] + BROKER_STABLE_S - time.monotonic()))

        def kill(target: Fleet, _: str) -> float:
            pid_file = target.data_dir / "mosquitto" / "mosquitto.pid"
            mosquitto = int(pid_file.read_text())
            assert target.process is not None
            if lag:  # the fleet stops reading; devices' telemetry piles up at the broker
                os.kill(target.process.pid, signal.SIGSTOP)
                time.sleep(LAG_S)
            os.kill(mosquitto, signal.SIGKILL)
            killed = time.monotonic()
            if lag:
                os.kill(target.process.pid, signal.SIGCONT)
            log(f"killed mosquitto at {dt.datetime.now(dt.UTC).isoformat()}")

            def back() -> bool:
                pid = int(pid_file.read_text())
                return (
                    pid != mosquitto
                    and running(pid)
                    and target.health("ready") == 200
                    and target.online() >= set(rig.ids)
                )

            wait_for(back, STEP_TIMEOUT_S, "a new mosquitto and every device online")
            last_back[0] = time.monotonic()
            return last_back[0] - killed

        rig = Rig(lambda: fleet, f"sqlite:///{fleet.data_dir / 'fleet.db'}", devices,
                  [s.device_id for s in specs], kill, ["50", "100"], before=stable)  # fmt: skip
        return rig

    def fleet_rig(self, kind: str = "fleet") -> Rig:
        fleet = self.served_fleet(kind)
        specs = fleet.enroll(self.args.devices, "sim-")
        devices = self.simulate(fleet.mqtt_port(), specs)

        def kill(target: Fleet, _: str) -> float:
            target.kill()
            killed = time.monotonic()
            target.start()
            wait_for(
                lambda: target.health("ready") == 200 and target.online() >= set(rig.ids),
                STEP_TIMEOUT_S,
                "the restarted fleet ready with every device online",
            )
            return time.monotonic() - killed

        rig = Rig(lambda: fleet, f"sqlite:///{fleet.data_dir / 'fleet.db'}", devices,
                  [s.device_id for s in specs], kill, ["50", "100"])  # fmt: skip
        return rig

    def agent_rig(self) -> Rig:
        rig = self.fleet_rig("agent")
        fleet = rig.api()
        board = self.work / "agent" / "board"
        grant = fleet.ok("POST", "/enrollment-tokens", json={"profile": "host", "tags": [TAG]})
        done = subprocess.run(
            [EDGEFLEET, "agent", "enroll", "--fleet", fleet.url, "--token", grant["token"],
             "--out", str(board), "--device-id", "board-1"],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"agent enroll failed: {done.stderr[-2000:]}")
        config = board / "agent.toml"
        api_port = free_port()
        text_ = config.read_text().replace("port = 8800", f"port = {api_port}")
        text_ = text_.replace("[mqtt]\n", "[mqtt]\nreconnect_min_s = 1\nreconnect_max_s = 2\n")
        if "[health]" not in text_:
            text_ += "\n[health]\nwatch_inferences = 0\n"
        config.write_text(text_)
        command = [EDGEFLEET, "agent", "run", "--config", str(config)]
        agent_out, agent_log = board.parent / "agent.out", board.parent / "agent.log"
        agent = [self.processes.start(command, agent_out, agent_log)]
        local = f"http://127.0.0.1:{api_port}"

        def agent_ready() -> bool:
            return httpx.get(f"{local}/v2/health/ready", timeout=5).status_code == 200

        kills = [0]

        def kill(target: Fleet, rollout: str) -> float:
            stage = UPDATE_STAGES[kills[0] % len(UPDATE_STAGES)]
            kills[0] += 1
            said = f"command {rollout}:deploy:board-1: {stage}"
            wait_for(lambda: said in agent_log.read_text(), STEP_TIMEOUT_S, f"the agent {stage}")
            time.sleep(self.random.uniform(0.0, 0.05))
            agent[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            agent[0].wait(30)
            agent[0] = self.processes.start(command, agent_out, agent_log)
            wait_for(
                lambda: "board-1" in target.online() and agent_ready(),
                STEP_TIMEOUT_S,
                "the restarted agent online and ready",
            )
            return time.monotonic() - killed

        rig.kill_and_recover = kill
        rig.waves = ["100"]
        rig.board = "board-1"
        rig.agent_api = local
        wait_for(lambda: "board-1" in fleet.online(), 120, "the agent online")
        return rig

    def replica_rig(self, database_url: str) -> Rig:
        base = self.work / "replica"
        base.mkdir(parents=True)
        out, err = base / "broker.out", base / "broker.log"
        out.write_text("")
        self.processes.start(
            [EDGEFLEET, "fleet", "broker", "--data-dir", str(base / "broker"),
             "--database-url", database_url],
            out, err,
        )  # fmt: skip
        found = wait_for(lambda: _MQTT_LINE.search(out.read_text()), 120, "the standalone broker")
        broker_port = int(found.group(1))
        secret = base / "broker-secret"
        secret.write_text(secrets.token_urlsafe(24))
        secret.chmod(0o600)
        replicas: dict[str, Fleet] = {}
        for name in ("a", "b"):  # the first alone: it makes the shared OTA repository
            replicas[name] = Fleet(
                self.processes, base / "fleet",
                ["--replica-id", name, "--database-url", database_url,
                 "--mqtt-url", f"mqtt://127.0.0.1:{broker_port}",
                 "--mqtt-credential-file", str(base / "broker" / "broker-credential.json"),
                 "--rollout-lease", str(LEASE_S), "--broker-auth-secret-file", str(secret)],
                name=f"replica-{name}",
            )  # fmt: skip
            replicas[name].start()

        def leader(via: Fleet) -> str | None:
            lease = via.ok("GET", "/replicas")["lease"]
            return str(lease["holder"]) if lease["held"] else None

        wait_for(lambda: leader(replicas["b"]) is not None, 60, "a rollout leader")
        specs = replicas["a"].enroll(self.args.devices, "sim-")
        devices = self.simulate(broker_port, specs)

        def kill(_: Fleet, rollout: str) -> float:
            holder = wait_for(lambda: leader(replicas["a"]), 60, "a lease holder")
            dead, alive = replicas[holder], replicas["b" if holder == "a" else "a"]
            before = _progress(alive.ok("GET", f"/rollouts/{rollout}"))
            dead.kill()
            killed = time.monotonic()

            def moved() -> bool:
                if leader(alive) != alive.name.removeprefix("replica-"):
                    return False
                return _progress(alive.ok("GET", f"/rollouts/{rollout}")) != before

            wait_for(moved, STEP_TIMEOUT_S, "the other replica to lead and move the rollout")
            recovered = time.monotonic() - killed
            dead.start()  # the same replica id: it resumes its MQTT session
            return recovered

        def up() -> Fleet:
            return next(r for r in replicas.values() if r.health("live") == 200)

        return Rig(up, database_url, devices, [s.device_id for s in specs], kill, ["50", "100"])

    # --- the loop ---

    def run_kind(self, kind: str, iterations: int, rig: Rig, tally: Tally) -> None:
        everyone = set(rig.ids) | ({rig.board} if rig.board else set())
        self.rollout(rig, everyone, None)  # a first model everywhere, unmeasured
        for i in range(iterations):
            try:
                recovered = self.rollout(rig, everyone, tally)
            except Timeout as e:
                tally.timeouts += 1
                tally.notes.append(f"iteration {i + 1}: {e}")
                log(f"{kind} {i + 1}/{iterations}: {e}")
                continue
            tally.iterations += 1
            log(f"{kind} {i + 1}/{iterations}: recovered in {recovered:.2f} s")

    def rollout(self, rig: Rig, everyone: set[str], tally: Tally | None) -> float:
        """One rollout; with ``tally``, one kill while it is in flight. Recovery seconds."""
        fleet = rig.api()
        wait_for(lambda: fleet.online() >= everyone, STEP_TIMEOUT_S, "every device online")
        bundle, version = self.next_bundle()
        bundle_id = fleet.publish(bundle, version)
        if tally is not None:
            rig.before()
        received = sum(len(rig.devices.received_commands(d)) for d in rig.ids)
        rollout = fleet.ok(
            "POST",
            "/rollouts",
            json={
                "bundle_id": bundle_id,
                "waves": rig.waves,
                "tags": [TAG],
                "gate": {"soak_s": 1, "deploy_timeout_s": 120},
            },
        )["id"]
        recovered = 0.0
        if tally is not None:
            wait_for(
                lambda: sum(len(rig.devices.received_commands(d)) for d in rig.ids) > received,
                STEP_TIMEOUT_S,
                "the rollout's first command at a device",
            )
            if rig.board is None:
                time.sleep(self.random.uniform(0.0, 1.0))
            recovered = rig.kill_and_recover(fleet, rollout)
            tally.recover_s.append(recovered)
            fleet = rig.api()
        finished = ("completed", "paused", "rolled_back", "aborted")
        done = wait_for(
            lambda: (r := rig.api().ok("GET", f"/rollouts/{rollout}"))["state"] in finished and r,
            STEP_TIMEOUT_S,
            f"rollout {rollout} to finish",
        )
        target = f"{MODEL}-host-{version}"
        serving = {d: rig.devices.current_bundle(d) for d in rig.ids}
        if rig.agent_api is not None:
            serving[str(rig.board)] = _agent_serves(rig.agent_api)
        broken = sorted(d for d, bundle in serving.items() if bundle is None)
        behind = sorted(d for d, bundle in serving.items() if bundle not in (None, target))
        if tally is None:
            if done["state"] != "completed" or broken or behind:
                raise RuntimeError(f"the first rollout did not complete: {done}, {serving}")
            return 0.0
        tally.rollouts_completed += done["state"] == "completed"
        tally.without_model += len(broken)
        tally.behind += len(behind)
        if done["state"] != "completed" or broken or behind:
            tally.notes.append(
                f"rollout {version}: {done['state']} ({done['reason']}); without a working "
                f"model: {broken}; serving another: {[(d, serving[d]) for d in behind]}"
            )
        return recovered

    def count_records(self, rig: Rig, tally: Tally) -> None:
        """Stop the reports, let the devices re-send what is pending and the fleet drain,
        and compare ids acknowledged with rows stored."""
        rig.devices.behaviour.telemetry_interval_s = None

        def drained() -> bool:
            rig.devices.send_pending_telemetry()
            return not any(rig.devices.telemetry_ledger(d).pending for d in rig.ids)

        with suppress(Timeout):
            wait_for(drained, DRAIN_TIMEOUT_S, "every record acknowledged")
        ledgers = {d: rig.devices.telemetry_ledger(d) for d in rig.ids}
        sent = {(d, r) for d in rig.ids for r in rig.devices.telemetry_sent(d)}
        acknowledged = {(d, r) for d, ledger in ledgers.items() for r in ledger.acknowledged}
        engine = make_engine(rig.database_url)
        query = text("SELECT device_id, record_id FROM telemetry WHERE device_id LIKE 'sim-%'")

        def rows() -> list[tuple[str, str]]:
            with engine.connect() as connection:
                return [(str(d), str(r)) for d, r in connection.execute(query)]

        with suppress(Timeout):
            wait_for(lambda: acknowledged <= set(rows()), 60, "every acknowledged record stored")
        stored = rows()
        engine.dispose()
        unique = set(stored)
        tally.sent = len(sent)
        tally.acknowledged = len(acknowledged)
        tally.pending = sum(len(ledger.pending) for ledger in ledgers.values())
        tally.refusals = sum(ledger.refusals for ledger in ledgers.values())
        tally.resent = sum(ledger.resent for ledger in ledgers.values())
        log(f"{tally.kind}: {tally.resent} records sent again for want of a receipt")
        tally.stored = len(unique & acknowledged)
        tally.duplicates = len(stored) - len(unique)
        tally.lost = len(acknowledged - unique)
        tally.unexpected = len(unique - sent)
        for device, record in sorted(acknowledged - unique)[:50]:
            tally.notes.append(f"lost {device} {record}, {self.neighbours(rig, device, record)}")

    def neighbours(self, rig: Rig, device: str, record: str) -> str:
        """When the device's records just before and after ``record`` were made, if stored."""
        ids = rig.devices.telemetry_sent(device)
        n = ids.index(record)
        engine = make_engine(rig.database_url)
        query = text("SELECT ts FROM telemetry WHERE device_id = :d AND record_id = :r")
        times = []
        with engine.connect() as connection:
            for i in (n - 1, n + 1):
                ts = connection.execute(query, {"d": device, "r": ids[i]}).scalar() if (
                    0 <= i < len(ids)) else None  # fmt: skip
                times.append(str(ts))
        engine.dispose()
        return f"made between {times[0]} and {times[1]}"


def _progress(rollout: dict[str, Any]) -> tuple[str, int, str]:
    return rollout["state"], rollout["wave"], json.dumps(rollout["devices"], sort_keys=True)


def _agent_serves(local: str) -> str | None:
    """The bundle the agent's local API serves, if it answers an inference."""
    try:
        meta = httpx.get(f"{local}/v2/models/{MODEL}", timeout=10)
        if meta.status_code != 200:
            return None
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
        if not httpx.post(f"{local}/v2/models/{MODEL}/infer", json=body, timeout=10).is_success:
            return None
        return f"{MODEL}-host-{meta.json()['versions'][0]}"
    except httpx.HTTPError:
        return None


def table(tallies: list[Tally]) -> str:
    lines = [
        "| kill | iterations | records sent | acknowledged | pending | stored | duplicates "
        "| lost | rollouts completed | devices without a working model "
        "| devices on another model | recover median (s) | recover max (s) | timeouts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tallies:
        median = f"{statistics.median(t.recover_s):.1f}" if t.recover_s else "-"
        worst = f"{max(t.recover_s):.1f}" if t.recover_s else "-"
        lines.append(
            f"| {t.kind} | {t.iterations} | {t.sent} | {t.acknowledged} | {t.pending} "
            f"| {t.stored} | {t.duplicates} | {t.lost} "
            f"| {t.rollouts_completed}/{t.iterations + t.timeouts} | {t.without_model} "
            f"| {t.behind} | {median} | {worst} | {t.timeouts} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=100, help="in all, split over kinds")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--devices", type=int, default=12, help="simulated devices per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-receipts",
        action="store_true",
        help="simulated devices let go of telemetry at the PUBACK, not the storage receipt",
    )
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS) - set(EXTRA_KINDS):
        parser.error(
            f"unknown kinds {sorted(unknown)}; choose from {','.join(KINDS + EXTRA_KINDS)}"
        )
    if args.iterations < len(kinds) or args.devices < 1:
        parser.error("--iterations must be at least one per kind, --devices at least 1")
    # SIGTERM unwinds like Ctrl-C, through every cleanup below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    simulator_loop._RECONNECT_MAX_S = 2.0  # devices come back within 2 s of the broker
    per_kind = [args.iterations // len(kinds) + (i < args.iterations % len(kinds))
                for i in range(len(kinds))]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="edgefleet-chaos-"))
    tallies: list[Tally] = []
    started = time.monotonic()
    try:
        for kind, iterations in zip(kinds, per_kind, strict=True):
            tally = Tally(kind)
            if kind == "replica" and postgres_bin() is None:
                log("replica: skipped, no PostgreSQL server binaries (apt install postgresql)")
                continue
            with ExitStack() as stack:
                database = stack.enter_context(postgres_server()) if kind == "replica" else ""
                bench = Bench(args, work / f"run-{kind}", stack)
                if kind == "replica":
                    rig = bench.replica_rig(database)
                else:
                    rig = {"broker": bench.broker_rig, "fleet": bench.fleet_rig,
                           "agent": bench.agent_rig,
                           "broker-lag": partial(bench.broker_rig, lag=True)}[kind]()  # fmt: skip
                log(f"{kind}: {len(rig.ids)} simulated devices up; {iterations} iterations")
                bench.run_kind(kind, iterations, rig, tally)
                bench.count_records(rig, tally)
            tallies.append(tally)
            for note in tally.notes:
                log(f"{kind}: {note}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    peer = ", devices let go at the PUBACK (--no-receipts)" if args.no_receipts else ""
    print(f"chaos bench: {args.iterations} iterations, {args.devices} simulated devices per "
          f"kind, seed {args.seed}, {minutes:.0f} min{peer}\n")  # fmt: skip
    print(table(tallies))
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in tallies], indent=1))


if __name__ == "__main__":
    main()
