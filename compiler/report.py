"""``report.json`` (keys in DESIGN.md) and ``MODEL_CARD.md`` for a compile."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from .candidates import Candidate, Latency
from .importers import sha256_file

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


def _artifact(candidate: Candidate) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": candidate.id,
        "runtime": candidate.runtime,
        "precision": candidate.precision,
        "device": candidate.device,
        "path": candidate.artifact.name,
        "sha256": sha256_file(candidate.artifact),
        "size_bytes": candidate.artifact.stat().st_size,
    }
    sidecar = candidate.artifact.with_suffix(".json")
    if candidate.runtime == "tvm" and sidecar.exists():
        entry["metadata_path"] = sidecar.name
    if candidate.golden is not None:
        entry["golden"] = candidate.golden.as_report()
    return entry


def build_report(
    *,
    profile: str,
    source: dict[str, Any],
    candidates: list[Candidate],
    reference_latency: Latency | None,
    steps: list[dict[str, Any]],
    gate: dict[str, Any],
    notes: list[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    shipped = [c for c in candidates if c.passed]
    selected = next((c for c in shipped if c.selected), None)
    headline = selected or (shipped[0] if shipped else None)
    latency: dict[str, Any] = {}
    if reference_latency is not None:
        latency["reference_onnxruntime"] = reference_latency.as_report()
    for c in candidates:
        if c.latency is not None:
            latency[c.id] = c.latency.as_report()
    return {
        "profile": profile,
        "source": source,
        "settings": settings,
        "artifacts": [_artifact(c) for c in shipped],
        "latency_ms": latency,
        "accuracy": headline.comparison.as_report() if headline and headline.comparison else None,
        "gate": gate,
        "candidates": [
            {
                "id": c.id,
                "passed": c.passed,
                "selected": c.selected,
                "accuracy": c.comparison.as_report() if c.comparison else None,
                "latency_ms": c.latency.as_report() if c.latency else None,
                "size_bytes": c.artifact.stat().st_size if c.artifact.exists() else None,
                **({"latency_note": c.latency_note} if c.latency_note else {}),
            }
            for c in candidates
        ],
        "selected": selected.id if selected else None,
        "steps": steps,
        "notes": notes,
        "libraries": library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
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


def write_model_card(report: dict[str, Any], out_dir: Path) -> Path:
    """The metadata a model registry needs, for people: what, from what, how, how good."""
    lines = [
        f"# Model card: {Path(report['source']['path']).name} for `{report['profile']}`",
        "",
        f"- Source: `{report['source']['path']}` ({report['source']['kind']}), "
        f"sha256 `{report['source']['sha256']}`",
        f"- Hardware profile: `{report['profile']}`",
        f"- Created: {report['created']}",
        f"- Selected artifact: `{report['selected'] or 'not selected (no --select)'}`",
        "",
        "## Steps",
        "",
        "| step | seconds | settings and results |",
        "| --- | ---: | --- |",
    ]
    for step in report["steps"]:
        lines.append(f"| {step['name']} | {step['seconds']:.2f} | {_summary(step['detail'])} |")
    lines += [
        "",
        "## Candidates",
        "",
        "| artifact | passed gate | metric | value | p50 ms | size bytes |",
    ]
    lines.append("| --- | --- | --- | ---: | ---: | ---: |")
    for c in report["candidates"]:
        acc = c["accuracy"] or {}
        p50 = (c["latency_ms"] or {}).get("p50", "n/a")
        value = f"{acc['candidate']:.4f}" if acc else "n/a"
        metric = acc.get("metric", "n/a")
        lines.append(
            f"| {c['id']} | {c['passed']} | {metric} | {value} | {p50} | {c['size_bytes']} |"
        )
    lines += ["", "## Accuracy gate", "", f"`{json.dumps(report['gate'], sort_keys=True)}`", ""]
    if report["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    lines += ["## Libraries", "", *[f"- {k} {v}" for k, v in report["libraries"].items()], ""]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
