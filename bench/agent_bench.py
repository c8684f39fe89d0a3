"""Agent benchmark: what the agent costs per request, in memory, and in telemetry throughput.

    python bench/agent_bench.py [--runs 200] [--small-runs 1000] [--stub-runs 20000]
                                [--stub-cold-runs 300] [--load-requests 200]
                                [--load-concurrency 4] [--settle-s 5] [--records 20000]
                                [--telemetry-runs 3] [--skip-latency] [--skip-memory]
                                [--skip-telemetry] [--workdir DIR] [--json FILE]

Prints four markdown tables (progress goes to stderr). Nothing is downloaded.

Models. Two models are built locally, each in a child process (so TensorFlow is never
loaded into the measuring process), compiled with ``compiler.pipeline.compile_model`` for
the ``host`` profile cut down to ONNX Runtime (fp32, ``quantize="none"``, no tuning),
bundled with ``ota.bundle.bundle_compile_output``, unpacked with
``agent.model.unpack_bundle`` and loaded with ``agent.model.load_installed`` (ONNX Runtime
with its default thread count):

- ``mobilenetv2``: ``keras.applications.MobileNetV2(weights=None)``, 224x224x3 input, 1000
  classes, 3.5M parameters, *random* weights (nothing may be downloaded; the weights'
  values do not change the amount of work, so the timings are those of the real model);
- ``digits``: the small CNN ``examples/digits/train.py --out DIR`` trains on scikit-learn's
  bundled digits (8x8x1 input), where the fixed cost per request weighs far more.

1. Latency, batch 1, uniform noise as input, warm-up first (``--warmup`` calls per path),
   then ``--runs`` rounds (``--small-runs`` for digits) that call each path once, in an
   order rotated every round so drift hits every path alike; median and p95 per path:

   - direct: ``LoadedModel.runtime.predict_batch(inputs)`` (the peer);
   - Python API: ``InferenceService.infer(inputs)`` on a service with no fallback and no
     observer;
   - local HTTP API: ``POST /v2/models/{name}/infer`` with one keep-alive ``httpx.Client``
     against ``agent.api.local_api_server`` running on a thread of this process. The time
     includes the client's JSON work: encoding the request (``oip.encode_inputs`` +
     ``json.dumps``) and decoding the response (``oip.decode_output``), shown apart in the
     client-JSON row and subtracted in the "client JSON excluded" row (the server's JSON
     parsing and encoding stay in).

   Overhead = the median of the per-round differences (path - direct), with a 95 %
   bootstrap interval, in µs and as % of the direct median. Outputs of the three paths
   are checked equal once before timing.

2. Fixed cost of the Python API with the model's compute taken out: the same loaded
   model's runtime wrapped in a stub whose ``predict_batch`` returns outputs recorded
   before (its ``inputs``/``outputs`` still come from the real ONNX Runtime session), then
   interleaved rounds of the stub called directly (peer), ``InferenceService.infer`` bare,
   and with the ``InferenceStats`` observer the daemon attaches: ``--stub-runs`` rounds
   back to back (everything hot in the CPU caches), and ``--stub-cold-runs`` rounds where
   an untimed real inference of the model runs before each timed call, which leaves the
   caches as a real request finds them (a MobileNetV2 inference streams ~14 MB of weights
   and evicts the interpreter's working set; the Python code then runs several times
   slower than back to back). On a busy 2-core machine table 1's direct-vs-API difference
   for the large model is a few hundred µs inside milliseconds of noise; this table
   measures it directly, and its % column divides the after-an-inference overhead by
   table 1's direct median.

3. Memory: ``edgefleet agent run --config agent.toml`` as a real child process, MQTT
   pointed at a real mosquitto (``fleet.broker.MosquittoBroker``, password account and ACL
   per device), the local API on a free loopback port. The MobileNetV2 bundle is
   installed into the data directory the way the updater does (``agent.slots.Slots``:
   ``stage`` + ``switch``); the agent loads it from there at start. ``/proc/PID/status``
   is read: idle = the model loaded, the device online (its retained ``status`` seen by a
   subscriber on the broker), no request yet, after ``--settle-s`` seconds; under load =
   the highest VmRSS sampled every 0.1 s while ``--load-requests`` requests
   (pre-encoded JSON, ``--load-concurrency`` keep-alive clients) go through its local API;
   after load = 3 s after the last answer. VmHWM is the kernel's high-water mark, which
   it only updates now and then (on unmaps), so it may read a little below a sampled
   VmRSS. The same agent with no model installed gives the baseline.

4. Telemetry throughput: ``--records`` records, each what ``InferenceStats.report`` makes
   of 20 inferences, are put into a fresh ``TelemetryQueue`` (one transaction, not timed),
   then a ``TelemetrySender`` (default ``TelemetryConfig``: 500 records a batch, zstd)
   publishes them with a paho client logged in as a device of the broker; timed from its
   first ``publish`` until the queue is empty (polled every 10 ms), i.e. the last batch
   PUBACKed and removed. Peer, same run: a plain paho client, same device account, sending
   the very payloads the sender published, QoS 1, one in flight (publish, wait for the
   PUBACK: the sender's pattern) and pipelined (publish all, then wait: paho's and the
   broker's in-flight window). A subscriber on the fleet account counts every telemetry
   message to check that all of them arrived. Median of ``--telemetry-runs``.

Everything shares this machine's cores (the client, the server thread, the agent, the
broker); nothing here is a test. With the defaults it took about 3.5 minutes on a 2-core
machine (a third of it building the two models).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.api import local_api_server
from agent.config import ApiConfig, TelemetryConfig
from agent.inference import InferenceService
from agent.model import LoadedModel, load_installed, unpack_bundle
from agent.runtimes import Runtime
from agent.slots import Slots
from agent.telemetry import InferenceOutcome, InferenceStats, TelemetrySender
from agent.telemetry_queue import TelemetryQueue
from contracts import oip
from contracts.artifacts import RuntimeName
from contracts.mqtt import TOPIC_PREFIX, TelemetryRecord, device_topic
from contracts.tensors import TensorSpec
from fleet.broker import DeviceCredential, MosquittoBroker, MqttEndpoint, hash_password

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mobilenetv2", "digits")
FLEET_USER = "bench-fleet"
MIB = 1024 * 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    text_columns: int = 1,
    last_is_text: bool = False,
) -> str:
    """A GitHub markdown table: the first ``text_columns`` (and the last, if
    ``last_is_text``) left-aligned, numbers right."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    if last_is_text:
        align[-1] = ":---"
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], bool], timeout_s: float, what: str, poll: float = 0.02) -> None:
    deadline = time.perf_counter() + timeout_s
    while not probe():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- models (built in child processes) ----------------------------------------------------


def compile_and_bundle(model: Path, calibration: Path | None, out_dir: Path, name: str) -> Path:
    """Compile ``model`` for the host profile (ONNX Runtime only, fp32) and bundle it."""
    from compiler.pipeline import CompileOptions, compile_model
    from hw_profiles import load_profile
    from ota.bundle import bundle_compile_output

    host = load_profile("host")
    onnxruntime = host.runtime("onnxruntime")
    assert onnxruntime is not None
    compiled = out_dir / f"{name}-compiled"
    compile_model(
        CompileOptions(
            model=model,
            profile=host.model_copy(update={"runtimes": [onnxruntime]}),
            out_dir=compiled,
            calibration=calibration,
            quantize="none",
            tune_trials=0,
            latency_runs=5,
        )
    )
    bundle = out_dir / f"{name}.efb"
    bundle_compile_output(
        compiled, version="1.0.0", out=bundle, artifact_id="onnxruntime:fp32", name=f"{name}-host"
    )
    return bundle


def build_model(kind: str, out_dir: Path) -> None:
    """The child process: build, compile and bundle one model into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "mobilenetv2":
        import keras

        keras.utils.set_random_seed(0)
        image = keras.Input((224, 224, 3), name="image")
        model = keras.applications.MobileNetV2(weights=None, input_tensor=image)
        source = out_dir / "mobilenetv2.keras"
        model.save(source)
        compile_and_bundle(source, None, out_dir, kind)
    elif kind == "digits":
        train = REPO / "examples" / "digits" / "train.py"
        data = out_dir / "digits-train"
        subprocess.run([sys.executable, str(train), "--out", str(data)], check=True)
        compile_and_bundle(data / "digits.onnx", data / "digits.npz", out_dir, kind)
    else:
        raise ValueError(f"unknown model {kind!r}")


def build_models(work: Path) -> dict[str, Path]:
    """Both bundles, built side by side in two child processes."""
    children = {}
    for kind in MODELS:
        if (work / f"{kind}.efb").is_file():
            log(f"models: reusing {work / f'{kind}.efb'}")
            continue
        log(f"models: building {kind} (child process)")
        with (work / f"build-{kind}.log").open("wb") as out:
            children[kind] = subprocess.Popen(
                [sys.executable, __file__, "--build-model", kind, "--build-dir", str(work)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    for kind, child in children.items():
        if child.wait() != 0:
            tail = (work / f"build-{kind}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building {kind} failed:\n{tail}")
    return {kind: work / f"{kind}.efb" for kind in MODELS}


def parameter_count(model: LoadedModel) -> int:
    import onnx

    graph = onnx.load(str(model.directory / model.manifest.artifact)).graph
    return sum(math.prod(init.dims) for init in graph.initializer)


def sample_inputs(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Batch 1 of uniform noise in [0, 1) for each input."""
    rng = np.random.default_rng(0)
    return {
        spec.name: rng.random([1 if d is None else d for d in spec.shape]).astype(spec.dtype)
        for spec in specs
    }


# --- 1. latency --------------------------------------------------------------------------


class ApiServer:
    """``local_api_server`` over ``service`` on a thread of this process."""

    def __init__(self, service: InferenceService) -> None:
        self.port = free_port()
        self._server = local_api_server(service, ApiConfig(port=self.port))
        self._thread = threading.Thread(target=self._server.run, name="local-api", daemon=True)
        self._thread.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        wait_until(self._ready, 30, "the local API to answer")

    def _ready(self) -> bool:
        try:
            return self.client.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(30)


def http_infer(
    client: httpx.Client, name: str, inputs: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], float, float]:
    """One request as a client makes it: the outputs, and seconds spent encoding/decoding."""
    start = time.perf_counter()
    body = json.dumps({"inputs": oip.encode_inputs(inputs)}).encode()
    encoded = time.perf_counter()
    response = client.post(
        f"/v2/models/{name}/infer", content=body, headers={"content-type": "application/json"}
    )
    answered = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"the local API answered {response.status_code}: {response.text}")
    outputs = [
        oip.decode_output(oip.ResponseOutput.model_validate(o)) for o in response.json()["outputs"]
    ]
    return outputs, encoded - start, time.perf_counter() - answered


def interleaved(
    calls: Mapping[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    before: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each path: ``warmup`` untimed calls each, then ``rounds`` rounds
    calling every path once, the order rotated by one each round; ``before`` (untimed)
    runs before every timed call."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before()
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_overhead(path: Sequence[float], peer: Sequence[float]) -> tuple[float, float, float]:
    """Median of the per-round differences ``path - peer`` and its 95 % bootstrap interval."""
    diff = np.asarray(path) - np.asarray(peer)
    rng = np.random.default_rng(0)
    boot = np.median(rng.choice(diff, size=(2000, len(diff))), axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.median(diff)), float(low), float(high)


def bench_latency(
    name: str, model: LoadedModel, rounds: int, warmup: int
) -> tuple[list[dict[str, Any]], float]:
    """Table 1's rows for one model; also the direct median in seconds."""
    inputs = sample_inputs(model.runtime.inputs)
    service = InferenceService()
    service.set_model(model)
    server = ApiServer(service)
    client_json: list[float] = []
    try:
        expected = model.runtime.predict_batch(inputs)
        for got in (service.infer(inputs).outputs, http_infer(server.client, name, inputs)[0]):
            for a, b in zip(expected, got, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

        def direct() -> None:
            model.runtime.predict_batch(inputs)

        def python_api() -> None:
            service.infer(inputs)

        def http_api() -> None:
            _, encode_s, decode_s = http_infer(server.client, name, inputs)
            client_json.append(encode_s + decode_s)

        log(f"latency: {name}: {warmup} warm-up + {rounds} interleaved rounds")
        times = interleaved(
            {"direct": direct, "python": python_api, "http": http_api}, rounds, warmup
        )
    finally:
        server.close()
        service.close()
    client_json = client_json[warmup:]
    times["round trip"] = [t - j for t, j in zip(times["http"], client_json, strict=True)]
    times["client json"] = client_json
    labels = {
        "direct": "direct runtime.predict_batch (peer)",
        "python": "Python API: InferenceService.infer",
        "http": "local HTTP API, client JSON included",
        "round trip": "local HTTP API, client JSON excluded",
        "client json": "(client JSON encode + decode alone)",
    }
    peer = statistics.median(times["direct"])
    rows = []
    for key, label in labels.items():
        row: dict[str, Any] = {
            "model": name,
            "path": label,
            "runs": len(times[key]),
            "median_us": statistics.median(times[key]) * 1e6,
            "p95_us": percentile(times[key], 95) * 1e6,
            "overhead_us": None,
            "ci_us": None,
            "overhead_pct": None,
            "samples_us": [round(t * 1e6, 1) for t in times[key]],
        }
        if key not in ("direct", "client json"):
            overhead, low, high = paired_overhead(times[key], times["direct"])
            row["overhead_us"] = overhead * 1e6
            row["ci_us"] = (low * 1e6, high * 1e6)
            row["overhead_pct"] = 100 * overhead / peer
        rows.append(row)
    return rows, peer


# --- 2. fixed cost, compute taken out -----------------------------------------------------


class StubRuntime:
    """``real``'s signature, but ``predict_batch`` returns outputs recorded before."""

    def __init__(self, real: Runtime, outputs: list[np.ndarray]) -> None:
        self._real = real
        self._outputs = outputs
        self.name: RuntimeName = real.name

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._real.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._real.outputs

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._outputs)

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._outputs)

    def metadata(self) -> dict[str, Any]:
        return self._real.metadata()

    def close(self) -> None:
        pass


def bench_fixed_cost(
    name: str, model: LoadedModel, rounds: int, cold_rounds: int, direct_median_s: float
) -> list[dict[str, Any]]:
    inputs = sample_inputs(model.runtime.inputs)
    stub = StubRuntime(model.runtime, model.runtime.predict_batch(inputs))
    stubbed = LoadedModel(manifest=model.manifest, runtime=stub, directory=model.directory)
    bare = InferenceService()
    bare.set_model(stubbed)
    observed = InferenceService()
    observed.set_model(stubbed)
    observed.add_observer(InferenceStats().observe)

    def direct() -> None:
        stub.predict_batch(inputs)

    def bare_api() -> None:
        bare.infer(inputs)

    def observed_api() -> None:
        observed.infer(inputs)

    def real_inference() -> None:
        model.runtime.predict_batch(inputs)

    calls = {"direct": direct, "bare": bare_api, "observed": observed_api}
    log(f"fixed cost: {name}: {rounds} rounds back to back on a stub runtime")
    warm = interleaved(calls, rounds, warmup=200)
    log(f"fixed cost: {name}: {cold_rounds} rounds, each call after a real inference")
    cold = interleaved(calls, cold_rounds, warmup=10, before=real_inference)
    labels = {
        "direct": "stub.predict_batch (peer)",
        "bare": "InferenceService.infer",
        "observed": "InferenceService.infer + InferenceStats observer",
    }
    rows = []
    for key, label in labels.items():
        row: dict[str, Any] = {"model": name, "path": label}
        for mode, times, runs in (("warm", warm, rounds), ("cold", cold, cold_rounds)):
            row[f"{mode}_runs"] = runs
            row[f"{mode}_median_us"] = statistics.median(times[key]) * 1e6
            row[f"{mode}_overhead_us"] = None
            if key != "direct":
                overhead, low, high = paired_overhead(times[key], times["direct"])
                row[f"{mode}_overhead_us"] = overhead * 1e6
                row[f"{mode}_ci_us"] = (low * 1e6, high * 1e6)
        cold_overhead = row["cold_overhead_us"]
        row["pct_of_direct"] = (
            None if cold_overhead is None else 100 * cold_overhead / (direct_median_s * 1e6)
        )
        rows.append(row)
    return rows


# --- the broker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    device_id: str
    password: str


class FleetSubscriber:
    """The fleet account on the broker: devices' retained status, telemetry messages counted."""

    def __init__(self, endpoint: MqttEndpoint) -> None:
        self.telemetry = 0
        self.online: dict[str, bool] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(endpoint.username, endpoint.password)
        self._client.on_connect = lambda client, *_: client.subscribe(
            [(f"{TOPIC_PREFIX}/+/status", 1), (f"{TOPIC_PREFIX}/+/telemetry", 1)]
        )
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._message
        self._client.connect(endpoint.host, endpoint.port)
        self._client.loop_start()
        if not subscribed.wait(15):
            raise RuntimeError("the fleet subscriber could not subscribe")

    def _message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        device, channel = message.topic.split("/")[-2:]
        with self._lock:
            if channel == "telemetry":
                self.telemetry += 1
            elif message.payload:
                self.online[device] = bool(json.loads(message.payload).get("online"))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def connect_device(
    endpoint: MqttEndpoint, account: Account, max_inflight: int | None = None
) -> mqtt.Client:
    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=account.device_id, protocol=mqtt.MQTTv5
    )
    if max_inflight is not None:  # paho's default is 20
        client.max_inflight_messages_set(max_inflight)
    client.username_pw_set(account.device_id, account.password)
    client.on_connect = lambda *_: connected.set()
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    if not connected.wait(15) or not client.is_connected():
        raise RuntimeError(f"{account.device_id} could not connect to the broker")
    return client


def disconnect(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


# --- 3. memory of the agent process -------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (bytes) and Threads of ``pid``."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"}
    result = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            number = int(value.split()[0])
            result[key] = number if key == "Threads" else number * 1024
    return result


def write_agent_config(home: Path, account: Account, endpoint: MqttEndpoint, port: int) -> Path:
    config = home / "agent.toml"
    config.write_text(
        "\n".join(
            [
                f"device_id = {json.dumps(account.device_id)}",
                'data_dir = "data"',
                "",
                "[mqtt]",
                f"host = {json.dumps(endpoint.host)}",
                f"port = {endpoint.port}",
                f"username = {json.dumps(account.device_id)}",
                f"password = {json.dumps(account.password)}",
                "",
                "[api]",
                f"port = {port}",
                "",
            ]
        )
    )
    return config


def load_agent(
    client_url: str, name: str, body: bytes, requests: int, concurrency: int
) -> tuple[float, int]:
    """Send ``requests`` requests from ``concurrency`` keep-alive clients; (seconds, failures)."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    failures = [0]

    def worker() -> None:
        with httpx.Client(base_url=client_url, timeout=120) as client:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                response = client.post(
                    f"/v2/models/{name}/infer",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                if response.status_code != 200:
                    with lock:
                        failures[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, failures[0]


def bench_agent_memory(
    work: Path,
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    bundle: Path | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    label = "MobileNetV2 installed" if bundle is not None else "no model"
    home = work / account.device_id
    shutil.rmtree(home, ignore_errors=True)  # a --workdir used before
    data = home / "data"
    data.mkdir(parents=True)
    model_name = None
    if bundle is not None:
        slots = Slots(data)
        model_name = slots.stage(bundle).model.name
        slots.switch()
    port = free_port()
    config = write_agent_config(home, account, endpoint, port)
    command = [str(Path(sys.executable).parent / "edgefleet"), "agent", "run", "--config"]
    result: dict[str, Any] = {"agent": label}
    log(f"memory: starting edgefleet agent run ({label})")
    with (home / "agent.log").open("wb") as agent_log:
        start = time.perf_counter()
        process = subprocess.Popen(
            [*command, str(config)], stdout=agent_log, stderr=subprocess.STDOUT
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited; see {home / 'agent.log'}")
            try:
                live = client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False
            return live and subscriber.online.get(account.device_id, False)

        wait_until(up, 180, f"the agent ({label}) to serve and be online", poll=0.05)
        result["start_s"] = time.perf_counter() - start
        ready = client.get("/v2/health/ready").status_code == 200
        if ready != (bundle is not None):
            raise RuntimeError(f"agent ({label}): /v2/health/ready says ready={ready}")
        time.sleep(args.settle_s)
        result["idle"] = proc_status(process.pid)
        log(f"memory: {label}: idle VmRSS {result['idle']['VmRSS'] / MIB:.1f} MiB")
        if bundle is not None and model_name is not None and args.load_requests:
            specs = [
                TensorSpec(t["name"], tuple(None if d < 0 else d for d in t["shape"]), "float32")
                for t in client.get(f"/v2/models/{model_name}").json()["inputs"]
            ]
            body = json.dumps({"inputs": oip.encode_inputs(sample_inputs(specs))}).encode()
            peak = [0]
            loading = threading.Event()

            def sample() -> None:
                while not loading.wait(0.1):
                    peak[0] = max(peak[0], proc_status(process.pid)["VmRSS"])

            sampler = threading.Thread(target=sample)
            sampler.start()
            log(f"memory: {label}: {args.load_requests} requests, {args.load_concurrency} clients")
            try:
                seconds, failures = load_agent(
                    f"http://127.0.0.1:{port}",
                    model_name,
                    body,
                    args.load_requests,
                    args.load_concurrency,
                )
            finally:
                loading.set()
                sampler.join()
            if failures:
                raise RuntimeError(f"{failures} of {args.load_requests} requests failed")
            result["load"] = {
                "requests": args.load_requests,
                "concurrency": args.load_concurrency,
                "request_bytes": len(body),
                "seconds": seconds,
                "peak_sampled_rss": peak[0],
                "end": proc_status(process.pid),
            }
            time.sleep(3)
            result["after_load"] = proc_status(process.pid)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return result


# --- 4. telemetry throughput ---------------------------------------------------------------


def make_records(count: int) -> list[TelemetryRecord]:
    """``count`` records as the daemon makes them: ``InferenceStats`` over 20 inferences each."""
    stats = InferenceStats()
    rng = random.Random(0)
    records: list[TelemetryRecord] = []
    for _ in range(count):
        for _ in range(20):
            stats.observe(
                InferenceOutcome(
                    bundle="mobilenetv2-host-1.0.0",
                    served_by="local",
                    latency_ms=rng.uniform(15.0, 40.0),
                    local_error=False,
                    fallback_reason=None,
                    predicted_class=rng.randrange(1000),
                )
            )
        records.extend(stats.report())
    return records


def sender_run(
    work: Path,
    records: list[TelemetryRecord],
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
) -> tuple[dict[str, Any], list[bytes]]:
    config = TelemetryConfig()
    max_bytes = max(config.max_queue_bytes, 4096 * len(records))
    path = work / f"telemetry-{secrets.token_hex(4)}.db"
    queue = TelemetryQueue(path, max_bytes)
    start = time.perf_counter()
    queue.put_many(records)
    fill_s = time.perf_counter() - start
    if len(queue) != len(records):
        raise RuntimeError(f"the queue holds {len(queue)} of {len(records)} records")
    client = connect_device(endpoint, account)
    payloads: list[bytes] = []
    first: list[float] = []
    publish = client.publish

    def recording_publish(
        topic: str, payload: Any = None, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> mqtt.MQTTMessageInfo:
        if not first:
            first.append(time.perf_counter())
        payloads.append(payload)
        return publish(topic, payload, qos, retain, properties)

    client.publish = recording_publish  # type: ignore[method-assign]
    delivered = subscriber.telemetry
    sender = TelemetrySender(queue, account.device_id, client, config)
    try:
        sender.start()
        wait_until(lambda: len(queue) == 0, 600, "the sender to empty the queue", poll=0.01)
        seconds = time.perf_counter() - first[0]
    finally:
        sender.stop()
        disconnect(client)
    wait_until(
        lambda: subscriber.telemetry - delivered >= len(payloads), 60, "the sender's batches"
    )
    queue.close()
    path.unlink()
    return {
        "seconds": seconds,
        "fill_s": fill_s,
        "batches": len(payloads),
        "payload_bytes": sum(len(p) for p in payloads),
    }, payloads


def peer_run(
    payloads: list[bytes],
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    *,
    pipelined: bool,
) -> float:
    """Seconds from the first publish to the last PUBACK of ``payloads`` (plain paho, QoS 1)."""
    topic = device_topic(account.device_id, "telemetry")
    client = connect_device(endpoint, account, len(payloads) if pipelined else None)
    delivered = subscriber.telemetry
    try:
        start = time.perf_counter()
        if pipelined:
            infos = [client.publish(topic, payload, qos=1) for payload in payloads]
            for info in infos:
                info.wait_for_publish(60)
        else:
            for payload in payloads:
                client.publish(topic, payload, qos=1).wait_for_publish(60)
        seconds = time.perf_counter() - start
    finally:
        disconnect(client)
    wait_until(lambda: subscriber.telemetry - delivered >= len(payloads), 60, "the peer's batches")
    return seconds


def bench_telemetry(
    work: Path,
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    log(f"telemetry: making {args.records} records with InferenceStats")
    records = make_records(args.records)
    record_bytes = statistics.mean(
        len(r.model_dump_json(exclude_defaults=True)) for r in records[:200]
    )
    times: dict[str, list[float]] = {"sender": [], "one": [], "pipelined": []}
    sender_info: list[dict[str, Any]] = []
    for i in range(args.telemetry_runs):
        info, payloads = sender_run(work, records, endpoint, subscriber, account)
        sender_info.append(info)
        times["sender"].append(info["seconds"])
        times["one"].append(peer_run(payloads, endpoint, subscriber, account, pipelined=False))
        times["pipelined"].append(peer_run(payloads, endpoint, subscriber, account, pipelined=True))
        log(
            f"telemetry: run {i + 1}/{args.telemetry_runs}: "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
        )
    labels = {
        "sender": "TelemetryQueue + TelemetrySender",
        "one": "plain paho, same payloads, one in flight (peer)",
        "pipelined": "plain paho, same payloads, pipelined",
    }
    peer = statistics.median(times["one"])
    rows = []
    for key, label in labels.items():
        median = statistics.median(times[key])
        rows.append(
            {
                "path": label,
                "records": len(records),
                "batches": sender_info[0]["batches"],
                "payload_bytes": sender_info[0]["payload_bytes"],
                "median_s": median,
                "min_s": min(times[key]),
                "records_per_s": len(records) / median,
                "x_peer": peer / median,
            }
        )
    extra = {
        "record_json_bytes_mean": record_bytes,
        "fill_s_median": statistics.median(i["fill_s"] for i in sender_info),
    }
    return rows, extra


# --- output -------------------------------------------------------------------------------


def fmt_us(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def fmt_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f} %" if abs(value) < 10 else f"{value:+,.0f} %"


def mib(value: int) -> str:
    return f"{value / MIB:.1f}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{fmt_us(ci[0])}, {fmt_us(ci[1])}]"


def latency_table(rows: list[dict[str, Any]], params: dict[str, int], load: str) -> str:
    title = (
        f"Per-request latency, batch 1, fp32 on ONNX Runtime (CPU), {os.cpu_count()} cores, "
        f"load average {load}; interleaved rounds, median and p95; overhead = median of the "
        "per-round differences from direct, with its 95 % bootstrap interval "
        "(target: Python API overhead < 5 % on MobileNetV2)"
    )
    return markdown_table(
        title,
        ["model", "path", "runs", "median µs", "p95 µs", "overhead µs", "95 % CI µs", "overhead %"],
        [
            [
                f"{r['model']} ({params[r['model']] / 1e6:.2f}M params)",
                r["path"],
                str(r["runs"]),
                fmt_us(r["median_us"]),
                fmt_us(r["p95_us"]),
                fmt_us(r["overhead_us"]),
                fmt_ci(r["ci_us"]),
                fmt_pct(r["overhead_pct"]),
            ]
            for r in rows
        ],
        text_columns=2,
    )


def fixed_cost_table(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    return markdown_table(
        "Fixed cost of the Python API: the model's compute replaced by a stub returning "
        f"recorded outputs; back to back ({r0['warm_runs']} rounds) and each call right after "
        f"an untimed real inference of the model, caches as in real use ({r0['cold_runs']} "
        "rounds); overhead = median per-round difference from the stub; "
        "% = that, after a real inference, over the direct median of the table above",
        [
            "model",
            "path",
            "back to back µs",
            "overhead µs",
            "after an inference µs",
            "overhead µs",
            "95 % CI µs",
            "% of direct",
        ],
        [
            [
                r["model"],
                r["path"],
                fmt_us(r["warm_median_us"]),
                fmt_us(r["warm_overhead_us"]),
                fmt_us(r["cold_median_us"]),
                fmt_us(r["cold_overhead_us"]),
                fmt_ci(r.get("cold_ci_us")),
                fmt_pct(r["pct_of_direct"]),
            ]
            for r in rows
        ],
        text_columns=2,
    )


def memory_table(results: list[dict[str, Any]], broker: str) -> str:
    rows = []
    for r in results:
        idle = r["idle"]
        rows.append(
            [
                r["agent"],
                "idle",
                mib(idle["VmRSS"]),
                mib(idle["RssAnon"]),
                mib(idle["RssFile"]),
                mib(idle["VmHWM"]),
                str(idle["Threads"]),
                f"ready and online in {r['start_s']:.1f} s",
            ]
        )
        if "load" in r:
            load, end, after = r["load"], r["load"]["end"], r["after_load"]
            rate = load["requests"] / load["seconds"]
            rows.append(
                [
                    r["agent"],
                    "under load (peak sampled)",
                    mib(load["peak_sampled_rss"]),
                    "",
                    "",
                    mib(end["VmHWM"]),
                    str(end["Threads"]),
                    f"{load['requests']} requests of {load['request_bytes'] / 1e6:.1f} MB JSON, "
                    f"{load['concurrency']} clients, {rate:.1f} req/s",
                ]
            )
            rows.append(
                [
                    r["agent"],
                    "3 s after load",
                    mib(after["VmRSS"]),
                    mib(after["RssAnon"]),
                    mib(after["RssFile"]),
                    mib(after["VmHWM"]),
                    str(after["Threads"]),
                    "",
                ]
            )
    return markdown_table(
        f"Memory of `edgefleet agent run` (/proc/PID/status, MiB), MQTT to {broker}",
        ["agent", "state", "VmRSS", "RssAnon", "RssFile", "VmHWM", "threads", "notes"],
        rows,
        text_columns=2,
        last_is_text=True,
    )


def telemetry_table(rows: list[dict[str, Any]], extra: dict[str, Any], runs: int) -> str:
    r0 = rows[0]
    title = (
        f"Telemetry to a local mosquitto, QoS 1: {r0['records']:,} records "
        f"(~{extra['record_json_bytes_mean']:.0f} B of JSON each) in {r0['batches']} zstd "
        f"batches, {r0['payload_bytes'] / 1e6:.2f} MB on the wire; median of {runs} runs "
        f"(queue fill, one transaction, not timed: {extra['fill_s_median']:.2f} s)"
    )
    return markdown_table(
        title,
        ["path", "median s", "min s", "records/s", "throughput x peer"],
        [
            [
                r["path"],
                f"{r['median_s']:.3f}",
                f"{r['min_s']:.3f}",
                f"{r['records_per_s']:,.0f}",
                f"{r['x_peer']:.2f}",
            ]
            for r in rows
        ],
    )


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="latency rounds, MobileNetV2")
    parser.add_argument("--small-runs", type=int, default=1000, help="latency rounds, digits")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per path")
    parser.add_argument("--stub-runs", type=int, default=20000, help="fixed cost, back to back")
    parser.add_argument(
        "--stub-cold-runs", type=int, default=300, help="fixed cost, after a real inference"
    )
    parser.add_argument("--load-requests", type=int, default=200)
    parser.add_argument("--load-concurrency", type=int, default=4)
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle wait before reading")
    parser.add_argument("--records", type=int, default=20000, help="telemetry records")
    parser.add_argument("--telemetry-runs", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, help="keep files here, reuse bundles built there before"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--skip-latency", action="store_true", help="no tables 1 and 2")
    parser.add_argument("--skip-memory", action="store_true", help="no memory table")
    parser.add_argument("--skip-telemetry", action="store_true", help="no telemetry table")
    parser.add_argument("--build-model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--build-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_model:
        build_model(args.build_model, args.build_dir)
        return
    counts = (args.runs, args.small_runs, args.stub_runs, args.stub_cold_runs, args.records)
    if min(*counts, args.telemetry_runs) < 1:
        parser.error("run and record counts must be at least 1")

    started = time.perf_counter()
    results: dict[str, Any] = {}
    tables: list[str] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="agent-bench-"))
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundles: dict[str, Path] = {}
        models: dict[str, LoadedModel] = {}
        if not (args.skip_latency and args.skip_memory):
            bundles = build_models(work)
            for kind, bundle in bundles.items():
                shutil.rmtree(work / f"{kind}-installed", ignore_errors=True)
                unpack_bundle(bundle, work / f"{kind}-installed")
                models[kind] = load_installed(work / f"{kind}-installed")
                stack.callback(models[kind].close)
            results["params"] = {kind: parameter_count(m) for kind, m in models.items()}

        if not args.skip_latency:
            latency: list[dict[str, Any]] = []
            fixed: list[dict[str, Any]] = []
            for kind, model in models.items():
                rounds = args.runs if kind == "mobilenetv2" else args.small_runs
                rows, direct_s = bench_latency(model.model_name, model, rounds, args.warmup)
                latency += rows
                fixed += bench_fixed_cost(
                    model.model_name, model, args.stub_runs, args.stub_cold_runs, direct_s
                )
            results["latency"], results["fixed_cost"] = latency, fixed
            results["latency_load_average"] = load_average()
            tables.append(
                latency_table(latency, results["params"], results["latency_load_average"])
            )
            tables.append(fixed_cost_table(fixed))

        if not (args.skip_memory and args.skip_telemetry):
            log("broker: starting mosquitto")
            accounts = {
                role: Account(f"bench-{role}", secrets.token_urlsafe(16))
                for role in ("agent-empty", "agent-model", "telemetry")
            }
            broker = stack.enter_context(MosquittoBroker(work / "broker"))
            endpoint = broker.start(
                fleet_username=FLEET_USER,
                fleet_password=secrets.token_urlsafe(16),
                devices=[
                    DeviceCredential(a.device_id, hash_password(a.password))
                    for a in accounts.values()
                ],
            )
            subscriber = FleetSubscriber(endpoint)
            stack.callback(subscriber.close)

        if not args.skip_memory:
            memory = [
                bench_agent_memory(work, endpoint, subscriber, accounts["agent-empty"], None, args),
                bench_agent_memory(
                    work,
                    endpoint,
                    subscriber,
                    accounts["agent-model"],
                    bundles["mobilenetv2"],
                    args,
                ),
            ]
            results["memory"] = memory
            tables.append(memory_table(memory, f"a real mosquitto on 127.0.0.1:{endpoint.port}"))

        if not args.skip_telemetry:
            telemetry, extra = bench_telemetry(
                work, endpoint, subscriber, accounts["telemetry"], args
            )
            results["telemetry"], results["telemetry_extra"] = telemetry, extra
            tables.append(telemetry_table(telemetry, extra, args.telemetry_runs))
    print("\n\n".join(tables))
    total = time.perf_counter() - started
    print(f"\n_total bench time {total:.0f} s, load average at the end {load_average()}_")
    results["total_s"] = total
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
