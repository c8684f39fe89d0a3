"""Compile benchmark: a MobileNetV2-sized CNN (224x224x3, batch 1, random weights) on this
machine, every artifact the compiler makes, measured in one run against ONNX Runtime fp32.

    python bench/compile_bench.py [--trials 136,544] [--runs 100] [--json FILE]

Prints one table: p50 / p95 latency, ratio to ONNX Runtime fp32 (the peer; below 1.0 is
faster), size, and cosine similarity / top-1 agreement of the logits with the peer on random
inputs. Rows "from ONNX" are LiteRT built from the ONNX model (onnx2tf), as for a PyTorch
user's export. Tuning times are printed with the TVM rows. Nothing here is a test: numbers
depend on the machine. With the default budgets it took 17 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.runtimes import LiteRTRuntime, OnnxRuntime, Runtime, TvmRuntime
from compiler import litert, onnx_to_tf, quantize, tune, tvm_build
from compiler.data import Dataset
from compiler.importers import import_model
from compiler.measure import measure_latency
from compiler.validate import compare
from hw_profiles import load_profile

INPUT = "image"
ANY_GATE = load_profile("host").accuracy_gate  # only its metrics are read here


def make_model(work: Path) -> Path:
    """MobileNetV2 (alpha 1.0, 224x224x3, 1000 classes) with random weights, as .keras.

    Its batch normalisations take their statistics from 16 random images (one forward pass
    in training mode with momentum 0): untouched, random weights shrink the logits to
    ~1e-11, which full-integer int8 turns into zeros; normalised, they are ~1 and top-1
    agreement with fp32 says something."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), weights=None, classifier_activation=None
    )
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(np.random.default_rng(1).random((16, 224, 224, 3), dtype=np.float32), training=True)
    for layer in norms:
        layer.momentum = 0.99
    inputs = keras.Input((224, 224, 3), name=INPUT)
    wrapped = keras.Model(inputs, model(inputs))
    path = work / "mobilenetv2.keras"
    wrapped.save(path)
    return path


def row(
    name: str,
    runtime: Runtime,
    artifact: Path,
    inputs: dict[str, np.ndarray],
    reference: np.ndarray | None,
    runs: int,
    note: str = "",
) -> dict[str, Any]:
    """Latency of one call on the first input; agreement with ``reference`` on all of them.

    With random weights the logits of most inputs rank the same class first, so top-1
    agreement says little; cosine similarity of the logits is the column to read.
    """
    latency = measure_latency(runtime, {k: v[:1] for k, v in inputs.items()}, runs, warmup=10)
    outputs = runtime.predict_batch(inputs)[0]
    result: dict[str, Any] = {
        "artifact": name,
        "p50_ms": latency.p50,
        "p95_ms": latency.p95,
        "size_bytes": artifact.stat().st_size,
        "note": note,
        "outputs": outputs,
    }
    if reference is not None:
        comparison = compare([reference], [outputs], None, ANY_GATE, "classification")
        result["top1_agreement"] = float(np.mean(outputs.argmax(1) == reference.argmax(1)))
        result["cosine"] = comparison.cosine_similarity
    print(f"measured {name}: p50 {latency.p50:.2f} ms {note}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", default="136,544", help="MetaSchedule budgets, comma-separated ('' for none)"
    )
    parser.add_argument("--runs", type=int, default=100, help="timed calls per artifact")
    parser.add_argument("--samples", type=int, default=32, help="random inputs for agreement")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    budgets = [int(t) for t in args.trials.split(",") if t]
    threads = os.cpu_count() or 1
    host = load_profile("host")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = import_model(make_model(work), work)
        rng = np.random.default_rng(0)
        data = {INPUT: rng.random((args.samples, 224, 224, 3), dtype=np.float32)}
        calibration = Dataset({INPUT: data[INPUT][: args.samples // 2]}, None)
        # The peer first: every other row's agreement and ratios are against it.
        pinned = {"threads": threads}

        peer_row = row(
            "onnxruntime fp32 (peer)",
            OnnxRuntime(source.onnx_path, **pinned),
            source.onnx_path,
            data,
            None,
            args.runs,
        )
        reference = peer_row["outputs"]
        rows.append(peer_row)

        int8 = work / "ort-int8.onnx"
        quantize.quantize_onnx(source.onnx_path, int8, "int8", calibration)
        rows.append(
            row(
                "onnxruntime int8 (static QDQ)",
                OnnxRuntime(int8, **pinned),
                int8,
                data,
                reference,
                args.runs,
            )
        )

        for precision, label in (("fp32", "fp32"), ("int8", "int8 (full integer)")):
            path = work / f"litert-{precision}.tflite"
            litert.convert(source, path, precision, calibration)  # type: ignore[arg-type]
            rows.append(
                row(
                    f"litert {label}",
                    LiteRTRuntime(path, **pinned),
                    path,
                    data,
                    reference,
                    args.runs,
                )
            )

        # The same ONNX model a PyTorch user brings, to LiteRT through onnx2tf
        # (compiler/onnx_to_tf.py): what an ONNX source gets beside ONNX Runtime.
        try:
            from_onnx = onnx_to_tf.to_saved_model(source.onnx_path, work / "onnx2tf", source)
        except onnx_to_tf.ConversionError as e:
            print(f"litert from ONNX not measured: {e}", file=sys.stderr, flush=True)
            from_onnx = None
        for precision, label in (("fp32", "fp32"), ("int8", "int8 (full integer)")):
            if from_onnx is None:
                break
            path = work / f"litert-onnx-{precision}.tflite"
            litert.convert(from_onnx, path, precision, calibration)  # type: ignore[arg-type]
            rows.append(
                row(
                    f"litert {label} from ONNX",
                    LiteRTRuntime(path, **pinned),
                    path,
                    data,
                    reference,
                    args.runs,
                )
            )

        def tvm_row(label: str, database: Path | None, note: str) -> None:
            path = work / f"tvm-{label.replace(' ', '-')}.so"
            tvm_build.build(
                source.onnx_path,
                host,
                path,
                precision="fp32",
                device="cpu",
                database=database,
                inputs=source.inputs,
                outputs=source.outputs,
                work=work,
                twin=False,
            )
            rows.append(
                row(f"tvm {label}", TvmRuntime(path), path, data, reference, args.runs, note)
            )

        tvm_row("untuned", None, "")
        for trials in budgets:
            start = time.perf_counter()
            result = tune.tune_model(
                source.onnx_path,
                host,
                inputs=source.inputs,
                trials=trials,
                cache_root=work / f"cache-{trials}",
            )
            minutes = (time.perf_counter() - start) / 60
            tvm_row(f"tuned {trials} trials", result.database, f"tuning {minutes:.1f} min")

    peer_p50, peer_size = rows[0]["p50_ms"], rows[0]["size_bytes"]
    table = Table(title=f"MobileNetV2 224x224x3, batch 1, {threads} threads, median of {args.runs}")
    columns = ("artifact", "p50 ms", "p95 ms", "x peer", "MB", "x size", "cosine", "top-1", "note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("artifact", "note") else "right")
    for r in rows:
        cosine = f"{r['cosine']:.4f}" if "cosine" in r else "peer"
        top1 = f"{r['top1_agreement']:.3f}" if "cosine" in r else "peer"
        table.add_row(
            r["artifact"],
            f"{r['p50_ms']:.2f}",
            f"{r['p95_ms']:.2f}",
            f"{r['p50_ms'] / peer_p50:.2f}",
            f"{r['size_bytes'] / 1e6:.2f}",
            f"{r['size_bytes'] / peer_size:.2f}",
            cosine,
            top1,
            r["note"],
        )
    Console().print(table)
    if args.json:
        clean = [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
        args.json.write_text(json.dumps(clean, indent=2))


if __name__ == "__main__":
    main()
