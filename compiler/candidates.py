"""A candidate is one artifact to ship: a runtime at a precision, with what was measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contracts.artifacts import Device, Precision, RuntimeName, artifact_id
from contracts.report import AccuracySearch, Comparison, GoldenVectors, Latency, ValidatedOn

__all__ = ["Candidate"]


@dataclass
class Candidate:
    """``artifact`` is what ships; ``runnable`` is what runs on this machine when that
    differs (a TVM build for the board validated through the same module built for this
    machine); ``validated_on`` says where the gate and the golden vectors run it."""

    runtime: RuntimeName
    precision: Precision
    artifact: Path
    runnable: Path
    validated_on: ValidatedOn
    device: Device = "cpu"
    comparison: Comparison | None = None
    latency: Latency | None = None
    latency_note: str | None = None
    selected: bool = False
    golden: GoldenVectors | None = None
    accuracy_search: AccuracySearch | None = None
    plain_int8: Path | None = None
    """The int8 model before the accuracy search, kept to time what the search cost."""

    @property
    def id(self) -> str:
        return artifact_id(self.runtime, self.precision)

    @property
    def emulated(self) -> bool:
        return self.validated_on.kind == "emulator"

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed
