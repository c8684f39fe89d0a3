"""Magnitude and structured pruning of ONNX graphs, checked by running them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.runtimes import OnnxRuntime
from compiler.prune import magnitude_prune, structured_prune

rng = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)


def nchw_cnn(residual: bool = False) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv (+ residual Add) -> Flatten -> Gemm, NCHW."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], name="bn"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    last = "c2"
    if residual:
        nodes.append(helper.make_node("Add", ["c2", "r1"], ["sum"], name="residual"))
        last = "sum"
    nodes += [
        helper.make_node("Flatten", [last], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    channels2 = 8 if residual else 12
    inits = [
        _init("w1", 8, 1, 3, 3), _init("b1", 8), _init("s", 8), _init("bb", 8), _init("m", 8),
        numpy_helper.from_array(np.ones(8, "float32"), "v"),
        _init("w2", channels2, 8, 3, 3), _init("b2", channels2),
        _init("wf", 10, channels2 * 16), _init("bf", 10),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return OnnxRuntime(path).predict({"x": x})[0]


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_the_target_sparsity(scope: str) -> None:
    model = nchw_cnn()
    pruned, report = magnitude_prune(model, 0.5, scope)  # type: ignore[arg-type]
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    assert report.parameters_after == report.parameters_before  # shapes stay
    assert report.compressed_bytes_after < report.compressed_bytes_before
    if scope == "layer":
        for layer in report.layers:
            assert layer["sparsity"] == pytest.approx(0.5, abs=0.02)
    biases = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert np.count_nonzero(biases["b1"]) == 8  # biases are not weights


def test_structured_pruning_shrinks_layers_and_their_consumers(tmp_path: Path) -> None:
    model = nchw_cnn()
    pruned, report = structured_prune(model, 0.5)
    dims = _dims(pruned)
    assert dims["w1"] == [4, 1, 3, 3] and dims["s"] == [4] and dims["v"] == [4]
    assert dims["w2"] == [6, 4, 3, 3] and dims["b2"] == [6]
    assert dims["wf"] == [10, 6 * 16]  # the flatten after conv2 lost 6 channels x 16 positions
    assert report.parameters_after < report.parameters_before
    assert {layer["node"] for layer in report.layers} == {"conv1", "conv2"}
    assert report.skipped == [{"node": "fc", "reason": "its output is a model output"}]
    x = rng.standard_normal((3, 1, 4, 4)).astype("float32")
    assert _run(pruned, x, tmp_path).shape == (3, 10)


def test_structured_pruning_keeps_the_strongest_channels(tmp_path: Path) -> None:
    model = nchw_cnn()
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    strongest = set(np.argsort(-np.abs(w1).sum(axis=(1, 2, 3)))[:4].tolist())
    pruned, _ = structured_prune(model, 0.5)
    kept = numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == "w1"))
    kept_rows = {int(np.where((w1 == row).all(axis=(1, 2, 3)))[0][0]) for row in kept}
    assert kept_rows == strongest


def test_a_layer_feeding_a_residual_add_is_left_whole() -> None:
    pruned, report = structured_prune(nchw_cnn(residual=True), 0.5)
    reasons = {s["node"]: s["reason"] for s in report.skipped}
    assert "meets another branch in Add" in reasons["conv1"]
    assert "meets another branch in Add" in reasons["conv2"]
    assert _dims(pruned)["w1"] == [8, 1, 3, 3]


def test_structured_pruning_of_a_keras_export_follows_transpose_and_reshape(
    digits: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(digits / "digits.onnx"))
    pruned, report = structured_prune(model, 0.25)
    assert len(report.layers) == 3  # both convolutions and the hidden dense layer
    assert report.parameters_after < 0.7 * report.parameters_before
    data = np.load(digits / "digits.npz")
    path = tmp_path / "p.onnx"
    onnx.save(pruned, str(path))
    scores = OnnxRuntime(path).predict({"image": data["image"]})[0]
    assert scores.shape == (len(data["image"]), 10)


def test_sparsity_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude_prune(nchw_cnn(), 1.0)
