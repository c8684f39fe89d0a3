"""``agent.telemetry``'s arithmetic in one process, fast: what :class:`InferenceStats` makes of
the outcomes it sees (counts per bundle pair, latency percentiles and histogram, predictions,
truth), the checks on an :class:`InferenceOutcome`, and how a batch is cut to fit a payload.
The sender over a real broker is in tests/test_agent_telemetry.py. ``make mutate`` runs these
(.ci/mutate.py)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest

from agent.telemetry import (
    FALLBACK_REASONS,
    LATENCY_BUCKETS_MS,
    InferenceOutcome,
    InferenceStats,
    _fit,
    _percentile,
)
from contracts.bounded import MAX_MILLISECONDS
from contracts.mqtt import MAX_PAYLOAD_BYTES, TelemetryBatch, TelemetryRecord

V1, V2, SHADOW = "digits-host-1.0.0", "digits-host-1.1.0", "digits-host-2.0.0"


def _outcome(**fields: Any) -> InferenceOutcome:
    values: dict[str, Any] = {
        "bundle": V1,
        "served_by": "local",
        "latency_ms": 3.0,
        "local_error": False,
        "fallback_reason": None,
        "predicted_class": 7,
    }
    return InferenceOutcome(**(values | fields))


def test_an_idle_interval_reports_nothing() -> None:
    stats = InferenceStats()
    assert stats.report() == []
    stats.observe(_outcome())
    assert len(stats.report()) == 1
    assert stats.report() == []  # the interval started over


def test_one_record_per_bundle_pair_with_its_own_counts() -> None:
    stats = InferenceStats()
    before = time.time()
    stats.observe(_outcome(latency_ms=1.0, predicted_class=3))
    stats.observe(
        _outcome(
            latency_ms=4.0,
            local_error=True,
            predicted_class=None,
            served_by="cloud",
            fallback_reason="error",
        )
    )
    stats.observe(
        _outcome(latency_ms=2.0, served_by="cloud", fallback_reason="confidence", predicted_class=3)
    )
    stats.observe(
        _outcome(
            bundle=V2,
            latency_ms=700.0,
            served_by="none",
            fallback_reason="no_model",
            predicted_class=None,
        )
    )
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=True, predicted_class=1))
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=False, predicted_class=1))
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=None, predicted_class=12))
    records = {(r.bundle, r.shadow_bundle): r for r in stats.report()}
    assert set(records) == {(V1, None), (V2, None), (V1, SHADOW)}
    plain = records[(V1, None)]
    assert (plain.inferences, plain.errors, plain.fallbacks) == (3, 1, 2)
    assert (plain.shadow_compared, plain.shadow_agreed) == (0, 0)
    assert plain.latency_p50_ms == 2.0
    assert plain.latency_p95_ms == pytest.approx(3.8)
    assert plain.extra["predictions"] == {"3": 2}
    assert plain.extra["served_by"] == {"local": 1, "cloud": 2}
    assert plain.extra["fallback_reasons"] == {"error": 1, "confidence": 1}
    assert plain.extra["latency_histogram_ms"] == {
        "edges": list(LATENCY_BUCKETS_MS),
        "counts": [1, 1, 1] + [0] * (len(LATENCY_BUCKETS_MS) - 2),
    }
    assert "truth" not in plain.extra and "drift" not in plain.extra
    assert before <= plain.ts <= time.time()
    other = records[(V2, None)]
    assert (other.inferences, other.errors, other.fallbacks) == (1, 0, 1)
    assert other.latency_p50_ms == other.latency_p95_ms == 700.0
    assert other.extra["served_by"] == {"none": 1}
    assert other.extra["predictions"] == {}
    assert other.extra["latency_histogram_ms"]["counts"][9] == 1  # 500 < 700 <= 1000
    shadowed = records[(V1, SHADOW)]
    assert (shadowed.inferences, shadowed.shadow_compared, shadowed.shadow_agreed) == (3, 2, 1)
    assert shadowed.extra["predictions"] == {"1": 2, "12": 1}  # sorted by class, not text
    assert list(shadowed.extra["predictions"]) == ["1", "12"]
    assert len({r.id for r in records.values()}) == 3
    assert all(len(r.id) == 32 for r in records.values())
    TelemetryBatch(records=list(records.values()))  # what the fleet accepts


def test_latencies_fall_in_the_bucket_whose_edge_they_do_not_pass() -> None:
    stats = InferenceStats()
    for latency in (0.0, 1.0, 1.5, 5000.0, 5000.1, 1e6):
        stats.observe(_outcome(latency_ms=latency))
    (record,) = stats.report()
    counts = record.extra["latency_histogram_ms"]["counts"]
    assert len(counts) == len(LATENCY_BUCKETS_MS) + 1
    assert counts[0] == 2 and counts[1] == 1  # <= 1 ms, then (1, 2]
    assert counts[len(LATENCY_BUCKETS_MS) - 1] == 1  # (2000, 5000]
    assert counts[-1] == 2  # slower than every edge
    assert sum(counts) == 6


def test_a_call_that_hung_past_a_day_counts_as_a_day_and_the_record_is_still_made() -> None:
    stats = InferenceStats()
    for latency in (2.0, 1e12):
        stats.observe(_outcome(latency_ms=latency))
    (record,) = stats.report()
    assert record.inferences == 2
    assert record.latency_p95_ms == pytest.approx(0.95 * MAX_MILLISECONDS, rel=0.06)


def test_truth_is_counted_with_the_bundles_inferences() -> None:
    stats = InferenceStats()
    stats.observe(_outcome(shadow_bundle=SHADOW, shadow_agreed=True))
    stats.observe_truth(V1, correct=True)
    stats.observe_truth(V1, correct=False)
    stats.observe_truth(V1, correct=True)
    stats.observe_truth(V2, correct=False)
    records = {(r.bundle, r.shadow_bundle): r for r in stats.report()}
    assert set(records) == {(V1, SHADOW), (V2, None)}
    assert records[(V1, SHADOW)].extra["truth"] == {"labelled": 3, "correct": 2}
    assert records[(V1, SHADOW)].inferences == 1
    lone = records[(V2, None)]
    assert lone.extra["truth"] == {"labelled": 1, "correct": 0}
    assert (lone.inferences, lone.latency_p50_ms, lone.latency_p95_ms) == (0, None, None)


def test_past_the_sample_cap_latencies_are_a_uniform_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agent.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_MAX_LATENCY_SAMPLES", 100)
    stats = InferenceStats()
    for n in range(1000):  # the first half fast, the second half slow
        stats.observe(_outcome(latency_ms=1.0 if n < 500 else 100.0))
    (record,) = stats.report()
    assert record.inferences == 1000
    assert sum(record.extra["latency_histogram_ms"]["counts"]) == 1000
    # a reservoir keeps later samples too: the median is not stuck on the first 100
    assert record.latency_p95_ms == 100.0
    kept = stats._tallies  # reset by report
    assert kept == {}


def test_percentiles_interpolate_as_numpy_does() -> None:
    assert _percentile([], 0.5) is None
    assert _percentile([4.0], 0.95) == 4.0
    for values in ([1.0, 2.0], [1.0, 2.0, 3.0, 10.0], [float(v) for v in range(1, 21)], [0.5] * 3):
        for q in (0.0, 0.5, 0.95, 1.0):
            expected = float(np.percentile(values, q * 100))
            assert _percentile(values, q) == pytest.approx(expected), (values, q)
    assert _percentile([1.0, 2.0, 3.0, 10.0], 0.95) == pytest.approx(8.95)
    assert _percentile([1.0, 3.0], 0.5) == 2.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"served_by": "edge"}, "served_by must be one of ('local', 'cloud', 'none'), got 'edge'"),
        (
            {"fallback_reason": "slow"},
            f"fallback_reason must be one of {sorted(FALLBACK_REASONS)} or None, got 'slow'",
        ),
        ({"latency_ms": -0.5}, "latency_ms must be a finite number >= 0, got -0.5"),
        ({"latency_ms": math.inf}, "latency_ms must be a finite number >= 0, got inf"),
        ({"latency_ms": math.nan}, "latency_ms must be a finite number >= 0, got nan"),
    ],
)
def test_an_outcome_that_makes_no_sense_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        _outcome(**fields)
    assert str(raised.value) == message


def test_every_fallback_reason_and_zero_latency_are_accepted() -> None:
    for reason in FALLBACK_REASONS:
        assert _outcome(fallback_reason=reason, latency_ms=0.0).fallback_reason == reason
    assert {"no_model", "error", "latency", "confidence"} == FALLBACK_REASONS


def _sized(n: int, extra_bytes: int) -> TelemetryRecord:
    return TelemetryRecord(id=f"r{n}", ts=1.0, extra={"p": "x" * extra_bytes})


def test_a_batch_is_cut_to_the_longest_prefix_that_fits_a_payload() -> None:
    small = [_sized(n, 10) for n in range(5)]
    assert _fit(small) == small
    assert _fit([]) == []
    big = [_sized(n, 200_000) for n in range(40)]
    kept = _fit(big)
    assert 0 < len(kept) < len(big) and kept == big[: len(kept)]
    size = len(TelemetryBatch(records=kept).model_dump_json(exclude_defaults=True).encode())
    assert size <= MAX_PAYLOAD_BYTES
    one_more = TelemetryBatch(records=big[: len(kept) + 1])
    assert len(one_more.model_dump_json(exclude_defaults=True).encode()) > MAX_PAYLOAD_BYTES


def _json_bytes(records: list[TelemetryRecord]) -> int:
    return len(TelemetryBatch(records=records).model_dump_json(exclude_defaults=True).encode())


def test_a_batch_that_fits_to_the_byte_is_kept_whole() -> None:
    base = 100_000  # an extra string may hold 256 KiB: room for the padding
    records = [_sized(n, base) for n in range(MAX_PAYLOAD_BYTES // (base + 100))]
    pad = MAX_PAYLOAD_BYTES - _json_bytes(records)
    assert 0 < pad < base
    exact = [*records[:-1], _sized(len(records) - 1, base + pad)]
    assert _json_bytes(exact) == MAX_PAYLOAD_BYTES
    assert _fit(exact) == exact
    over = [*records[:-1], _sized(len(records) - 1, base + pad + 1)]
    assert _fit(over) == records[:-1]
