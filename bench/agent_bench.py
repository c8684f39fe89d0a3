"""Agent benchmark: what the agent costs per request, in memory, and in telemetry throughput.

    python bench/agent_bench.py [--runs 200] [--small-runs 1000] [--stub-runs 20000]
                                [--stub-cold-runs 300] [--load-requests 200]
                                [--load-concurrency 4] [--settle-s 5] [--records 20000]
                                [--telemetry-runs 3] [--skip-latency] [--skip-memory]
                                [--skip-telemetry] [--workdir DIR] [--json FILE]

Prints five markdown tables (progress goes to stderr). Nothing is downloaded.

Models. Two models are built locally, each in a child process (so TensorFlow is never
loaded into the measuring process), compiled with ``compiler.pipeline.compile_model`` for
the ``host`` profile cut down to ONNX Runtime (fp32, ``quantize="fp32"``, no tuning),
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

   Drift summaries, in the same interleaved rounds: a fourth path, the observed service
   whose model carries a drift reference (the bundle's; for a bundle compiled without data,
   one made from 32 noise samples, as the cost does not depend on the edges' values), so
   each call's inputs are sampled and binned into the bundle's ``DriftSummary``
   (``contracts/drift.py``). Its cost = the median per-round difference from the observed
   service without one, as % of table 1's direct median; its size = the summary in the
   record ``InferenceStats.report`` made of all those rounds, as compact JSON.

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

This script holds the command line; the measurements live in ``bench/agent_costs/``:
``models.py`` (building the bundles), ``latency.py`` (tables 1 and 2), ``memory.py``
(table 3), ``telemetry.py`` (table 4), ``broker.py`` (accounts and clients on mosquitto)
and ``common.py`` (what they share).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from agent.model import LoadedModel, load_installed, unpack_bundle
from fleet.broker import DeviceCredential, MosquittoBroker, hash_password

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.agent_costs.broker import Account, FleetSubscriber
from bench.agent_costs.common import load_average, log
from bench.agent_costs.latency import (
    bench_fixed_cost,
    bench_latency,
    drift_table,
    fixed_cost_table,
    latency_table,
)
from bench.agent_costs.memory import bench_agent_memory, memory_table
from bench.agent_costs.models import MODELS, build_model, build_models, parameter_count
from bench.agent_costs.telemetry import bench_telemetry, telemetry_table

FLEET_USER = "bench-fleet"


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
            bundles = build_models(work, Path(__file__))
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
            drift = [row for row in fixed if "summary_bytes" in row]
            fixed = [row for row in fixed if "summary_bytes" not in row]
            results["latency"], results["fixed_cost"], results["drift"] = latency, fixed, drift
            results["latency_load_average"] = load_average()
            tables.append(
                latency_table(latency, results["params"], results["latency_load_average"])
            )
            tables.append(fixed_cost_table(fixed))
            tables.append(drift_table(drift))

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
