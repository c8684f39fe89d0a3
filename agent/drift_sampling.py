"""Which answered calls go into the drift summary, so that summarising stays cheap.

Summarising one call costs a roughly fixed few tens of microseconds (a few hundred values
copied out of the inputs and binned, ``contracts/drift.py``): nothing beside a 70 ms
MobileNetV2, a fifth of a 0.1 ms model. :class:`DriftSampling` folds each call with the
probability that keeps that cost at :data:`COST_SHARE` of the model's own time: every call
of most models, a random share of the tiniest. The coin never looks at what a call holds,
so the summary stays an unbiased sample of the traffic; it only counts fewer calls, and
drift then needs more inferences to show (docs/agent.md, "Drift summaries").
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Mapping

import numpy as np

from contracts.drift import ReferenceProfile, SummaryBuilder, drift_sample

__all__ = ["COST_SHARE", "DriftSampling", "summary_cost_s"]

COST_SHARE = 0.02
"""Summarising may cost this share of inference time (the target is under 5 %)."""
_TIMED_RUNS = 5


class DriftSampling:
    """The coin for one model: ``cost_s`` is what summarising one of its calls costs."""

    def __init__(
        self, cost_s: float, share: float = COST_SHARE, rng: random.Random | None = None
    ) -> None:
        if cost_s < 0 or not 0 < share <= 1:
            raise ValueError(f"cost_s {cost_s} must be >= 0 and share {share} in (0, 1]")
        self.cost_s, self.share = cost_s, share
        self._rng = rng or random.Random()

    def probability(self, call_s: float) -> float:
        """The chance a call that took ``call_s`` is summarised."""
        if self.cost_s == 0:
            return 1.0
        return min(1.0, self.share * max(call_s, 0.0) / self.cost_s)

    def take(self, call_s: float) -> bool:
        """Whether to summarise this call (it took ``call_s`` seconds)."""
        probability = self.probability(call_s)
        return probability >= 1.0 or self._rng.random() < probability


def summary_cost_s(
    reference: ReferenceProfile,
    inputs: Mapping[str, np.ndarray],
    first_output: np.ndarray | None,
) -> float:
    """What summarising a call like this one costs here: the median of a few timed runs
    of what every summarised call does (take its values, bin them)."""
    builder = SummaryBuilder(reference)
    times = []
    for _ in range(_TIMED_RUNS):
        start = time.perf_counter()
        builder.add_sample(drift_sample(inputs, first_output))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
