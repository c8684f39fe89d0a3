"""``report.json`` (the model is ``contracts.report.CompileReport``) and ``MODEL_CARD.md``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from contracts.durable import write_atomic
from contracts.report import (
    REFERENCE_LATENCY,
    REPORT_NAME,
    AccuracyGate,
    Artifact,
    CandidateFailure,
    CandidateResult,
    CompileReport,
    CompileSettings,
    Latency,
    SourceInfo,
    StepRecord,
    TaskChoice,
)

from .candidates import Candidate
from .importers import sha256_file
from .output import MODEL_CARD_NAME

__all__ = ["build_report", "library_versions", "write_model_card", "write_report"]

_LIBRARIES = (
    "edgefleet",
    "onnx",
    "onnxruntime",
    "apache-tvm",
    "tensorflow",
    "ai-edge-litert",
    "numpy",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _artifact(candidate: Candidate) -> Artifact:
    sidecar = candidate.artifact.with_suffix(".json")
    return Artifact(
        id=candidate.id,
        runtime=candidate.runtime,
        precision=candidate.precision,
        device=candidate.device,
        path=candidate.artifact.name,
        sha256=sha256_file(candidate.artifact),
        size_bytes=candidate.artifact.stat().st_size,
        metadata_path=sidecar.name if sidecar.exists() else None,
        golden=candidate.golden,
        validated_on=candidate.validated_on,
    )


def _candidate(candidate: Candidate) -> CandidateResult:
    artifact = candidate.artifact
    return CandidateResult(
        id=candidate.id,
        passed=candidate.passed,
        selected=candidate.selected,
        accuracy=candidate.comparison,
        latency_ms=candidate.latency,
        size_bytes=artifact.stat().st_size if artifact.exists() else None,
        latency_note=candidate.latency_note,
        validated_on=candidate.validated_on,
        accuracy_search=candidate.accuracy_search,
    )


def build_report(
    *,
    profile: str,
    source: SourceInfo,
    candidates: list[Candidate],
    reference_latency: Latency | None,
    steps: list[StepRecord],
    gate: AccuracyGate,
    notes: list[str],
    settings: CompileSettings,
    task: TaskChoice | None = None,
    failed: list[CandidateFailure] | None = None,
) -> CompileReport:
    """The report of a compile whose candidates that failed the gate are already removed."""
    shipped = [c for c in candidates if c.passed]
    selected = next((c for c in shipped if c.selected), None)
    headline = selected or (shipped[0] if shipped else None)
    latency = {REFERENCE_LATENCY: reference_latency} if reference_latency is not None else {}
    latency |= {c.id: c.latency for c in candidates if c.latency is not None}
    return CompileReport(
        profile=profile,
        source=source,
        settings=settings,
        artifacts=[_artifact(c) for c in shipped],
        latency_ms=latency,
        accuracy=headline.comparison if headline else None,
        gate=gate,
        candidates=[_candidate(c) for c in candidates],
        selected=selected.id if selected else None,
        steps=steps,
        notes=list(notes),
        libraries=library_versions(),
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        task=task,
        failed=list(failed or []),
    )


def write_report(report: CompileReport, out_dir: Path) -> Path:
    path = out_dir / REPORT_NAME
    write_atomic(path, report.to_json())
    return path


def _summary(detail: dict[str, Any]) -> str:
    """Scalar settings as ``key=value``; nested results by name (report.json has them all)."""
    parts = []
    for key, value in detail.items():
        if isinstance(value, dict | list):
            parts.append(f"{key} (see report.json)")
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts).replace("|", "/") or "-"


def write_model_card(report: CompileReport, out_dir: Path) -> Path:
    """The metadata a model registry needs, for people: what, from what, how, how good."""
    source = report.source
    lines = [
        f"# Model card: {Path(source.path).name} for `{report.profile}`",
        "",
        f"- Source: `{source.path}` ({source.kind}), sha256 `{source.sha256}`",
        f"- Hardware profile: `{report.profile}`",
        f"- Created: {report.created.isoformat()}",
        f"- Selected artifact: `{report.selected or 'not selected (no --select)'}`",
        "",
        "## Steps",
        "",
        "| step | seconds | settings and results |",
        "| --- | ---: | --- |",
    ]
    for step in report.steps:
        lines.append(f"| {step.name} | {step.seconds:.2f} | {_summary(step.detail)} |")
    lines += [
        "",
        "## Candidates",
        "",
        "| artifact | passed gate | metric | value | p50 ms | size bytes | validated on |",
    ]
    lines.append("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for c in report.candidates:
        acc = c.accuracy
        p50 = c.latency_ms.p50 if c.latency_ms else "n/a"
        value = f"{acc.candidate:.4f}" if acc else "n/a"
        metric = acc.metric if acc else "n/a"
        where = c.validated_on.summary if c.validated_on else "n/a"
        lines.append(
            f"| {c.id} | {c.passed} | {metric} | {value} | {p50} | {c.size_bytes} | {where} |"
        )
    if report.failed:
        lines += ["", "## Candidates not built or not run", ""]
        lines += [f"- `{f.id}` ({f.step}): {f.cause}" for f in report.failed]
    searched = [c for c in report.candidates if c.accuracy_search]
    for c in searched:
        search = c.accuracy_search
        assert search is not None
        kept = ", ".join(f"`{name}`" for name in search.kept_in_float) or "none"
        lines += [
            "",
            f"## int8 accuracy search for `{c.id}`: {search.outcome}",
            "",
            f"- Kept in float: {kept}; {len(search.steps)} rounds",
            f"- Size {search.size_bytes_before} -> {search.size_bytes_after} bytes",
        ]
    gate = json.dumps(report.gate.model_dump(mode="json"), sort_keys=True)
    task = report.task
    judged = f"{task.task} ({'declared' if task.declared else task.reason})" if task else "n/a"
    lines += ["", "## Accuracy gate", "", f"- Judged as: {judged}", f"- Thresholds: `{gate}`", ""]
    if report.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    lines += ["## Libraries", "", *[f"- {k} {v}" for k, v in report.libraries.items()], ""]
    path = out_dir / MODEL_CARD_NAME
    write_atomic(path, "\n".join(lines).encode())
    return path
