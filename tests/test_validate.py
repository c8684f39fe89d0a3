"""The accuracy gate's metrics, per task, and the evidence the task is inferred from."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.validate import compare, infer_task
from hw_profiles import load_profile

GATE = load_profile("rpi4").accuracy_gate  # 0.97 agreement, 1 point drop, 0.99 cosine


def test_identical_classifier_outputs_pass() -> None:
    scores = np.random.default_rng(0).standard_normal((100, 10))
    result = compare([scores], [scores.copy()], scores.argmax(1), GATE, "classification")
    assert result.passed and result.metric == "top1_agreement" and result.candidate == 1.0
    assert result.accuracy_drop == 0.0


def test_disagreement_and_accuracy_drop_fail_with_the_numbers() -> None:
    reference = np.eye(10)[np.arange(100) % 10] + 0.01
    candidate = reference.copy()
    candidate[:5] = np.roll(candidate[:5], 1, axis=1)  # 5 of 100 flip their top-1
    result = compare([reference], [candidate], reference.argmax(1), GATE, "classification")
    assert not result.passed
    assert result.top1_agreement == 0.95
    assert "top1_agreement 0.9500 < threshold 0.9700" in result.failures
    assert "accuracy_drop 0.0500 > threshold 0.0100" in result.failures


def test_regression_is_judged_by_relative_error_and_the_optional_max_abs() -> None:
    reference = np.random.default_rng(1).standard_normal((20, 1))
    close = compare([reference], [reference * 1.01], None, GATE, "regression")
    assert close.passed and close.metric == "relative_error"
    assert close.candidate == pytest.approx(0.01)
    far = compare([reference], [reference * 1.2], None, GATE, "regression")
    assert far.failures == ["relative_error 0.2000 > threshold 0.0500"]
    strict = GATE.model_copy(update={"max_abs_error": 1e-4})
    result = compare([reference], [reference + 1e-3], None, strict, "regression")
    assert not result.passed and result.failures[0].startswith("max_abs_error")


def test_an_embedding_is_judged_by_cosine_not_by_the_top_1_of_its_dimensions() -> None:
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((50, 384))
    noisy = reference + 0.05 * rng.standard_normal(reference.shape)  # cosine ~0.999
    embedding = compare([reference], [noisy], None, GATE, "embedding")
    assert embedding.passed and embedding.metric == "cosine_similarity"
    assert "top1_agreement" not in embedding.outputs[0].metrics
    as_classifier = compare([reference], [noisy], None, GATE, "classification")
    assert as_classifier.top1_agreement is not None and as_classifier.top1_agreement < 0.97
    drifted = compare([reference], [reference + 0.5 * noisy], None, GATE, "embedding")
    assert drifted.passed  # same direction: cosine is what an embedding is used for
    turned = reference.copy()
    turned[:, :192] *= -1
    assert (
        compare([reference], [turned], None, GATE, "embedding")
        .failures[0]
        .startswith("cosine_similarity")
    )


def test_a_detector_judges_boxes_by_iou_and_scores_by_their_error() -> None:
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 100, (10, 5, 2))
    boxes = np.concatenate([corners, corners + 20], axis=-1)  # 20 x 20 boxes
    scores = rng.uniform(0, 1, (10, 5))
    shifted = boxes + np.array([2.0, 0.0, 2.0, 0.0])  # IoU 18*20 / (2*400 - 360) = 0.818
    result = compare([boxes, scores], [shifted, scores + 0.01], None, GATE, "detection", ["b", "s"])
    assert [o.role for o in result.outputs] == ["boxes", "box_scores"]
    assert result.metric == "box_iou" and result.candidate == pytest.approx(360 / 440)
    assert result.failures == ["b: box_iou 0.8182 < threshold 0.9000"]
    assert result.outputs[1].passed and result.outputs[1].metrics["score_error"] == pytest.approx(
        0.01
    )
    names = ["b", "s"]
    bad_scores = compare([boxes, scores], [boxes, scores + 0.2], None, GATE, "detection", names)
    assert bad_scores.failures == ["s: score_error 0.2000 > threshold 0.0500"]


def test_every_output_is_compared_not_only_the_first() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(5), 40)
    value = rng.standard_normal((40, 1))
    result = compare(
        [probs, value], [probs, value * 2], None, GATE, "classification", ["probs", "age"]
    )
    assert [o.role for o in result.outputs] == ["scores", "values"]
    assert not result.passed
    assert result.failures == ["age: relative_error 1.0000 > threshold 0.0500"]


@pytest.mark.parametrize(
    ("outputs", "labels", "task", "evidence"),
    [
        ([np.full((4, 5), 0.2)], None, "classification", "sums to 1"),
        ([np.eye(5)[:4] * 3.0], np.arange(4), "classification", "has labels"),
        ([np.ones((4, 384))], None, "embedding", "not probabilities, and the data has no labels"),
        ([np.ones((4, 1))], None, "regression", "not rows of scores"),
        ([np.ones((4, 3, 8, 8))], None, "regression", "not rows of scores"),
        ([np.ones((4, 10, 4)), np.ones((4, 10))], None, "detection", "holds boxes [4, 10, 4]"),
    ],
)
def test_the_task_is_inferred_from_evidence_that_is_named(
    outputs: list[np.ndarray], labels: np.ndarray | None, task: str, evidence: str
) -> None:
    inferred, reason = infer_task(outputs, [f"o{i}" for i in range(len(outputs))], labels)
    assert inferred == task and evidence in reason
