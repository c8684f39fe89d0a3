"""Is the canary's event rate higher than its baseline's? A sequential test, pure: counts in,
a :class:`Comparison` out. No I/O, no clock, no state kept between looks.

The canary (the new version on the wave's devices) and the baseline (the previous version
on the rollout's devices still serving it, over the same window) each report ``events``
(errors, fallbacks) in ``trials`` (inferences). Rare events over many trials are Poisson
counts; given the total ``k`` of events in both arms, the canary's share of them is
binomial, ``Bin(k, π)``, with ``π = θf / (θf + 1 - f)`` where ``f`` is the canary's share
of the trials and ``θ`` the ratio of its rate to the baseline's: ``π = f`` when nothing
changed. This is the conditional test of two Poisson rates (Przyborowski & Wilenski, 1940).

Each gate evaluation is a look at the counts so far, and a rollout looks every tick. A
fixed-sample test looked at that often would halt good canaries far more often than its
``alpha``; so the evidence is a **mixture sequential probability ratio test** (mSPRT,
Robbins' method of mixtures): the likelihood of ``π`` averaged over a Beta prior centred
on ``f``, over the likelihood at ``f``. Under no change this Bayes factor is a martingale,
so by Ville's inequality it ever reaches ``1/alpha`` with probability at most ``alpha``,
however often it is looked at: ``1/factor`` is an always-valid p-value (Johari, Koomen,
Pekelis & Walsh, "Always Valid Inference", 2022; for deployments, Lindon, Sanden &
Shirikian, "Rapid Regression Detection in Software Deployments through Sequential
Testing", KDD 2022). The prior's spread matches the smallest regression worth detecting,
``min_effect``, where the test is most powerful. Only a higher canary rate halts; the
Bayes factor is two-sided, so the one-sided false-halt rate stays under ``alpha``.

The guarantee is exact while ``f`` stays put (both arms' trials grow in proportion, as
over a shared window); the module takes ``f`` from the counts at each look.

Verdicts, in order:

- ``halt``: the canary's rate is higher and the always-valid p-value is below ``alpha``
  (at any look, however early);
- ``wait``: fewer events than :func:`min_events` (or no trials in an arm);
- ``pass``: at least :func:`min_events` events and no regression signal. ``min_events``
  is the least ``k`` at which the test, looked at only then, halts a canary ``min_effect``
  times worse with probability ``power``; looks before it add to that, so at least
  ``power`` of such canaries halt before they could pass.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

__all__ = [
    "TEST_NAME",
    "Arm",
    "Comparison",
    "Design",
    "Outcome",
    "compare",
    "min_events",
]

TEST_NAME = "mixture SPRT on the conditional binomial"

_MAX_EVENTS = 10_000_000
"""Beyond this many events, :func:`min_events` stops looking (a share of trials so lopsided
that no count of events tells the arms apart) and the test never passes."""


class Outcome(enum.StrEnum):
    HALT = "halt"
    PASS = "pass"
    WAIT = "wait"


@dataclass(frozen=True)
class Arm:
    """``events`` (errors, fallbacks) in ``trials`` (inferences)."""

    events: int
    trials: int

    def __post_init__(self) -> None:
        if not 0 <= self.events <= self.trials:
            raise ValueError(
                f"{self.events} events in {self.trials} trials: expected 0 <= events <= trials"
            )

    @property
    def rate(self) -> float | None:
        return self.events / self.trials if self.trials else None


@dataclass(frozen=True)
class Design:
    """What the test is built to tell apart.

    ``alpha``: the most often it may halt a canary no worse than its baseline, however
    often it looks; ``power``: how often it must halt one ``min_effect`` times worse (the
    ratio of the canary's rate to the baseline's) before passing it."""

    alpha: float = 0.05
    power: float = 0.8
    min_effect: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0.5 <= self.power < 1:
            raise ValueError(f"power must be in [0.5, 1), got {self.power}")
        if not 1 < self.min_effect <= 1000:
            raise ValueError(f"min_effect must be a ratio in (1, 1000], got {self.min_effect}")


@dataclass(frozen=True)
class Comparison:
    """One look: the outcome, why, and the figures behind it."""

    outcome: Outcome
    reason: str
    """The effect, the evidence and the sample, in words."""
    events: int
    """Events in both arms: the sample the test has."""
    min_events: int | None
    """Events needed before it may pass (``None`` without trials in an arm)."""
    p_value: float
    """Always-valid p-value for "the canary's rate is higher" (1 when it is not)."""
    ratio: float | None
    """Canary rate / baseline rate (``inf`` when only the canary had events)."""
    difference: float | None
    """Canary rate - baseline rate."""
    test: str = TEST_NAME


def compare(canary: Arm, baseline: Arm, design: Design) -> Comparison:
    """The verdict of one look at the two arms' counts so far."""
    difference = (
        canary.rate - baseline.rate
        if canary.rate is not None and baseline.rate is not None
        else None
    )
    ratio = _ratio(canary, baseline)
    k = canary.events + baseline.events
    if not canary.trials or not baseline.trials:
        missing = "the canary" if not canary.trials else "the baseline"
        return Comparison(Outcome.WAIT, f"no trials from {missing} yet", k, None, 1.0, ratio, None)
    share = canary.trials / (canary.trials + baseline.trials)
    needed = min_events(share, design)
    higher = canary.events * baseline.trials > baseline.events * canary.trials
    p_value = (
        min(1.0, math.exp(-_log_bayes_factor(canary.events, baseline.events, share, design)))
        if higher
        else 1.0
    )
    effect = _effect(canary, baseline, ratio)
    sample = f"{k} events, {needed} needed to pass"
    if higher and p_value < design.alpha:
        reason = f"regression: {effect}; p = {p_value:.2g} < alpha {design.alpha:g} ({sample})"
        return Comparison(Outcome.HALT, reason, k, needed, p_value, ratio, difference)
    evidence = f"{effect}; p = {p_value:.2g}, halts below alpha {design.alpha:g}"
    if k < needed or needed >= _MAX_EVENTS:
        reason = f"too few events to pass: {evidence} ({sample})"
        return Comparison(Outcome.WAIT, reason, k, needed, p_value, ratio, difference)
    reason = (
        f"no regression signal at the minimum sample: {evidence} ({sample}; "
        f"a {design.min_effect:g}x regression halts before this with probability "
        f">= {design.power:g})"
    )
    return Comparison(Outcome.PASS, reason, k, needed, p_value, ratio, difference)


def min_events(share: float, design: Design) -> int:
    """The least total of events ``k`` at which one look halts a canary ``min_effect``
    times worse with probability ``power``, when the canary has ``share`` of the trials.

    Found by doubling then bisection over ``k``; the power at one ``k`` is an exact
    binomial tail beyond the first canary count whose evidence reaches ``1/alpha``.
    """
    if not 0 < share < 1:
        raise ValueError(f"the canary's share of trials must be in (0, 1), got {share}")
    # rounded to 3 significant digits (of the smaller of share and 1 - share), so that
    # looks whose shares barely differ share one search
    if share <= 0.5:
        return _min_events(float(f"{share:.3g}"), design)
    return _min_events(1 - float(f"{1 - share:.3g}"), design)


@functools.lru_cache(maxsize=4096)
def _min_events(share: float, design: Design) -> int:
    low, high = 0, 8
    while _power(high, share, design) < design.power:
        low, high = high, high * 2
        if high > _MAX_EVENTS:
            return _MAX_EVENTS
    while high - low > 1:
        middle = (low + high) // 2
        if _power(middle, share, design) >= design.power:
            high = middle
        else:
            low = middle
    return high


def _power(k: int, share: float, design: Design) -> float:
    """P(one look at ``k`` events halts) for a canary ``min_effect`` times worse."""
    threshold = math.log(1 / design.alpha)
    first = math.floor(k * share) + 1  # the canary's events must exceed its share to halt
    if first > k or _log_bayes_factor(k, 0, share, design) < threshold:
        return 0.0
    low, high = first, k  # evidence grows with the canary's count above its share
    while low < high:
        middle = (low + high) // 2
        if _log_bayes_factor(middle, k - middle, share, design) >= threshold:
            high = middle
        else:
            low = middle + 1
    return _binomial_tail(low, k, _regressed_share(share, design.min_effect))


def _binomial_tail(first: int, k: int, p: float) -> float:
    """P(X >= first) for X ~ Bin(k, p), summed from the mode outwards until negligible."""
    log_p, log_q = math.log(p), math.log1p(-p)

    def term(x: int) -> float:
        log_choose = math.lgamma(k + 1) - math.lgamma(x + 1) - math.lgamma(k - x + 1)
        return math.exp(log_choose + x * log_p + (k - x) * log_q)

    start = max(first, math.floor((k + 1) * p))
    total = 0.0
    for x in range(start, k + 1):  # from the mode (or first) up
        value = term(x)
        total += value
        if value < 1e-15 * total:
            break
    for x in range(start - 1, first - 1, -1):  # from the mode down to first
        value = term(x)
        total += value
        if value < 1e-15 * total:
            break
    return min(total, 1.0)


def _regressed_share(share: float, ratio: float) -> float:
    """The canary's share of events when its rate is ``ratio`` times the baseline's."""
    return ratio * share / (ratio * share + 1 - share)


def _log_bayes_factor(canary: int, baseline: int, share: float, design: Design) -> float:
    """log of the Beta-mixture likelihood of the canary's count over the likelihood at
    ``share`` (no change). The Beta prior has mean ``share`` and a standard deviation of
    the distance from ``share`` to the share a ``min_effect`` regression would take."""
    gap = _regressed_share(share, design.min_effect) - share
    concentration = max(share * (1 - share) / gap**2 - 1, 1.0)
    a, b = concentration * share, concentration * (1 - share)
    return (
        _log_beta(canary + a, baseline + b)
        - _log_beta(a, b)
        - canary * math.log(share)
        - baseline * math.log1p(-share)
    )


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _ratio(canary: Arm, baseline: Arm) -> float | None:
    if canary.rate is None or baseline.rate is None:
        return None
    if baseline.rate == 0:
        return math.inf if canary.rate else None
    return canary.rate / baseline.rate


def _effect(canary: Arm, baseline: Arm, ratio: float | None) -> str:
    shown = "n/a" if ratio is None else "inf" if math.isinf(ratio) else f"{ratio:.2f}x"
    return (
        f"{canary.events}/{canary.trials} = {canary.rate:.2%} vs the baseline's "
        f"{baseline.events}/{baseline.trials} = {baseline.rate:.2%} "
        f"(ratio {shown}, difference {((canary.rate or 0) - (baseline.rate or 0)) * 100:+.2f} "
        "points)"
    )
