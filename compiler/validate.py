"""Compare a candidate's outputs with the fp32 reference's and apply the accuracy gate.

Each output is judged by what it holds, which follows from the task: class scores by top-1
agreement (and, with labels, the accuracy drop), an embedding by cosine similarity,
regression values by relative error, detection boxes by IoU and their scores by mean
absolute difference. The task is declared (``--task``) or inferred from evidence, and the
report says which and why (``infer_task``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from contracts.report import AccuracyGate, Comparison, OutputComparison, Task

__all__ = ["Role", "boxes_index", "compare", "infer_task", "roles"]

Role = Literal["scores", "embedding", "values", "boxes", "box_scores"]
_PROBABILITY_TOLERANCE = 1e-3
_HEADLINE: dict[Role, str] = {
    "scores": "top1_agreement",
    "embedding": "cosine_similarity",
    "values": "relative_error",
    "boxes": "box_iou",
    "box_scores": "score_error",
}


def _is_rows(output: np.ndarray) -> bool:
    """(N, k) with k >= 2: one row of scores or features per sample."""
    return output.ndim == 2 and output.shape[1] >= 2


def _are_probabilities(output: np.ndarray) -> bool:
    sums = output.astype(np.float64).sum(axis=-1)
    return bool(np.all(output >= 0) and np.allclose(sums, 1.0, atol=_PROBABILITY_TOLERANCE))


def boxes_index(outputs: Sequence[np.ndarray]) -> int | None:
    """The output holding boxes: (N, K, 4) beside another output with K entries per sample."""
    for i, output in enumerate(outputs):
        if output.ndim == 3 and output.shape[-1] == 4:
            count = output.shape[1]
            if any(o.ndim >= 2 and o.shape[1] == count for j, o in enumerate(outputs) if j != i):
                return i
    return None


def infer_task(
    outputs: Sequence[np.ndarray], names: Sequence[str], labels: np.ndarray | None
) -> tuple[Task, str]:
    """The task the reference's ``outputs`` (on the validation data) show, and the evidence."""
    boxes = boxes_index(outputs)
    if boxes is not None:
        return "detection", (
            f"output {names[boxes]!r} holds boxes {list(outputs[boxes].shape)} (last dimension "
            "4) beside per-box scores"
        )
    first, name = outputs[0], names[0]
    if _is_rows(first):
        if _are_probabilities(first):
            return "classification", f"every row of output {name!r} is non-negative and sums to 1"
        if labels is not None:
            return "classification", "the validation data has labels"
        return "embedding", (
            f"output {name!r} has {first.shape[1]} values per sample that are not "
            "probabilities, and the data has no labels"
        )
    return "regression", f"output {name!r} has shape {list(first.shape)}, not rows of scores"


def roles(task: Task, outputs: Sequence[np.ndarray]) -> list[Role]:
    """What each output holds under ``task``; an output the task does not describe (a
    classifier's second head of one value) is judged as values."""
    if task == "detection":
        boxes = boxes_index(outputs)
        return ["boxes" if i == boxes else "box_scores" for i in range(len(outputs))]
    by_task: dict[Task, Role] = {"classification": "scores", "embedding": "embedding"}
    rows = by_task.get(task, "values")
    return [rows if _is_rows(o) else "values" for o in outputs]


def _flat(output: np.ndarray) -> np.ndarray:
    return output.astype(np.float64).reshape(len(output), -1)


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = _flat(reference), _flat(candidate)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return float(np.mean(np.sum(ref * cand, axis=1) / np.where(norms == 0, 1.0, norms)))


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    scale = float(np.linalg.norm(ref))
    return float(np.linalg.norm(candidate.astype(np.float64) - ref) / (scale or 1.0))


def _box_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean IoU of each reference box with the candidate's box at the same index (corners
    x1, y1, x2, y2, in either order); two empty boxes at the same place agree."""

    def corners(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
        b = boxes.astype(np.float64).reshape(-1, 4)
        return (
            np.minimum(b[:, 0], b[:, 2]),
            np.minimum(b[:, 1], b[:, 3]),
            np.maximum(b[:, 0], b[:, 2]),
            np.maximum(b[:, 1], b[:, 3]),
        )

    rx1, ry1, rx2, ry2 = corners(reference)
    cx1, cy1, cx2, cy2 = corners(candidate)
    inter = np.clip(np.minimum(rx2, cx2) - np.maximum(rx1, cx1), 0, None) * np.clip(
        np.minimum(ry2, cy2) - np.maximum(ry1, cy1), 0, None
    )
    union = (rx2 - rx1) * (ry2 - ry1) + (cx2 - cx1) * (cy2 - cy1) - inter
    same = np.all(np.isclose(reference.reshape(-1, 4), candidate.reshape(-1, 4)), axis=1)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), same.astype(np.float64))
    return float(np.mean(iou))


class _Checks:
    """The gate's failures, one line per threshold missed."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.failures: list[str] = []

    def at_least(self, name: str, value: float, threshold: float | None) -> None:
        if threshold is not None and not value >= threshold:
            self.failures.append(f"{self.prefix}{name} {value:.4f} < threshold {threshold:.4f}")

    def at_most(self, name: str, value: float, threshold: float | None) -> None:
        if threshold is not None and not value <= threshold:
            self.failures.append(f"{self.prefix}{name} {value:.4f} > threshold {threshold:.4f}")


def _judge(
    name: str,
    role: Role,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None,
    gate: AccuracyGate,
    prefix: str,
) -> tuple[OutputComparison, dict[str, float]]:
    """One output's metrics and verdict, and the accuracies behind a classifier's drop."""
    checks = _Checks(prefix)
    metrics: dict[str, float] = {
        "cosine_similarity": _cosine(reference, candidate),
        "max_abs_error": float(np.max(np.abs(_flat(reference) - _flat(candidate)), initial=0.0)),
    }
    extra: dict[str, float] = {}
    if role == "scores":
        agreement = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
        metrics["top1_agreement"] = agreement
        checks.at_least("top1_agreement", agreement, gate.min_top1_agreement)
        if labels is not None:
            extra["reference_accuracy"] = float(np.mean(reference.argmax(1) == labels))
            extra["accuracy"] = float(np.mean(candidate.argmax(1) == labels))
            metrics["accuracy_drop"] = extra["reference_accuracy"] - extra["accuracy"]
            checks.at_most("accuracy_drop", metrics["accuracy_drop"], gate.max_accuracy_drop)
    elif role == "box_scores":
        metrics["score_error"] = float(np.mean(np.abs(_flat(reference) - _flat(candidate))))
        checks.at_most("score_error", metrics["score_error"], gate.max_score_error)
    elif role == "embedding":
        checks.at_least(
            "cosine_similarity", metrics["cosine_similarity"], gate.min_cosine_similarity
        )
    elif role == "values":
        metrics["relative_error"] = _relative_error(reference, candidate)
        checks.at_most("relative_error", metrics["relative_error"], gate.max_relative_error)
    elif role == "boxes":
        metrics["box_iou"] = _box_iou(reference, candidate)
        checks.at_least("box_iou", metrics["box_iou"], gate.min_box_iou)
    if role not in ("scores", "box_scores"):
        checks.at_most("max_abs_error", metrics["max_abs_error"], gate.max_abs_error)
    result = OutputComparison(
        name=name,
        role=role,
        metrics=metrics,  # type: ignore[arg-type]
        passed=not checks.failures,
        failures=checks.failures,
    )
    return result, extra


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None,
    gate: AccuracyGate,
    task: Task,
    names: Sequence[str] | None = None,
) -> Comparison:
    """Every output of ``candidate`` against ``reference`` (and ``labels``, which judge the
    first classifier output), each by its role under ``task``, checked against ``gate``."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs to compare with {len(reference)}")
    names = list(names) if names else [f"output {i}" for i in range(len(reference))]
    several = len(reference) > 1
    judged: list[OutputComparison] = []
    accuracies: dict[str, float] = {}
    for i, (name, role) in enumerate(zip(names, roles(task, reference), strict=True)):
        result, extra = _judge(
            name,
            role,
            reference[i],
            candidate[i],
            labels if not accuracies and task == "classification" else None,
            gate,
            f"{name}: " if several else "",
        )
        judged.append(result)
        accuracies = accuracies or extra
    first = judged[0]
    headline = _HEADLINE[first.role]
    lower_is_better = headline in ("relative_error", "score_error")
    return Comparison(
        metric=headline,  # type: ignore[arg-type]
        reference=0.0 if lower_is_better else 1.0,
        candidate=first.metrics[headline],  # type: ignore[index]
        passed=all(o.passed for o in judged),
        max_abs_error=first.metrics["max_abs_error"],
        cosine_similarity=first.metrics["cosine_similarity"],
        top1_agreement=first.metrics.get("top1_agreement"),
        reference_accuracy=accuracies.get("reference_accuracy"),
        accuracy=accuracies.get("accuracy"),
        accuracy_drop=first.metrics.get("accuracy_drop"),
        failures=[f for o in judged for f in o.failures],
        task=task,
        outputs=judged,
    )
