"""Accuracy-aware int8: keep the operators that hurt most in float until the gate passes.

When a static int8 model misses the accuracy gate, each quantized operator's contribution
to the error is measured by quantizing that operator alone (its inputs, weights and, as
ONNX Runtime's QDQ format does for some operators, its output) and comparing the model's
outputs with the float model's: the signal-to-quantization-noise ratio (SQNR, dB) lost.
Quantizing one at a time, rather than keeping one at a time in float, also finds a pair
that shares a tensor (a layer whose output the next one reads), where keeping either
alone in float changes nothing because the other still quantizes the tensor. Models with
more than ``MAX_PROBES`` quantized operators probe only the ones that ONNX Runtime's QDQ
debugging tools (``onnxruntime.quantization.qdq_loss_debug``) rank worst: the SQNR lost
between an operator's inputs and its output, every intermediate tensor of both exposed.
The search then keeps the most sensitive operators in float (1, 2, 4, ... of them),
re-quantizes and re-validates, until the gate passes or every quantized operator would be
float, which is no int8 at all: a refusal.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from contracts.report import AccuracySearch, Comparison, SearchStep

from .data import Dataset
from .quantize import prepare_for_quantization, quantize_onnx

__all__ = ["MAX_PROBES", "SearchResult", "operator_sensitivity", "search_int8"]

MAX_PROBES = 16
_MAX_SAMPLES = 32
_CAP_DB = 100.0  # an exact tensor's SQNR is infinite; cap it so differences stay finite


@dataclass(frozen=True)
class SearchResult:
    """The search's record, and the int8 model that passed (``None`` on a refusal)."""

    record: AccuracySearch
    model: Path | None
    comparison: Comparison | None
    refusal: str | None


def _reader(data: Dataset) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            count = min(len(data), _MAX_SAMPLES)
            self._samples: Iterator[dict[str, np.ndarray]] = (
                {name: array[i : i + 1] for name, array in data.inputs.items()}
                for i in range(count)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._samples, None)

    return Reader()


def _activations(model: Path, data: Dataset, work: Path) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    augmented = work / f"{model.stem}.debug.onnx"
    modify_model_output_intermediate_tensors(model, augmented)
    return collect_activations(str(augmented), _reader(data))


def _sqnr(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_signal_to_quantization_noice_ratio,
    )

    value = float(compute_signal_to_quantization_noice_ratio(list(reference), list(other)))
    return _CAP_DB if math.isnan(value) or value > _CAP_DB else value


def _quantized_nodes(int8_model: Path) -> set[str]:
    """Names of the operators the int8 model quantized: those fed by a DequantizeLinear."""
    graph = onnx.load(str(int8_model)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {
        n.name
        for n in graph.node
        if n.name  # an unnamed node cannot be named in nodes_to_exclude
        and n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in dequantized for i in n.input)
    }


def _activation_ranking(
    prepared: Path, int8_model: Path, quantized: set[str], data: Dataset, work: Path
) -> dict[str, float]:
    """Per quantized operator, the SQNR (dB) lost between its inputs and its output in
    ``int8_model`` against ``prepared`` (the float model the quantizer started from)."""
    floats = _activations(prepared, data, work)
    int8s = _activations(int8_model, data, work)
    sensitivity: dict[str, float] = {}
    for node in onnx.load(str(prepared)).graph.node:
        if node.name not in quantized or not node.output or node.output[0] not in floats:
            continue
        out = node.output[0]
        if out not in int8s:
            continue
        inputs = [i for i in node.input if i in floats and i in int8s]
        before = min((_sqnr(floats[i], int8s[i]) for i in inputs), default=_CAP_DB)
        sensitivity[node.name] = round(before - _sqnr(floats[out], int8s[out]), 3)
    return sensitivity


def _outputs(model: Path, data: Dataset) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    count = min(len(data), _MAX_SAMPLES)
    feed = {name: array[:count] for name, array in data.inputs.items()}
    return [np.asarray(o) for o in session.run(None, feed)]


def _output_sqnr(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    return _sqnr([r.astype(np.float64).ravel() for r in reference], [o.ravel() for o in other])


def operator_sensitivity(
    source: Path,
    prepared: Path,
    int8_model: Path,
    calibration: Dataset,
    data: Dataset,
    work: Path,
) -> dict[str, float]:
    """Per quantized operator of ``int8_model``, the output SQNR (dB) lost when it alone is
    quantized, most sensitive first (see the module doc)."""
    quantized = _quantized_nodes(int8_model)
    probes = sorted(quantized)
    if len(probes) > MAX_PROBES:
        ranking = _activation_ranking(prepared, int8_model, quantized, data, work)
        probes = sorted(ranking, key=lambda name: -ranking[name])[:MAX_PROBES]
    reference = _outputs(source, data)
    sensitivity: dict[str, float] = {}
    for name in probes:
        probe = work / "probe.onnx"
        quantize_onnx(source, probe, "int8", calibration, only=[name])
        sensitivity[name] = round(_CAP_DB - _output_sqnr(reference, _outputs(probe, data)), 3)
    return dict(sorted(sensitivity.items(), key=lambda item: -item[1]))


def search_int8(
    source: Path,
    plain_int8: Path,
    calibration: Dataset,
    validation: Dataset,
    judge: Callable[[Path], Comparison],
    keep_float: Sequence[str] = (),
    *,
    work: Path,
) -> SearchResult:
    """Keep the most sensitive operators of ``plain_int8`` (quantized from ``source``) in
    float until ``judge`` passes; the passing model is written beside ``plain_int8``."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        scratch = Path(tmp)
        prepared = scratch / "prepared.onnx"
        prepare_for_quantization(source, prepared)
        sensitivity = operator_sensitivity(
            source, prepared, plain_int8, calibration, validation, scratch
        )
        order = [name for name in sensitivity if name not in keep_float]
        steps: list[SearchStep] = []
        for count in _sizes(len(order)):
            kept = [*keep_float, *order[:count]]
            trial = scratch / f"int8-keep-{count}.onnx"
            quantize_onnx(source, trial, "int8", calibration, kept)
            comparison = judge(trial)
            steps.append(
                SearchStep(
                    kept_in_float=kept,
                    metric=comparison.metric,
                    value=comparison.candidate,
                    passed=comparison.passed,
                )
            )
            if comparison.passed:
                chosen = plain_int8.with_name(f"{plain_int8.stem}.searched.onnx")
                trial.replace(chosen)
                return SearchResult(
                    _record("passed", kept, steps, sensitivity, plain_int8, chosen),
                    chosen,
                    comparison,
                    None,
                )
        refusal = (
            f"int8 refused after the accuracy search: keeping up to {len(order) - 1} of the "
            f"{len(order)} quantized operators in float still missed the gate, and keeping "
            "all of them leaves no int8 (ship fp32 or fp16, or lower the gate)"
            if len(order) > 1
            else f"int8 refused after the accuracy search: its one quantized operator "
            f"({', '.join(order)}) is what misses the gate, and keeping it in float leaves no "
            "int8 (ship fp32 or fp16, or lower the gate)"
            if order
            else "int8 refused: the accuracy search found no quantized operator to keep in float"
        )
        kept = [*keep_float, *order]
        return SearchResult(
            _record("refused", kept, steps, sensitivity, plain_int8, plain_int8),
            None,
            None,
            refusal,
        )


def _sizes(operators: int) -> list[int]:
    """How many operators each round keeps in float: 1, 2, 4, ..., and all but one."""
    sizes = []
    count = 1
    while count < operators:
        sizes.append(count)
        count *= 2
    if operators > 1 and sizes[-1] != operators - 1:
        sizes.append(operators - 1)
    return sizes


def _record(
    outcome: str,
    kept: list[str],
    steps: list[SearchStep],
    sensitivity: dict[str, float],
    before: Path,
    after: Path,
) -> AccuracySearch:
    return AccuracySearch(
        outcome=outcome,  # type: ignore[arg-type]
        kept_in_float=kept if outcome == "passed" else [],
        steps=steps,
        sensitivity=sensitivity,
        size_bytes_before=before.stat().st_size,
        size_bytes_after=after.stat().st_size,
    )
