"""Tables 1 and 2 of the agent benchmark: per-request latency of the direct runtime call,
the Python API and the local HTTP API, and the Python API's fixed cost with the model's
compute replaced by a stub. Both time paths in interleaved rounds against a peer. The drift
table takes its figures from table 2's rounds: the same observed service with and without
the bundle's drift reference."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from agent.api import local_api_server
from agent.config import ApiConfig
from agent.inference import InferenceService
from agent.model import LoadedModel
from agent.runtimes import Runtime
from agent.telemetry import InferenceStats
from contracts import oip
from contracts.artifacts import RuntimeName
from contracts.drift import ReferenceProfile, reference_from_samples
from contracts.tensors import TensorSpec

from .common import (
    fmt_ci,
    fmt_pct,
    fmt_us,
    free_port,
    log,
    markdown_table,
    percentile,
    sample_inputs,
    wait_until,
)

__all__ = [
    "bench_fixed_cost",
    "bench_latency",
    "drift_table",
    "fixed_cost_table",
    "latency_table",
]


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
    drift_stats = InferenceStats()
    drifted = InferenceService()
    drifted.set_model(
        LoadedModel(
            manifest=model.manifest,
            runtime=stub,
            directory=model.directory,
            drift_reference=model.drift_reference or _noise_reference(model),
        )
    )
    drifted.add_observer(drift_stats.observe)

    def direct() -> None:
        stub.predict_batch(inputs)

    def bare_api() -> None:
        bare.infer(inputs)

    def observed_api() -> None:
        observed.infer(inputs)

    def drift_api() -> None:
        drifted.infer(inputs)

    def real_inference() -> None:
        model.runtime.predict_batch(inputs)

    calls = {"direct": direct, "bare": bare_api, "observed": observed_api, "drift": drift_api}
    log(f"fixed cost: {name}: {rounds} rounds back to back on a stub runtime")
    warm = interleaved(calls, rounds, warmup=200)
    log(f"fixed cost: {name}: {cold_rounds} rounds, each call after a real inference")
    cold = interleaved(calls, cold_rounds, warmup=10, before=real_inference)
    labels = {
        "direct": "stub.predict_batch (peer)",
        "bare": "InferenceService.infer",
        "observed": "InferenceService.infer + InferenceStats observer",
        "drift": "InferenceService.infer + InferenceStats observer + drift summary",
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
    (record,) = drift_stats.report()
    summary = json.dumps(record.extra["drift"], separators=(",", ":")).encode()
    drift_row: dict[str, Any] = {
        "model": name,
        "path": "drift summary (vs the observed service)",
        "summary_bytes": len(summary),
        "summary_inferences": record.inferences,
        "reference": "the bundle's" if model.drift_reference else "from noise",
    }
    for mode, times in (("warm", warm), ("cold", cold)):
        added, low, high = paired_overhead(times["drift"], times["observed"])
        drift_row[f"{mode}_added_us"] = added * 1e6
        drift_row[f"{mode}_ci_us"] = (low * 1e6, high * 1e6)
    drift_row["pct_of_direct"] = 100 * drift_row["cold_added_us"] / (direct_median_s * 1e6)
    rows.append(drift_row)
    return rows


def _noise_reference(model: LoadedModel) -> ReferenceProfile:
    """A reference for a bundle compiled without data (the costs do not depend on the values
    of its edges): 32 noise samples and the model's outputs on them."""
    rng = np.random.default_rng(1)
    batch = {
        spec.name: rng.random([32, *[1 if d is None else d for d in spec.shape[1:]]]).astype(
            spec.dtype
        )
        for spec in model.runtime.inputs
    }
    outputs = model.runtime.predict_batch(batch)
    return reference_from_samples(batch, outputs[0], classifier=outputs[0].ndim == 2)


def drift_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        "Drift summaries (contracts/drift.py): what folding each call into its bundle's "
        "summary adds to the Python API with the InferenceStats observer (median of the "
        "per-round differences, table 2's rounds), as % of the direct median of table 1 "
        "(target < 5 %), and the summary's size in the telemetry record's extra, compact "
        "JSON before zstd (target < 1 KiB)",
        [
            "model",
            "reference",
            "added back to back µs",
            "added after an inference µs",
            "95 % CI µs",
            "% of direct",
            "bytes per record",
            "inferences in it",
        ],
        [
            [
                r["model"],
                r["reference"],
                fmt_us(r["warm_added_us"]),
                fmt_us(r["cold_added_us"]),
                fmt_ci(r["cold_ci_us"]),
                fmt_pct(r["pct_of_direct"]),
                str(r["summary_bytes"]),
                str(r["summary_inferences"]),
            ]
            for r in rows
        ],
        text_columns=2,
    )


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
