"""``edgefleet compile``: the command line of the compiler (contract in docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer
from rich.console import Console
from rich.table import Table

from contracts.artifacts import LEGACY_FP32, PRECISIONS
from contracts.cli import JsonOption, fail, print_json, third_party_output_to_stderr
from contracts.report import REFERENCE_LATENCY, TASKS

if TYPE_CHECKING:
    from contracts.report import CompileReport

    from .pipeline import TaskOption

_stderr = Console(stderr=True)


class _ProgressHook:
    """One line per step on stderr, with a spinner while it runs."""

    def __init__(self) -> None:
        self._status: Any = None

    def before_step(self, name: str) -> None:
        self._status = _stderr.status(f"{name} ...")
        self._status.start()

    def after_step(self, name: str, seconds: float, detail: dict[str, Any]) -> None:
        self.close()
        skipped = detail.get("skipped") if isinstance(detail, dict) else None
        suffix = f" [dim](skipped: {skipped})[/]" if skipped else ""
        _stderr.print(f"[green]done[/] {name:<9} {seconds:7.2f} s{suffix}", highlight=False)

    def close(self) -> None:
        """Stop the spinner, also when a step failed and ``after_step`` never came."""
        if self._status is not None:
            self._status.stop()
            self._status = None


def candidates_table(report: CompileReport) -> Table:
    metrics = sorted({c.accuracy.metric for c in report.candidates if c.accuracy})
    title = f"Candidates for {report.profile}" + (f" ({', '.join(metrics)})" if metrics else "")
    table = Table(title=title, title_justify="left")
    table.add_column("artifact", no_wrap=True)
    for column in ("gate", "metric", "p50 ms", "p95 ms", "bytes"):
        table.add_column(column, justify="left" if column == "gate" else "right")
    reference = report.latency_ms.get(REFERENCE_LATENCY)
    if reference:
        p50, p95 = f"{reference.p50:.3f}", f"{reference.p95:.3f}"
        table.add_row("reference onnxruntime:fp32", "", "", p50, p95, "")
    for c in report.candidates:
        acc, lat = c.accuracy, c.latency_ms
        table.add_row(
            c.id + (" [bold green]selected[/]" if c.selected else ""),
            "pass" if c.passed else "[red]fail[/]",
            f"{acc.candidate:.4f}" if acc else "-",
            f"{lat.p50:.3f}" if lat else "-",
            f"{lat.p95:.3f}" if lat else "-",
            f"{c.size_bytes:,}" if c.size_bytes else "-",
        )
    return table


def compile_command(
    model: Annotated[Path, typer.Argument(help="ONNX file, .keras file or SavedModel directory.")],
    profile: Annotated[str, typer.Option(help="Hardware profile (see `edgefleet profiles list`).")],
    calibration: Annotated[
        Path | None,
        typer.Option(help=".npz: one array per model input, samples first; optional 'labels'."),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(help=".npz to validate on; default: the second half of --calibration."),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            help="fp32 (as trained), int8 (static, calibrated), int8-dynamic or fp16. "
            "'none' is a deprecated alias of fp32."
        ),
    ] = "fp32",
    prune: Annotated[
        float, typer.Option(help="Target sparsity, 0 to <1.", min=0.0, max=0.99)
    ] = 0.0,
    prune_structured: Annotated[
        bool, typer.Option(help="Remove whole channels / neurons instead of zeroing weights.")
    ] = False,
    prune_scope: Annotated[
        str, typer.Option(help="Magnitude pruning threshold: global or per layer.")
    ] = "global",
    keep_float: Annotated[
        list[str] | None,
        typer.Option(help="ONNX node name that int8 leaves in float; repeat for several."),
    ] = None,
    tune_trials: Annotated[
        int, typer.Option(help="MetaSchedule trials; 0 skips tuning.", min=0)
    ] = 0,
    tune_time: Annotated[
        str | None,
        typer.Option(
            help="Time budget for tuning (20m, 90s, 1h), alone or with --tune-trials: "
            "whichever runs out first."
        ),
    ] = None,
    rpc_tracker: Annotated[
        str | None, typer.Option(help="HOST:PORT of a TVM RPC tracker to measure on boards.")
    ] = None,
    rpc_key: Annotated[str, typer.Option(help="Device key the boards registered with.")] = "",
    select: Annotated[
        str | None, typer.Option(help="'fastest': measure every candidate and mark the fastest.")
    ] = None,
    min_top1_agreement: Annotated[float | None, typer.Option(help="Override the gate.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Override the gate.")] = None,
    min_cosine_similarity: Annotated[float | None, typer.Option(help="Override the gate.")] = None,
    max_abs_error: Annotated[float | None, typer.Option(help="Override the gate.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where tuning databases and emulated userlands persist "
            "(default ~/.cache/edgefleet)."
        ),
    ] = None,
    latency_runs: Annotated[int, typer.Option(help="Timed calls per artifact.", min=1)] = 50,
    task: Annotated[
        str,
        typer.Option(
            help="What the outputs hold, which decides the gate's metrics: classification, "
            "embedding, regression, detection, or 'auto' to infer it from the data (the "
            "report says what it inferred and why)."
        ),
    ] = "auto",
    accuracy_search: Annotated[
        bool,
        typer.Option(
            "--accuracy-search/--no-accuracy-search",
            help="When static int8 misses the gate, keep its most sensitive operators in "
            "float until it passes; --no-accuracy-search refuses it instead.",
        ),
    ] = True,
    emulation: Annotated[
        str,
        typer.Option(
            help="For a board this machine cannot run: 'auto' validates its artifacts on an "
            "emulated board when this machine can (root, qemu-user-static) and the arm64 "
            "userland is built; 'on' requires it, building the userland once; 'off' "
            "validates here."
        ),
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory (default build/MODEL-PROFILE); replaced only when it is "
            "empty or an earlier compile's output."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace --out even if it holds other files."),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Prune, quantize, tune and build MODEL for a hardware profile, behind an accuracy gate."""
    from contracts.report import AccuracyGate
    from hw_profiles import ProfileError, load_profile

    from .errors import CompilerError
    from .pipeline import CompileOptions, compile_model
    from .tune import RpcTarget, parse_duration

    if quantize == LEGACY_FP32:
        _stderr.print(
            f"[yellow]warning:[/] --quantize {LEGACY_FP32} is deprecated; use --quantize fp32",
            highlight=False,
        )
        quantize = "fp32"
    if quantize not in PRECISIONS:
        fail(f"--quantize must be one of {', '.join(PRECISIONS)}, got {quantize!r}")
    if prune_scope not in ("global", "layer"):
        fail(f"--prune-scope must be global or layer, got {prune_scope!r}")
    if select not in (None, "fastest"):
        fail(f"--select accepts only 'fastest', got {select!r}")
    if task not in ("auto", *TASKS):
        fail(f"--task must be auto, {', '.join(TASKS)}; got {task!r}")
    if emulation not in ("auto", "on", "off"):
        fail(f"--emulation must be auto, on or off, got {emulation!r}")
    if (rpc_tracker is None) != (not rpc_key):
        fail("--rpc-tracker and --rpc-key go together")
    try:
        hw = load_profile(profile)
        out = out or Path("build") / f"{_model_stem(model)}-{hw.name}"
        overrides = {
            k: v
            for k, v in {
                "min_top1_agreement": min_top1_agreement,
                "max_accuracy_drop": max_accuracy_drop,
                "min_cosine_similarity": min_cosine_similarity,
                "max_abs_error": max_abs_error,
            }.items()
            if v is not None
        }
        options = CompileOptions(
            model=model,
            profile=hw,
            out_dir=out,
            force=force,
            calibration=calibration,
            validation=validation,
            quantize=quantize,
            prune=prune,
            prune_structured=prune_structured,
            prune_scope=cast(Literal["global", "layer"], prune_scope),
            keep_float=tuple(keep_float or ()),
            tune_trials=tune_trials,
            tune_time_s=parse_duration(tune_time) if tune_time is not None else None,
            rpc=RpcTarget.parse(rpc_tracker, rpc_key) if rpc_tracker else None,
            select=cast(Literal["fastest"] | None, select),
            gate=AccuracyGate.model_validate({**hw.accuracy_gate.model_dump(), **overrides}),
            latency_runs=latency_runs,
            emulation=cast(Literal["auto", "on", "off"], emulation),
            task=cast("TaskOption", task),
            accuracy_search=accuracy_search,
            **({"cache_dir": cache_dir} if cache_dir else {}),
        )
        progress = _ProgressHook()
        try:
            with third_party_output_to_stderr():
                report = compile_model(options, hooks=[progress])
        finally:
            progress.close()
    except (ProfileError, CompilerError, ValueError) as e:
        fail(e)
    if json_output:
        print_json(report.to_dict())
        return
    console = Console()
    console.print(candidates_table(report))
    for failure in report.failed:
        console.print(f"[red]skipped[/] {failure.id} ({failure.step}): {failure.cause}")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote {out / 'report.json'} and {out / 'MODEL_CARD.md'}")


def _model_stem(model: Path) -> str:
    """``digits`` for ``digits.onnx``, ``digits.keras`` or a SavedModel directory ``digits/``."""
    return model.name.split(".")[0] or "model"
