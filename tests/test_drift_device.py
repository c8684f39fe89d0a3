"""Drift on the device, in process: inferences folded into the summary that rides in a
telemetry record, cohorts of simulated devices scored the way the fleet scores them
(``contracts/drift.py``), and the compiled digits model's reference carried through its
bundle to the agent. The fleet's own version, over MQTT and the database, is the fleet's."""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.drift_sampling import COST_SHARE, DriftSampling
from agent.inference import InferenceService
from agent.model import load_installed, unpack_bundle
from agent.telemetry import DriftObservation, InferenceOutcome, InferenceStats
from compiler.pipeline import DEFAULT_PIPELINE, CompileOptions, compile_model
from contracts.drift import (
    DRIFT_REFERENCE_FILE,
    MIN_COUNT,
    OTHER_CLASS,
    OUTPUT_NORM,
    VALUES_PER_FEATURE,
    DriftSummary,
    ReferenceProfile,
    SummaryBuilder,
    drift_sample,
    reference_from_samples,
    score,
)
from hw_profiles import load_profile
from ota.bundle import bundle_compile_output
from ota.errors import BundleError
from ota.manifest import MANIFEST_NAME, parse_manifest
from tests.utils import task_models

CLASSES = 20
IMAGE = (3, 12, 12)


def _images(rng: np.random.Generator, count: int, shift: float = 0.0) -> np.ndarray:
    """Images as a camera gives them: each its own brightness (the values of one image move
    together, so its pixels are far from independent draws), then per-pixel noise."""
    brightness = rng.normal(0.0, 0.5, size=(count, 1, 1, 1))
    return (brightness + shift + rng.normal(size=(count, *IMAGE))).astype(np.float32)


def _classes(rng: np.random.Generator, count: int) -> np.ndarray:
    weights = np.linspace(2.0, 0.1, CLASSES)
    return rng.choice(CLASSES, size=count, p=weights / weights.sum())


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    """From 500 validation images and a classifier's scores that pick ``_classes``."""
    rng = np.random.default_rng(2026)
    scores = np.eye(CLASSES)[_classes(rng, 500)]
    return reference_from_samples({"image": _images(rng, 500)}, scores, classifier=True)


def _outcome(
    reference: ReferenceProfile, image: np.ndarray, cls: int, served_by: str = "local"
) -> InferenceOutcome:
    return InferenceOutcome(
        bundle="cam-1.0.0",
        served_by=served_by,  # type: ignore[arg-type]
        latency_ms=1.0,
        local_error=False,
        fallback_reason=None if served_by == "local" else "confidence",
        predicted_class=cls,
        drift=DriftObservation(reference, drift_sample({"image": image[np.newaxis]})),
    )


def test_inference_stats_fold_each_call_into_the_records_drift_summary(
    reference: ReferenceProfile,
) -> None:
    rng = np.random.default_rng(1)
    stats = InferenceStats()
    images, classes = _images(rng, 30), _classes(rng, 30)
    for image, cls in zip(images, classes, strict=True):
        stats.observe(_outcome(reference, image, int(cls)))
    stats.observe(_outcome(reference, images[0], 0, served_by="cloud"))
    stats.observe(  # a bundle without a reference sends no summary
        InferenceOutcome("other-1.0.0", "local", 1.0, False, None, 3)
    )

    records = {r.bundle: r for r in stats.report()}
    assert "drift" not in records["other-1.0.0"].extra
    summary = DriftSummary.from_extra(records["cam-1.0.0"].extra["drift"])
    assert summary.count == 31
    assert set(summary.features) == {"image:0", "image:1", "image:2"}
    for counts in summary.features.values():
        assert sum(counts) == 31 * VALUES_PER_FEATURE
    tracked = set(reference.tracked_classes())
    expected: dict[int, int] = {}
    for cls in classes:  # the cloud's answer is not the bundle's prediction: not counted
        key = int(cls) if int(cls) in tracked else OTHER_CLASS
        expected[key] = expected.get(key, 0) + 1
    assert summary.classes == expected
    # The same calls folded directly give the same counts: nothing lost between the two.
    builder = SummaryBuilder(reference)
    for image in [*images, images[0]]:
        builder.add({"image": image[np.newaxis]})
    assert builder.summary().features == summary.features
    assert stats.report() == []


def test_the_sample_is_a_copy_so_a_reused_input_buffer_does_not_change_it(
    reference: ReferenceProfile,
) -> None:
    for buffer in (np.zeros((1, *IMAGE), dtype=np.float32), np.zeros((1, 5))):
        sample = drift_sample({"x": buffer})
        buffer += 100.0
        assert sample and all(set(values) == {0.0} for values in sample.values())


SHIFT = 0.5
"""Brightness added to every pixel of the shifted cohort: half a pixel's noise, as a camera
whose exposure changed."""
DEVICES = 10
INTERVAL = 25
"""Inferences per device and reporting interval."""
DETECTED_WITHIN = 500
"""Inferences of the shifted cohort (all its devices together) by which drift must show."""
LONG_RUN_WINDOWS = 500


def _interval(reference: ReferenceProfile, rng: np.random.Generator, shift: float) -> DriftSummary:
    builder = SummaryBuilder(reference)
    images, classes = _images(rng, INTERVAL, shift), _classes(rng, INTERVAL)
    for image, cls in zip(images, classes, strict=True):
        builder.add({"image": image[np.newaxis]}, None, int(cls))
    return builder.summary()


def _window(reference: ReferenceProfile, rng: np.random.Generator, count: int) -> DriftSummary:
    """``count`` reference-fed inferences at once: the images binned as one batch (the same
    values and bins as call by call, in a fraction of the time), classes one by one."""
    features = SummaryBuilder(reference)
    features.add({"image": _images(rng, count)})
    classes = SummaryBuilder(reference)
    for cls in _classes(rng, count):
        classes.add_sample({}, int(cls))
    return DriftSummary(
        count=count, features=features.summary().features, classes=classes.summary().classes
    )


def test_a_shifted_cohort_alerts_and_the_reference_cohort_does_not(
    reference: ReferenceProfile,
) -> None:
    """Two cohorts of devices send interval summaries; the fleet merges each cohort's and
    scores it after every round of intervals."""
    rng = np.random.default_rng(7)
    merged = {"shifted": DriftSummary(), "reference": DriftSummary()}
    alerted_at: dict[str, int] = {}
    for _ in range(DETECTED_WITHIN // (DEVICES * INTERVAL) + 1):
        for cohort, shift in (("shifted", SHIFT), ("reference", 0.0)):
            for _ in range(DEVICES):
                merged[cohort] = merged[cohort].merge(_interval(reference, rng, shift))
            if cohort not in alerted_at and score(reference, merged[cohort]).alert:
                alerted_at[cohort] = merged[cohort].count
    assert "shifted" in alerted_at and alerted_at["shifted"] <= DETECTED_WITHIN
    assert "reference" not in alerted_at
    reasons = score(reference, merged["shifted"]).reasons
    assert reasons and all(r.startswith("image:") for r in reasons)  # not the classes


def test_devices_fed_the_reference_never_alert_in_a_long_run(
    reference: ReferenceProfile,
) -> None:
    """Windows of ``MIN_COUNT`` inferences (the fewest that can alert, so the noisiest),
    each scored on its own: a false alarm is any window that alerts."""
    rng = np.random.default_rng(11)
    false_alarms = 0
    worst = 0.0
    for _ in range(LONG_RUN_WINDOWS):
        scored = score(reference, _window(reference, rng, MIN_COUNT))
        false_alarms += scored.alert
        worst = max(worst, scored.max_psi)
    assert false_alarms == 0, f"{false_alarms} false alarms, worst PSI {worst:.3f}"


# --- a real bundle: the compiled digits model ------------------------------------------------


@pytest.fixture(scope="module")
def digits_slot(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("drift-slot")
    bundle = out / "digits.efb"
    bundle_compile_output(
        compiled_digits, version="1.0.0", out=bundle, artifact_id="onnxruntime:fp32"
    )
    unpack_bundle(bundle, out / "slot")
    return out / "slot"


@pytest.mark.slow
def test_the_bundle_carries_the_reference_and_the_agent_scores_its_own_inferences(
    compiled_digits: Path, digits: Path, digits_slot: Path
) -> None:
    """compile → bundle (hash-listed) → agent: the validation half of the data reads as the
    reference, the same images inverted (white digits on black turned black on white) as
    drift, each from what the agent's telemetry record carries."""
    written = (compiled_digits / DRIFT_REFERENCE_FILE).read_bytes()
    manifest = parse_manifest((digits_slot / MANIFEST_NAME).read_bytes())
    listed = {f.path: f.sha256 for f in manifest.files}
    assert listed[DRIFT_REFERENCE_FILE] == hashlib.sha256(written).hexdigest()
    model = load_installed(digits_slot)
    try:
        assert model.drift_reference == ReferenceProfile.from_json_bytes(written)
        with np.load(digits / "digits.npz") as data:
            validation = np.asarray(data["image"][300:])  # the half the compile validated on
        for images, drifted in ((validation, False), (1.0 - validation, True)):
            stats = InferenceStats()
            with InferenceService(drift_share=None) as service:
                service.add_observer(stats.observe)
                service.set_model(model)
                for image in images:
                    service.infer({"image": image[np.newaxis]})
            (record,) = stats.report()
            summary = DriftSummary.from_extra(record.extra["drift"])
            assert summary.count == len(images) == record.inferences
            scored = score(model.drift_reference, summary)
            assert scored.alert is drifted, scored.reasons
    finally:
        model.close()


@pytest.mark.slow
def test_a_broken_drift_reference_is_never_signed_and_on_a_device_costs_only_drift(
    compiled_digits: Path, digits_slot: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "compile"
    shutil.copytree(compiled_digits, output)
    (output / DRIFT_REFERENCE_FILE).write_text('{"schema": "edgefleet.drift-reference/1"}')
    with pytest.raises(BundleError, match=DRIFT_REFERENCE_FILE):
        bundle_compile_output(
            output, version="1.0.0", out=tmp_path / "b.efb", artifact_id="onnxruntime:fp32"
        )
    assert not (tmp_path / "b.efb").exists()

    slot = tmp_path / "slot"
    shutil.copytree(digits_slot, slot)
    (slot / DRIFT_REFERENCE_FILE).write_bytes(b'{"samples": NaN}')  # on the device's disk
    with caplog.at_level(logging.WARNING, logger="agent.model"):
        model = load_installed(slot)
    try:
        assert model.drift_reference is None
        assert "no drift summaries" in caplog.text and DRIFT_REFERENCE_FILE in caplog.text
        stats = InferenceStats()
        with InferenceService(drift_share=None) as service:
            service.add_observer(stats.observe)
            service.set_model(model)
            service.infer({"image": np.zeros((1, 8, 8, 1), dtype=np.float32)})
        (record,) = stats.report()
        assert record.inferences == 1 and "drift" not in record.extra
    finally:
        model.close()


def test_a_regressors_bundle_folds_the_local_output_norm(tmp_path: Path) -> None:
    """Compile (ONNX Runtime fp32 only) → bundle → agent, for a model that is not a
    classifier: each locally answered call adds its first output's norm."""
    model = task_models.regressor(tmp_path)
    host = load_profile("host")
    compile_model(
        CompileOptions(
            model=model,
            profile=host.model_copy(
                update={"runtimes": [r for r in host.runtimes if r.name == "onnxruntime"]}
            ),
            out_dir=tmp_path / "out",
            calibration=model.with_suffix(".npz"),
            quantize="fp32",
            latency_runs=1,
        ),
        pipeline=tuple(step for step in DEFAULT_PIPELINE if step != "build"),
    )
    bundle_compile_output(tmp_path / "out", version="1.0.0", out=tmp_path / "r.efb")
    unpack_bundle(tmp_path / "r.efb", tmp_path / "slot")
    loaded = load_installed(tmp_path / "slot")
    try:
        assert loaded.drift_reference is not None and loaded.drift_reference.has_output_norm()
        stats = InferenceStats()
        with InferenceService(drift_share=None) as service:
            service.add_observer(stats.observe)
            service.set_model(loaded)
            with np.load(model.with_suffix(".npz")) as data:
                rows = np.asarray(data["x"][:20])
            for row in rows:
                service.infer({"x": row[np.newaxis]})
        (record,) = stats.report()
        summary = DriftSummary.from_extra(record.extra["drift"])
        assert sum(summary.features[OUTPUT_NORM]) == 20
        assert summary.classes == {}

        # Where summarising may cost next to nothing of the model's time, no call is
        # summarised; the calls themselves are all counted.
        with InferenceService(drift_share=1e-12) as service:
            service.add_observer(stats.observe)
            service.set_model(loaded)
            for row in rows:
                service.infer({"x": row[np.newaxis]})
        (record,) = stats.report()
        assert record.inferences == 20 and "drift" not in record.extra
    finally:
        loaded.close()


@pytest.mark.parametrize(
    ("cost_s", "call_s", "probability"),
    [(0.0, 1e-4, 1.0), (20e-6, 70e-3, 1.0), (20e-6, 1e-3, 1.0), (20e-6, 1e-4, 0.1)],
)
def test_summaries_are_drawn_at_the_rate_that_keeps_their_cost_to_its_share(
    cost_s: float, call_s: float, probability: float
) -> None:
    """At 2 %: a 70 ms or a 1 ms model has every call summarised, a 0.1 ms one whose
    summaries cost 20 µs a tenth of them, drawn by a coin that never sees the call."""
    sampling = DriftSampling(cost_s, COST_SHARE, random.Random(7))
    assert sampling.probability(call_s) == pytest.approx(probability)
    taken = sum(sampling.take(call_s) for _ in range(20_000))
    assert taken == pytest.approx(20_000 * probability, rel=0.05)
