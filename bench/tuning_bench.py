"""Tuning that accumulates: a second model tuned against the profile's shared database (its
shared layers already tuned for a first model) versus the same model tuned from scratch.

    python bench/tuning_bench.py [--trials 64] [--runs 100]

Two CNNs (64x64x3, batch 1, random weights) share a trunk of eight layers (same shapes,
different weights: MetaSchedule keys its records by workload) and differ in their head:
A ends in 1000 classes, B in a 128-unit layer and 10 classes. A is tuned into a fresh
database; B is then tuned with the same ``--trials`` twice: from scratch into an empty
database, and against A's, where only B's new tasks are tuned, with their share of the
budget (compiler/tune.py). Prints, for B each way: tuning seconds, tasks tuned / reused,
trials measured, and the p50 of a TVM build from that database (the same latency is the
point); then the ratio of tuning times. Nothing here is a test: numbers depend on the
machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.runtimes import TvmRuntime
from compiler import tune, tvm_build
from compiler.importers import SourceModel, import_model
from compiler.measure import measure_latency
from hw_profiles import load_profile

INPUT = "image"


def make_model(work: Path, name: str, head: list[int], seed: int) -> SourceModel:
    """The shared trunk with ``head`` (dense widths, the last one the classes), as ONNX."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((64, 64, 3), name=INPUT)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.Conv2D(32, 1, activation="relu")(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(64, 1, activation="relu")(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(128, 1, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    for width in head[:-1]:
        x = layers.Dense(width, activation="relu")(x)
    outputs = layers.Dense(head[-1])(x)
    path = work / f"{name}.keras"
    keras.Model(inputs, outputs).save(path)
    (work / name).mkdir()
    return import_model(path, work / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule budget per tune")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per build")
    args = parser.parse_args()
    host = load_profile("host")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a = make_model(work, "a", [1000], seed=0)
        b = make_model(work, "b", [128, 10], seed=1)
        x = {INPUT: np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)}

        def tuned(model: SourceModel, cache: Path) -> tune.TuneResult:
            result = tune.tune_model(
                model.onnx_path, host, inputs=model.inputs, trials=args.trials, cache_root=cache
            )
            print(
                f"tuned {model.onnx_path.parent.name}: {result.seconds:.1f} s, "
                f"{result.tasks - result.tasks_reused}/{result.tasks} tasks, "
                f"{result.trials} trials",
                file=sys.stderr,
                flush=True,
            )
            return result

        def p50_ms(model: SourceModel, database: Path, label: str) -> float:
            path = work / f"{label}.so"
            tvm_build.build(
                model.onnx_path,
                host,
                path,
                precision="fp32",
                device="cpu",
                database=database,
                inputs=model.inputs,
                outputs=model.outputs,
                work=work,
                twin=False,
            )
            return measure_latency(TvmRuntime(path), x, args.runs, warmup=10).p50

        tuned(a, work / "shared")
        rows = []
        for label, cache in (("from scratch", "scratch"), ("shared database", "shared")):
            result = tuned(b, work / cache)
            rows.append((label, result, p50_ms(b, result.database, label.replace(" ", "-"))))

    table = Table(title=f"model B tuned with --trials {args.trials}, p50 of {args.runs} calls")
    for column in ("B tuned", "tuning s", "tasks tuned", "reused", "trials", "p50 ms"):
        table.add_column(column, justify="left" if column == "B tuned" else "right")
    for label, result, p50 in rows:
        table.add_row(
            label,
            f"{result.seconds:.1f}",
            str(result.tasks - result.tasks_reused),
            str(result.tasks_reused),
            str(result.trials),
            f"{p50:.3f}",
        )
    Console().print(table)
    (_, scratch, scratch_p50), (_, shared, shared_p50) = rows
    print(
        f"tuning time from scratch / with the shared database: "
        f"{scratch.seconds / shared.seconds:.1f}x; p50 shared / scratch: "
        f"{shared_p50 / scratch_p50:.2f}"
    )


if __name__ == "__main__":
    main()
