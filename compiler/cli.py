"""``edgefleet compile``: the command line of the compiler (contract in docs/DESIGN)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hw_profiles.cli_support import JsonOption, not_implemented


def compile_command(
    model: Annotated[Path, typer.Argument(help="ONNX file, .keras file or SavedModel directory.")],
    profile: Annotated[
        str, typer.Option(help="Hardware profile name (see `edgefleet profiles list`).")
    ],
    calibration: Annotated[
        Path | None, typer.Option(help=".npz with one array per model input, samples first.")
    ] = None,
    quantize: Annotated[str, typer.Option(help="int8, int8-dynamic, fp16 or none.")] = "none",
    prune: Annotated[float, typer.Option(help="Target weight sparsity, 0 to 1.")] = 0.0,
    tune_trials: Annotated[int, typer.Option(help="MetaSchedule trials; 0 skips tuning.")] = 0,
    out: Annotated[
        Path, typer.Option(help="Output directory for artifacts and report.json.")
    ] = Path("build"),
    json_output: JsonOption = False,
) -> None:
    """Prune, quantize, tune and build MODEL for a hardware profile, behind an accuracy gate."""
    not_implemented("compile", issue=3)
