"""Small ONNX models of each task, built in the test (nothing downloaded), with their data.

Each builder writes ``NAME.onnx`` and ``NAME.npz`` (calibration data: one array per input,
and ``labels`` where the task has them) into a directory and returns the model's path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "classifier",
    "contrib_op_regressor",
    "depthwise_separable_cnn",
    "detector_head",
    "embedder",
    "outlier_classifier",
    "outlier_input_classifier",
    "regressor",
]

FEATURES = 16
SAMPLES = 96


def _save(
    directory: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    inputs: dict[str, list[int | str]],
    outputs: dict[str, list[int | str]],
    data: dict[str, np.ndarray],
    opsets: dict[str, int] | None = None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(_typed(v), k) for k, v in initializers.items()],
    )
    domains = {"": 17, **(opsets or {})}
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    np.savez(directory / f"{name}.npz", **data)  # type: ignore[arg-type]
    return path


def _typed(value: np.ndarray) -> np.ndarray:
    """Float weights as float32; shapes and sizes stay int64."""
    return value.astype(np.float32) if value.dtype.kind == "f" else value.astype(np.int64)


def _features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SAMPLES, FEATURES)).astype(np.float32)


def _mlp(
    rng: np.random.Generator, width: int, out: int
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """x -> Gemm -> Relu -> Gemm -> y0 (before the task's head)."""
    weights = {
        "w1": rng.standard_normal((FEATURES, width)) * 0.5,
        "b1": rng.standard_normal(width) * 0.1,
        "w2": rng.standard_normal((width, out)) * 0.5,
        "b2": rng.standard_normal(out) * 0.1,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y0"], name="head"),
    ]
    return nodes, weights


def classifier(directory: Path) -> Path:
    """Softmax probabilities over 5 classes; no labels (the rows say it all)."""
    nodes, weights = _mlp(np.random.default_rng(1), 32, 5)
    nodes.append(helper.make_node("Softmax", ["y0"], ["probs"], axis=1, name="softmax"))
    return _save(
        directory,
        "classifier",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"probs": ["N", 5]},
        {"x": _features(11)},
    )


def embedder(directory: Path) -> Path:
    """A 24-dimensional embedding: rows that are not probabilities, data without labels."""
    nodes, weights = _mlp(np.random.default_rng(2), 32, 24)
    nodes[-1].output[0] = "embedding"
    return _save(
        directory,
        "embedder",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"embedding": ["N", 24]},
        {"x": _features(12)},
    )


def regressor(directory: Path) -> Path:
    """One value per sample."""
    nodes, weights = _mlp(np.random.default_rng(3), 32, 1)
    nodes[-1].output[0] = "value"
    return _save(
        directory,
        "regressor",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"value": ["N", 1]},
        {"x": _features(13)},
    )


def detector_head(directory: Path) -> Path:
    """Two outputs: 6 boxes (x1, y1, x2, y2 in pixels) and 6 scores per sample."""
    rng = np.random.default_rng(4)
    nodes, weights = _mlp(rng, 32, 6 * 4 + 6)
    weights |= {
        "corner": np.tile([0.0, 0.0, 32.0, 32.0], 6).reshape(1, 24) + 100.0,
        "box_shape": np.array([-1, 6, 4]),
        "split": np.array([24, 6]),
        "ten": np.array(10.0),
    }
    nodes += [
        helper.make_node("Split", ["y0", "split"], ["raw_boxes", "raw_scores"], axis=1),
        helper.make_node("Mul", ["raw_boxes", "ten"], ["scaled"], name="scale_boxes"),
        helper.make_node("Add", ["scaled", "corner"], ["flat_boxes"], name="place_boxes"),
        helper.make_node("Reshape", ["flat_boxes", "box_shape"], ["boxes"], name="boxes"),
        helper.make_node("Sigmoid", ["raw_scores"], ["scores"], name="scores"),
    ]
    return _save(
        directory,
        "detector",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"boxes": ["N", 6, 4], "scores": ["N", 6]},
        {"x": _features(14)},
    )


def outlier_classifier(directory: Path) -> Path:
    """A classifier that plain int8 breaks, and keeping two of its four operators in float
    repairs.

    Its ``outlier`` layer writes one channel 400 times larger than the rest, which ``head``
    ignores (weight 0): that tensor quantized per tensor rounds the channels that carry the
    decision to a few levels, and its logits are a few units apart (low margin: samples
    whose top two logits are within 1 are left out of the data). Both
    layers quantize that tensor (ONNX Runtime's QDQ quantizes a Gemm's output too), so both
    must stay in float; ``embed`` before them and the softmax quantize harmlessly (their
    8 bits are enough for the margins between the classes).
    """
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((FEATURES, FEATURES)) * 0.3
    w1 = rng.standard_normal((FEATURES, FEATURES)) * 0.3
    w1[:, -1] = 0.0
    w1[0, -1] = 400.0
    w2 = rng.standard_normal((FEATURES, 4))
    w2[-1, :] = 0.0
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["a"], name="embed"),
        helper.make_node("Gemm", ["a", "w1", "b1"], ["h"], name="outlier"),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    weights = {
        "w0": w0,
        "b0": np.zeros(FEATURES),
        "w1": w1,
        "b1": np.zeros(FEATURES),
        "w2": w2,
        "b2": np.zeros(4),
    }
    x = np.random.default_rng(15).standard_normal((4 * SAMPLES, FEATURES)).astype(np.float32)
    top2 = np.sort(((x @ w0) @ w1) @ w2, axis=1)[:, -2:]
    clear = x[top2[:, 1] - top2[:, 0] > 1.0][:SAMPLES]  # int8 at its best keeps these
    return _save(
        directory,
        "outlier_classifier",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"probs": ["N", 4]},
        {"x": clear},
    )


def outlier_input_classifier(directory: Path) -> Path:
    """One Gemm over inputs of which one feature is 1000 times the rest and ignored: int8
    of its input breaks it, and keeping its only operator in float leaves no int8 at all."""
    rng = np.random.default_rng(6)
    x = _features(16)
    x[:, 0] *= 1000.0
    w = rng.standard_normal((FEATURES, 4)) * 0.2
    w[0, :] = 0.0
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="only")]
    return _save(
        directory,
        "outlier_input_classifier",
        nodes,
        {"w": w, "b": np.zeros(4)},
        {"x": ["N", FEATURES]},
        {"logits": ["N", 4]},
        {"x": x, "labels": (x @ w).argmax(1)},
    )


def contrib_op_regressor(directory: Path) -> Path:
    """A Gemm whose output goes through ONNX Runtime's ``com.microsoft`` FastGelu (models
    optimized by ``onnxruntime.transformers`` carry such operators): ONNX Runtime runs it,
    onnx2tf has no converter for it."""
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["y0"], name="dense"),
        helper.make_node("FastGelu", ["y0"], ["value"], name="fast_gelu", domain="com.microsoft"),
    ]
    weights = {"w": np.random.default_rng(8).standard_normal((FEATURES, 1)), "b": np.zeros(1)}
    return _save(
        directory,
        "contrib_op_regressor",
        nodes,
        weights,
        {"x": ["N", FEATURES]},
        {"value": ["N", 1]},
        {"x": _features(18)},
        opsets={"com.microsoft": 1},
    )


def depthwise_separable_cnn(directory: Path) -> Path:
    """Conv, depthwise Conv + BatchNormalization + Clip (ReLU6), pointwise Conv, opset 17:
    the block TVM's mixed-precision pass (ToMixedPrecision) rejects."""
    rng = np.random.default_rng(7)
    channels = 8
    weights = {
        "w1": rng.standard_normal((channels, 3, 3, 3)) * 0.3,
        "b1": np.zeros(channels),
        "dw": rng.standard_normal((channels, 1, 3, 3)) * 0.3,
        "gamma": np.ones(channels),
        "beta": np.zeros(channels),
        "mean": np.zeros(channels),
        "var": np.ones(channels),
        "pw": rng.standard_normal((4, channels, 1, 1)) * 0.3,
        "low": np.array(0.0),
        "high": np.array(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node(
            "Conv", ["c1", "dw"], ["c2"], group=channels, pads=[1, 1, 1, 1], name="depthwise"
        ),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Clip", ["bn", "low", "high"], ["relu6"], name="relu6"),
        helper.make_node("Conv", ["relu6", "pw"], ["c3"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["c3"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["probs"], axis=1),
    ]
    images = np.random.default_rng(17).standard_normal((32, 3, 16, 16)).astype(np.float32)
    return _save(
        directory,
        "dwcnn",
        nodes,
        weights,
        {"x": ["N", 3, 16, 16]},
        {"probs": ["N", 4]},
        {"x": images},
    )
