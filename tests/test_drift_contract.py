"""The drift contract (``contracts/drift.py``): strict reference files, mergeable bounded
summaries, scores that are zero on the reference and grow with a shift. In-process only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contracts.bounded import MAX_COUNT
from contracts.drift import (
    DRIFT_REFERENCE_SCHEMA,
    MAX_EDGES,
    MIN_COUNT,
    OTHER_CLASS,
    OUTPUT_NORM,
    PSI_ALERT,
    TRACKED_CLASSES,
    VALUES_PER_FEATURE,
    DriftSummary,
    FeatureReference,
    ReferenceProfile,
    SummaryBuilder,
    binned_wasserstein,
    input_features,
    psi,
    psi_noise,
    reference_from_samples,
    score,
)
from contracts.errors import ContractError, DriftError
from contracts.mqtt import TelemetryBatch, TelemetryRecord, encode_telemetry


def _reference(*, classes: int = 10, seed: int = 0) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(256, 3, 16, 16)).astype(np.float32)
    scores = rng.normal(size=(256, classes))
    return reference_from_samples({"image": images}, scores, classifier=True)


def _fed(
    reference: ReferenceProfile, inferences: int, *, shift: float = 0.0, seed: int = 1
) -> DriftSummary:
    rng = np.random.default_rng(seed)
    builder = SummaryBuilder(reference)
    classes = len(reference.classes or [1])
    for _ in range(inferences):
        image = rng.normal(loc=shift, size=(1, 3, 16, 16)).astype(np.float32)
        builder.add({"image": image}, None, int(rng.integers(classes)))
    return builder.summary()


def _summary(seed: int) -> DriftSummary:
    rng = np.random.default_rng(seed)
    return DriftSummary(
        count=int(rng.integers(0, 1000)),
        features={
            "a": [int(v) for v in rng.integers(0, 1000, size=5)],
            **({"b": [int(v) for v in rng.integers(0, 9, size=3)]} if seed % 2 else {}),
        },
        classes={int(k): int(rng.integers(1, 50)) for k in rng.integers(-1, 16, size=4)},
    )


def test_merge_is_associative_and_commutative_and_adds_counts() -> None:
    a, b, c = _summary(1), _summary(2), _summary(3)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(b) == b.merge(a)
    merged = a.merge(b)
    assert merged.count == a.count + b.count
    assert merged.features["a"] == [
        x + y for x, y in zip(a.features["a"], b.features["a"], strict=True)
    ]
    assert merged.features["b"] == a.features["b"]
    for key in set(a.classes) | set(b.classes):
        assert merged.classes[key] == a.classes.get(key, 0) + b.classes.get(key, 0)


def test_merge_refuses_summaries_binned_differently() -> None:
    with pytest.raises(DriftError, match="different references"):
        DriftSummary(features={"a": [1, 2]}).merge(DriftSummary(features={"a": [1, 2, 3]}))


def test_psi_is_zero_on_the_reference_and_grows_with_the_shift() -> None:
    reference = _reference()
    on_reference = score(reference, _fed(reference, MIN_COUNT))
    assert on_reference.max_psi < 0.05
    assert not on_reference.alert
    previous = on_reference
    for shift in (0.25, 0.5, 1.0):
        shifted = score(reference, _fed(reference, MIN_COUNT, shift=shift))
        for name, feature in shifted.features.items():
            assert feature.psi > previous.features[name].psi
            assert (feature.distance or 0) > (previous.features[name].distance or 0)
        previous = shifted
    assert previous.alert
    assert any("PSI" in reason for reason in previous.reasons)


def test_exact_reference_counts_score_zero() -> None:
    feature = FeatureReference(name="f", edges=[0.0, 1.0, 2.0], fractions=[0.1, 0.4, 0.4, 0.1])
    assert psi(feature.fractions, [100_000, 400_000, 400_000, 100_000]) == pytest.approx(
        0, abs=1e-6
    )
    assert binned_wasserstein(feature, [10, 40, 40, 10]) == pytest.approx(0)
    assert binned_wasserstein(feature, [0, 0, 0, 10]) == pytest.approx(0.5)
    assert psi(feature.fractions, [0, 0, 0, 0]) == 0.0


def test_no_alert_below_the_minimum_count_however_far_the_shift() -> None:
    reference = _reference()
    few = score(reference, _fed(reference, MIN_COUNT - 1, shift=3.0))
    assert few.max_psi > 1 and not few.alert


def test_classes_beyond_the_tracked_ones_share_one_bucket() -> None:
    reference = _reference(classes=200)
    summary = _fed(reference, 500)
    assert len(summary.classes) <= TRACKED_CLASSES + 1
    assert OTHER_CLASS in summary.classes
    assert set(summary.classes) - {OTHER_CLASS} <= set(reference.tracked_classes())


def test_a_3_channel_classifier_summary_is_well_under_1_kib() -> None:
    reference = _reference(classes=1000)
    summary = _fed(reference, 5000)
    encoded = json.dumps(summary.to_extra(), separators=(",", ":")).encode()
    assert len(encoded) < 1024 * 3 // 4, len(encoded)
    assert DriftSummary.from_extra(json.loads(encoded)) == summary


def _bytes_in_a_batch(summary: DriftSummary) -> int:
    """The bytes ``summary`` takes in a telemetry batch as the device encodes it
    (``contracts.mqtt.encode_telemetry``, uncompressed): a record with it against the same
    record with an empty summary, plus that empty ``{}``."""

    def batch(drift: dict[str, object]) -> int:
        record = TelemetryRecord(id="r" * 32, ts=0.0, extra={"drift": drift})
        return len(encode_telemetry(TelemetryBatch(records=[record]), compress=False))

    return batch(summary.to_extra()) - batch({}) + len("{}")


def test_a_3_channel_classifiers_summary_stays_under_1_kib_at_every_counts_bound() -> None:
    """The worst case whatever the traffic, the tracked classes given 5-digit ids: every
    count at 2^31 - 1, the most inferences one record counts (``contracts.bounded``;
    README "Benchmarks" quotes this size); then the bins as full as they can get, an input
    channel's bins adding up to ``VALUES_PER_FEATURE`` values per inference and the
    classes to one per inference, spread evenly (the most digits)."""
    summary = _fed(_reference(classes=1000), 5000)
    ids = [OTHER_CLASS if k == OTHER_CLASS else 10_000 + k for k in summary.classes]
    at_bound = DriftSummary(
        count=MAX_COUNT,
        features={n: [MAX_COUNT] * len(c) for n, c in summary.features.items()},
        classes=dict.fromkeys(ids, MAX_COUNT),
    )
    full = DriftSummary(
        count=MAX_COUNT,
        features={
            n: [VALUES_PER_FEATURE * MAX_COUNT // len(c)] * len(c)
            for n, c in summary.features.items()
        },
        classes=dict.fromkeys(ids, MAX_COUNT // len(ids)),
    )
    assert OUTPUT_NORM not in summary.features  # a classifier: its bins are all an input's
    assert set(at_bound.to_extra()) == set(summary.to_extra())
    size, fullest = _bytes_in_a_batch(at_bound), _bytes_in_a_batch(full)
    print(f"worst-case summary: {size} bytes ({fullest} with the bins as full as they get)")
    assert size < 1024 and fullest < 1024


def test_the_reference_file_round_trips() -> None:
    reference = _reference()
    data = reference.to_json_bytes()
    assert json.loads(data)["schema"] == DRIFT_REFERENCE_SCHEMA
    assert ReferenceProfile.from_json_bytes(data) == reference


def _profile_json(**changes: object) -> bytes:
    document: dict[str, object] = {
        "schema": DRIFT_REFERENCE_SCHEMA,
        "samples": 10,
        "features": [{"name": "x:0", "edges": [0.0, 1.0], "fractions": [0.25, 0.5, 0.25]}],
        "classes": [0.5, 0.5],
    }
    document.update(changes)
    return json.dumps(document).encode()


def _feature(**changes: object) -> list[dict[str, object]]:
    feature: dict[str, object] = {
        "name": "x:0",
        "edges": [0.0, 1.0],
        "fractions": [0.25, 0.5, 0.25],
    }
    feature.update(changes)
    return [feature]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            b'{"schema": "edgefleet.drift-reference/1", "samples": 1, "features": [{"name": "x", '
            b'"edges": [NaN], "fractions": [0.5, 0.5]}]}',
            "NaN edge",
        ),
        (_profile_json(features=_feature(edges=[1.0, 0.0])), "unsorted edges"),
        (_profile_json(features=_feature(edges=[1.0, 1.0])), "repeated edge"),
        (_profile_json(features=_feature(fractions=[0.5, 0.5])), "too few fractions"),
        (_profile_json(features=_feature(fractions=[0.5, 0.5, 0.5])), "fractions over 1"),
        (_profile_json(features=_feature(fractions=[-0.25, 1.0, 0.25])), "negative fraction"),
        (_profile_json(features=_feature(name="x\x00")), "control character"),
        (_profile_json(features=_feature(edges=list(range(MAX_EDGES + 1)))), "too many edges"),
        (_profile_json(features=_feature() * 2), "duplicate feature"),
        (_profile_json(classes=[1.0] * 2), "classes over 1"),
        (_profile_json(classes=[1e-6] * 1_000_001), "huge class list"),
        (_profile_json(schema="edgefleet.drift-reference/9"), "unknown schema"),
        (_profile_json(samples="10"), "text for a number"),
        (_profile_json(extra=1), "unknown key"),
        (b"[]", "not an object"),
        (b"\xff\xfe", "not JSON"),
        (b" " * (5 << 20), "over the size bound"),
    ],
)
def test_hostile_reference_files_are_refused_with_a_contract_error(data: bytes, why: str) -> None:
    with pytest.raises(DriftError):
        ReferenceProfile.from_json_bytes(data)
    assert issubclass(DriftError, ContractError)


def test_a_well_formed_file_is_accepted() -> None:
    assert ReferenceProfile.from_json_bytes(_profile_json()).samples == 10


@pytest.mark.parametrize(
    "value",
    [
        {"count": -1},
        {"count": 1, "features": {"x": [1]}},
        {"count": 1, "features": {f"f{i}": [1, 1] for i in range(65)}},
        {"count": 1, "classes": {str(i): 1 for i in range(TRACKED_CLASSES + 2)}},
        {"count": 1, "classes": {"-2": 1}},
        {"count": 1, "features": {"x": [2**60, 2**60]}},
        {"count": 1.5},
        {"count": float("nan")},
        {"count": 1, "unknown": 1},
        "not a summary",
    ],
)
def test_hostile_summaries_are_refused(value: object) -> None:
    with pytest.raises(DriftError):
        DriftSummary.from_extra(value)


@pytest.mark.parametrize(
    ("shape", "names", "per_sample"),
    [
        ((2, 3, 8, 8), ["x:0", "x:1", "x:2"], 64),
        ((2, 8, 8, 3), ["x:0", "x:1", "x:2"], 64),
        ((2, 5), ["x:0", "x:1", "x:2", "x:3", "x:4"], 1),
        ((2, 1000), [f"x:{i}" for i in range(16)], 1),
        ((2, 7), [f"x:{i}" for i in range(7)], 1),
        ((2, 100, 100, 100, 2), ["x"], 64),
    ],
)
def test_input_features_per_channel_and_bounded(
    shape: tuple[int, ...], names: list[str], per_sample: int
) -> None:
    batch = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    features = input_features("x", batch)
    assert [name for name, _ in features] == names
    assert all(len(values) == 2 * per_sample for _, values in features)


def test_nhwc_channels_hold_their_own_values() -> None:
    batch = np.zeros((1, 8, 8, 3), dtype=np.float32)
    batch[..., 2] = 7.0
    features = dict(input_features("x", batch))
    assert set(features["x:2"]) == {7.0}
    assert set(features["x:0"]) == {0.0}


def test_a_psi_alerts_past_its_threshold_plus_what_chance_gives_at_that_sample_size() -> None:
    """The same class shift: within the noise of 222 inferences against a reference of 100
    samples, a drift with 22 200 against 10 000."""
    fractions = [1 / 17] * 17
    counts = [21] * 8 + [6] * 9  # PSI about 0.33
    for samples, scale, alerts in ((100, 1, False), (10_000, 100, True)):
        reference = ReferenceProfile(samples=samples, features=[], classes=fractions)
        summary = DriftSummary(
            count=sum(counts) * scale,
            classes={c: n * scale for c, n in enumerate(counts[:16])} | {-1: counts[16] * scale},
        )
        scored = score(reference, summary)
        assert scored.classes_psi is not None and scored.classes_psi > PSI_ALERT
        assert scored.classes_psi_limit == pytest.approx(
            PSI_ALERT + psi_noise(17, summary.count, samples)
        )
        assert scored.alert is alerts


def test_a_regressors_output_norm_is_binned_and_its_shift_seen() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 4))
    reference = reference_from_samples({"x": features}, features @ np.ones((4, 2)))
    assert reference.classes is None and reference.has_output_norm()
    for scale, drifted in ((1.0, False), (3.0, True)):
        builder = SummaryBuilder(reference)
        for row in rng.normal(size=(MIN_COUNT, 4)):
            batch = row[np.newaxis]
            builder.add({"x": batch}, scale * batch @ np.ones((4, 2)))
        summary = builder.summary()
        assert sum(summary.features[OUTPUT_NORM]) == MIN_COUNT
        scored = score(reference, summary)
        assert scored.alert is drifted
        assert any(r.startswith(OUTPUT_NORM) for r in scored.reasons) is drifted
