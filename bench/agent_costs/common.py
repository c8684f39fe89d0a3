"""What the agent benchmark's measurements share: progress on stderr, waiting, statistics,
inputs, and markdown tables with their number formats."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from contracts.tensors import TensorSpec

__all__ = [
    "MIB",
    "fmt_ci",
    "fmt_pct",
    "fmt_us",
    "free_port",
    "load_average",
    "log",
    "markdown_table",
    "mib",
    "percentile",
    "sample_inputs",
    "wait_until",
]

MIB = 1024 * 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    text_columns: int = 1,
    last_is_text: bool = False,
) -> str:
    """A GitHub markdown table: the first ``text_columns`` (and the last, if
    ``last_is_text``) left-aligned, numbers right."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    if last_is_text:
        align[-1] = ":---"
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(probe: Callable[[], bool], timeout_s: float, what: str, poll: float = 0.02) -> None:
    deadline = time.perf_counter() + timeout_s
    while not probe():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def sample_inputs(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Batch 1 of uniform noise in [0, 1) for each input."""
    rng = np.random.default_rng(0)
    return {
        spec.name: rng.random([1 if d is None else d for d in spec.shape]).astype(spec.dtype)
        for spec in specs
    }


def fmt_us(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def fmt_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f} %" if abs(value) < 10 else f"{value:+,.0f} %"


def mib(value: int) -> str:
    return f"{value / MIB:.1f}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{fmt_us(ci[0])}, {fmt_us(ci[1])}]"
