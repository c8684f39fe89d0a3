"""Which runtime wheels a board gets on top of ``edgefleet[agent]``: :func:`runtime_packages`.

``edgefleet[agent]`` brings ONNX Runtime (CPU) and LiteRT, which publish aarch64 and x86_64
wheels only: a 32-bit OS is refused with the fix. On top of it:

* A Jetson on L4T R36.4 (JetPack 6.1 to 6.2.x, CUDA 12.6) gets ``onnxruntime-gpu`` from
  NVIDIA's Jetson AI Lab index, :data:`JETSON_JP6_INDEX_URL`, in place of ``onnxruntime``:
  both own the ``onnxruntime`` import package, so the CPU one is uninstalled first. NVIDIA
  builds these for the JetPack's own Python (3.10 on JetPack 6), and edgefleet needs 3.11,
  so the index may have no wheel for the venv: the GPU wheel is optional, and without one
  the CPU ``onnxruntime`` goes back in and the install says so. ``gpu_index_url`` (or pip's
  ``--find-links``) points at a cp311 build instead.
* Any other Jetson (JetPack 4, 5, 6.0, 7) keeps the CPU ``onnxruntime``: NVIDIA's wheels for
  JetPack 4 and 5 are for Python 3.6 and 3.8, and JetPack 6.0's CUDA 12.2 index is retired.
* ``tvm=True`` adds ``apache-tvm`` and ``apache-tvm-ffi`` at the compiler extra's pins (an
  artifact only loads in the TVM that built it). It is the whole TVM wheel, hundreds of MB,
  as PyPI has no runtime-only one; hence opt-in.

Version ranges come from edgefleet's own metadata (:func:`edgefleet_requirement`), so they
move with ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InstallError
from .boards import Board

__all__ = [
    "JETSON_JP6_INDEX_URL",
    "RuntimeWheel",
    "edgefleet_requirement",
    "runtime_packages",
    "with_agent_extra",
]

JETSON_JP6_INDEX_URL = "https://pypi.jetson-ai-lab.io/jp6/cu126"
"""NVIDIA's Jetson AI Lab package index for JetPack 6.1+ (CUDA 12.6, Ubuntu 22.04)."""

_GPU_INDEX_FOR_L4T = {"36.4": JETSON_JP6_INDEX_URL}
"""L4T major.minor -> an index with ``onnxruntime-gpu`` built for that release's CUDA."""

_WHEEL_ARCHES = ("aarch64", "x86_64")


@dataclass(frozen=True)
class RuntimeWheel:
    """A pip requirement installed after ``edgefleet[agent]``, and why."""

    requirement: str
    why: str
    index_url: str | None = None
    """An extra index it comes from; ``None``: the indexes pip is configured with."""
    replaces: str | None = None
    """A distribution it replaces, both owning one import package: that one is uninstalled
    first, and put back (with a warning) when pip cannot get this one."""


def edgefleet_requirement(name: str, extra: str) -> str:
    """``name`` with the version range edgefleet's ``extra`` gives it; bare when unknown."""
    try:
        requirements = importlib.metadata.requires("edgefleet") or []
    except importlib.metadata.PackageNotFoundError:
        return name
    pattern = re.compile(rf"{re.escape(name)}(?![\w.-])", re.IGNORECASE)
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' in marker and pattern.match(spec.strip()):
            return spec.strip()
    return name


_EDGEFLEET_SPEC = re.compile(r"edgefleet(?P<version>\s*(?:[<>=!~].*)?)", re.IGNORECASE)


def with_agent_extra(package: str) -> str:
    """``package`` with the ``[agent]`` extra when it names edgefleet without extras: a wheel,
    an sdist or a source folder (``./edgefleet.whl`` -> ``./edgefleet.whl[agent]``), or the
    name with a version (``edgefleet==0.2.0`` -> ``edgefleet[agent]==0.2.0``). Without it pip
    installs the agent without its runtimes; any other requirement is left as given."""
    if "[" in package:
        return package
    if Path(package).exists() or package.endswith((".whl", ".tar.gz", ".zip")):
        return f"{package}[agent]"
    if match := _EDGEFLEET_SPEC.fullmatch(package):
        return f"edgefleet[agent]{match['version']}"
    return package


def runtime_packages(
    board: Board, *, tvm: bool = False, gpu_index_url: str | None = None
) -> list[RuntimeWheel]:
    """The runtime wheels ``board`` gets beyond ``edgefleet[agent]`` (see the module doc).

    ``gpu_index_url`` replaces the built-in choice of index for a Jetson's
    ``onnxruntime-gpu``, and gives one to a JetPack that has none.
    """
    if board.arch not in _WHEEL_ARCHES:
        raise InstallError(
            f"this is a {board.arch} system; onnxruntime, ai-edge-litert and apache-tvm publish "
            "aarch64 and x86_64 wheels only. On a Raspberry Pi, flash the 64-bit Raspberry Pi OS."
        )
    wheels: list[RuntimeWheel] = []
    index = gpu_index_url
    if board.family == "jetson" and index is None and board.l4t:
        index = _GPU_INDEX_FOR_L4T.get(".".join(board.l4t.split(".")[:2]))
    if board.family == "jetson" and index:
        cpu = edgefleet_requirement("onnxruntime", "agent")
        wheels.append(
            RuntimeWheel(
                requirement="onnxruntime-gpu" + cpu[len("onnxruntime") :],
                why="the CUDA and TensorRT execution providers on the Jetson GPU",
                index_url=index,
                replaces="onnxruntime",
            )
        )
    if tvm:
        wheels += [
            RuntimeWheel(
                edgefleet_requirement(name, "compiler"),
                why="TVM artifacts load only in the TVM that built them: the compiler's pin",
            )
            for name in ("apache-tvm", "apache-tvm-ffi")
        ]
    return wheels
