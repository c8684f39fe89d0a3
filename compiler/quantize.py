"""ONNX Runtime quantization: static int8 (QDQ, per channel, calibrated), dynamic int8, fp16."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization.shape_inference import quant_pre_process

from contracts.artifacts import Precision

from .data import Dataset
from .errors import OptionError, StepError

__all__ = ["prepare_for_quantization", "quantize_onnx"]


def _samples(data: Dataset) -> Iterator[dict[str, Any]]:
    for i in range(len(data)):
        yield {name: array[i : i + 1] for name, array in data.inputs.items()}


def quantize_onnx(
    src: Path,
    dst: Path,
    precision: Precision,
    calibration: Dataset | None,
    keep_float: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``src`` at ``precision`` to ``dst``; ``keep_float`` names nodes left in float,
    ``only`` (static int8) the nodes to quantize, every other left in float.

    Integer quantization runs on the model after ONNX Runtime's pre-processing (shape
    inference and graph optimization, which folds and fuses nodes so fewer Q/DQ pairs are
    needed); ``keep_float`` names nodes of that model.
    """
    try:
        if precision == "fp32":
            shutil.copyfile(src, dst)
            return {"precision": "fp32"}
        if precision == "fp16":
            return _fp16(src, dst)
        if precision == "int8" and calibration is None:
            raise StepError("static int8 needs calibration data")
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            prepare_for_quantization(src, prepared)
            _check_node_names(prepared, keep_float)
            if precision == "int8-dynamic":
                return _dynamic(prepared, dst, keep_float)
            assert calibration is not None
            return _static(prepared, dst, calibration, keep_float, only)
    except StepError:
        raise
    except Exception as e:  # onnxruntime.quantization raises untyped errors
        raise StepError(f"ONNX Runtime could not quantize {src.name} to {precision}: {e}") from e


def prepare_for_quantization(src: Path, dst: Path) -> None:
    """The model integer quantization starts from (its node names are ``keep_float``'s)."""
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def _check_node_names(model: Path, names: Sequence[str]) -> None:
    nodes = [node.name for node in onnx.load(str(model)).graph.node]
    unknown = sorted(set(names) - set(nodes))
    if unknown:
        raise OptionError(
            f"--keep-float names nodes that are not in the model as it is quantized: {unknown}. "
            "ONNX Runtime's pre-processing fuses and renames some nodes (MatMul+Add into Gemm); "
            f"its nodes are: {', '.join(nodes[:40])}{' ...' if len(nodes) > 40 else ''}"
        )


def _static(
    src: Path,
    dst: Path,
    data: Dataset,
    keep_float: Sequence[str],
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = _samples(data)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._samples, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=list(keep_float),
        nodes_to_quantize=list(only) if only is not None else None,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return {
        "precision": "int8",
        "format": "QDQ",
        "per_channel": True,
        "calibration_samples": len(data),
        "kept_in_float": list(keep_float),
    }


def _dynamic(src: Path, dst: Path, keep_float: Sequence[str]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic quantization pays off for MatMul / Gemm; ConvInteger has few fast kernels.
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=list(keep_float),
    )
    return {"precision": "int8-dynamic", "quantized_ops": ["MatMul", "Gemm"]}


def _fp16(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {"precision": "fp16", "io": "float32"}
