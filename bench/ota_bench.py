"""OTA benchmark: how fast a bundle is verified, and how small a delta between releases is.

    python bench/ota_bench.py [--size-mb 200] [--runs 5] [--skip-verify] [--skip-delta]
                              [--workdir DIR] [--json FILE]

Prints two markdown tables.

Verification: a bundle of about ``--size-mb`` MB (a float32 noise "weights" file, golden
vectors and a report.json, written with ``ota.archive.write_bundle``) is published into a
fresh TUF repository, then timed, file in page cache, median of ``--runs`` interleaved runs:

- ``hashlib.sha256`` (``hashlib.file_digest``) over the bundle file: the peer, one pass
  over the same bytes with the fastest hashing Python has;
- ``ota.archive.verify_bundle``: the manifest and every file's SHA-256;
- ``ota.verify.verify_sideloaded``: the whole offline check a device makes (TUF metadata
  from the trusted root, the bundle's target length and SHA-256, every file's SHA-256).

The target is ``verify_sideloaded`` at no less than 0.8 of the peer's throughput. A fourth
row hashes the file twice on two threads at once: ``verify_sideloaded`` computes the TUF
target hash and the per-file hashes side by side on two threads, so it reaches the target
only where a second core is free, and that row (about 1.0 x peer with a free core, about
0.5 without) says whether one was. "CPU s" is the process's CPU time (all threads).

Deltas: a ~2M-parameter CNN trained on scikit-learn's bundled digits (nothing is
downloaded) is compiled with ``compiler.pipeline.compile_model`` for the host profile
(ONNX Runtime only, to keep the run short) and bundled with ``ota.bundle``. Two releases:

- fine-tune: the model trained one more epoch at a small learning rate; every fp32 weight
  moves a little. Old and new bundles ship ``onnxruntime:fp32``.
- re-quantize: the same fp32 model quantized to static int8 twice, calibrated on two
  disjoint halves of the data. Old and new bundles ship ``onnxruntime:int8``. Per-channel
  weight scales depend on the weights alone, so only activation scales, zero points and
  the golden outputs change: expect a tiny delta.
- fine-tune, int8: the base and the fine-tuned model, both static int8 on the same
  calibration data; int8 rounding absorbs most of the small weight changes (about four
  in five int8 weights kept their value when this was written).

For each, ``ota.delta.make_delta`` with zstd (old bundle as dictionary) and bsdiff, with
an ``apply_delta`` round trip checked bit for bit; the peer row is the new bundle
compressed by zstd level 19 without a dictionary, what a delta must beat to be worth it.
Ratios are against the full (uncompressed) new bundle. Make times are one run; apply
times the median of ``--runs``.

Nothing here is a test: numbers depend on the machine and on what else runs on it. With
the defaults it took about 40 seconds on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from contracts.artifacts import Precision, artifact_id
from contracts.report import GoldenVectors
from ota.archive import verify_bundle, write_bundle
from ota.bundle import bundle_compile_output
from ota.delta import DeltaAlgorithm, apply_delta, make_delta
from ota.keys import KeyStore
from ota.manifest import BundleFile, Manifest, ModelInfo
from ota.repository import OtaRepository
from ota.verify import verify_sideloaded

INPUT = "image"
MB = 1_000_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
) -> str:
    """A GitHub markdown table: the first ``text_columns`` left-aligned, numbers right."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- verification ------------------------------------------------------------------------


def make_large_bundle(work: Path, size_mb: int) -> Path:
    """A bundle whose artifact is ``size_mb`` MB of float32 noise (incompressible weights)."""
    src = work / "large-src"
    src.mkdir()
    weights = src / "onnxruntime-fp32.onnx"
    rng = np.random.default_rng(0)
    remaining = size_mb * MB // 4  # float32 values
    digest = hashlib.sha256()
    with weights.open("wb") as f:
        while remaining:
            n = min(remaining, 4 << 20)
            chunk = rng.standard_normal(n, dtype=np.float32).tobytes()
            f.write(chunk)
            digest.update(chunk)
            remaining -= n
    golden = src / "onnxruntime-fp32.golden.npz"
    save_npz(
        golden,
        {
            f"input:{INPUT}": rng.random((4, 224, 224, 3), dtype=np.float32),
            "output:0": rng.standard_normal((4, 1000), dtype=np.float32),
        },
    )
    report = src / "report.json"
    report.write_text(json.dumps({"profile": "host", "artifacts": [], "bench": True}) + "\n")
    sources = {p.name: p for p in (weights, golden, report)}
    files = [
        BundleFile(
            path=name,
            sha256=digest.hexdigest() if path == weights else sha256_file(path),
            size=path.stat().st_size,
        )
        for name, path in sorted(sources.items())
    ]
    manifest = Manifest(
        name="bench-large-host",
        version="1.0.0",
        version_number=1_000_000,
        model=ModelInfo(name="bench-large", version="1.0.0"),
        profile="host",
        runtime="onnxruntime",
        precision="fp32",
        device="cpu",
        artifact=weights.name,
        files=files,
        min_agent_version="0.1.0",
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        golden_vectors=GoldenVectors(path=golden.name, count=4, atol=1e-4, rtol=1e-3, top1=True),
    )
    out = write_bundle(manifest, sources, work / "bench-large-1.0.0.efb")
    for path in sources.values():
        path.unlink()
    return out


def bench_verify(work: Path, size_mb: int, runs: int) -> tuple[str, list[dict[str, Any]]]:
    log(f"verify: writing a {size_mb} MB bundle")
    bundle = make_large_bundle(work, size_mb)
    size = bundle.stat().st_size
    log("verify: creating a TUF repository and publishing the bundle")
    repo = OtaRepository.create(work / "repo", KeyStore(work / "keys", b"bench-passphrase"))
    repo.add_bundle(bundle)

    def hashlib_peer() -> None:
        sha256_file(bundle)

    def archive_only() -> None:
        verify_bundle(bundle)

    def sideloaded() -> None:
        verify_sideloaded(bundle, repo.root_file, repo.metadata_dir)

    def two_hashes() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            other = pool.submit(sha256_file, bundle)
            sha256_file(bundle)
            other.result()

    methods: list[tuple[str, Callable[[], None]]] = [
        ("hashlib.sha256 over the file (peer)", hashlib_peer),
        ("ota.archive.verify_bundle", archive_only),
        ("ota.verify.verify_sideloaded", sideloaded),
        ("2 x hashlib.sha256 on 2 threads (core check)", two_hashes),
    ]
    hashlib_peer()  # warm-up: the bundle is in the page cache from here on
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    cpu: dict[str, list[float]] = {name: [] for name, _ in methods}
    for i in range(runs):
        for name, fn in methods:  # interleaved, so drift hits every method alike
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        log(f"verify: run {i + 1}/{runs}: " + ", ".join(f"{t[-1]:.3f}s" for t in times.values()))

    rows: list[dict[str, Any]] = []
    peer = statistics.median(times[methods[0][0]])
    for name, _ in methods:
        median = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "median_s": median,
                "min_s": min(times[name]),
                "cpu_s": statistics.median(cpu[name]),
                "mb_per_s": size / MB / median,
                "x_peer": peer / median,
            }
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = markdown_table(
        f"Verification of a {size / MB:.1f} MB bundle, page cache warm, median of {runs} runs, "
        f"{os.cpu_count()} cores, load average {load} "
        "(target: verify_sideloaded >= 0.80 x peer)",
        ["method", "median s", "min s", "CPU s", "MB/s", "throughput x peer"],
        [
            [
                r["method"],
                f"{r['median_s']:.3f}",
                f"{r['min_s']:.3f}",
                f"{r['cpu_s']:.3f}",
                f"{r['mb_per_s']:.0f}",
                f"{r['x_peer']:.2f}",
            ]
            for r in rows
        ],
    )
    return table, rows


# --- deltas ------------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8, 1) in [0, 1] and labels, shuffled with a fixed seed."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(images))
    x = (images[order] / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    return x, labels[order].astype("int64")


def train_models(work: Path) -> dict[str, Any]:
    """The base model (3 epochs) and its fine-tune (1 more epoch at 1/10 the learning rate
    on a third of the training data), as .keras; the held-out data as .npz files."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = digits()
    held_out = 600
    x_train, y_train = x[:-held_out], y[:-held_out]
    x_val, y_val = x[-held_out:-400], y[-held_out:-400]
    calib_a, calib_b = x[-400:-200], x[-200:]
    save_npz(work / "validation.npz", {INPUT: x_val, "labels": y_val})
    save_npz(work / "calib-a.npz", {INPUT: calib_a})
    save_npz(work / "calib-b.npz", {INPUT: calib_b})

    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name=INPUT),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    base_accuracy = float(model.evaluate(x_val, y_val, verbose=0)[1])
    base = work / "digits-base.keras"
    model.save(base)
    before = [w.copy() for w in model.get_weights()]

    model.optimizer.learning_rate.assign(1e-4)
    third = len(x_train) // 3
    model.fit(x_train[:third], y_train[:third], epochs=1, batch_size=32, verbose=0)
    tuned_accuracy = float(model.evaluate(x_val, y_val, verbose=0)[1])
    tuned = work / "digits-finetuned.keras"
    model.save(tuned)
    after = model.get_weights()
    old_w = np.concatenate([w.ravel() for w in before])
    new_w = np.concatenate([w.ravel() for w in after])
    moved = old_w != new_w
    nonzero = moved & (old_w != 0)  # biases start at zero
    relative = float(np.median(np.abs(new_w - old_w)[nonzero] / np.abs(old_w[nonzero])))
    return {
        "base": base,
        "finetuned": tuned,
        "params": int(model.count_params()),
        "weights_changed": float(np.mean(moved)),
        "median_relative_change": relative,
        "base_accuracy": base_accuracy,
        "finetuned_accuracy": tuned_accuracy,
    }


def compile_and_bundle(
    model: Path,
    precision: Precision,
    calibration: Path,
    validation: Path,
    out: Path,
    version: str,
) -> Path:
    from compiler.pipeline import CompileOptions, compile_model
    from hw_profiles import load_profile

    host = load_profile("host")
    onnxruntime = host.runtime("onnxruntime")
    assert onnxruntime is not None
    profile = host.model_copy(update={"runtimes": [onnxruntime]})
    out_dir = out.with_suffix(".compiled")
    compile_model(
        CompileOptions(
            model=model,
            profile=profile,
            out_dir=out_dir,
            calibration=calibration,
            validation=validation,
            quantize=precision,
            tune_trials=0,
            latency_runs=10,
        )
    )
    bundle_compile_output(
        out_dir,
        version=version,
        out=out,
        artifact_id=artifact_id("onnxruntime", precision),
        name="digits-host",
    )
    return out


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def delta_rows(case: str, old: Path, new: Path, work: Path, runs: int) -> list[dict[str, Any]]:
    import zstandard

    new_bytes = new.read_bytes()
    new_sha = hashlib.sha256(new_bytes).hexdigest()
    full = len(new_bytes)
    compressor = zstandard.ZstdCompressor(level=19)
    compressed, make_s = timed(compressor.compress, new_bytes)
    apply_times = []
    for _ in range(runs):
        restored, seconds = timed(zstandard.ZstdDecompressor().decompress, compressed)
        apply_times.append(seconds)
        assert restored == new_bytes
    rows = [
        {
            "case": case,
            "method": "zstd -19, no dictionary (peer)",
            "full_bytes": full,
            "delta_bytes": len(compressed),
            "make_s": make_s,
            "apply_s": statistics.median(apply_times),
        }
    ]
    labels: dict[DeltaAlgorithm, str] = {
        "zstd": "ota.delta zstd (old bundle as dictionary)",
        "bsdiff": "ota.delta bsdiff",
    }
    slug = "".join(c if c.isalnum() else "-" for c in case).strip("-")
    for algorithm, label in labels.items():
        delta = work / f"{slug}.{algorithm}.delta"
        _, make_s = timed(make_delta, old, new, delta, algorithm=algorithm)
        apply_times = []
        for i in range(runs):
            rebuilt = work / f"{slug}.{algorithm}.rebuilt-{i}.efb"
            _, seconds = timed(apply_delta, old, delta, rebuilt, expected_sha256=new_sha)
            apply_times.append(seconds)
            if rebuilt.read_bytes() != new_bytes:
                raise AssertionError(f"{case} {algorithm}: apply_delta did not rebuild the bundle")
            rebuilt.unlink()
        rows.append(
            {
                "case": case,
                "method": label,
                "full_bytes": full,
                "delta_bytes": delta.stat().st_size,
                "make_s": make_s,
                "apply_s": statistics.median(apply_times),
            }
        )
        log(f"delta: {case} {algorithm}: {delta.stat().st_size} of {full} bytes")
    return rows


def bench_delta(work: Path, runs: int) -> tuple[str, list[dict[str, Any]]]:
    log("delta: training the digits CNN and its fine-tune")
    models = train_models(work)
    validation, calib_a, calib_b = (
        work / "validation.npz",
        work / "calib-a.npz",
        work / "calib-b.npz",
    )
    log("delta: compiling and bundling 5 releases")
    base_fp32 = compile_and_bundle(
        models["base"], "fp32", calib_a, validation, work / "base-fp32.efb", "1.0.0"
    )
    tuned_fp32 = compile_and_bundle(
        models["finetuned"], "fp32", calib_a, validation, work / "tuned-fp32.efb", "1.0.1"
    )
    int8_a = compile_and_bundle(
        models["base"], "int8", calib_a, validation, work / "base-int8-a.efb", "1.0.0"
    )
    int8_b = compile_and_bundle(
        models["base"], "int8", calib_b, validation, work / "base-int8-b.efb", "1.0.1"
    )
    tuned_int8 = compile_and_bundle(
        models["finetuned"], "int8", calib_a, validation, work / "tuned-int8.efb", "1.0.1"
    )
    rows = delta_rows("fine-tune (fp32)", base_fp32, tuned_fp32, work, runs)
    rows += delta_rows("re-quantize (int8)", int8_a, int8_b, work, runs)
    rows += delta_rows("fine-tune (int8)", int8_a, tuned_int8, work, runs)
    for r in rows:
        r["ratio"] = r["delta_bytes"] / r["full_bytes"]
    title = (
        f"Deltas between digits CNN bundles ({models['params'] / 1e6:.2f}M parameters; "
        f"the fine-tune changed {models['weights_changed']:.0%} of the weights, by a median "
        f"{models['median_relative_change']:.2%} of their value; validation accuracy "
        f"{models['base_accuracy']:.3f} -> {models['finetuned_accuracy']:.3f}); "
        f"ratio = delta / full new bundle; apply = median of {runs}"
    )
    table = markdown_table(
        title,
        ["case", "method", "full bundle bytes", "delta bytes", "ratio", "make s", "apply s"],
        [
            [
                r["case"],
                r["method"],
                f"{r['full_bytes']:,}",
                f"{r['delta_bytes']:,}",
                f"{r['ratio']:.3f}",
                f"{r['make_s']:.2f}",
                f"{r['apply_s']:.3f}",
            ]
            for r in rows
        ],
        text_columns=2,
    )
    return table, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="bundle size for verification")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per method (median)")
    parser.add_argument("--skip-verify", action="store_true", help="no verification table")
    parser.add_argument("--skip-delta", action="store_true", help="no delta table")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.runs < 1 or args.size_mb < 1:
        parser.error("--runs and --size-mb must be at least 1")

    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    tables: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        work = args.workdir or Path(tmp)
        if not args.skip_verify:
            verify_work = work / "verify"
            verify_work.mkdir(parents=True)
            table, results["verify"] = bench_verify(verify_work, args.size_mb, args.runs)
            tables.append(table)
        if not args.skip_delta:
            delta_work = work / "delta"
            delta_work.mkdir(parents=True)
            table, results["delta"] = bench_delta(delta_work, args.runs)
            tables.append(table)
    print("\n\n".join(tables))
    print(f"\n_total bench time {time.perf_counter() - started:.0f} s_")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
