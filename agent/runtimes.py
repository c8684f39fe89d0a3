"""Inference runtimes behind one interface: ONNX Runtime, LiteRT (TFLite) and TVM.

Each runtime loads one artifact and answers ``predict`` (one call, inputs as the model
takes them) and ``predict_batch`` (N samples stacked on the first axis, split into calls the
model accepts). Inputs are keyed by the source model's input names; outputs come back as a
list in the model's output order, always as float32 when the model quantized its outputs.

A signature sidecar (``ARTIFACT.json``, :func:`write_signature`) names an artifact's inputs
and outputs as the source model does: a TVM library needs one (it carries no names), and a
LiteRT model uses one when it has it (the converter renames ``image`` to
``serving_default_image:0``), so clients send the same names whichever runtime serves.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from contracts.artifacts import RUNTIME_NAMES, Device, RuntimeName
from contracts.tensors import TensorSpec, dtype_of_onnxruntime_type

from .errors import ModelLoadError, RuntimeUnavailableError

__all__ = [
    "PREFERRED_ORT_PROVIDERS",
    "LiteRTRuntime",
    "OnnxRuntime",
    "Runtime",
    "TvmRuntime",
    "load_runtime",
    "read_signature",
    "write_signature",
]


class Runtime(Protocol):
    name: RuntimeName

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def metadata(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _per_sample(
    predict: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]],
    inputs: Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """Run ``predict`` on each sample (first axis) and stack the outputs again."""
    count = len(next(iter(inputs.values())))
    per_sample = [predict({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    return [np.concatenate([outs[j] for outs in per_sample]) for j in range(len(per_sample[0]))]


def _require(module: str, runtime: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeUnavailableError(
            f"the {runtime} runtime needs the Python module {module!r}, which is not installed "
            "(pip install 'edgefleet[agent]')"
        ) from e


def _check_file(path: Path, runtime: str) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{runtime} model {path} does not exist or is not a file")


PREFERRED_ORT_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Tried in this order; those this onnxruntime build lacks are skipped (a Jetson's
onnxruntime-gpu has the first two, PyPI's onnxruntime only the CPU)."""


class OnnxRuntime:
    """An ``.onnx`` file on ONNX Runtime with the given execution providers."""

    name: RuntimeName = "onnxruntime"

    def __init__(
        self, path: Path, threads: int = 0, providers: Sequence[str] = PREFERRED_ORT_PROVIDERS
    ) -> None:
        ort = _require("onnxruntime", "onnxruntime")
        _check_file(path, "onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own untyped exceptions for bad files
            raise ModelLoadError(f"onnxruntime cannot load {path}: {e}") from e
        self.providers = self._session.get_providers()

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_ort_spec(i) for i in self._session.get_inputs()]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_ort_spec(o) for o in self._session.get_outputs()]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(None, dict(inputs)))

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if all(spec.shape and spec.shape[0] is None for spec in self.inputs):
            return self.predict(inputs)
        return _per_sample(self.predict, inputs)

    def metadata(self) -> dict[str, Any]:
        return _metadata(self, providers=self.providers)

    def close(self) -> None:
        if hasattr(self, "_session"):  # closing twice is harmless
            del self._session


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, shape, dtype_of_onnxruntime_type(arg.type) or arg.type)


class LiteRTRuntime:
    """A ``.tflite`` file on LiteRT (``ai-edge-litert``, or ``tflite-runtime`` if that is there).

    Inputs are matched to the model's by position. Integer-quantized inputs and outputs are
    quantized and dequantized here, so callers always speak float32. With a signature
    sidecar beside the file, inputs and outputs carry the source model's names and types.
    """

    name: RuntimeName = "litert"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        _check_file(path, "litert")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            Interpreter = _require("tflite_runtime.interpreter", "litert").Interpreter
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"LiteRT cannot load {path}: {e}") from e
        self._in = self._interpreter.get_input_details()
        self._out = self._interpreter.get_output_details()
        self._inputs = [_litert_spec(d) for d in self._in]
        self._outputs = [_litert_spec(d) for d in self._out]
        if path.with_suffix(".json").is_file():
            inputs, outputs = read_signature(path)
            if (len(inputs), len(outputs)) != (len(self._in), len(self._out)):
                raise ModelLoadError(
                    f"{path.with_suffix('.json')} names {len(inputs)} inputs and "
                    f"{len(outputs)} outputs, but {path.name} has {len(self._in)} and "
                    f"{len(self._out)}: the sidecar belongs to another model"
                )
            self._inputs, self._outputs = inputs, outputs

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = (
            [inputs[spec.name] for spec in self._inputs]
            if all(spec.name in inputs for spec in self._inputs)
            else list(inputs.values())
        )
        for detail, value in zip(self._in, values, strict=True):
            self._interpreter.set_tensor(detail["index"], _quantize(value, detail))
        self._interpreter.invoke()
        return [_dequantize(self._interpreter.get_tensor(d["index"]), d) for d in self._out]

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return _per_sample(self.predict, inputs)

    def metadata(self) -> dict[str, Any]:
        return _metadata(self)

    def close(self) -> None:
        if hasattr(self, "_interpreter"):  # closing twice is harmless
            del self._interpreter


def _litert_spec(detail: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        detail["name"], tuple(int(x) for x in detail["shape"]), detail["dtype"].__name__
    )


def _quantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)
    return value.astype(dtype)


def _dequantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.issubdtype(value.dtype, np.integer) and scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


def write_signature(
    artifact: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> Path:
    """Write the sidecar naming an artifact's inputs and outputs (``ARTIFACT.json``)."""
    sidecar = artifact.with_suffix(".json")
    data = {"inputs": [asdict(s) for s in inputs], "outputs": [asdict(s) for s in outputs]}
    sidecar.write_text(json.dumps(data, indent=2))
    return sidecar


def read_signature(artifact: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs an artifact's sidecar names."""
    sidecar = artifact.with_suffix(".json")
    try:
        data = json.loads(sidecar.read_text())
        specs = [
            [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in data[key]]
            for key in ("inputs", "outputs")
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{artifact} needs a readable signature {sidecar}: {e}") from e
    return specs[0], specs[1]


class TvmRuntime:
    """A TVM Relax library (``.so``) built by the compiler, with its ``.json`` sidecar."""

    name: RuntimeName = "tvm"

    def __init__(self, path: Path, device: Device = "cpu") -> None:
        tvm = _require("tvm", "tvm")
        _check_file(path, "tvm")
        self._inputs, self._outputs = read_signature(path)
        try:
            self._device = tvm.cuda() if device == "gpu" else tvm.cpu()
            self._vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), self._device)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"TVM cannot load {path}: {e}") from e
        self._tvm = tvm

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        args = [
            self._tvm.runtime.tensor(np.ascontiguousarray(inputs[s.name]), self._device)
            for s in self._inputs
        ]
        result = self._vm["main"](*args)
        items = (
            result if isinstance(result, Sequence) and not hasattr(result, "numpy") else [result]
        )
        return [item.numpy() for item in items]

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return _per_sample(self.predict, inputs)

    def metadata(self) -> dict[str, Any]:
        return _metadata(self)

    def close(self) -> None:
        if hasattr(self, "_vm"):  # closing twice is harmless
            del self._vm


def _metadata(runtime: Runtime, **extra: Any) -> dict[str, Any]:
    return {
        "runtime": runtime.name,
        "inputs": [asdict(s) for s in runtime.inputs],
        "outputs": [asdict(s) for s in runtime.outputs],
        **extra,
    }


def load_runtime(name: RuntimeName, path: Path, **options: Any) -> Runtime:
    """Load ``path`` on the runtime called ``name`` (as a bundle's manifest names it)."""
    classes: dict[str, Any] = {
        "onnxruntime": OnnxRuntime,
        "litert": LiteRTRuntime,
        "tvm": TvmRuntime,
    }
    if name not in classes:
        raise ValueError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIME_NAMES)}")
    runtime: Runtime = classes[name](path, **options)
    return runtime
