"""``contracts.report``: report.json read back through its model, and refused when it lies."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.errors import ReportError
from contracts.report import REPORT_SCHEMA, parse_report
from tests.utils.reports import as_schema_2


@pytest.fixture
def report(compiled_digits: Path) -> dict[str, Any]:
    """The report of a real compile (host: onnxruntime, litert and tvm fp32), as JSON types."""
    raw: dict[str, Any] = json.loads((compiled_digits / "report.json").read_text())
    return raw


def test_a_real_report_round_trips_byte_for_byte(compiled_digits: Path) -> None:
    data = (compiled_digits / "report.json").read_bytes()
    parsed = parse_report(data)
    assert parsed.to_json() == data
    assert parsed.schema_ == REPORT_SCHEMA
    assert [a.id for a in parsed.artifacts] == ["onnxruntime:fp32", "litert:fp32", "tvm:fp32"]
    tvm = parsed.artifact("tvm:fp32")
    assert tvm is not None and tvm.metadata_path == "tvm-fp32.json" and tvm.golden is not None
    assert "metadata_path" not in json.loads(data)["artifacts"][0]  # absent, not null
    assert parsed.gate.min_top1_agreement == 0.97
    assert parsed.schema_ == "edgefleet.compile-report/3"
    assert {a.validated_on.kind for a in parsed.artifacts if a.validated_on} == {"build-machine"}
    assert parsed.task is not None and parsed.task.task == "classification"
    assert parsed.failed == []
    accuracy = parsed.candidates[0].accuracy
    assert accuracy is not None and [o.role for o in accuracy.outputs] == ["scores"]


def test_a_schema_2_report_without_tasks_still_reads(report: dict[str, Any]) -> None:
    as_schema_2(report)
    parsed = parse_report(json.dumps(report).encode())
    assert parsed.schema_ == "edgefleet.compile-report/2"
    assert parsed.task is None and parsed.failed == []
    assert parsed.gate.min_box_iou == 0.9  # a threshold /2 did not have reads as its default


def test_a_schema_1_report_without_validated_on_still_reads(report: dict[str, Any]) -> None:
    as_schema_2(report)
    report["schema"] = "edgefleet.compile-report/1"
    for record in (*report["artifacts"], *report["candidates"]):
        del record["validated_on"]
    parsed = parse_report(json.dumps(report).encode())
    assert parsed.schema_ == "edgefleet.compile-report/1"
    assert all(a.validated_on is None for a in parsed.artifacts)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the dotted ``path`` (list indexes as numbers) to ``value``."""

    def edit(report: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = report
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    """An edit that removes the dotted ``path``."""

    def edit(report: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = report
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return edit


def _duplicate_artifact(report: dict[str, Any]) -> None:
    report["artifacts"].append(report["artifacts"][0])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("artifacts.0.id", "tvm:fp32"), "does not match its runtime and precision"),
        (_set("artifacts.0.precision", "none"), "artifacts.0.precision: Input should be 'fp32'"),
        (_set("artifacts.1.metadata_path", "../tvm-fp32.json"), "must be a plain file name"),
        (_set("artifacts.0.golden.path", "sub/golden.npz"), "must be a plain file name"),
        (_set("artifacts.0.sha256", "ABC"), "64 lowercase hex digits"),
        (_duplicate_artifact, "artifacts list 'onnxruntime:fp32' more than once"),
        (_set("candidates.0.passed", False), "not among the candidates that passed the gate"),
        (_set("candidates.0.selected", True), "do not match selected None"),
        (_set("created", "2026-01-01T00:00:00"), "created: must carry a timezone (e.g. +00:00)"),
        (_set("settings.quantize", "none"), "settings.quantize: Input should be"),
        (_set("steps.0.seconds", "fast"), "steps.0.seconds: Input should be a valid number"),
        (_set("gate.min_top1_agreement", 2.0), "gate.min_top1_agreement"),
        (_drop("candidates.1.validated_on"), "candidates.1: validated_on is required in"),
        (_set("artifacts.0.validated_on.kind", "board"), "validated_on.kind: Input should be"),
        (_set("schema", "edgefleet.compile-report/1"), "validated_on arrived with"),
        (_set("failed", [{"id": "tvm:fp16", "step": "build"}]), "failed.0.cause: Field required"),
        (_set("task", {"task": "segmentation", "declared": True, "reason": "-"}), "task.task"),
    ],
)
def test_a_report_that_does_not_hold_is_refused_naming_the_field(
    report: dict[str, Any], edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    edit(report)
    with pytest.raises(ReportError) as caught:
        parse_report(json.dumps(report).encode())
    assert expected in str(caught.value)


def test_bytes_that_are_not_a_report_are_refused() -> None:
    with pytest.raises(ReportError, match="not valid JSON"):
        parse_report(b"{")
    with pytest.raises(ReportError, match="must hold a JSON object, not list"):
        parse_report(b"[]")
    with pytest.raises(ReportError, match="no 'schema' key"):
        parse_report(b"{}")
