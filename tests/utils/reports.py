"""Older report.json schemas, made from a current report the way older releases wrote them."""

from __future__ import annotations

from typing import Any

__all__ = ["as_schema_2"]

_GATE_FROM_3 = ("max_relative_error", "min_box_iou", "max_score_error")


def as_schema_2(report: dict[str, Any]) -> None:
    """What a compile of the release before tasks, per-output comparisons, skipped
    candidates and the int8 accuracy search (schema /3) wrote."""
    report["schema"] = "edgefleet.compile-report/2"
    report.pop("task", None)
    report.pop("failed", None)
    for key in _GATE_FROM_3:
        report["gate"].pop(key, None)
    comparisons = [report.get("accuracy"), *(c.get("accuracy") for c in report["candidates"])]
    for comparison in comparisons:
        if comparison is not None:
            comparison.pop("task", None)
            comparison.pop("outputs", None)
    for candidate in report["candidates"]:
        candidate.pop("accuracy_search", None)
