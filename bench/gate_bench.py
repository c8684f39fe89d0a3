"""Canary gate benchmark: how often each gate halts a canary, by how much worse it is.

    python bench/gate_bench.py [--runs 2000] [--seed 16] [--json FILE]

Prints a markdown table. Nothing is timed: the figures are rates over seeded Monte-Carlo
rollouts, the same on every machine for the same arguments.

Each rollout is a wave whose canary serves 10 % of the inferences: every look (an engine
tick) adds 20 canary and 180 baseline inferences, the baseline at a 2 % error rate and the
canary at ``ratio`` times that, errors drawn binomially. Three gates judge the same draws:

- ``compare: baseline`` (``fleet/rollouts/sequential.py``, the gate's per-rate alpha
  0.025 of its default 0.05, power 0.8, min_effect 2): looks until it halts or passes;
- the fixed threshold (the gate's default ``max_error_rate_increase`` 0.02 with
  ``min_inferences`` 1,000): one look, once the canary has 1,000 inferences;
- a fixed-sample test looked at every tick (the exact one-sided conditional binomial
  test at 0.025, passing at the same minimum sample as the sequential test): what the
  sequential test would be without its correction for repeated looks.

A last row per ratio is the sequential test in the last wave, where no device is left on
the previous version and the baseline is a fixed hour of its telemetry (36,000 inferences)
while the canary's grows: outside the test's exact guarantee, measured here.

Columns: the share halted (at ratio 1 the false-halt rate, above it the power), the share
passed, and the median canary inferences at the decision. A run undecided after 2,000
looks counts in neither.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fleet.rollouts.sequential import Arm, Design, Outcome, compare

CANARY_PER_LOOK, BASELINE_PER_LOOK = 20, 180
BASELINE_RATE = 0.02
MAX_LOOKS = 2000
DESIGN = Design(alpha=0.025, power=0.8, min_effect=2.0)
RATIOS = (1.0, 1.25, 1.5, 2.0, 3.0)
FIXED_BASELINE = 36_000

Gate = Callable[[Arm, Arm], Outcome]


@dataclass(frozen=True)
class Row:
    gate: str
    ratio: float
    halted: float
    passed: float
    median_canary_inferences: float | None


def sequential(canary: Arm, baseline: Arm) -> Outcome:
    return compare(canary, baseline, DESIGN).outcome


def fixed_threshold(canary: Arm, baseline: Arm) -> Outcome:
    if canary.trials < 1000:
        return Outcome.WAIT
    allowed = (baseline.rate or 0.0) + 0.02
    return Outcome.HALT if (canary.rate or 0.0) > allowed else Outcome.PASS


def repeated_fixed_sample(canary: Arm, baseline: Arm) -> Outcome:
    k = canary.events + baseline.events
    share = canary.trials / (canary.trials + baseline.trials)
    tail = sum(
        math.comb(k, x) * share**x * (1 - share) ** (k - x) for x in range(canary.events, k + 1)
    )
    if tail < DESIGN.alpha:
        return Outcome.HALT
    waiting = compare(canary, baseline, DESIGN).outcome is Outcome.WAIT
    return Outcome.WAIT if waiting else Outcome.PASS


def simulate(gate: Gate, ratio: float, runs: int, rng: np.random.Generator, fixed: bool) -> Row:
    halted = passed = 0
    decided_at: list[int] = []
    for _ in range(runs):
        canary_events = rng.binomial(CANARY_PER_LOOK, BASELINE_RATE * ratio, MAX_LOOKS).cumsum()
        if fixed:
            baseline_events = np.full(MAX_LOOKS, rng.binomial(FIXED_BASELINE, BASELINE_RATE))
        else:
            baseline_events = rng.binomial(BASELINE_PER_LOOK, BASELINE_RATE, MAX_LOOKS).cumsum()
        for look in range(MAX_LOOKS):
            trials = CANARY_PER_LOOK * (look + 1)
            baseline_trials = FIXED_BASELINE if fixed else BASELINE_PER_LOOK * (look + 1)
            outcome = gate(
                Arm(int(canary_events[look]), trials),
                Arm(int(baseline_events[look]), baseline_trials),
            )
            if outcome is not Outcome.WAIT:
                halted += outcome is Outcome.HALT
                passed += outcome is Outcome.PASS
                decided_at.append(trials)
                break
    median = statistics.median(decided_at) if decided_at else None
    name = {sequential: "compare: baseline", fixed_threshold: "fixed threshold +2 points"}
    label = name.get(gate, "fixed-sample test, every look")
    if fixed:
        label += ", last wave (fixed baseline)"
    return Row(label, ratio, halted / runs, passed / runs, median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for ratio in RATIOS:
        for gate, fixed in (
            (sequential, False),
            (fixed_threshold, False),
            (repeated_fixed_sample, False),
            (sequential, True),
        ):
            rng = np.random.default_rng([args.seed, int(ratio * 100)])  # same draws per ratio
            rows.append(simulate(gate, ratio, args.runs, rng, fixed))
    print(f"{args.runs} seeded rollouts per row (seed {args.seed}); baseline error rate 2 %\n")
    print("| gate | canary / baseline rate | halted | passed | median canary inferences |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        median = (
            "—" if row.median_canary_inferences is None else f"{row.median_canary_inferences:,.0f}"
        )
        print(f"| {row.gate} | {row.ratio:g}x | {row.halted:.2%} | {row.passed:.2%} | {median} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
