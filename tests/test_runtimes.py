"""The runtimes behind one interface: bad artifacts give ModelLoadError, never a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelLoadError
from agent.runtimes import load_runtime


@pytest.mark.parametrize(
    ("runtime", "suffix"), [("onnxruntime", ".onnx"), ("litert", ".tflite"), ("tvm", ".so")]
)
def test_a_missing_or_corrupt_artifact_is_a_model_load_error(
    runtime: str, suffix: str, tmp_path: Path
) -> None:
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_runtime(runtime, missing)  # type: ignore[arg-type]
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x00not a model" * 10)
    if runtime == "tvm":
        corrupt.with_suffix(".json").write_text('{"inputs": [], "outputs": []}')
    with pytest.raises(ModelLoadError, match=str(corrupt)):
        load_runtime(runtime, corrupt)  # type: ignore[arg-type]


def test_an_unknown_runtime_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one of tvm, onnxruntime, litert"):
        load_runtime("tensorrt", tmp_path / "m.plan")  # type: ignore[arg-type]


def test_onnxruntime_batches_when_the_model_allows_it(digits: Path) -> None:
    runtime = load_runtime("onnxruntime", digits / "digits.onnx")
    assert runtime.inputs[0].name == "image" and runtime.inputs[0].shape[0] is None
    images = np.load(digits / "digits.npz")["image"][:7]
    batched = runtime.predict_batch({"image": images})[0]
    one_by_one = np.concatenate(
        [runtime.predict({"image": images[i : i + 1]})[0] for i in range(7)]
    )
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    assert runtime.metadata()["runtime"] == "onnxruntime"
