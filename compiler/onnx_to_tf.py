"""ONNX sources to a TensorFlow SavedModel with onnx2tf, so LiteRT artifacts exist for them.

onnx2tf (PINTO0309/onnx2tf) is the maintained ONNX-to-TensorFlow converter; onnx-tf is no
longer maintained. Its package metadata pins exact TensorFlow and ONNX Runtime releases
older than the compiler's, so the Makefile installs it without those pins (``make setup``);
it runs on the TensorFlow the compiler uses. Inputs of rank 3 and more keep their ONNX
layout (channels first): onnx2tf would otherwise make them channels last, and the artifact
must take what the ONNX model takes. LiteRT's own converter then writes each precision
from the SavedModel (``compiler/litert.py``).

Before onnx2tf sees the model, ONNX Runtime's basic graph optimizations rewrite it
(constant folding, a Mul/Add/BatchNormalization/Pad after a Conv folded into the Conv:
standard ONNX operators only, the same function). Exporters write such chains, and onnx2tf
fails on some: a MobileNetV2 exported from Keras by tf2onnx stopped at the ``Mul`` after a
depthwise Conv, and converts once it is folded (``bench/compile_bench.py``).

onnx2tf runs in a child process (``python -m compiler.onnx_to_tf``): on import it sets
``TF_USE_LEGACY_KERAS``, which would change what ``tf.keras`` is for the rest of a
compile, and on a failed operator it exits the process.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import StepError
from .importers import SourceModel

__all__ = ["ConversionError", "available", "to_saved_model"]

_OP_NAME = re.compile(r"onnx_op_name:\s*(\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[\w.]*(Error|Exception): ")
_UNSUPPORTED = re.compile(r"No module named 'onnx2tf\.ops\.(\w+)'")
TIMEOUT_S = 1800
INSTALL_HINT = (
    "onnx2tf is not installed: `make setup` installs it, or `pip install --no-deps "
    "onnx2tf onnx_graphsurgeon sng4onnx tf_keras` (its metadata pins older TensorFlow)"
)


class ConversionError(StepError):
    """onnx2tf could not convert the model; ``operator`` names the node when it said which."""

    def __init__(self, message: str, operator: str | None) -> None:
        super().__init__(message)
        self.operator = operator


def available() -> bool:
    return importlib.util.find_spec("onnx2tf") is not None


def to_saved_model(onnx_path: Path, out_dir: Path, source: SourceModel) -> SourceModel:
    """The SavedModel onnx2tf writes for ``onnx_path`` into ``out_dir``, as a source the
    LiteRT converter reads, with the ONNX model's input and output names and shapes."""
    if not available():
        raise StepError(INSTALL_HINT)
    layout_kept = [s.name for s in source.inputs if len(s.shape) >= 3]
    folded = _folded(onnx_path, out_dir.with_name(f"{out_dir.name}-folded.onnx"))
    command = [sys.executable, "-m", __name__, str(folded), str(out_dir)]
    command += [f"--keep-layout={name}" for name in layout_kept]
    try:
        child = subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ConversionError(f"onnx2tf took more than {TIMEOUT_S} s", None) from e
    log = child.stdout + child.stderr
    if child.returncode != 0 or not (out_dir / "saved_model.pb").exists():
        raise _conversion_error(log, folded)
    return SourceModel(
        path=out_dir,
        kind="saved_model",
        sha256=source.sha256,
        onnx_path=onnx_path,
        inputs=source.inputs,
        outputs=source.outputs,
    )


def _folded(onnx_path: Path, folded_path: Path) -> Path:
    """``onnx_path`` after ONNX Runtime's basic (operator-preserving) graph optimizations,
    written to ``folded_path``; the model as it was when ONNX Runtime cannot load it (the
    validation step will say why)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded_path)
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception:  # any load failure: convert the model as given
        return onnx_path
    return folded_path


def _conversion_error(log: str, onnx_path: Path) -> ConversionError:
    """The operator onnx2tf names in its trace (or has no converter for), and the last line
    that says what failed."""
    log = _ANSI.sub("", log)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    named = _OP_NAME.findall(log)
    types = {n.name: n.op_type for n in graph.node}
    operator = f"{types.get(named[-1], 'node')} {named[-1]!r}" if named else None
    missing = _UNSUPPORTED.search(log)
    if missing:
        op_type = missing.group(1)
        names = [n.name or "(unnamed)" for n in graph.node if n.op_type == op_type]
        operator = f"{op_type} {names[0]!r}" if names else op_type
        return ConversionError(
            f"onnx2tf could not convert the model at {operator}: onnx2tf has no converter "
            f"for {op_type}",
            operator,
        )
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]  # "ValueError: ..."
    cause = (raised or lines or ["no SavedModel written"])[-1][:300]
    where = f" at {operator}" if operator else ""
    return ConversionError(f"onnx2tf could not convert the model{where}: {cause}", operator)


def _main() -> None:
    parser = argparse.ArgumentParser(description="onnx2tf, for compiler/onnx_to_tf.py")
    parser.add_argument("onnx", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--keep-layout", action="append", default=[])
    args = parser.parse_args()
    import onnx2tf

    onnx2tf.convert(
        input_onnx_file_path=str(args.onnx),
        output_folder_path=str(args.out),
        keep_ncw_or_nchw_or_ncdhw_input_names=args.keep_layout or None,
        non_verbose=True,
        not_use_onnxsim=True,
        output_signaturedefs=True,
    )


if __name__ == "__main__":
    _main()
