"""Latency of an artifact: median and 95th percentile of single calls, after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from agent.runtimes import Runtime
from contracts.report import Latency

__all__ = ["latency_of", "measure_latency"]


def measure_latency(
    runtime: Runtime, sample: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5
) -> Latency:
    """Time ``runs`` calls of ``runtime.predict(sample)`` on this machine, in milliseconds."""
    for _ in range(warmup):
        runtime.predict(sample)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        runtime.predict(sample)
        times[i] = (time.perf_counter() - start) * 1000.0
    return latency_of(times, "host")


def latency_of(times_ms: np.ndarray, where: str) -> Latency:
    """Median and 95th percentile of ``times_ms``, to 0.1 µs as reports give them."""
    return Latency(
        p50=round(float(np.median(times_ms)), 4),
        p95=round(float(np.percentile(times_ms, 95)), 4),
        runs=len(times_ms),
        where=where,
    )
