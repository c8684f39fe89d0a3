"""Compare a candidate's outputs with the fp32 reference and apply the accuracy gate."""

from __future__ import annotations

import numpy as np

from contracts.report import AccuracyGate, Comparison

__all__ = ["compare", "is_classifier"]


def is_classifier(output: np.ndarray) -> bool:
    """Scores of shape (N, classes) with at least two classes."""
    return output.ndim == 2 and output.shape[1] >= 2


def compare(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, gate: AccuracyGate
) -> Comparison:
    """Metrics of ``candidate`` against ``reference`` (and ``labels``), checked against ``gate``.

    Classifiers are judged by top-1 agreement and, with labels, accuracy drop; other models
    by cosine similarity and, when the gate sets it, max-abs error.
    """
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = float(np.mean(np.sum(ref * cand, axis=1) / np.where(norms == 0, 1.0, norms)))
    max_abs_error = float(np.max(np.abs(ref - cand)))
    failures: list[str] = []

    def check(name: str, value: float, threshold: float | None, higher_is_better: bool) -> None:
        if threshold is None:
            return
        ok = value >= threshold if higher_is_better else value <= threshold
        if not ok:
            sign = "<" if higher_is_better else ">"
            failures.append(f"{name} {value:.4f} {sign} threshold {threshold:.4f}")

    if not is_classifier(reference):
        check("cosine_similarity", cosine, gate.min_cosine_similarity, higher_is_better=True)
        check("max_abs_error", max_abs_error, gate.max_abs_error, higher_is_better=False)
        return Comparison(
            metric="cosine_similarity",
            reference=1.0,
            candidate=cosine,
            passed=not failures,
            max_abs_error=max_abs_error,
            cosine_similarity=cosine,
            failures=failures,
        )
    agreement = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    check("top1_agreement", agreement, gate.min_top1_agreement, higher_is_better=True)
    ref_acc = cand_acc = drop = None
    if labels is not None:
        ref_acc = float(np.mean(reference.argmax(1) == labels))
        cand_acc = float(np.mean(candidate.argmax(1) == labels))
        drop = ref_acc - cand_acc
        check("accuracy_drop", drop, gate.max_accuracy_drop, higher_is_better=False)
    return Comparison(
        metric="top1_agreement",
        reference=1.0,
        candidate=agreement,
        passed=not failures,
        max_abs_error=max_abs_error,
        cosine_similarity=cosine,
        top1_agreement=agreement,
        reference_accuracy=ref_acc,
        accuracy=cand_acc,
        accuracy_drop=drop,
        failures=failures,
    )
