"""LiteRT (TFLite) artifacts, converted from the TensorFlow source with TensorFlow's converter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from contracts.artifacts import Precision

from .data import Dataset
from .errors import StepError
from .importers import SourceModel, load_keras

__all__ = ["convert"]


def convert(
    source: SourceModel, dst: Path, precision: Precision, calibration: Dataset | None
) -> dict[str, Any]:
    """Write ``source`` as a ``.tflite`` at ``precision``: fp32, fp16 weights, dynamic-range
    int8, or full-integer int8 (int8 inputs and outputs) calibrated on ``calibration``."""
    import tensorflow as tf

    if source.kind == "saved_model":
        converter = tf.lite.TFLiteConverter.from_saved_model(str(source.path))
    else:
        model = source.keras_model
        if model is None:
            model = load_keras(source.path, source.kind)
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    detail: dict[str, Any] = {"precision": precision}
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8-dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        if calibration is None:
            raise StepError("full-integer int8 needs calibration data")
        names = [s.name for s in source.inputs]

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(len(calibration)):
                yield [calibration.inputs[name][i : i + 1] for name in names]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        detail.update(full_integer=True, calibration_samples=len(calibration))
    try:
        dst.write_bytes(converter.convert())
    except Exception as e:  # the converter raises ConverterError and plain Exceptions
        raise StepError(
            f"TensorFlow could not convert {source.path} to TFLite ({precision}): {e}"
        ) from e
    return detail
