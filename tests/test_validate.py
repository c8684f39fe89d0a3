"""The accuracy gate's metrics."""

from __future__ import annotations

import numpy as np

from compiler.validate import compare
from hw_profiles import load_profile

GATE = load_profile("rpi4").accuracy_gate  # 0.97 agreement, 1 point drop, 0.99 cosine


def test_identical_classifier_outputs_pass() -> None:
    scores = np.random.default_rng(0).standard_normal((100, 10))
    result = compare(scores, scores.copy(), scores.argmax(1), GATE)
    assert result.passed and result.metric == "top1_agreement" and result.candidate == 1.0
    assert result.accuracy_drop == 0.0


def test_disagreement_and_accuracy_drop_fail_with_the_numbers() -> None:
    reference = np.eye(10)[np.arange(100) % 10] + 0.01
    candidate = reference.copy()
    candidate[:5] = np.roll(candidate[:5], 1, axis=1)  # 5 of 100 flip their top-1
    result = compare(reference, candidate, reference.argmax(1), GATE)
    assert not result.passed
    assert result.top1_agreement == 0.95
    assert "top1_agreement 0.9500 < threshold 0.9700" in result.failures
    assert "accuracy_drop 0.0500 > threshold 0.0100" in result.failures


def test_regression_outputs_use_cosine_and_the_optional_max_abs() -> None:
    reference = np.random.default_rng(1).standard_normal((20, 1))
    close = compare(reference, reference + 1e-3, None, GATE)
    assert close.passed and close.metric == "cosine_similarity"
    strict = GATE.model_copy(update={"max_abs_error": 1e-4})
    result = compare(reference, reference + 1e-3, None, strict)
    assert not result.passed and result.failures[0].startswith("max_abs_error")
