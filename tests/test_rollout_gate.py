"""The gate, pure: figures in, a verdict out. No database, no clock, no fleet.

Each case changes one figure of a wave that passes every check, so that exactly one
check fails, and asserts the verdict names that metric with its value and threshold.
The boundary cases put a figure exactly at its threshold, which passes: turning any
comparison around, or dropping any check, fails one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

from fleet.models import (
    Gate,
    GateMetric,
    GateOutcome,
    GateVerdict,
    HealthStats,
    RolloutDeviceState,
)
from fleet.rollouts import WaveCounts, check_failures, evaluate
from fleet.rollouts.gate import ModelQuality

GATE = Gate(
    min_healthy_ratio=0.9,
    max_failure_ratio=0.1,
    soak_s=60,
    deploy_timeout_s=600,
    max_error_rate_increase=0.02,
    max_fallback_rate_increase=0.05,
    max_latency_ratio=1.5,
    min_inferences=100,
    min_agreement=0.9,
)
COUNTS = WaveCounts(wave=2, members=10, healthy=10)
NEW = HealthStats(records=10, inferences=1000, errors=10, fallbacks=20, latency_p95_ms=12.0)
BASELINE = HealthStats(records=40, inferences=4000, errors=40, fallbacks=80, latency_p95_ms=10.0)
SHADOW_NEW = HealthStats(records=10, inferences=1000, shadow_compared=1000, shadow_agreed=950)

DEPLOY_METRICS = {
    GateMetric.FAILURE_RATIO,
    GateMetric.HEALTHY_RATIO,
    GateMetric.INFERENCES,
    GateMetric.ERROR_RATE,
    GateMetric.FALLBACK_RATE,
    GateMetric.LATENCY_P95_MS,
}
SHADOW_METRICS = {
    GateMetric.FAILURE_RATIO,
    GateMetric.HEALTHY_RATIO,
    GateMetric.INFERENCES,
    GateMetric.AGREEMENT,
}


@dataclass
class Case:
    """One wave: the passing one above, with the changes named."""

    counts: WaveCounts = COUNTS
    new: HealthStats = NEW
    baseline: HealthStats = BASELINE
    gate: dict[str, Any] = field(default_factory=dict)
    shadow: bool = False
    soaked_s: float = 60.0

    def verdict(self) -> GateVerdict:
        gate = GATE.model_copy(update=self.gate)
        return evaluate(
            self.counts,
            self.new,
            self.baseline,
            gate,
            shadow=self.shadow,
            soaked_s=self.soaked_s,
        )


def _stats(base: HealthStats, **changes: Any) -> HealthStats:
    return base.model_copy(update=changes)


TRIPS = {
    "failure ratio": (
        Case(
            counts=WaveCounts(wave=2, members=10, healthy=9, failed=1),
            gate={"max_failure_ratio": 0.05},
        ),
        GateMetric.FAILURE_RATIO,
        0.1,
        0.05,
        ["failure ratio 10.0% > max 5.0%", "1 of 10 devices failed"],
    ),
    "healthy ratio": (
        Case(counts=WaveCounts(wave=2, members=10, healthy=8)),
        GateMetric.HEALTHY_RATIO,
        0.8,
        0.9,
        ["healthy ratio 80.0% < min 90.0%", "8 of 10 devices healthy"],
    ),
    "error rate": (
        Case(new=_stats(NEW, errors=120)),
        GateMetric.ERROR_RATE,
        0.12,
        0.03,
        ["error rate 12.0% > max 3.0%", "previous version's 1.0% + 2.0% allowed"],
    ),
    "fallback rate": (
        Case(new=_stats(NEW, fallbacks=80)),
        GateMetric.FALLBACK_RATE,
        0.08,
        0.07,
        ["fallback rate 8.0% > max 7.0%", "previous version's 2.0% + 5.0% allowed"],
    ),
    "p95 latency": (
        Case(new=_stats(NEW, latency_p95_ms=16.0)),
        GateMetric.LATENCY_P95_MS,
        16.0,
        15.0,
        ["p95 latency 16.0 ms > max 15.0 ms", "1.5x the previous version's 10.0 ms"],
    ),
    "shadow agreement": (
        Case(new=_stats(SHADOW_NEW, shadow_agreed=850), shadow=True),
        GateMetric.AGREEMENT,
        0.85,
        0.9,
        ["agreement 85.0% < min 90.0%", "850 of 1000 predictions agreed"],
    ),
    "inferences, after waiting longer than soak and deploy timeout": (
        Case(new=_stats(NEW, inferences=99, errors=0, fallbacks=0), soaked_s=661),
        GateMetric.INFERENCES,
        99,
        100,
        ["inferences 99 < min 100", "661 s ago", "waits 660 s at most"],
    ),
}


@pytest.mark.parametrize(
    ("case", "metric", "value", "threshold", "words"), TRIPS.values(), ids=TRIPS
)
def test_each_check_fails_the_gate_alone(
    case: Case, metric: GateMetric, value: float, threshold: float, words: list[str]
) -> None:
    verdict = case.verdict()

    assert verdict.outcome is GateOutcome.FAILED
    assert verdict.waiting == ""
    [failure] = verdict.failures
    assert failure.metric is metric
    assert failure.value == pytest.approx(value)
    assert failure.threshold == pytest.approx(threshold)
    assert not failure.passed
    assert failure.reason.startswith(words[0])  # the metric's own name, first
    for text in words:
        assert text in failure.reason
    assert verdict.summary == failure.reason
    assert all(c.passed for c in verdict.checks if c is not failure)


def test_too_few_inferences_waits_and_names_the_count_and_what_is_needed() -> None:
    # at exactly soak_s + deploy_timeout_s it still waits; a second more fails (above)
    verdict = Case(new=_stats(NEW, inferences=99, errors=0, fallbacks=0), soaked_s=660).verdict()

    assert verdict.outcome is GateOutcome.WAITING
    assert verdict.failures == []
    [waiting] = [c for c in verdict.checks if not c.passed]
    assert (waiting.metric, waiting.value, waiting.threshold) == (GateMetric.INFERENCES, 99, 100)
    assert verdict.waiting == waiting.reason
    assert "inferences 99 < min 100" in verdict.waiting
    # health is not judged on too few inferences
    assert {c.metric for c in verdict.checks} == {
        GateMetric.FAILURE_RATIO,
        GateMetric.HEALTHY_RATIO,
        GateMetric.INFERENCES,
    }


def test_a_shadow_rollout_waits_for_compared_inferences_not_served_ones() -> None:
    new = _stats(SHADOW_NEW, inferences=5000, shadow_compared=40, shadow_agreed=40)
    verdict = Case(new=new, shadow=True).verdict()

    assert verdict.outcome is GateOutcome.WAITING
    assert "compared inferences 40 < min 100" in verdict.waiting


def test_a_failed_check_fails_the_gate_even_while_it_waits_for_inferences() -> None:
    verdict = Case(
        counts=WaveCounts(wave=2, members=10, healthy=8),
        new=_stats(NEW, inferences=10, errors=0, fallbacks=0),
    ).verdict()

    assert verdict.outcome is GateOutcome.FAILED
    assert [c.metric for c in verdict.failures] == [GateMetric.HEALTHY_RATIO]
    assert verdict.waiting  # still said, for the figures


def test_everything_passing_passes_with_every_check_made() -> None:
    deploy = Case().verdict()
    shadow = Case(new=SHADOW_NEW, shadow=True).verdict()

    for verdict, metrics in ((deploy, DEPLOY_METRICS), (shadow, SHADOW_METRICS)):
        assert verdict.outcome is GateOutcome.PASSED
        assert {c.metric for c in verdict.checks} == metrics
        assert all(c.passed for c in verdict.checks)
        assert (verdict.failures, verdict.waiting, verdict.wave) == ([], "", 2)
    assert deploy.new == NEW and deploy.baseline == BASELINE


BOUNDARIES = {
    "failure ratio": Case(counts=WaveCounts(wave=2, members=10, healthy=9, failed=1)),
    "healthy ratio": Case(counts=WaveCounts(wave=2, members=10, healthy=9)),
    "inferences": Case(new=_stats(NEW, inferences=100, errors=0, fallbacks=0)),
    # binary fractions, so that previous + allowed is exactly the new rate
    "error rate": Case(
        new=_stats(NEW, inferences=1024, errors=64),
        baseline=_stats(BASELINE, inferences=1024, errors=32),
        gate={"max_error_rate_increase": 0.03125},
    ),
    "fallback rate": Case(
        new=_stats(NEW, inferences=1024, errors=0, fallbacks=64),
        baseline=_stats(BASELINE, inferences=1024, fallbacks=32),
        gate={"max_fallback_rate_increase": 0.03125},
    ),
    "p95 latency": Case(new=_stats(NEW, latency_p95_ms=15.0)),
    "shadow agreement": Case(new=_stats(SHADOW_NEW, shadow_agreed=900), shadow=True),
}


@pytest.mark.parametrize("case", BOUNDARIES.values(), ids=BOUNDARIES)
def test_a_figure_exactly_at_its_threshold_does_not_fail(case: Case) -> None:
    verdict = case.verdict()

    assert verdict.outcome is not GateOutcome.FAILED, verdict.summary
    assert any(c.value == c.threshold for c in verdict.checks)


def test_the_error_rate_is_held_to_the_allowed_increase_alone_without_a_baseline() -> None:
    verdict = Case(new=_stats(NEW, errors=21), baseline=HealthStats()).verdict()

    [failure] = verdict.failures
    assert (failure.metric, failure.threshold) == (GateMetric.ERROR_RATE, 0.02)
    assert "no inferences from the previous version" in failure.reason
    # and latency, with nothing to compare with, is not judged
    assert GateMetric.LATENCY_P95_MS not in {c.metric for c in verdict.checks}


def test_the_failure_check_alone_judges_the_failure_ratio_at_any_time() -> None:
    passing = check_failures(WaveCounts(wave=0, members=10, failed=1), GATE)
    failing = check_failures(WaveCounts(wave=0, members=10, failed=2), GATE)

    assert passing.outcome is GateOutcome.PASSED
    assert failing.outcome is GateOutcome.FAILED
    [check] = failing.checks
    assert (check.metric, check.value, check.threshold) == (GateMetric.FAILURE_RATIO, 0.2, 0.1)
    assert failing.summary == "failure ratio 20.0% > max 10.0% (2 of 10 devices failed)"
    assert failing.new is None and failing.baseline is None


def test_a_verdict_survives_the_json_column() -> None:
    verdict = Case(new=_stats(NEW, errors=120)).verdict()
    stored = verdict.model_dump(mode="json")

    assert stored["outcome"] == "failed"
    assert stored["new"]["error_rate"] == pytest.approx(0.12)
    assert stored["checks"][0]["metric"] == "failure_ratio"
    again = GateVerdict.model_validate(stored)
    assert again == verdict and again.outcome is GateOutcome.FAILED


def test_counts_that_cannot_be_are_refused() -> None:
    with pytest.raises(ValueError, match="not a count of members"):
        WaveCounts(wave=0, members=2, healthy=2, failed=1)
    with pytest.raises(ValueError, match="no members"):
        check_failures(WaveCounts(wave=0, members=0), GATE)


def test_counts_are_taken_from_the_members_states() -> None:
    states = {
        RolloutDeviceState.HEALTHY: 4,
        RolloutDeviceState.FAILED: 1,
        RolloutDeviceState.IN_PROGRESS: 2,
        RolloutDeviceState.PENDING: 3,
    }
    counts = WaveCounts.of(3, states)

    assert counts == WaveCounts(wave=3, members=10, healthy=4, failed=1)
    assert counts.answered == 5
    assert WaveCounts.of(1, {}) == WaveCounts(wave=1, members=0, healthy=0, failed=0)


# --- compare: baseline, the sequential test ---------------------------------------------------

COMPARED = {"compare": "baseline", "alpha": 0.05, "power": 0.8, "min_effect": 2.0}
# 2 % errors and 4 % fallbacks in the previous version over the soak; the canary has 10 %
# of the inferences. alpha 0.05 is split over the two rates: 0.025 each.
SAME = HealthStats(records=20, inferences=2000, errors=40, fallbacks=80, latency_p95_ms=12.0)
PREVIOUS = HealthStats(
    records=180, inferences=18000, errors=360, fallbacks=720, latency_p95_ms=10.0
)
VS_BASELINE = {GateMetric.ERROR_RATE_VS_BASELINE, GateMetric.FALLBACK_RATE_VS_BASELINE}


def test_a_canary_with_twice_the_error_rate_fails_on_the_test_with_its_effect_and_p() -> None:
    verdict = Case(new=_stats(SAME, errors=80), baseline=PREVIOUS, gate=COMPARED).verdict()

    assert verdict.outcome is GateOutcome.FAILED
    [failure] = verdict.failures
    assert failure.metric is GateMetric.ERROR_RATE_VS_BASELINE
    assert (failure.bound, failure.threshold) == ("min", 0.025)
    assert failure.value < 0.025  # the always-valid p-value
    for text in ("error rate vs previous version: p", "< min 0.025", "mixture SPRT", "ratio 2.00x"):
        assert text in failure.reason
    # a fixed threshold of +2 points would have let it through: 4 % <= 2 % + 2 %
    assert Case(new=_stats(SAME, errors=80), baseline=PREVIOUS).verdict().outcome is (
        GateOutcome.PASSED
    )


def test_a_canary_with_no_change_passes_once_the_test_has_its_sample() -> None:
    verdict = Case(new=SAME, baseline=PREVIOUS, gate=COMPARED).verdict()

    assert verdict.outcome is GateOutcome.PASSED, verdict.summary
    metrics = {c.metric for c in verdict.checks}
    assert metrics >= VS_BASELINE
    assert not {GateMetric.ERROR_RATE, GateMetric.FALLBACK_RATE} & metrics  # replaced
    assert GateMetric.LATENCY_P95_MS in metrics  # still a threshold
    [errors] = [c for c in verdict.checks if c.metric is GateMetric.ERROR_RATE_VS_BASELINE]
    assert "no regression signal at the minimum sample" in errors.reason
    assert "needed to pass" in errors.reason


def test_a_small_wave_on_a_few_fallbacks_waits_and_says_how_many_events_it_needs() -> None:
    # 2.4x the fallbacks, on 19 of them: a threshold of +5 points fails it; the test waits
    new = _stats(SAME, inferences=200, errors=4, fallbacks=19)
    previous = _stats(PREVIOUS, inferences=1800, errors=36, fallbacks=72)
    verdict = Case(new=new, baseline=previous, gate=COMPARED).verdict()

    assert verdict.outcome is GateOutcome.WAITING
    assert "fallback rate vs previous version: too few events to pass" in verdict.waiting
    assert "91 events" in verdict.waiting and "needed to pass" in verdict.waiting
    assert "error rate vs previous version" in verdict.waiting
    assert not VS_BASELINE & {c.metric for c in verdict.checks}
    assert Case(new=new, baseline=previous).verdict().outcome is GateOutcome.FAILED


def test_past_its_patience_a_rate_the_test_cannot_decide_is_held_to_its_threshold() -> None:
    new = _stats(SAME, inferences=200, errors=4, fallbacks=19)
    previous = _stats(PREVIOUS, inferences=1800, errors=36, fallbacks=72)
    verdict = Case(new=new, baseline=previous, gate=COMPARED, soaked_s=661).verdict()

    assert verdict.outcome is GateOutcome.FAILED
    assert verdict.waiting == ""
    [failure] = verdict.failures
    assert failure.metric is GateMetric.FALLBACK_RATE
    assert failure.reason.startswith("fallback rate 9.5% > max 9.0%")
    assert "held to the threshold" in failure.reason and "mixture SPRT" in failure.reason


# --- drift and live accuracy --------------------------------------------------------------------

QUALITY = {
    "drift over its limit": (
        {"max_drift_psi": 0.2},
        ModelQuality(drift_psi=0.35),
        GateMetric.DRIFT_PSI,
        "input drift PSI 0.350 > max 0.200",
    ),
    "accuracy under its floor": (
        {"min_live_accuracy": 0.9, "min_labelled": 100},
        ModelQuality(labelled=200, correct=170),
        GateMetric.LIVE_ACCURACY,
        "live accuracy 85.0% < min 90.0% (170 of 200 labelled predictions right)",
    ),
}


@pytest.mark.parametrize(("gate", "quality", "metric", "reason"), QUALITY.values(), ids=QUALITY)
def test_drift_and_live_accuracy_fail_the_gate_when_it_sets_them(
    gate: dict[str, Any], quality: ModelQuality, metric: GateMetric, reason: str
) -> None:
    case = Case(gate=gate)
    verdict = evaluate(
        case.counts, NEW, BASELINE, GATE.model_copy(update=gate), shadow=False, soaked_s=60,
        quality=quality,
    )  # fmt: skip

    [failure] = verdict.failures
    assert failure.metric is metric
    assert failure.reason.startswith(reason)


NOT_JUDGED = {
    "no limits set": ({}, ModelQuality(drift_psi=9.0, labelled=500, correct=0)),
    "no drift score": ({"max_drift_psi": 0.2}, ModelQuality()),
    "too few labels": (
        {"min_live_accuracy": 0.9, "min_labelled": 100},
        ModelQuality(labelled=99, correct=0),
    ),
}


@pytest.mark.parametrize(("gate", "quality"), NOT_JUDGED.values(), ids=NOT_JUDGED)
def test_drift_and_accuracy_are_not_judged_without_a_limit_or_a_figure(
    gate: dict[str, Any], quality: ModelQuality
) -> None:
    verdict = evaluate(
        COUNTS, NEW, BASELINE, GATE.model_copy(update=gate), shadow=False, soaked_s=60,
        quality=quality,
    )  # fmt: skip

    assert verdict.outcome is GateOutcome.PASSED
    assert not {GateMetric.DRIFT_PSI, GateMetric.LIVE_ACCURACY} & {c.metric for c in verdict.checks}


def test_quality_figures_that_cannot_be_are_refused() -> None:
    with pytest.raises(ValueError, match="not a count of labels"):
        ModelQuality(labelled=1, correct=2)


@pytest.mark.parametrize(
    "spec",
    [
        {"compare": "bayesian"},
        {"alpha": 0},
        {"alpha": 0.5},
        {"power": 1.0},
        {"min_effect": 1.0},
        {"max_drift_psi": -1},
        {"min_live_accuracy": 1.5},
        {"compar": "baseline"},  # misspelt: would otherwise leave thresholds in force
    ],
    ids=str,
)
def test_a_gate_spec_out_of_range_or_misspelt_is_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Gate.model_validate(spec)
