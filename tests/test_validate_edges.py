"""The accuracy gate's metrics at their edges (``compiler/validate.py``): the cases that
decide a borderline verdict, each with the number worked out by hand.

Found by ``make mutate`` (docs/mutation.md): changes at these edges passed the broader
cases in tests/test_validate.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.validate import compare, infer_task, roles
from contracts.report import AccuracyGate

GATE = AccuracyGate(
    min_top1_agreement=0.97,
    max_accuracy_drop=0.01,
    min_cosine_similarity=0.99,
    max_relative_error=0.05,
    min_box_iou=0.9,
    max_score_error=0.05,
)


def test_probabilities_may_hold_zeros_and_round_off_but_two_columns_at_least() -> None:
    one_hot = np.eye(3)[[0, 1, 2, 0]]  # zeros are probabilities too
    rounded = np.full((4, 2), 0.5) + np.array([0.0004, 0.0])  # rows sum to 1.0004
    single = np.full((4, 1), 1.0)  # one value per sample: not rows of scores
    assert infer_task([one_hot], ["p"], None)[0] == "classification"
    assert infer_task([rounded], ["p"], None)[0] == "classification"
    assert infer_task([single], ["p"], None)[0] == "regression"
    assert infer_task([rounded + 0.01], ["p"], None)[0] == "embedding"


def test_boxes_are_the_three_dimensional_output_beside_per_box_scores() -> None:
    boxes, scores = np.ones((2, 3, 4)), np.ones((2, 3))
    assert roles("detection", [scores, boxes]) == ["box_scores", "boxes"]
    # a (N, 4) output is not boxes, and boxes need scores with as many entries
    assert infer_task([np.ones((2, 4)), scores], ["a", "b"], None)[0] != "detection"
    assert infer_task([boxes, np.ones((2, 5))], ["a", "b"], None)[0] != "detection"
    assert infer_task([boxes], ["a"], None)[0] != "detection"


BOX = np.array([[[0.0, 0.0, 2.0, 2.0]]])
IOUS = {
    "half overlapping: 2 / (4 + 4 - 2)": (np.array([[[1.0, 0.0, 3.0, 2.0]]]), 1 / 3),
    "corners given the other way round": (np.array([[[2.0, 2.0, 0.0, 0.0]]]), 1.0),
    "apart": (np.array([[[5.0, 5.0, 6.0, 6.0]]]), 0.0),
    "touching at an edge": (np.array([[[2.0, 0.0, 4.0, 2.0]]]), 0.0),
    "crossing on one axis only": (np.array([[[0.0, 3.0, 2.0, 5.0]]]), 0.0),
    "sliding one unit each way": (np.array([[[1.0, 1.0, 3.0, 3.0]]]), 1 / 7),
}


@pytest.mark.parametrize(("candidate", "iou"), IOUS.values(), ids=IOUS)
def test_box_iou_is_worked_out_box_by_box(candidate: np.ndarray, iou: float) -> None:
    result = compare([BOX, np.ones((1, 1))], [candidate, np.ones((1, 1))], None, GATE, "detection")
    assert result.metric == "box_iou" and result.reference == 1.0
    assert result.candidate == pytest.approx(iou, abs=1e-12)


def test_empty_boxes_agree_only_where_they_are_the_same() -> None:
    point = np.array([[[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]])
    moved = np.array([[[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]]])
    scores = np.ones((1, 2))
    result = compare([point, scores], [moved, scores], None, GATE, "detection")
    assert result.candidate == pytest.approx(0.5)  # the first agrees, the second does not
    assert result.failures == ["output 0: box_iou 0.5000 < threshold 0.9000"]


def test_box_scores_are_judged_by_mean_error_not_by_max_abs() -> None:
    boxes = np.tile(BOX, (1, 2, 1))
    scores = np.array([[0.5, 0.5]])
    strict = GATE.model_copy(update={"max_abs_error": 0.01})
    result = compare(
        [boxes, scores], [boxes, scores + np.array([[0.04, 0.0]])], None, strict, "detection"
    )
    [_, judged] = result.outputs
    assert judged.metrics["score_error"] == pytest.approx(0.02)
    assert judged.metrics["max_abs_error"] == pytest.approx(0.04)
    assert result.passed  # 0.04 over max_abs_error, but scores are judged on their mean


def test_max_abs_error_is_gated_for_values_not_for_class_scores() -> None:
    strict = GATE.model_copy(update={"max_abs_error": 0.01})
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    as_scores = compare(
        [scores], [scores + np.array([[0.05, 0.0]])], None, strict, "classification"
    )
    assert as_scores.passed and as_scores.max_abs_error == pytest.approx(0.05)
    values = np.array([[100.0], [100.0]])
    as_values = compare([values], [values + np.array([[0.05], [0.0]])], None, strict, "regression")
    assert as_values.failures == ["max_abs_error 0.0500 > threshold 0.0100"]
    assert as_values.reference == 0.0  # lower is better: the reference's own error


def test_a_zero_reference_and_zero_vectors_do_not_divide_by_zero() -> None:
    zeros = np.zeros((2, 1))
    regression = compare([zeros], [zeros + 0.5], None, GATE, "regression")
    assert regression.candidate == pytest.approx(np.linalg.norm([0.5, 0.5]))
    vectors = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    embedding = compare([vectors], [vectors], None, GATE, "embedding")
    assert embedding.candidate == pytest.approx(0.5)  # a zero vector agrees with nothing


def test_embedding_cosine_is_the_mean_over_samples() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 1.0]])  # cosines 1 and 1/sqrt(2)
    result = compare([reference], [candidate], None, GATE, "embedding")
    assert result.candidate == pytest.approx((1 + 2**-0.5) / 2)
    assert result.failures == [f"cosine_similarity {(1 + 2**-0.5) / 2:.4f} < threshold 0.9900"]


def test_labels_judge_only_the_first_classifier_output() -> None:
    first = np.eye(2)[[0, 1, 0, 1]]
    second = np.eye(2)[[1, 1, 1, 1]]
    labels = np.array([0, 1, 0, 1])
    result = compare([first, second], [first, second], labels, GATE, "classification", ["a", "b"])
    assert (result.reference_accuracy, result.accuracy, result.accuracy_drop) == (1.0, 1.0, 0.0)
    assert "accuracy_drop" not in result.outputs[1].metrics
    assert compare([first], [first], labels, GATE, "embedding").accuracy is None


def test_outputs_without_names_are_numbered_and_a_count_mismatch_is_refused() -> None:
    values = np.ones((2, 1))
    result = compare([values, values], [values, values * 3], None, GATE, "regression")
    assert result.failures == ["output 1: relative_error 2.0000 > threshold 0.0500"]
    with pytest.raises(ValueError, match=r"^1 outputs to compare with 2$"):
        compare([values, values], [values], None, GATE, "regression")
    with pytest.raises(ValueError):
        compare([values, values], [values, values], None, GATE, "regression", ["only one"])
