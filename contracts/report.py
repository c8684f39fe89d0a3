"""``report.json``: what a compile writes beside its artifacts, and a bundle is made from.

``edgefleet compile`` builds a :class:`CompileReport` and writes it with
:meth:`CompileReport.to_json`; ``edgefleet ota bundle`` reads it back with
:func:`parse_report`, the only way in from bytes, which raises
:class:`~contracts.errors.ReportError` naming the fields at fault. Every model refuses
unknown keys, so a typo is an error rather than a value silently left out.

The two records other packages share live here too, defined once: the accuracy gate's
thresholds (:class:`AccuracyGate`, a hardware profile's defaults and the ones a compile
applied) and the golden vectors an artifact ships with (:class:`GoldenVectors`, in the
report and in a bundle's manifest).

Keys a record leaves out when they do not apply (a TVM artifact's ``metadata_path``, a
classifier's ``top1_agreement``) are left out of the JSON too, not written as ``null``.

Versions: schema ``/2`` added :class:`ValidatedOn`, where each candidate ran for the gate
and its golden vectors (``validated_on``, required from ``/2`` on). :func:`parse_report`
reads ``/1`` reports too, which have no such key.

Schema ``/3`` added what the gate judged and what could not be judged: the task
(:class:`TaskChoice`, declared or inferred and why), one :class:`OutputComparison` per
model output, regression and detection thresholds in the gate, candidates that could not be
built or run (:class:`CandidateFailure`, in ``failed``) and the int8 accuracy search
(:class:`AccuracySearch`). Those keys have defaults, so ``/1`` and ``/2`` reports still
read; compiles write ``/3``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from .artifacts import PRECISIONS, RUNTIME_NAMES, Device, Precision, RuntimeName, artifact_id
from .errors import ReportError

__all__ = [
    "MAX_REPORT_BYTES",
    "READABLE_SCHEMAS",
    "REFERENCE_LATENCY",
    "REPORT_NAME",
    "REPORT_SCHEMA",
    "TASKS",
    "AccuracyGate",
    "AccuracySearch",
    "Artifact",
    "CandidateFailure",
    "CandidateResult",
    "Comparison",
    "CompileReport",
    "CompileSettings",
    "GoldenVectors",
    "Latency",
    "OutputComparison",
    "SearchStep",
    "SourceInfo",
    "StepRecord",
    "Task",
    "TaskChoice",
    "ValidatedOn",
    "parse_report",
]

REPORT_NAME = "report.json"
REPORT_SCHEMA: Literal["edgefleet.compile-report/3"] = "edgefleet.compile-report/3"
READABLE_SCHEMAS = ("edgefleet.compile-report/1", "edgefleet.compile-report/2", REPORT_SCHEMA)
"""What :func:`parse_report` accepts: this release's schema and the ones before it."""
_WITH_VALIDATED_ON = ("edgefleet.compile-report/2", REPORT_SCHEMA)

Task = Literal["classification", "embedding", "regression", "detection"]
TASKS: tuple[Task, ...] = ("classification", "embedding", "regression", "detection")
MAX_REPORT_BYTES = 16 << 20
REFERENCE_LATENCY = "reference_onnxruntime"
"""The key of ``latency_ms`` that times the unpruned fp32 original on ONNX Runtime."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Record(BaseModel):
    """Strict, frozen, unknown keys refused; fields named in ``_omit_when_empty`` are left
    out of the JSON when ``None`` or empty, as the compiler has always written them."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    _omit_when_empty: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not self._omit_when_empty or not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if key not in self._omit_when_empty or (value is not None and value != [])
        }


def _check_file_name(value: str, what: str) -> None:
    """A plain file name in the compile output directory: no folders, not ``.`` or ``..``."""
    if (
        not value
        or value in (".", "..")
        or any(c in value for c in "/\\\x00")
        or len(value.encode("utf-8", "surrogatepass")) > 100
    ):
        raise ValueError(
            f"{what} {value!r} must be a plain file name in the compile output directory "
            "(1 to 100 bytes, no '/', not '.' or '..')"
        )


def _sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return value


_Sha256 = Annotated[str, AfterValidator(_sha256)]


class AccuracyGate(_Record):
    """Thresholds of the compiler's accuracy gate: a hardware profile's defaults, and in a
    report the ones the compile applied (the profile's, or overridden on the command line)."""

    min_top1_agreement: Annotated[float, Field(ge=0.0, le=1.0)]
    max_accuracy_drop: Annotated[
        float, Field(ge=0.0, le=1.0, description="fraction, 0.01 = 1 point")
    ]
    min_cosine_similarity: Annotated[float, Field(ge=-1.0, le=1.0)]
    max_abs_error: Annotated[
        float | None,
        Field(gt=0.0, description="unset: reported but not gated (scale depends on model)"),
    ] = None
    max_relative_error: Annotated[
        float,
        Field(gt=0.0, description="regression: ||candidate - reference|| / ||reference||"),
    ] = 0.05
    min_box_iou: Annotated[
        float, Field(ge=0.0, le=1.0, description="detection: mean IoU of matching boxes")
    ] = 0.9
    max_score_error: Annotated[
        float, Field(ge=0.0, description="detection: mean absolute difference of scores")
    ] = 0.05


class GoldenVectors(_Record):
    """Inputs and the outputs the artifact gave for them at compile time (an ``.npz``:
    ``input:NAME`` and ``output:INDEX`` arrays), with the tolerance the agent's health check
    allows on the device: ``|got - expected| <= atol + rtol * |expected|`` element-wise,
    and for classifiers the same top-1 class when ``top1`` is set."""

    path: str
    count: Annotated[int, Field(ge=1)]
    atol: Annotated[float, Field(ge=0)]
    rtol: Annotated[float, Field(ge=0)]
    top1: bool


class Latency(_Record):
    """Milliseconds per single call: median and 95th percentile over ``runs`` calls."""

    p50: Annotated[float, Field(ge=0)]
    p95: Annotated[float, Field(ge=0)]
    runs: Annotated[int, Field(ge=1)]
    where: str = Field(description="'host', or 'rpc key KEY' for a board behind a tracker")


Metric = Literal["top1_agreement", "cosine_similarity", "relative_error", "box_iou", "score_error"]


class OutputComparison(_Record):
    """One model output against the reference's, judged by its task's metrics (schema /3)."""

    _omit_when_empty = frozenset({"failures"})

    name: str
    role: Literal["scores", "embedding", "values", "boxes", "box_scores"]
    metrics: dict[Metric | Literal["max_abs_error", "accuracy_drop"], float]
    passed: bool
    failures: list[str] = Field(default_factory=list)


class Comparison(_Record):
    """A candidate's outputs against the fp32 reference's, and the gate's verdict.

    ``metric`` is the headline of the first output (``candidate`` its value, ``reference``
    the reference's); classifiers also get top-1 agreement and, with labels, accuracies.
    From schema ``/3`` on, ``outputs`` judges every output and ``task`` names the task.
    """

    _omit_when_empty = frozenset(
        {
            "top1_agreement",
            "reference_accuracy",
            "accuracy",
            "accuracy_drop",
            "failures",
            "task",
            "outputs",
        }
    )

    metric: Metric
    reference: float
    candidate: float
    passed: bool
    max_abs_error: float
    cosine_similarity: float
    top1_agreement: float | None = None
    reference_accuracy: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    failures: list[str] = Field(
        default_factory=list, description="what failed the gate, one line per threshold"
    )
    task: Task | None = None
    outputs: list[OutputComparison] = Field(default_factory=list)


class TaskChoice(_Record):
    """The task the gate judged the model as: declared with ``--task``, or inferred."""

    task: Task
    declared: bool
    reason: str = Field(description="the evidence, e.g. 'rows of output 0 sum to 1'")


class CandidateFailure(_Record):
    """A candidate that could not be built or run: skipped, the others went on (schema /3)."""

    id: str
    step: str
    cause: str = Field(description="one line")


class SearchStep(_Record):
    """One round of the int8 accuracy search: what was kept in float and how it did."""

    kept_in_float: list[str]
    metric: str
    value: float
    passed: bool


class AccuracySearch(_Record):
    """How int8 found its way past the gate by keeping the most sensitive operators in
    float, or why it could not (``outcome`` ``refused``)."""

    _omit_when_empty = frozenset({"p50_ms_before", "p50_ms_after"})

    outcome: Literal["passed", "refused"]
    kept_in_float: list[str]
    steps: list[SearchStep]
    sensitivity: dict[str, float] = Field(
        description="per quantized operator, its error contribution (SQNR dB lost)"
    )
    size_bytes_before: Annotated[int, Field(ge=0)]
    size_bytes_after: Annotated[int, Field(ge=0)]
    p50_ms_before: float | None = None
    p50_ms_after: float | None = None


class ValidatedOn(_Record):
    """Where a candidate ran for the accuracy gate and its golden vectors (schema ``/2``).

    ``kind``: ``build-machine``, the artifact itself on the compiling machine; ``emulator``,
    the artifact itself on the board's instruction set under qemu user mode (``cpu`` names
    the CPU model); ``host-build``, the same module built for the compiling machine, when
    the artifact cannot run there (a board's GPU, or no emulation). ``summary`` says it in
    words, e.g. "aarch64 under qemu, cortex-a72". Emulated runs are never timed.
    """

    _omit_when_empty = frozenset({"cpu"})

    kind: Literal["build-machine", "emulator", "host-build"]
    arch: str = Field(description="the instruction set it ran on: aarch64, x86_64")
    cpu: str | None = Field(default=None, description="the emulated CPU model")
    summary: str


class SourceInfo(_Record):
    path: str
    kind: Literal["onnx", "keras", "saved_model"]
    sha256: _Sha256


class CompileSettings(_Record):
    """The options the compile ran with."""

    quantize: Precision
    prune: Annotated[float, Field(ge=0.0, lt=1.0)]
    prune_structured: bool
    prune_scope: Literal["global", "layer"]
    keep_float: list[str]
    tune_trials: Annotated[int, Field(ge=0)]
    select: Literal["fastest"] | None
    rpc_tracker: str | None


class Artifact(_Record):
    """One shipped artifact (it passed the gate): files are named relative to the report."""

    _omit_when_empty = frozenset({"metadata_path", "golden", "validated_on"})

    id: str
    runtime: RuntimeName
    precision: Precision
    device: Device
    path: str
    sha256: _Sha256
    size_bytes: Annotated[int, Field(ge=0)]
    metadata_path: str | None = Field(
        default=None,
        description="the input and output signature beside the artifact (TVM, LiteRT)",
    )
    golden: GoldenVectors | None = None
    validated_on: ValidatedOn | None = Field(default=None, description="schema /2 on")

    @model_validator(mode="after")
    def _consistent(self) -> Artifact:
        expected = artifact_id(self.runtime, self.precision)
        if self.id != expected:
            raise ValueError(
                f"artifact id {self.id!r} does not match its runtime and precision "
                f"(expected {expected!r})"
            )
        for what, name in self.files().items():
            _check_file_name(name, what)
        return self

    def files(self) -> dict[str, str]:
        """What each file of the artifact is (``path``, ``metadata_path``, ``golden.path``)
        and its name."""
        files = {"path": self.path}
        if self.metadata_path is not None:
            files["metadata_path"] = self.metadata_path
        if self.golden is not None:
            files["golden.path"] = self.golden.path
        return files


class CandidateResult(_Record):
    """One runtime at one precision that was built and judged, shipped or not."""

    _omit_when_empty = frozenset({"latency_note", "validated_on", "accuracy_search"})

    id: str
    passed: bool
    selected: bool
    accuracy: Comparison | None
    latency_ms: Latency | None
    size_bytes: Annotated[int, Field(ge=0)] | None
    latency_note: str | None = Field(default=None, description="why latency was not measured")
    validated_on: ValidatedOn | None = Field(default=None, description="schema /2 on")
    accuracy_search: AccuracySearch | None = Field(default=None, description="schema /3 on")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        runtime, _, precision = value.partition(":")
        if runtime not in RUNTIME_NAMES or precision not in PRECISIONS:
            raise ValueError(
                f"{value!r} is not RUNTIME:PRECISION with a runtime of "
                f"{', '.join(RUNTIME_NAMES)} and a precision of {', '.join(PRECISIONS)}"
            )
        return value


class StepRecord(_Record):
    name: str
    seconds: Annotated[float, Field(ge=0)]
    detail: dict[str, Any] = Field(description="what the step reports; free-form per step")


class CompileReport(_Record):
    """Everything one compile did and measured, and which artifacts it shipped."""

    model_config = ConfigDict(populate_by_name=True)  # merged with _Record's
    _omit_when_empty = frozenset({"task"})

    schema_: Literal[
        "edgefleet.compile-report/1", "edgefleet.compile-report/2", "edgefleet.compile-report/3"
    ] = Field(alias="schema", default=REPORT_SCHEMA)
    profile: str
    source: SourceInfo
    settings: CompileSettings
    artifacts: list[Artifact]
    latency_ms: dict[str, Latency] = Field(
        description=f"per candidate id, and {REFERENCE_LATENCY!r} for the fp32 original"
    )
    accuracy: Comparison | None = Field(description="the selected (else first) artifact's")
    gate: AccuracyGate
    candidates: list[CandidateResult]
    selected: str | None
    steps: list[StepRecord]
    notes: list[str]
    libraries: dict[str, str]
    created: dt.datetime
    task: TaskChoice | None = Field(default=None, description="schema /3 on")
    failed: list[CandidateFailure] = Field(
        default_factory=list, description="candidates skipped: not built or not run (/3 on)"
    )

    @field_validator("created", mode="before")
    @classmethod
    def _created(cls, value: object) -> object:
        """JSON has no datetime: an ISO 8601 string with a timezone."""
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError as e:
                raise ValueError(f"not an ISO 8601 time: {e}") from e
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            raise ValueError("must carry a timezone (e.g. +00:00)")
        return value

    @field_serializer("created", when_used="json")
    def _created_iso(self, value: dt.datetime) -> str:
        return value.isoformat()

    @model_validator(mode="after")
    def _references(self) -> CompileReport:
        ids = [a.id for a in self.artifacts]
        _no_duplicates("artifacts", ids)
        _no_duplicates("artifact files", [n for a in self.artifacts for n in a.files().values()])
        _no_duplicates("candidates", [c.id for c in self.candidates])
        passed = {c.id for c in self.candidates if c.passed}
        unjudged = [i for i in ids if i not in passed]
        if unjudged:
            raise ValueError(
                f"artifacts {unjudged} are not among the candidates that passed the gate"
            )
        if self.selected is not None and self.selected not in ids:
            raise ValueError(
                f"selected names {self.selected!r}, which is not a shipped artifact; "
                f"the artifacts are {ids}"
            )
        flagged = [c.id for c in self.candidates if c.selected]
        if flagged != ([self.selected] if self.selected else []):
            raise ValueError(
                f"candidates marked selected {flagged} do not match selected {self.selected!r}"
            )
        records: list[tuple[str, Artifact | CandidateResult]] = [
            (f"artifacts.{i}", a) for i, a in enumerate(self.artifacts)
        ]
        records += [(f"candidates.{i}", c) for i, c in enumerate(self.candidates)]
        if self.schema_ in _WITH_VALIDATED_ON:
            missing = [where for where, r in records if r.validated_on is None]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)}: validated_on is required in {self.schema_}"
                )
        else:
            early = [where for where, r in records if r.validated_on is not None]
            if early:
                raise ValueError(
                    f"{', '.join(early)}: validated_on arrived with {_WITH_VALIDATED_ON[0]}, "
                    f"and this report says {self.schema_}"
                )
        return self

    def artifact(self, wanted: str) -> Artifact | None:
        """The shipped artifact with id ``wanted``, if there is one."""
        return next((a for a in self.artifacts if a.id == wanted), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON types, exactly what :meth:`to_json` writes."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True)
        return data

    def to_json(self) -> bytes:
        """The bytes of ``report.json``: indented JSON, keys in field order, a final newline."""
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()


def _no_duplicates(what: str, names: list[str]) -> None:
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{what} list {twice[0]!r} more than once")


def parse_report(data: bytes) -> CompileReport:
    """Validate ``report.json`` bytes; ``ReportError`` names the first fields at fault."""
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(
            f"{REPORT_NAME} is {len(data)} bytes, more than the {MAX_REPORT_BYTES >> 20} MiB "
            "allowed"
        )
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, 4300+ digit integers
        raise ReportError(f"{REPORT_NAME} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{REPORT_NAME} must hold a JSON object, not {type(raw).__name__}")
    schema = raw.get("schema")
    if schema not in READABLE_SCHEMAS:
        found = (
            "no 'schema' key (written before reports were versioned)"
            if schema is None
            else (f"schema {schema!r}")
        )
        readable = ", ".join(repr(s) for s in READABLE_SCHEMAS[:-1])
        readable += f" and {READABLE_SCHEMAS[-1]!r}"
        raise ReportError(
            f"{REPORT_NAME} has {found}; this release reads schemas {readable}: "
            "compile the model again with this release"
        )
    try:
        return CompileReport.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors(include_url=False)[:5])
        raise ReportError(f"{REPORT_NAME} is not a valid compile report: {problems}") from None


def _describe(error: Any) -> str:
    """``field.path: problem``; a problem across fields (a reference) names them itself."""
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (a typo?)"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
