"""A candidate is one artifact to ship: a runtime at a precision, with what was measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contracts.artifacts import Device, Precision, RuntimeName, artifact_id
from contracts.report import Comparison, GoldenVectors, Latency

__all__ = ["Candidate"]


@dataclass
class Candidate:
    """``artifact`` is what ships; ``runnable`` is what runs here when that differs (a TVM
    build for the board validated through the same module built for this machine)."""

    runtime: RuntimeName
    precision: Precision
    artifact: Path
    runnable: Path
    device: Device = "cpu"
    comparison: Comparison | None = None
    latency: Latency | None = None
    latency_note: str | None = None
    selected: bool = False
    golden: GoldenVectors | None = None

    @property
    def id(self) -> str:
        return artifact_id(self.runtime, self.precision)

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed
