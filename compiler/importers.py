"""Read the model to compile: ONNX as it is; Keras and SavedModel converted to ONNX.

Every later step works on ONNX. A TensorFlow source is also kept, because LiteRT
artifacts are converted from it with TensorFlow's own converter.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from agent.errors import ModelLoadError
from agent.runtimes import OnnxRuntime
from contracts.tensors import TensorSpec

from .errors import ModelImportError

__all__ = ["SourceModel", "import_model", "sha256_file"]

SourceKind = Literal["onnx", "keras", "saved_model"]


@dataclass(frozen=True)
class SourceModel:
    """The model as given (``path``, ``kind``, ``sha256``) and its ONNX form (``onnx_path``).

    ``keras_model`` is the loaded Keras model of a TensorFlow source, kept so the LiteRT
    converter does not load it again for every precision.
    """

    path: Path
    kind: SourceKind
    sha256: str
    onnx_path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    keras_model: Any = field(default=None, compare=False, repr=False)

    @property
    def is_tensorflow(self) -> bool:
        return self.kind != "onnx"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tree(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _kind(path: Path) -> SourceKind:
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        raise ModelImportError(f"{path} is a directory without saved_model.pb: not a SavedModel")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".keras":
        return "keras"
    raise ModelImportError(
        f"cannot tell the format of {path}: expected a .onnx file, a .keras file or a "
        "SavedModel directory"
    )


def import_model(path: Path, work_dir: Path) -> SourceModel:
    """Check ``path`` and give back its ONNX form (written under ``work_dir`` if converted)."""
    if not path.exists():
        raise ModelImportError(f"model {path} does not exist")
    kind = _kind(path)
    sha = _sha256_tree(path) if kind == "saved_model" else sha256_file(path)
    keras_model = None
    if kind == "onnx":
        onnx_path = path
        _check_onnx(path)
    else:
        onnx_path = work_dir / "source.onnx"
        keras_model = _tensorflow_to_onnx(path, kind, onnx_path)
    try:
        session = OnnxRuntime(onnx_path)  # the fp32 reference runs on ONNX Runtime
    except ModelLoadError as e:
        raise ModelImportError(f"{path}: the fp32 reference does not load: {e}") from e
    return SourceModel(path, kind, sha, onnx_path, session.inputs, session.outputs, keras_model)


def _check_onnx(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise ModelImportError(f"{path} is not a valid ONNX model: {e}") from e
    except Exception as e:  # protobuf's DecodeError and friends for truncated files
        raise ModelImportError(f"{path} cannot be read as ONNX: {e}") from e


def load_keras(path: Path, kind: SourceKind) -> Any:
    """The Keras model for a ``.keras`` file, or a SavedModel's serving signature wrapped in one."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
    except ImportError as e:
        raise ModelImportError(
            "TensorFlow models need the compiler extra: pip install 'edgefleet[compiler]'"
        ) from e
    try:
        if kind == "keras":
            return keras.saving.load_model(path, compile=False)
        return _wrap_saved_model(keras, path)
    except ModelImportError:
        raise
    except Exception as e:  # keras raises many unrelated types for a bad file
        raise ModelImportError(f"cannot load {path} as a {kind} model: {e}") from e


def _wrap_saved_model(keras: Any, path: Path) -> Any:
    """A Keras model around a SavedModel's ``serving_default`` signature."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures.get("serving_default")
    if signature is None:
        raise ModelImportError(f"SavedModel {path} has no 'serving_default' signature")
    specs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(specs) != 1 or len(outputs) != 1:
        raise ModelImportError(
            f"SavedModel {path}: edgefleet converts signatures with one input and one output; "
            f"this one has inputs {sorted(specs)} and outputs {sorted(outputs)}. "
            "Export a .keras file instead."
        )
    ((name, spec),) = specs.items()
    model_input = keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name)
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    (output,) = layer(model_input).values()
    return keras.Model(model_input, output)


def _call_once(model: Any) -> None:
    import numpy as np

    zeros = [np.zeros([1 if d is None else d for d in t.shape], t.dtype) for t in model.inputs]
    model(zeros[0] if len(zeros) == 1 else zeros)


def _tensorflow_to_onnx(path: Path, kind: SourceKind, onnx_path: Path) -> Any:
    """Write the ONNX form of a TensorFlow source; returns the loaded Keras model."""
    model: Any = load_keras(path, kind)
    try:
        _call_once(model)  # a loaded model must have been called before Keras exports it
        model.export(str(onnx_path), format="onnx", verbose=False)
    except ImportError as e:
        raise ModelImportError(f"converting {path} to ONNX needs tf2onnx: {e}") from e
    except Exception as e:
        raise ModelImportError(f"TensorFlow could not convert {path} to ONNX: {e}") from e
    return model
