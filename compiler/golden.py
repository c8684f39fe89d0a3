"""Golden vectors: a few inputs and what each shipped artifact answered for them.

The agent's health check runs them after an install and compares with a tolerance that
depends on the precision: the board's CPU rounds differently from the build machine's, and
reduced precisions more so. The tolerance is ``atol + rtol * |expected|`` element-wise,
with ``atol`` a fraction of the largest expected magnitude, and the same top-1 class for
classifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contracts.artifacts import Precision
from contracts.report import GoldenVectors
from contracts.tensors import TensorSpec

__all__ = ["GOLDEN_COUNT", "golden_inputs", "write_golden"]

GOLDEN_COUNT = 4
# Per precision: (absolute error as a fraction of the largest expected magnitude, rtol).
_TOLERANCE: dict[Precision, tuple[float, float]] = {
    "fp32": (1e-3, 1e-3),
    "fp16": (2e-2, 1e-2),
    "int8": (5e-2, 5e-2),
    "int8-dynamic": (5e-2, 5e-2),
}


def golden_inputs(
    data: Mapping[str, np.ndarray] | None, specs: list[TensorSpec]
) -> dict[str, np.ndarray]:
    """The first samples of ``data``; without data, seeded normal noise of the input shapes."""
    if data is not None:
        return {name: array[:GOLDEN_COUNT] for name, array in data.items()}
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in specs:
        shape = tuple(1 if d is None else d for d in spec.shape[1:])
        inputs[spec.name] = rng.standard_normal((GOLDEN_COUNT, *shape)).astype(spec.dtype)
    return inputs


def write_golden(
    outputs: list[np.ndarray],
    inputs: Mapping[str, np.ndarray],
    precision: Precision,
    path: Path,
    *,
    top1: bool,
) -> GoldenVectors:
    """Save ``inputs`` and the artifact's ``outputs`` for them to ``path``; the record names
    the file by its name alone (it sits beside the artifact) with the tolerance, and
    ``top1`` when the first output is a classifier's scores."""
    arrays = {f"input:{name}": value for name, value in inputs.items()}
    arrays |= {f"output:{i}": value for i, value in enumerate(outputs)}
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    scale = max(float(np.max(np.abs(o))) if o.size else 0.0 for o in outputs)
    atol_fraction, rtol = _TOLERANCE[precision]
    return GoldenVectors(
        path=path.name,
        count=len(next(iter(inputs.values()))),
        atol=max(scale * atol_fraction, 1e-6),
        rtol=rtol,
        top1=top1,
    )
