"""The sequential test of a canary's rate against its baseline's, pure
(``fleet/rollouts/sequential.py``): counts in, a verdict out.

The table pins the verdict of single looks; the Monte-Carlo cases run seeded rollouts that
look after every batch of inferences, as the engine does every tick, and count how often a
canary no worse than its baseline is halted (at most ``alpha``) and how often one twice as
bad is (at least ``power``). A fixed-sample test looked at this often halts good canaries
several times more often than ``alpha``, which the first Monte-Carlo case would catch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleet.rollouts.sequential import (
    TEST_NAME,
    Arm,
    Design,
    Outcome,
    compare,
    min_events,
)

DESIGN = Design(alpha=0.025, power=0.8, min_effect=2.0)

# canary (events, trials), baseline (events, trials) -> outcome, words in the reason
LOOKS = {
    "twice the baseline's error rate halts": (
        (80, 2000),
        (360, 18000),
        Outcome.HALT,
        ["regression", "4.00% vs the baseline's 360/18000 = 2.00%", "ratio 2.00x", "+2.00"],
    ),
    "no change, past the minimum sample, passes": (
        (40, 2000),
        (360, 18000),
        Outcome.PASS,
        ["no regression signal at the minimum sample", "ratio 1.00x", "400 events, 304 needed"],
    ),
    "no change, short of the minimum sample, waits": (
        (20, 1000),
        (180, 9000),
        Outcome.WAIT,
        ["too few events to pass", "200 events, 304 needed"],
    ),
    "twice the rate on too few events waits rather than halts": (
        (4, 100),
        (18, 900),
        Outcome.WAIT,
        ["ratio 2.00x", "22 events, 304 needed"],
    ),
    "a canary better than its baseline is never a regression": (
        (0, 2000),
        (3600, 18000),
        Outcome.PASS,
        ["ratio 0.00x", "p = 1"],
    ),
    "a baseline without inferences waits": ((5, 100), (0, 0), Outcome.WAIT, ["the baseline"]),
    "a baseline of one inference tells nothing, however bad the canary": (
        (10**9, 10**9),
        (0, 1),
        Outcome.WAIT,
        ["ratio inf", "needed to pass"],
    ),
    "a canary without inferences waits": ((0, 0), (5, 100), Outcome.WAIT, ["the canary"]),
}


@pytest.mark.parametrize(("canary", "baseline", "outcome", "words"), LOOKS.values(), ids=LOOKS)
def test_one_look_decides_from_the_counts(
    canary: tuple[int, int], baseline: tuple[int, int], outcome: Outcome, words: list[str]
) -> None:
    result = compare(Arm(*canary), Arm(*baseline), DESIGN)

    assert result.outcome is outcome, result.reason
    for text in words:
        assert text in result.reason
    assert result.test == TEST_NAME
    assert result.events == canary[0] + baseline[0]
    if outcome is Outcome.HALT:
        assert result.p_value < DESIGN.alpha
    else:
        assert result.p_value >= DESIGN.alpha


def test_only_the_canary_has_events_is_an_infinite_ratio_and_halts() -> None:
    result = compare(Arm(30, 1000), Arm(0, 9000), DESIGN)

    assert result.outcome is Outcome.HALT
    assert result.ratio == math.inf and "ratio inf" in result.reason


def test_the_minimum_sample_is_the_least_at_which_one_look_has_the_power() -> None:
    # each is checked against an exact power computed here, by brute force
    for share in (0.02, 0.1, 0.5, 0.9):
        needed = min_events(share, DESIGN)
        assert _one_look_power(needed, share) >= DESIGN.power
        assert _one_look_power(needed - 1, share) < DESIGN.power


def test_the_minimum_sample_grows_as_the_design_asks_more() -> None:
    base = min_events(0.1, DESIGN)

    assert min_events(0.1, Design(alpha=0.005, power=0.8, min_effect=2.0)) > base
    assert min_events(0.1, Design(alpha=0.025, power=0.95, min_effect=2.0)) > base
    assert min_events(0.1, Design(alpha=0.025, power=0.8, min_effect=1.5)) > base
    assert min_events(0.01, DESIGN) > base  # a small canary needs more events in all
    assert min_events(1e-5, DESIGN) > min_events(1e-4, DESIGN)


def _one_look_power(k: int, share: float) -> float:
    """P(a look at k events halts), for a canary twice as bad, summed over every split."""
    regressed = 2 * share / (2 * share + 1 - share)
    halting = (
        x
        for x in range(k + 1)
        if compare(
            Arm(x, round(share * 10**6)), Arm(k - x, round((1 - share) * 10**6)), DESIGN
        ).outcome
        is Outcome.HALT
    )
    return sum(
        math.exp(
            math.log(math.comb(k, x)) + x * math.log(regressed) + (k - x) * math.log1p(-regressed)
        )
        for x in halting
    )


RUNS = 2000


def _halt_rate(ratio: float, seed: int) -> float:
    """Share of ``RUNS`` rollouts halted: each look adds 20 canary and 180 baseline
    inferences at a 2 % baseline error rate, until the test passes or halts."""
    rng = np.random.default_rng(seed)
    canary = rng.binomial(20, 0.02 * ratio, size=(RUNS, 400)).cumsum(axis=1)
    baseline = rng.binomial(180, 0.02, size=(RUNS, 400)).cumsum(axis=1)
    halted = 0
    for run in range(RUNS):
        for look in range(400):
            trials = 20 * (look + 1)
            result = compare(
                Arm(int(canary[run, look]), trials),
                Arm(int(baseline[run, look]), 9 * trials),
                DESIGN,
            )
            if result.outcome is not Outcome.WAIT:
                halted += result.outcome is Outcome.HALT
                break
        else:
            pytest.fail(f"run {run} neither passed nor halted in 400 looks")
    return halted / RUNS


def test_looking_every_tick_halts_good_canaries_at_most_alpha_of_the_time() -> None:
    assert _halt_rate(1.0, seed=16) <= DESIGN.alpha


def test_a_canary_twice_as_bad_halts_at_least_power_of_the_time() -> None:
    assert _halt_rate(2.0, seed=17) >= DESIGN.power


@pytest.mark.parametrize(
    ("arm", "design"),
    [
        (lambda: Arm(3, 2), None),
        (lambda: Arm(-1, 2), None),
        (None, lambda: Design(alpha=0.5)),
        (None, lambda: Design(power=1.0)),
        (None, lambda: Design(min_effect=1.0)),
    ],
)
def test_counts_and_designs_that_cannot_be_are_refused(arm: object, design: object) -> None:
    with pytest.raises(ValueError, match=r"expected|must be"):
        (arm or design)()  # type: ignore[operator]
    with pytest.raises(ValueError, match="share"):
        min_events(1.0, DESIGN)
