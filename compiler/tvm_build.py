"""Build TVM Relax modules for a profile: import ONNX, apply tuning, compile, link.

Edge inference runs one sample at a time, so the module is built for batch 1: static
shapes are what MetaSchedule tunes well. When the pipeline has no way to run a board's
build (its GPU, or no emulated board), the build is paired with a twin: the same module
built for this machine, which the validate and golden steps run instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from agent.runtimes import write_signature
from contracts.artifacts import Device, Precision
from contracts.tensors import TensorSpec
from hw_profiles import Profile, load_profile

from .errors import StepError
from .targets import tvm_target
from .toolchain import export_library

__all__ = ["TVM_PRECISIONS", "GpuToolchainMissing", "TvmBuild", "build", "import_relax"]

TVM_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")
TVM_PRECISIONS_WHY = (
    "TVM imports int8 (QDQ) models as float arithmetic around quantize/dequantize, which is "
    "no faster than fp32, so TVM ships fp32 (and fp16) and int8 ships for ONNX Runtime / LiteRT"
)


class GpuToolchainMissing(StepError):
    """CUDA code generation needs the CUDA toolkit (nvcc) on the build machine."""


@dataclass(frozen=True)
class TvmBuild:
    """``runnable`` is the twin when one was built, else the artifact itself."""

    artifact: Path
    runnable: Path
    target: str
    tuned: bool
    seconds: float

    def as_detail(self) -> dict[str, Any]:
        return {"target": self.target, "tuned": self.tuned, "seconds": round(self.seconds, 3)}


def batch_one(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [
        TensorSpec(s.name, tuple(1 if d is None else d for d in s.shape), s.dtype) for s in specs
    ]


def _fold_batch_one(onnx_path: Path, inputs: list[TensorSpec]) -> onnx.ModelProto:
    """The model with batch 1 and its shape arithmetic folded into constants.

    Converters compute reshape targets at run time (Shape -> Gather -> Concat); Relax needs
    them static. ONNX Runtime's basic level folds constants with standard ONNX operators
    only, so the result stays a plain ONNX model.
    """
    import tempfile

    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    fixed = {s.name: s.shape for s in batch_one(inputs)}
    for graph_input in model.graph.input:
        if graph_input.name in fixed:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, fixed[graph_input.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(folded))


def import_relax(onnx_path: Path, inputs: list[TensorSpec]) -> Any:
    """The ONNX model as a Relax IRModule with batch 1 and weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(_fold_batch_one(onnx_path, inputs))
    except Exception as e:  # the frontend raises many types for unsupported operators
        raise StepError(f"TVM's ONNX frontend cannot import {onnx_path.name}: {e}") from e


def _to_precision(mod: Any, precision: Precision) -> Any:
    if precision == "fp16":
        from tvm import relax

        try:
            return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        except Exception as e:  # TVM raises InternalError for graphs the pass cannot type
            first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
            raise StepError(f"TVM's mixed-precision pass (ToMixedPrecision) failed: {first}") from e
    return mod


def compile_module(mod: Any, target: Any, database: Path | None) -> Any:
    """``tvm.compile``, with MetaSchedule's tuned schedules when a database is given."""
    import tvm

    if database is None:
        return tvm.compile(mod, target=target)
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(database))
    return ms.relax_integration.compile_relax(db, mod, target, params=None)


def build(
    onnx_path: Path,
    profile: Profile,
    out_path: Path,
    *,
    precision: Precision,
    device: Device,
    database: Path | None,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    work: Path,
    twin: bool,
) -> TvmBuild:
    """Build ``onnx_path`` for ``profile`` into ``out_path`` (and its signature sidecar);
    with ``twin``, also the same module for this machine, in ``work``."""
    start = time.perf_counter()
    mod = _to_precision(import_relax(onnx_path, inputs), precision)
    target = tvm_target(profile, device)
    database = database if device == "cpu" else None  # tuning covers the CPU target only
    try:
        executable = compile_module(mod, target, database)
    except Exception as e:
        if device == "gpu" and ("nvcc" in str(e) or "nvrtc" in str(e).lower()):
            raise GpuToolchainMissing(
                "CUDA code generation needs the CUDA toolkit (nvcc) on the build machine"
            ) from e
        raise StepError(f"TVM could not compile for {profile.name}: {e}") from e
    export_library(executable, out_path, profile)
    specs_in, specs_out = batch_one(inputs), batch_one(outputs)
    write_signature(out_path, specs_in, specs_out)

    runnable = out_path
    if twin:
        host = load_profile("host")
        runnable = work / f"host-{out_path.name}"
        export_library(compile_module(mod, tvm_target(host), None), runnable, host)
        write_signature(runnable, specs_in, specs_out)
    return TvmBuild(
        out_path, runnable, str(target), database is not None, time.perf_counter() - start
    )
