"""Detect the build machine, for the ``host`` profile.

Reads ``/proc/cpuinfo`` and ``/proc/meminfo`` rather than asking TVM, so a device without
the compiler installed can describe itself too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["UnsupportedHostError", "detect_host"]

# CPU feature flags as /proc/cpuinfo spells them -> the LLVM attribute TVM should enable.
_X86_FEATURES = {
    "avx2": "+avx2",
    "fma": "+fma",
    "f16c": "+f16c",
    "avx512f": "+avx512f",
    "avx512bw": "+avx512bw",
    "avx512dq": "+avx512dq",
    "avx512vl": "+avx512vl",
    "avx512_vnni": "+avx512vnni",
    "avx_vnni": "+avxvnni",
}
_AARCH64_FEATURES = {
    "asimd": "+neon",
    "asimddp": "+dotprod",
    "asimdhp": "+fullfp16",
    "i8mm": "+i8mm",
    "sve": "+sve",
}
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class UnsupportedHostError(RuntimeError):
    """The build machine's architecture has no code generator here."""


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _memory_mb(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def detect_host(
    machine: str | None = None, cpuinfo: str | None = None, meminfo: str | None = None
) -> dict[str, Any]:
    """Profile fields describing this machine: arch, CPU target, native compiler, resources.

    The memory budget is half of physical memory: the rest is left to the OS and the
    compiler itself. The arguments exist so other machines can be described in tests.
    """
    raw_machine = machine if machine is not None else platform.machine()
    arch = _ARCH_ALIASES.get(raw_machine.lower())
    if arch is None:
        raise UnsupportedHostError(
            f"cannot describe this machine as a profile: architecture {raw_machine!r} is not "
            f"supported (supported: {', '.join(sorted(set(_ARCH_ALIASES.values())))})"
        )
    flags = _cpu_flags(cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo"))
    table = _X86_FEATURES if arch == "x86_64" else _AARCH64_FEATURES
    mattr = [attr for flag, attr in table.items() if flag in flags]
    cores = os.cpu_count() or 1
    memory_mb = _memory_mb(meminfo if meminfo is not None else _read("/proc/meminfo")) or 1024
    cpu_target: dict[str, Any] = {
        "kind": "llvm",
        "mtriple": f"{arch}-linux-gnu",
        "num-cores": cores,
    }
    if mattr:
        cpu_target["mattr"] = mattr
    return {
        "arch": arch,
        "targets": {"cpu": cpu_target},
        "toolchain": {"cc": "gcc", "apt_packages": ["gcc"]},
        "resources": {"cores": cores, "memory_budget_mb": max(memory_mb // 2, 1)},
    }


def runs_here(profile_arch: str, cpu_target: dict[str, Any]) -> tuple[bool, str]:
    """Whether code for ``cpu_target`` runs on this machine, and if not, why."""
    here = detect_host()
    if profile_arch != here["arch"]:
        return False, f"the profile targets {profile_arch} and this machine is {here['arch']}"
    missing = set(cpu_target.get("mattr", [])) - set(here["targets"]["cpu"].get("mattr", []))
    if missing:
        return False, f"this CPU lacks {', '.join(sorted(missing))}"
    return True, "the target runs here"
