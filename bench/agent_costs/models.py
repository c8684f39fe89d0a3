"""The two models the agent benchmark serves, each built, compiled for the ``host`` profile
(ONNX Runtime, fp32) and bundled in a child process, so TensorFlow is never loaded into the
measuring process."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from agent.model import LoadedModel

from .common import log

__all__ = ["MODELS", "build_model", "build_models", "parameter_count"]

REPO = Path(__file__).resolve().parents[2]
MODELS = ("mobilenetv2", "digits")


def compile_and_bundle(model: Path, calibration: Path | None, out_dir: Path, name: str) -> Path:
    """Compile ``model`` for the host profile (ONNX Runtime only, fp32) and bundle it."""
    from compiler.pipeline import CompileOptions, compile_model
    from hw_profiles import load_profile
    from ota.bundle import bundle_compile_output

    host = load_profile("host")
    onnxruntime = host.runtime("onnxruntime")
    assert onnxruntime is not None
    compiled = out_dir / f"{name}-compiled"
    compile_model(
        CompileOptions(
            model=model,
            profile=host.model_copy(update={"runtimes": [onnxruntime]}),
            out_dir=compiled,
            calibration=calibration,
            quantize="fp32",
            tune_trials=0,
            latency_runs=5,
        )
    )
    bundle = out_dir / f"{name}.efb"
    bundle_compile_output(
        compiled, version="1.0.0", out=bundle, artifact_id="onnxruntime:fp32", name=f"{name}-host"
    )
    return bundle


def build_model(kind: str, out_dir: Path) -> None:
    """The child process: build, compile and bundle one model into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "mobilenetv2":
        import keras

        keras.utils.set_random_seed(0)
        image = keras.Input((224, 224, 3), name="image")
        model = keras.applications.MobileNetV2(weights=None, input_tensor=image)
        source = out_dir / "mobilenetv2.keras"
        model.save(source)
        compile_and_bundle(source, None, out_dir, kind)
    elif kind == "digits":
        train = REPO / "examples" / "digits" / "train.py"
        data = out_dir / "digits-train"
        subprocess.run([sys.executable, str(train), "--out", str(data)], check=True)
        compile_and_bundle(data / "digits.onnx", data / "digits.npz", out_dir, kind)
    else:
        raise ValueError(f"unknown model {kind!r}")


def build_models(work: Path, entry: Path) -> dict[str, Path]:
    """Both bundles, built side by side in two child processes running the script ``entry``
    with ``--build-model KIND --build-dir WORK`` (which calls :func:`build_model`)."""
    children = {}
    for kind in MODELS:
        if (work / f"{kind}.efb").is_file():
            log(f"models: reusing {work / f'{kind}.efb'}")
            continue
        log(f"models: building {kind} (child process)")
        with (work / f"build-{kind}.log").open("wb") as out:
            children[kind] = subprocess.Popen(
                [sys.executable, str(entry), "--build-model", kind, "--build-dir", str(work)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    for kind, child in children.items():
        if child.wait() != 0:
            tail = (work / f"build-{kind}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building {kind} failed:\n{tail}")
    return {kind: work / f"{kind}.efb" for kind in MODELS}


def parameter_count(model: LoadedModel) -> int:
    import onnx

    graph = onnx.load(str(model.directory / model.manifest.artifact)).graph
    return sum(math.prod(init.dims) for init in graph.initializer)
