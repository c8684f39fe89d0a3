"""A wave's gate, judged without I/O: figures in, a typed :class:`GateVerdict` out.

The engine gathers the inputs (the wave's member counts, the new version's and the
previous version's :class:`HealthStats`, how long the wave has soaked) and stores the
verdict; nothing here reads the database or the clock. Every threshold is inclusive: a
value exactly at it passes.

The checks, in order:

- ``failure_ratio``: failed members / members at most ``max_failure_ratio``. Judged at
  any time, deploying or soaking (:func:`check_failures`), and again in the full gate.
- ``healthy_ratio``: healthy members / members at least ``min_healthy_ratio``.
- ``inferences``: inferences the wave reported since its soak began (shadow: compared
  ones) at least ``min_inferences``. Below it the verdict waits, and fails once the wave
  has soaked longer than ``soak_s + deploy_timeout_s``.

and, once there are enough inferences:

- ``error_rate``, ``fallback_rate``: at most the previous version's rate plus
  ``max_error_rate_increase`` / ``max_fallback_rate_increase`` (0 without a baseline);
- ``latency_p95_ms``: at most ``max_latency_ratio`` times the previous version's;
- shadow rollouts instead: ``agreement`` at least ``min_agreement``.

With ``compare: baseline`` the error and fallback rates are judged instead by the
sequential test of :mod:`.sequential` against the previous version's devices over the
same window (``error_rate_vs_baseline``, ``fallback_rate_vs_baseline``: its always-valid
p-value at least ``alpha`` / 2, one half per rate). Until the test has its minimum sample
the verdict waits; past ``soak_s + deploy_timeout_s`` without it (rates too low to tell
apart), the rate falls back to its ``threshold`` check, and the reason says so.

When the engine read them (:class:`ModelQuality`, :mod:`.quality`): ``drift_psi`` at most
``max_drift_psi``, and ``live_accuracy`` at least ``min_live_accuracy`` once
``min_labelled`` labels came; both unset by default, and not judged.

A figure nobody reported (no inferences, no latency, no baseline latency) is not judged.

The verdict's types (``GateVerdict``, ``GateCheck``, ``HealthStats``) live in
``fleet.models`` beside ``RolloutPublic``, which returns them: the models cannot import
this package, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..models import (
    Gate,
    GateCheck,
    GateMetric,
    GateVerdict,
    HealthStats,
    RolloutDeviceState,
)
from .sequential import Arm, Design, Outcome, compare

__all__ = ["ModelQuality", "WaveCounts", "check_failures", "evaluate"]


@dataclass(frozen=True)
class WaveCounts:
    """How many of one wave's members there are, and how many answered healthy or failed."""

    wave: int
    members: int
    healthy: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        if min(self.healthy, self.failed) < 0 or self.healthy + self.failed > self.members:
            raise ValueError(
                f"wave {self.wave}: {self.healthy} healthy and {self.failed} failed of "
                f"{self.members} members is not a count of members"
            )

    @classmethod
    def of(cls, wave: int, states: Mapping[RolloutDeviceState, int]) -> WaveCounts:
        """From the number of members in each state."""
        return cls(
            wave=wave,
            members=sum(states.values()),
            healthy=states.get(RolloutDeviceState.HEALTHY, 0),
            failed=states.get(RolloutDeviceState.FAILED, 0),
        )

    @property
    def answered(self) -> int:
        return self.healthy + self.failed


@dataclass(frozen=True)
class ModelQuality:
    """What the new version's model shows in the field, from the wave's devices: its input
    drift score (``None``: no reference or no summaries) and its ground-truth labels."""

    drift_psi: float | None = None
    labelled: int = 0
    correct: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.labelled:
            raise ValueError(
                f"{self.correct} correct of {self.labelled} labelled is not a count of labels"
            )


def check_failures(counts: WaveCounts, gate: Gate) -> GateVerdict:
    """The check that applies at any time: the share of the wave's devices that failed."""
    return GateVerdict(wave=counts.wave, checks=[_failure_ratio(counts, gate)])


def evaluate(
    counts: WaveCounts,
    new: HealthStats,
    baseline: HealthStats,
    gate: Gate,
    *,
    shadow: bool,
    soaked_s: float,
    quality: ModelQuality | None = None,
) -> GateVerdict:
    """The full gate, for a wave that has soaked ``soaked_s`` seconds (at least
    ``gate.soak_s``). ``new``: the new version's telemetry from the wave's members since
    the soak began; ``baseline``: the previous version's, from the rollout's members
    (with ``compare: baseline``, over the same window); ``quality``: drift and labels."""
    checks = [_failure_ratio(counts, gate), _healthy_ratio(counts, gate)]
    seen = new.shadow_compared if shadow else new.inferences
    patience_s = gate.soak_s + gate.deploy_timeout_s
    waited = (
        f"reported since the soak began {soaked_s:.0f} s ago; "
        f"the gate waits {patience_s:.0f} s at most"
    )
    inferences = _check(
        GateMetric.INFERENCES,
        seen,
        gate.min_inferences,
        "min",
        label="compared inferences" if shadow else "inferences",
        shown="{:.0f}".format,
        detail=waited,
    )
    checks.append(inferences)
    waiting = ""
    if not inferences.passed:
        if soaked_s <= patience_s:
            waiting = inferences.reason
    elif shadow:
        checks += _agreement(new, gate)
    elif gate.compare == "baseline":
        rates, undecided = _compared(new, baseline, gate, patient=soaked_s <= patience_s)
        checks += rates + _latency(new, baseline, gate)
        waiting = "; ".join(undecided)
    else:
        checks += _health(new, baseline, gate)
    if quality is not None:
        checks += _quality(quality, gate)
    return GateVerdict(wave=counts.wave, checks=checks, waiting=waiting, new=new, baseline=baseline)


def _failure_ratio(counts: WaveCounts, gate: Gate) -> GateCheck:
    return _check(
        GateMetric.FAILURE_RATIO,
        _share(counts.failed, counts),
        gate.max_failure_ratio,
        "max",
        label="failure ratio",
        shown="{:.1%}".format,
        detail=f"{counts.failed} of {counts.members} devices failed",
    )


def _healthy_ratio(counts: WaveCounts, gate: Gate) -> GateCheck:
    return _check(
        GateMetric.HEALTHY_RATIO,
        _share(counts.healthy, counts),
        gate.min_healthy_ratio,
        "min",
        label="healthy ratio",
        shown="{:.1%}".format,
        detail=f"{counts.healthy} of {counts.members} devices healthy",
    )


def _agreement(new: HealthStats, gate: Gate) -> list[GateCheck]:
    if new.agreement is None:
        return []
    check = _check(
        GateMetric.AGREEMENT,
        new.agreement,
        gate.min_agreement,
        "min",
        label="agreement",
        shown="{:.1%}".format,
        detail=f"{new.shadow_agreed} of {new.shadow_compared} predictions agreed",
    )
    return [check]


def _compared(
    new: HealthStats, baseline: HealthStats, gate: Gate, *, patient: bool
) -> tuple[list[GateCheck], list[str]]:
    """Error and fallback rates by the sequential test: the checks it decided, and why
    the others still wait. Once the gate's patience is spent, a rate the test cannot yet
    decide is held to its fixed threshold instead."""
    design = Design(alpha=gate.alpha / len(_COMPARED), power=gate.power, min_effect=gate.min_effect)
    checks, undecided = [], []
    for rate in _COMPARED:
        canary, previous = rate.arm(new), rate.arm(baseline)
        comparison = compare(canary, previous, design)
        label = rate.threshold_metric.value.replace("_", " ")
        if comparison.outcome is not Outcome.WAIT:
            passed = comparison.outcome is Outcome.PASS
            checks.append(
                GateCheck(
                    metric=rate.metric,
                    value=comparison.p_value,
                    threshold=design.alpha,
                    bound="min",
                    passed=passed,
                    reason=f"{label} vs previous version: p {comparison.p_value:.2g} "
                    f"{_OPERATOR['min', passed]} min {design.alpha:g} "
                    f"({comparison.test}: {comparison.reason})",
                )
            )
        elif patient:
            undecided.append(f"{label} vs previous version: {comparison.reason}")
        elif canary.rate is not None:
            held = _rate(rate.threshold_metric, canary.rate, previous.rate, rate.allowed(gate))
            reason = (
                f"{held.reason}; held to the threshold, the {comparison.test} could not "
                f"decide in time: {comparison.reason}"
            )
            checks.append(held.model_copy(update={"reason": reason}))
    return checks, undecided


@dataclass(frozen=True)
class _ComparedRate:
    """A rate ``compare: baseline`` tests: the test's metric, the rate's fixed-threshold
    metric and allowed increase, and which count of a :class:`HealthStats` it is."""

    metric: GateMetric
    threshold_metric: GateMetric
    events: Literal["errors", "fallbacks"]

    def arm(self, stats: HealthStats) -> Arm:
        return Arm(getattr(stats, self.events), stats.inferences)

    def allowed(self, gate: Gate) -> float:
        return float(getattr(gate, f"max_{self.threshold_metric.value}_increase"))


_COMPARED = (
    _ComparedRate(GateMetric.ERROR_RATE_VS_BASELINE, GateMetric.ERROR_RATE, "errors"),
    _ComparedRate(GateMetric.FALLBACK_RATE_VS_BASELINE, GateMetric.FALLBACK_RATE, "fallbacks"),
)


def _quality(quality: ModelQuality, gate: Gate) -> list[GateCheck]:
    """Drift and live accuracy, where the gate sets a limit and the figure exists."""
    checks = []
    if gate.max_drift_psi is not None and quality.drift_psi is not None:
        checks.append(
            _check(
                GateMetric.DRIFT_PSI,
                quality.drift_psi,
                gate.max_drift_psi,
                "max",
                label="input drift PSI",
                shown="{:.3f}".format,
                detail="the new version's inputs against its reference profile",
            )
        )
    if gate.min_live_accuracy is not None and quality.labelled >= max(gate.min_labelled, 1):
        checks.append(
            _check(
                GateMetric.LIVE_ACCURACY,
                quality.correct / quality.labelled,
                gate.min_live_accuracy,
                "min",
                label="live accuracy",
                shown="{:.1%}".format,
                detail=f"{quality.correct} of {quality.labelled} labelled predictions right",
            )
        )
    return checks


def _health(new: HealthStats, baseline: HealthStats, gate: Gate) -> list[GateCheck]:
    """Error rate, fallback rate and p95 latency against the previous version's."""
    checks = []
    if new.error_rate is not None:
        checks.append(
            _rate(
                GateMetric.ERROR_RATE,
                new.error_rate,
                baseline.error_rate,
                gate.max_error_rate_increase,
            )
        )
    if new.fallback_rate is not None:
        checks.append(
            _rate(
                GateMetric.FALLBACK_RATE,
                new.fallback_rate,
                baseline.fallback_rate,
                gate.max_fallback_rate_increase,
            )
        )
    return checks + _latency(new, baseline, gate)


def _latency(new: HealthStats, baseline: HealthStats, gate: Gate) -> list[GateCheck]:
    checks = []
    if new.latency_p95_ms is not None and baseline.latency_p95_ms:
        checks.append(
            _check(
                GateMetric.LATENCY_P95_MS,
                new.latency_p95_ms,
                baseline.latency_p95_ms * gate.max_latency_ratio,
                "max",
                label="p95 latency",
                shown="{:.1f} ms".format,
                detail=f"{gate.max_latency_ratio:g}x the previous version's "
                f"{baseline.latency_p95_ms:.1f} ms",
            )
        )
    return checks


def _rate(metric: GateMetric, new: float, previous: float | None, allowed: float) -> GateCheck:
    if previous is None:
        detail = f"no inferences from the previous version: 0.0% + {allowed:.1%} allowed"
    else:
        detail = f"previous version's {previous:.1%} + {allowed:.1%} allowed"
    return _check(
        metric,
        new,
        (previous or 0.0) + allowed,
        "max",
        label=metric.value.replace("_", " "),
        shown="{:.1%}".format,
        detail=detail,
    )


def _share(part: int, counts: WaveCounts) -> float:
    if not counts.members:
        raise ValueError(f"wave {counts.wave} has no members: there is nothing to judge")
    return part / counts.members


_OPERATOR = {("max", True): "<=", ("max", False): ">", ("min", True): ">=", ("min", False): "<"}


def _check(
    metric: GateMetric,
    value: float,
    threshold: float,
    bound: Literal["max", "min"],
    *,
    label: str,
    shown: Callable[[float], str],
    detail: str,
) -> GateCheck:
    passed = value <= threshold if bound == "max" else value >= threshold
    operator = _OPERATOR[bound, passed]
    return GateCheck(
        metric=metric,
        value=value,
        threshold=threshold,
        bound=bound,
        passed=passed,
        reason=f"{label} {shown(value)} {operator} {bound} {shown(threshold)} ({detail})",
    )
