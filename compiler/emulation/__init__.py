"""Emulated boards: a cached arm64 Debian userland run under qemu user mode.

The compiler runs a cross-built profile's artifacts on one (:func:`run_artifacts`) for the
accuracy gate and the golden vectors, when this machine can
(:func:`emulation_unavailable`); the test suite runs the agent on one. A board is the
userland (:func:`ensure_userland`, built once per package list under
``~/.cache/edgefleet/userlands``) plus a CPU model and an identity (:class:`BoardSpec`),
running in a mount namespace of its own (:class:`EmulatedBoard`).
"""

from ._artifacts import ArtifactToRun, EmulatedRunError, run_artifacts
from ._availability import emulation_unavailable
from ._board import BASE_ENV, BoardSpec, EmulatedBoard, cpuinfo_for, describe_exit
from ._userland import (
    MANIFEST,
    VENV,
    WHEELHOUSE,
    Userland,
    UserlandSpec,
    agent_userland_spec,
    ensure_userland,
    find_userland,
)

__all__ = [
    "BASE_ENV",
    "MANIFEST",
    "VENV",
    "WHEELHOUSE",
    "ArtifactToRun",
    "BoardSpec",
    "EmulatedBoard",
    "EmulatedRunError",
    "Userland",
    "UserlandSpec",
    "agent_userland_spec",
    "cpuinfo_for",
    "describe_exit",
    "emulation_unavailable",
    "ensure_userland",
    "find_userland",
    "run_artifacts",
]
