"""Calibration and validation data: one ``.npz`` array per model input, samples first.

An optional ``labels`` array holds class indices for classifiers.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.tensors import TensorSpec

from .errors import DataError

__all__ = ["Dataset", "load_dataset"]

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, indices: slice | np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels)

    def split(self, fraction: float) -> tuple[Dataset, Dataset]:
        """The first ``fraction`` of samples and the rest, in order (deterministic)."""
        cut = max(1, min(len(self) - 1, round(len(self) * fraction)))
        return self.take(slice(0, cut)), self.take(slice(cut, None))


def load_dataset(path: Path, model_inputs: Sequence[TensorSpec]) -> Dataset:
    """Read ``path`` and check it against the model's inputs: names, shapes, sample counts."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as e:
        raise DataError(f"data file {path} does not exist") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from e

    expected = {spec.name for spec in model_inputs}
    missing = sorted(expected - arrays.keys())
    unknown = sorted(arrays.keys() - expected - {LABELS_KEY})
    if missing or unknown:
        raise DataError(
            f"{path}: expected one array per model input named {sorted(expected)}"
            f" (plus optional {LABELS_KEY!r}); missing {missing}, unexpected {unknown}"
        )
    inputs: dict[str, np.ndarray] = {}
    for spec in model_inputs:
        array = arrays[spec.name]
        sample_shape = spec.shape[1:]
        if array.ndim != len(spec.shape) or any(
            want is not None and want != got
            for want, got in zip(sample_shape, array.shape[1:], strict=True)
        ):
            raise DataError(
                f"{path}: array {spec.name!r} has shape {array.shape}; the model takes "
                f"{_shape(spec.shape)}, so expected (N, {', '.join(_dim(d) for d in sample_shape)})"
            )
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    counts = {name: len(a) for name, a in inputs.items()}
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        counts[LABELS_KEY] = len(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: {LABELS_KEY!r} must be a 1-D integer array of class indices")
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"{path}: every array needs the same, non-zero number of samples; got {counts}"
        )
    return Dataset(inputs, labels)


def _dim(d: int | None) -> str:
    return "?" if d is None else str(d)


def _shape(shape: Sequence[int | None]) -> str:
    return f"[{', '.join(_dim(d) for d in shape)}]"
