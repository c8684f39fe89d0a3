"""A candidate is one artifact to ship: a runtime at a precision, with what was measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contracts.artifacts import RuntimeName

from .validate import Comparison

if TYPE_CHECKING:
    from .golden import Golden

__all__ = ["PRECISIONS", "Candidate", "Latency", "Precision", "candidate_id", "precision_label"]

Precision = Literal["none", "int8", "int8-dynamic", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("none", "int8", "int8-dynamic", "fp16")


def precision_label(precision: Precision) -> str:
    """How reports and file names say a precision: fp32 for no quantization."""
    return "fp32" if precision == "none" else precision


def candidate_id(runtime: str, precision: Precision) -> str:
    """``runtime:precision`` as reports name a candidate."""
    return f"{runtime}:{precision_label(precision)}"


@dataclass(frozen=True)
class Latency:
    p50: float
    p95: float
    runs: int
    where: str

    def as_report(self) -> dict[str, Any]:
        return {
            "p50": round(self.p50, 4),
            "p95": round(self.p95, 4),
            "runs": self.runs,
            "where": self.where,
        }


@dataclass
class Candidate:
    """``artifact`` is what ships; ``runnable`` is what runs here when that differs (a TVM
    build for the board validated through the same module built for this machine)."""

    runtime: RuntimeName
    precision: Precision
    artifact: Path
    runnable: Path
    device: Literal["cpu", "gpu"] = "cpu"
    comparison: Comparison | None = None
    latency: Latency | None = None
    latency_note: str | None = None
    selected: bool = False
    golden: Golden | None = None

    @property
    def id(self) -> str:
        return candidate_id(self.runtime, self.precision)

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed
