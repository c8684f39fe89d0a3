"""The compile pipeline: named steps run in order over one context, timed by hooks.

Steps live in a registry that refuses duplicates; each takes the ``CompileContext`` and
returns the detail the report shows for it. Timing and progress are hooks around the
steps, never code inside them. Artifacts are built in a staging directory next to the
output and published only when every step, the accuracy gate included, has passed.

One candidate that cannot be built or run never ends the compile: it is recorded (runtime,
precision, step, a one-line cause) in the report's ``failed`` and on stderr, removed, and
the others go on; only when none is left does the compile stop.

Where artifacts run for the gate and the golden vectors: on this machine when the profile's
target does; else, when this machine can emulate the board (``compiler/emulation``), the
artifacts themselves on an emulated board with the profile's CPU model; else the artifacts
that are portable (ONNX, TFLite) here and TVM through a twin built for this machine. Each
candidate's ``validated_on`` records which; emulated runs are never timed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnx

from agent.errors import AgentError
from agent.runtimes import OnnxRuntime, Runtime, load_runtime, write_signature
from contracts.artifacts import LEGACY_FP32, PRECISIONS, Precision, RuntimeName, artifact_id
from contracts.drift import DRIFT_REFERENCE_FILE, reference_from_samples
from contracts.report import (
    TASKS,
    AccuracyGate,
    CandidateFailure,
    Comparison,
    CompileReport,
    CompileSettings,
    Latency,
    SourceInfo,
    StepRecord,
    TaskChoice,
    ValidatedOn,
)
from contracts.tensors import TensorSpec
from hw_profiles import Profile
from hw_profiles.host import detect_host, runs_here

from . import emulation, int8_search, litert, onnx_to_tf, quantize, tune, tvm_build
from .candidates import Candidate
from .data import Dataset, load_dataset
from .errors import (
    AccuracyGateError,
    DataError,
    EmulationError,
    ModelImportError,
    OptionError,
    StepError,
    UnsupportedTargetError,
)
from .golden import golden_inputs, write_golden
from .importers import SourceModel, import_model
from .measure import measure_latency
from .output import check_output_dir, publish
from .prune import PruneScope, magnitude_prune, structured_prune
from .report import build_report, write_model_card, write_report
from .tune import RpcTarget
from .validate import boxes_index, compare, infer_task

__all__ = [
    "DEFAULT_PIPELINE",
    "CompileContext",
    "CompileOptions",
    "StepHook",
    "TaskOption",
    "compile_model",
    "register_step",
]


TaskOption = Literal["auto", "classification", "embedding", "regression", "detection"]


@dataclass(frozen=True)
class CompileOptions:
    model: Path
    profile: Profile
    out_dir: Path
    calibration: Path | None = None
    validation: Path | None = None
    quantize: Precision = "fp32"
    prune: float = 0.0
    prune_structured: bool = False
    prune_scope: PruneScope = "global"
    keep_float: tuple[str, ...] = ()  # ONNX node names int8 quantization leaves in float
    tune_trials: int = 0
    tune_time_s: float | None = None  # a time budget for tuning, alone or beside trials
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    rpc: RpcTarget | None = None
    select: Literal["fastest"] | None = None
    gate: AccuracyGate | None = None  # None: the profile's
    latency_runs: int = 50
    emulation: Literal["auto", "on", "off"] = "auto"
    """For a profile this machine cannot run: ``auto`` runs its artifacts on an emulated
    board when this machine can and the userland is built; ``on`` requires that, building
    the userland first if needed (minutes, once); ``off`` validates on this machine."""
    force: bool = False
    """Replace ``out_dir`` even when it is not an earlier compile output (never the
    current directory, one above it, or one holding the model)."""
    task: TaskOption = "auto"
    """What the outputs hold, which decides the gate's metrics; ``auto`` infers it."""
    accuracy_search: bool = True
    """A static int8 candidate that misses the gate keeps its most sensitive operators in
    float until it passes (``compiler/int8_search.py``); off: it is refused."""

    def __post_init__(self) -> None:
        if self.task != "auto" and self.task not in TASKS:
            raise ValueError(f"task must be auto or one of {', '.join(TASKS)}, got {self.task!r}")
        if self.quantize not in PRECISIONS:
            renamed = " (it is now called 'fp32')" if self.quantize == LEGACY_FP32 else ""
            raise ValueError(
                f"quantize must be one of {', '.join(PRECISIONS)}, got {self.quantize!r}{renamed}"
            )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet"


@dataclass(frozen=True)
class _Emulator:
    """The emulated board the profile's artifacts run on, chosen by the emulator step."""

    userland: emulation.Userland
    board: emulation.BoardSpec


@dataclass
class CompileContext:
    options: CompileOptions
    staging: Path
    work: Path
    source: SourceModel | None = None
    model_path: Path | None = None  # the fp32 ONNX every candidate starts from
    calibration: Dataset | None = None
    validation: Dataset | None = None
    precisions: list[Precision] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    tuning_database: Path | None = None
    emulator: _Emulator | None = None
    reference_latency: Latency | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[CandidateFailure] = field(default_factory=list)
    task: TaskChoice | None = None
    reference_outputs: list[np.ndarray] | None = None
    """The fp32 original's outputs on the validation data, once the validate step ran."""

    @property
    def profile(self) -> Profile:
        return self.options.profile

    @property
    def gate(self) -> AccuracyGate:
        return self.options.gate or self.profile.accuracy_gate

    def model(self) -> SourceModel:
        if self.source is None:
            raise RuntimeError("the import step has not run")
        return self.source


StepFn = Callable[[CompileContext], dict[str, Any]]
_STEPS: dict[str, StepFn] = {}
DEFAULT_PIPELINE = (
    "import",
    "emulator",
    "prune",
    "quantize",
    "tune",
    "build",
    "validate",
    "drift",
    "measure",
    "select",
    "golden",
)


def register_step(name: str) -> Callable[[StepFn], StepFn]:
    def add(fn: StepFn) -> StepFn:
        if name in _STEPS:
            raise ValueError(f"a step named {name!r} is already registered")
        _STEPS[name] = fn
        return fn

    return add


class StepHook(Protocol):
    def before_step(self, name: str) -> None: ...

    def after_step(self, name: str, seconds: float, detail: dict[str, Any]) -> None: ...


class _StepRecorder:
    """Keeps each step's time and detail for report.json."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def before_step(self, name: str) -> None:
        pass

    def after_step(self, name: str, seconds: float, detail: dict[str, Any]) -> None:
        self.records.append(StepRecord(name=name, seconds=round(seconds, 3), detail=detail))


# --- steps -------------------------------------------------------------------------------


@register_step("import")
def _import(ctx: CompileContext) -> dict[str, Any]:
    source = import_model(ctx.options.model, ctx.work)
    ctx.source, ctx.model_path = source, source.onnx_path
    if ctx.options.calibration is not None:
        ctx.calibration = load_dataset(ctx.options.calibration, source.inputs)
    if ctx.options.validation is not None:
        ctx.validation = load_dataset(ctx.options.validation, source.inputs)
    elif ctx.calibration is not None:
        if len(ctx.calibration) < 2:
            raise DataError(f"{ctx.options.calibration}: need at least 2 samples to split")
        ctx.calibration, ctx.validation = ctx.calibration.split(0.5)
        ctx.notes.append(
            "no --validation file: calibrated on the first half of the calibration data, "
            "validated on the second half"
        )
    else:
        ctx.notes.append(
            "no data given: static int8 and the accuracy gate are skipped "
            "(pass --calibration FILE.npz)"
        )
    ctx.precisions = _plan_precisions(ctx)
    if ctx.options.task != "auto":
        ctx.task = TaskChoice(task=ctx.options.task, declared=True, reason="declared with --task")
    return {
        "kind": source.kind,
        "sha256": source.sha256,
        "inputs": [f"{s.name}{list(s.shape)}" for s in source.inputs],
        "calibration_samples": len(ctx.calibration) if ctx.calibration else 0,
        "validation_samples": len(ctx.validation) if ctx.validation else 0,
        "precisions": list(ctx.precisions),
    }


def _plan_precisions(ctx: CompileContext) -> list[Precision]:
    supported = ctx.profile.quantization
    if ctx.options.select == "fastest":
        chosen: list[Precision] = [p for p in supported if p != "int8" or ctx.calibration]
        if "int8" in supported and "int8" not in chosen:
            ctx.notes.append("static int8 not tried: it calibrates on data (pass --calibration)")
        return ["fp32", *[p for p in chosen if p != "fp32"]]
    wanted = ctx.options.quantize
    if wanted != "fp32" and wanted not in supported:
        raise UnsupportedTargetError(
            f"profile {ctx.profile.name!r} does not list quantization {wanted!r}; "
            f"it supports {', '.join(supported)}"
        )
    if wanted == "int8" and ctx.calibration is None:
        raise DataError(
            "static int8 calibrates on data: pass --calibration FILE.npz, "
            "or use --quantize int8-dynamic, which needs none"
        )
    return [wanted]


@register_step("prune")
def _prune(ctx: CompileContext) -> dict[str, Any]:
    sparsity = ctx.options.prune
    if sparsity <= 0:
        return {"skipped": "no --prune"}
    model = onnx.load(str(ctx.model().onnx_path))
    if ctx.options.prune_structured:
        pruned, report = structured_prune(model, sparsity)
    else:
        pruned, report = magnitude_prune(model, sparsity, ctx.options.prune_scope)
    ctx.model_path = ctx.work / "pruned.onnx"
    onnx.save(pruned, str(ctx.model_path))
    return report.as_detail()


@register_step("emulator")
def _emulator(ctx: CompileContext) -> dict[str, Any]:
    """Choose where the artifacts of a profile this machine cannot run will run (see the
    module doc and ``CompileOptions.emulation``)."""
    here, why = _runs_here(ctx)
    if here:
        return {"skipped": "the profile's target runs on this machine"}
    mode, arch = ctx.options.emulation, ctx.profile.arch
    if mode == "off":
        return {"skipped": "--emulation off"}
    spec = emulation.agent_userland_spec(arch)
    cache = ctx.options.cache_dir
    reason: str | None = None
    userland: emulation.Userland | None = None
    if ctx.profile.emulation is None:
        reason = f"profile {ctx.profile.name!r} has no [emulation] section naming a CPU model"
    elif mode == "auto" and emulation.find_userland(spec, cache) is None:
        reason = (
            f"no {arch} userland is built in {cache / 'userlands'} "
            "(--emulation on builds it once, in a few minutes)"
        )
    else:
        reason = emulation.emulation_unavailable(arch)
    if reason is None:
        try:
            userland = emulation.ensure_userland(
                spec, cache, echo=lambda line: print(line, file=sys.stderr)
            )
        except EmulationError as e:
            reason = str(e)
    if userland is None or ctx.profile.emulation is None:
        if mode == "on":
            raise UnsupportedTargetError(f"--emulation on, but {arch} cannot be emulated: {reason}")
        ctx.notes.append(
            f"validated on this machine, not on {arch} ({why}): {reason}; a TVM build for the "
            "board is validated through the same module built for this machine"
        )
        return {"skipped": reason}
    board = emulation.BoardSpec(ctx.profile.emulation.qemu_cpu)
    ctx.emulator = _Emulator(userland, board)
    return {"board": board.summary, "userland": str(userland.directory)}


def _validated_on(ctx: CompileContext, device: str, *, twin: bool = False) -> ValidatedOn:
    """Where a candidate will run for the gate and the golden vectors."""
    host = str(detect_host()["arch"])
    if twin:
        return ValidatedOn(
            kind="host-build", arch=host, summary=f"host build of the same module ({host})"
        )
    if ctx.emulator is None:
        return ValidatedOn(
            kind="build-machine", arch=host, summary=f"the artifact itself on this {host} machine"
        )
    board = ctx.emulator.board
    provider = (
        " (CPU execution provider: the board's GPU is not emulated)" if device == "gpu" else ""
    )
    return ValidatedOn(
        kind="emulator", arch=ctx.profile.arch, cpu=board.cpu, summary=board.summary + provider
    )


_BAD_INPUT = (DataError, ModelImportError, OptionError)
"""Errors of the user's input: they end the compile, never skip only one candidate."""


def _one_line(error: BaseException) -> str:
    """The line of ``error`` that says what went wrong (TVM's start with a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Traceback", "File ", "0:", "1:"))]
    line = (useful or lines or [type(error).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _skip(
    ctx: CompileContext,
    runtime: RuntimeName,
    precision: Precision,
    step: str,
    error: BaseException,
    candidate: Candidate | None = None,
) -> None:
    """Record a candidate that could not be built or run, say so on stderr, and drop it
    (with its files) so the others go on."""
    cid = artifact_id(runtime, precision)
    failure = CandidateFailure(id=cid, step=step, cause=_one_line(error))
    ctx.failures.append(failure)
    print(f"skipped {failure.id}: {step} failed: {failure.cause}", file=sys.stderr, flush=True)
    if candidate is not None and candidate in ctx.candidates:
        ctx.candidates.remove(candidate)
        candidate.artifact.unlink(missing_ok=True)
        candidate.artifact.with_suffix(".json").unlink(missing_ok=True)


def _artifact_path(
    ctx: CompileContext, runtime: RuntimeName, precision: Precision, suffix: str
) -> Path:
    return ctx.staging / f"{runtime}-{precision}{suffix}"


@register_step("quantize")
def _quantize(ctx: CompileContext) -> dict[str, Any]:
    """ONNX Runtime and LiteRT artifacts, one per precision."""
    assert ctx.model_path is not None
    detail: dict[str, Any] = {}
    runtimes = {r.name: r for r in ctx.profile.runtimes}
    if "litert" in runtimes and ctx.model().is_tensorflow and ctx.options.prune > 0:
        ctx.notes.append("litert converts the TensorFlow model, which is not pruned")
    litert_source = _litert_source(ctx) if "litert" in runtimes else None
    for precision in ctx.precisions:
        if "onnxruntime" in runtimes:
            path = _artifact_path(ctx, "onnxruntime", precision, ".onnx")
            try:
                detail[artifact_id("onnxruntime", precision)] = quantize.quantize_onnx(
                    ctx.model_path, path, precision, ctx.calibration, ctx.options.keep_float
                )
            except _BAD_INPUT:
                raise
            except Exception as e:  # one candidate's failure: the others go on
                _skip(ctx, "onnxruntime", precision, "quantize", e)
            else:
                device = runtimes["onnxruntime"].device
                where = _validated_on(ctx, device)
                candidate = Candidate("onnxruntime", precision, path, path, where, device)
                ctx.candidates.append(candidate)
        if litert_source is not None:
            path = _artifact_path(ctx, "litert", precision, ".tflite")
            try:
                detail[artifact_id("litert", precision)] = litert.convert(
                    litert_source, path, precision, ctx.calibration
                )
            except _BAD_INPUT:
                raise
            except Exception as e:  # one candidate's failure: the others go on
                _skip(ctx, "litert", precision, "quantize", e)
                continue
            # The converter renames inputs (image -> serving_default_image:0): the sidecar
            # keeps the source's names, which the agent serves whatever the runtime.
            write_signature(
                path,
                tvm_build.batch_one(ctx.model().inputs),
                tvm_build.batch_one(ctx.model().outputs),
            )
            ctx.candidates.append(
                Candidate("litert", precision, path, path, _validated_on(ctx, "cpu"))
            )
    return detail


def _litert_source(ctx: CompileContext) -> SourceModel | None:
    """What LiteRT's converter reads: the TensorFlow source, or for an ONNX source the
    SavedModel onnx2tf makes of it (``compiler/onnx_to_tf.py``); ``None`` when there is
    none, said in a note or, for a failed conversion, as every LiteRT candidate's failure."""
    if ctx.model().is_tensorflow:
        return ctx.model()
    if not onnx_to_tf.available():
        ctx.notes.append(f"litert skipped for this ONNX source: {onnx_to_tf.INSTALL_HINT}")
        return None
    assert ctx.model_path is not None
    try:
        return onnx_to_tf.to_saved_model(ctx.model_path, ctx.work / "onnx2tf", ctx.model())
    except StepError as e:
        for precision in ctx.precisions:
            _skip(ctx, "litert", precision, "convert", e)
        return None


def _runs_here(ctx: CompileContext) -> tuple[bool, str]:
    return runs_here(ctx.profile.arch, ctx.profile.targets.cpu)


@register_step("tune")
def _tune(ctx: CompileContext) -> dict[str, Any]:
    trials, budget_s = ctx.options.tune_trials, ctx.options.tune_time_s
    if budget_s is not None and trials <= 0:
        trials = tune.TIME_ONLY_TRIALS
    if trials <= 0 or ctx.profile.runtime("tvm") is None:
        why = "no --tune-trials or --tune-time" if trials <= 0 else "profile has no tvm runtime"
        return {"skipped": why}
    here, why = _runs_here(ctx)
    if not here and ctx.options.rpc is None:
        raise UnsupportedTargetError(
            f"tuning measures candidates on the target, and {why}; pass --rpc-tracker HOST:PORT "
            "--rpc-key KEY to tune on a board, or --tune-trials 0"
        )
    assert ctx.model_path is not None
    result = tune.tune_model(
        ctx.model_path,
        ctx.profile,
        inputs=ctx.model().inputs,
        trials=trials,
        cache_root=ctx.options.cache_dir,
        rpc=ctx.options.rpc,
        time_budget_s=budget_s,
        echo=lambda line: print(line, file=sys.stderr, flush=True),
    )
    ctx.tuning_database = result.database
    return result.as_detail()


@register_step("build")
def _build(ctx: CompileContext) -> dict[str, Any]:
    tvm_runtime = ctx.profile.runtime("tvm")
    if tvm_runtime is None:
        return {"skipped": "profile has no tvm runtime"}
    assert ctx.model_path is not None
    detail: dict[str, Any] = {}
    here, _ = _runs_here(ctx)
    device = tvm_runtime.device
    twin = not here and (device == "gpu" or ctx.emulator is None)
    for precision in _tvm_precisions(ctx):
        path = _artifact_path(ctx, "tvm", precision, ".so")
        try:
            build = tvm_build.build(
                ctx.model_path,
                ctx.profile,
                path,
                precision=precision,
                device=tvm_runtime.device,
                database=ctx.tuning_database,
                inputs=ctx.model().inputs,
                outputs=ctx.model().outputs,
                work=ctx.work,
                twin=twin,
            )
        except tvm_build.GpuToolchainMissing as e:
            ctx.notes.append(
                f"{artifact_id('tvm', precision)} ({tvm_runtime.device}) not built: {e}"
            )
            continue
        except Exception as e:  # one candidate's failure: the others go on
            _skip(ctx, "tvm", precision, "build", e)
            continue
        where = _validated_on(ctx, device, twin=twin)
        ctx.candidates.append(Candidate("tvm", precision, path, build.runnable, where, device))
        detail[artifact_id("tvm", precision)] = build.as_detail() | {"validated_on": where.summary}
    return detail


def _load_reference(ctx: CompileContext) -> OnnxRuntime:
    """The unpruned fp32 original on ONNX Runtime, threaded like every candidate."""
    return OnnxRuntime(ctx.model().onnx_path, threads=os.cpu_count() or 1)


def _load(candidate: Candidate) -> Runtime:
    """The runtime for what runs here of ``candidate``, on every core like TVM's runtime (so
    latencies compare); a build that does not load is a failed step, not bad input."""
    threads = {} if candidate.runtime == "tvm" else {"threads": os.cpu_count() or 1}
    try:
        return load_runtime(candidate.runtime, candidate.runnable, **threads)
    except AgentError as e:
        raise StepError(f"{candidate.id} was built but does not load: {e}") from e


def _run(
    ctx: CompileContext, candidates: list[Candidate], inputs: dict[str, np.ndarray], purpose: str
) -> dict[str, list[np.ndarray]]:
    """Each candidate's outputs for ``inputs``, computed where its ``validated_on`` says: on
    this machine, or (in one batch) on the emulated board."""
    outputs: dict[str, list[np.ndarray]] = {}
    for candidate in candidates:
        if not candidate.emulated:
            try:
                runtime = _load(candidate)
                try:
                    outputs[candidate.id] = runtime.predict_batch(inputs)
                finally:
                    runtime.close()
            except Exception as e:  # one candidate's failure: the others go on
                _skip(ctx, candidate.runtime, candidate.precision, purpose, e, candidate)
    emulated = [c for c in candidates if c.emulated]
    attempt = 0
    while emulated:  # each failure drops its culprit and runs the rest, in a fresh folder
        attempt += 1
        assert ctx.emulator is not None
        board = ctx.emulator.board
        artifacts = [emulation.ArtifactToRun(c.id, c.runtime, c.artifact) for c in emulated]
        work = ctx.work / f"board-{purpose}-{attempt}"
        try:
            outputs |= emulation.run_artifacts(
                ctx.emulator.userland, board, artifacts, inputs, work
            )
            break
        except emulation.EmulatedRunError as e:
            culprit = next((c for c in emulated if c.id == e.artifact), None)
            if culprit is None:
                raise StepError(f"the artifacts do not run on {board.summary}: {e.detail}") from e
            cause = StepError(f"built but does not run on {board.summary}: {e.detail}")
            _skip(ctx, culprit.runtime, culprit.precision, purpose, cause, culprit)
            emulated.remove(culprit)
    return outputs


def _tvm_precisions(ctx: CompileContext) -> list[Precision]:
    """TVM builds fp32 and fp16; an int8 request gets a TVM fp32 build beside the int8
    ONNX Runtime / LiteRT artifacts (TVM here has no int8 kernels that beat fp32)."""
    unsupported = [p for p in ctx.precisions if p not in tvm_build.TVM_PRECISIONS]
    if unsupported:
        ctx.notes.append(f"tvm {', '.join(unsupported)} not built: {tvm_build.TVM_PRECISIONS_WHY}")
    chosen: list[Precision] = []
    for precision in ctx.precisions:
        substitute: Precision = precision if precision in tvm_build.TVM_PRECISIONS else "fp32"
        if substitute not in chosen:
            chosen.append(substitute)
    return chosen


@register_step("validate")
def _validate(ctx: CompileContext) -> dict[str, Any]:
    """Every candidate against the unpruned fp32 original on ONNX Runtime (this machine's)."""
    if ctx.validation is None:
        return {"skipped": "no validation data"}
    data = ctx.validation
    reference = _load_reference(ctx).predict_batch(data.inputs)
    ctx.reference_outputs = reference
    names = [spec.name for spec in ctx.model().outputs]
    ctx.task = _judged_task(ctx, reference, names, data.labels)
    outputs = _run(ctx, list(ctx.candidates), data.inputs, "validate")
    detail: dict[str, Any] = {"task": ctx.task.model_dump(mode="json")}

    def judge(candidate_outputs: list[np.ndarray]) -> Comparison:
        assert ctx.task is not None
        return compare(reference, candidate_outputs, data.labels, ctx.gate, ctx.task.task, names)

    for candidate in ctx.candidates:
        candidate.comparison = judge(outputs[candidate.id])
        if not candidate.passed and _searchable(ctx, candidate):
            _search_int8(ctx, candidate, judge)
        assert candidate.comparison is not None
        detail[candidate.id] = candidate.comparison.model_dump(mode="json") | {
            "validated_on": candidate.validated_on.summary
        }
        if candidate.accuracy_search is not None:
            detail[candidate.id]["accuracy_search"] = candidate.accuracy_search.outcome
    if not ctx.candidates:
        raise StepError(_none_left(ctx))
    failed = [c for c in ctx.candidates if not c.passed]
    if failed and ctx.options.select is None:
        raise AccuracyGateError(
            "accuracy gate failed, nothing published: "
            + "; ".join(
                f"{c.id}: {', '.join(c.comparison.failures)}" for c in failed if c.comparison
            )
            + f" (thresholds from profile {ctx.profile.name!r}; override them on the command line)"
        )
    if ctx.candidates and not any(c.passed for c in ctx.candidates):
        raise AccuracyGateError("accuracy gate failed for every candidate, nothing published")
    return detail


@register_step("drift")
def _drift(ctx: CompileContext) -> dict[str, Any]:
    """The validation data's drift reference profile (``contracts/drift.py``), written next to
    the report for ``edgefleet ota bundle`` to ship: what the agent compares its inputs with."""
    data = ctx.validation
    if data is None:
        return {"skipped": "no validation data: bundles of this compile carry no drift reference"}
    outputs = ctx.reference_outputs or _load_reference(ctx).predict_batch(data.inputs)
    names = [spec.name for spec in ctx.model().outputs]
    task = ctx.task.task if ctx.task else infer_task(outputs, names, data.labels)[0]
    profile = reference_from_samples(
        data.inputs, outputs[0] if outputs else None, classifier=task == "classification"
    )
    (ctx.staging / DRIFT_REFERENCE_FILE).write_bytes(profile.to_json_bytes())
    return {
        "file": DRIFT_REFERENCE_FILE,
        "samples": profile.samples,
        "features": [f.name for f in profile.features],
        "classes": len(profile.classes or []),
    }


def _judged_task(
    ctx: CompileContext, reference: list[np.ndarray], names: list[str], labels: np.ndarray | None
) -> TaskChoice:
    """The declared task, checked against the outputs, or the one they show."""
    if ctx.task is None:
        task, reason = infer_task(reference, names, labels)
        ctx.notes.append(f"judged as {task}: {reason} (declare it with --task)")
        return TaskChoice(task=task, declared=False, reason=reason)
    if ctx.task.task == "detection" and boxes_index(reference) is None:
        raise DataError(
            "--task detection needs an output of boxes shaped (N, K, 4) beside an output of "
            f"K scores per sample; the outputs are {[list(o.shape) for o in reference]}"
        )
    return ctx.task


def _searchable(ctx: CompileContext, candidate: Candidate) -> bool:
    return (
        ctx.options.accuracy_search
        and candidate.runtime == "onnxruntime"
        and candidate.precision == "int8"
        and ctx.calibration is not None
    )


def _search_int8(
    ctx: CompileContext, candidate: Candidate, judge: Callable[[list[np.ndarray]], Comparison]
) -> None:
    """Keep the most sensitive operators of a failing static int8 candidate in float until
    it passes; on a refusal the candidate stays failed and the note says why."""
    assert ctx.model_path is not None and ctx.calibration is not None
    assert ctx.validation is not None
    inputs = ctx.validation.inputs

    def judge_model(path: Path) -> Comparison:
        runtime = OnnxRuntime(path, threads=os.cpu_count() or 1)
        try:
            return judge(runtime.predict_batch(inputs))
        finally:
            runtime.close()

    print(
        f"{candidate.id} misses the gate: searching for operators to keep in float",
        file=sys.stderr,
        flush=True,
    )
    result = int8_search.search_int8(
        ctx.model_path,
        candidate.artifact,
        ctx.calibration,
        ctx.validation,
        judge_model,
        ctx.options.keep_float,
        work=ctx.work,
    )
    candidate.accuracy_search = result.record
    if result.model is None or result.comparison is None:
        ctx.notes.append(f"{candidate.id}: {result.refusal}")
        if candidate.comparison is not None and result.refusal:
            failures = [*candidate.comparison.failures, result.refusal]
            candidate.comparison = candidate.comparison.model_copy(update={"failures": failures})
        return
    plain = ctx.work / f"plain-{candidate.artifact.name}"
    candidate.artifact.replace(plain)
    result.model.replace(candidate.artifact)
    candidate.plain_int8 = plain
    candidate.comparison = result.comparison
    ctx.notes.append(
        f"{candidate.id} passed the gate with {len(result.record.kept_in_float)} operators kept "
        f"in float: {', '.join(result.record.kept_in_float)}"
        + ("; judged on this machine" if candidate.emulated else "")
    )


def _none_left(ctx: CompileContext) -> str:
    causes = "; ".join(f"{f.id} ({f.step}): {f.cause}" for f in ctx.failures)
    return f"no candidate could be built and run, nothing published: {causes or 'none planned'}"


@register_step("measure")
def _measure(ctx: CompileContext) -> dict[str, Any]:
    here, why = _runs_here(ctx)
    sample = _latency_sample(ctx)
    detail: dict[str, Any] = {}
    if here:
        reference = _load_reference(ctx)
        ctx.reference_latency = measure_latency(reference, sample, ctx.options.latency_runs)
        reference.close()
    for candidate in list(ctx.candidates):
        if not candidate.passed:
            continue
        if candidate.runtime == "tvm" and ctx.options.rpc is not None:
            candidate.latency = tune.rpc_latency(
                candidate.artifact, ctx.options.rpc, sample, ctx.options.latency_runs
            )
        elif not here:
            emulated = "; emulated runs are not timed" if candidate.emulated else ""
            candidate.latency_note = f"not measured: {why}{emulated}"
        elif candidate.device == "gpu":
            candidate.latency_note = "not measured: needs the board's GPU"
        else:
            try:
                candidate.latency = _time(candidate.runnable, candidate, sample, ctx)
                if candidate.plain_int8 is not None and candidate.accuracy_search is not None:
                    plain = _time(candidate.plain_int8, candidate, sample, ctx)
                    candidate.accuracy_search = candidate.accuracy_search.model_copy(
                        update={"p50_ms_before": plain.p50, "p50_ms_after": candidate.latency.p50}
                    )
            except Exception as e:  # one candidate's failure: the others go on
                _skip(ctx, candidate.runtime, candidate.precision, "measure", e, candidate)
                continue
        if candidate.latency:
            detail[candidate.id] = candidate.latency.model_dump(mode="json")
    if not here:
        ctx.notes.append(f"latency not measured on this machine: {why}")
    return detail


def _time(path: Path, candidate: Candidate, sample: dict[str, Any], ctx: CompileContext) -> Latency:
    """The latency of ``path`` on ``candidate``'s runtime, on this machine."""
    runtime = _load(replace(candidate, runnable=path))
    try:
        return measure_latency(runtime, sample, ctx.options.latency_runs)
    finally:
        runtime.close()


def _latency_sample(ctx: CompileContext) -> dict[str, Any]:
    """One sample to time with: the first validation sample, else zeros (timing only)."""
    data = ctx.validation or ctx.calibration
    if data is not None:
        return {k: v[:1] for k, v in data.inputs.items()}
    return {s.name: np.zeros(_one(s), s.dtype) for s in ctx.model().inputs}


def _one(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(1 if d is None else d for d in spec.shape)


@register_step("select")
def _select(ctx: CompileContext) -> dict[str, Any]:
    if ctx.options.select is None:
        return {"skipped": "no --select"}
    p50 = {c.id: c.latency.p50 for c in ctx.candidates if c.passed and c.latency is not None}
    slow = _untuned_and_slow(ctx, p50)
    p50 = {cid: ms for cid, ms in p50.items() if cid not in slow}
    if not p50:
        raise StepError(
            "--select fastest needs latencies, and none was measured: use a profile this "
            "machine can run (host) or --rpc-tracker to measure on a board"
        )
    fastest = min(p50, key=p50.__getitem__)
    next(c for c in ctx.candidates if c.id == fastest).selected = True
    return {"selected": fastest, "p50_ms": p50} | ({"not_eligible": slow} if slow else {})


UNTUNED_SLOWDOWN_LIMIT = 3.0
"""An untuned TVM CPU build slower than ONNX Runtime fp32 by more than this is not selected."""


def _untuned_and_slow(ctx: CompileContext, p50: dict[str, float]) -> dict[str, str]:
    """Untuned TVM CPU candidates far behind the ONNX Runtime reference, and why each is."""
    reference = ctx.reference_latency
    if reference is None or ctx.tuning_database is not None or reference.p50 <= 0:
        return {}
    slow: dict[str, str] = {}
    for candidate in ctx.candidates:
        ms = p50.get(candidate.id)
        if candidate.runtime != "tvm" or candidate.device != "cpu" or ms is None:
            continue
        ratio = ms / reference.p50
        if ratio > UNTUNED_SLOWDOWN_LIMIT:
            slow[candidate.id] = f"untuned, {ratio:.1f}x slower than onnxruntime:fp32"
            ctx.notes.append(
                f"{candidate.id} is untuned and {ratio:.1f}x slower than ONNX Runtime fp32 "
                f"(more than {UNTUNED_SLOWDOWN_LIMIT:g}x): not selected; tune it with "
                "--tune-trials"
            )
    return slow


@register_step("golden")
def _golden(ctx: CompileContext) -> dict[str, Any]:
    """A few inputs and each shipped artifact's answers, for the agent's health check."""
    data = ctx.validation or ctx.calibration
    inputs = golden_inputs(data.inputs if data else None, ctx.model().inputs)
    detail: dict[str, Any] = {"inputs": "validation data" if data else "seeded noise"}
    shipped = [c for c in ctx.candidates if c.passed]
    outputs = _run(ctx, shipped, inputs, "golden")
    for candidate in shipped:
        if candidate.id not in outputs:
            continue  # it failed to run and was skipped
        got = outputs[candidate.id]
        task = ctx.task.task if ctx.task else infer_task(got, [""] * len(got), None)[0]
        path = candidate.artifact.with_name(f"{candidate.artifact.stem}.golden.npz")
        candidate.golden = write_golden(
            got, inputs, candidate.precision, path, top1=task == "classification"
        )
        detail[candidate.id] = candidate.golden.model_dump(mode="json") | {
            "validated_on": candidate.validated_on.summary
        }
    return detail


# --- driver ------------------------------------------------------------------------------


def compile_model(
    options: CompileOptions,
    hooks: Sequence[StepHook] = (),
    pipeline: Sequence[str] = DEFAULT_PIPELINE,
) -> CompileReport:
    """Run ``pipeline`` and publish artifacts, report.json and MODEL_CARD.md to ``out_dir``.

    On any error nothing is published and ``out_dir`` is left as it was; an ``out_dir`` a
    compile may not replace (``compiler/output.py``) is refused before any work starts.
    """
    check_output_dir(options.out_dir, source=options.model, force=options.force)
    out = options.out_dir.resolve()
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    ctx = CompileContext(options, staging, staging / ".work")
    ctx.work.mkdir(parents=True)
    recorder = _StepRecorder()
    try:
        for name in pipeline:
            for hook in (recorder, *hooks):
                hook.before_step(name)
            start = time.perf_counter()
            detail = _STEPS[name](ctx)
            seconds = time.perf_counter() - start
            for hook in (recorder, *hooks):
                hook.after_step(name, seconds, detail)
        report = _finish(ctx, recorder.records)
        publish(staging, out, source=options.model, force=options.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _finish(ctx: CompileContext, steps: list[StepRecord]) -> CompileReport:
    if not any(c.passed for c in ctx.candidates):
        raise StepError(_none_left(ctx))
    for candidate in ctx.candidates:
        if not candidate.passed:
            candidate.artifact.unlink(missing_ok=True)
            candidate.artifact.with_suffix(".json").unlink(missing_ok=True)
    source = ctx.model()
    report = build_report(
        profile=ctx.profile.name,
        source=SourceInfo(path=str(source.path), kind=source.kind, sha256=source.sha256),
        candidates=ctx.candidates,
        reference_latency=ctx.reference_latency,
        steps=steps,
        gate=ctx.gate,
        notes=ctx.notes,
        settings=_settings(ctx.options),
        task=ctx.task,
        failed=ctx.failures,
    )
    shutil.rmtree(ctx.work)
    write_report(report, ctx.staging)
    write_model_card(report, ctx.staging)
    return report


def _settings(options: CompileOptions) -> CompileSettings:
    return CompileSettings(
        quantize=options.quantize,
        prune=options.prune,
        prune_structured=options.prune_structured,
        prune_scope=options.prune_scope,
        keep_float=list(options.keep_float),
        tune_trials=options.tune_trials,
        select=options.select,
        rpc_tracker=f"{options.rpc.host}:{options.rpc.port}" if options.rpc else None,
    )
