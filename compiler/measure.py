"""Latency of an artifact: median and 95th percentile of single calls, after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from agent.runtimes import Runtime

from .candidates import Latency

__all__ = ["measure_latency"]


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
    return Latency(float(np.median(times)), float(np.percentile(times, 95)), runs, "host")
