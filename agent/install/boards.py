"""What board the agent is being installed on: Raspberry Pi, Jetson or generic, and its profile.

:func:`detect_board` reads the device tree's model string (``/sys/firmware/devicetree/base``,
or ``/proc/device-tree``, the link to it older images rely on), and on a Jetson its Jetson
Linux (L4T) release, from a root directory (``/`` on the board, a fake tree in tests).

JetPack
-------
A Jetson names its L4T release in ``/etc/nv_tegra_release``
(``# R36 (release), REVISION: 4.3, ...``) or, on images without that file, in the version of
the ``nvidia-l4t-core`` package (``36.4.3-20250107174145``). :data:`JETPACK_FOR_L4T` maps
exact releases to JetPack versions, from NVIDIA's JetPack archive; a release it does not
list still gets its JetPack major version (:attr:`Board.jetpack_major`) from the L4T major
(32: 4, 34 and 35: 5, 36: 6, 38: 7), never a guessed minor.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "GPU_GROUPS",
    "JETPACK_FOR_L4T",
    "Board",
    "Family",
    "detect_board",
    "systemd_booted",
]

Family = Literal["raspberry-pi", "jetson", "generic"]

JETPACK_FOR_L4T: dict[str, str] = {
    "32.4.3": "4.4",
    "32.4.4": "4.4.1",
    "32.5.0": "4.5",
    "32.5.1": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    "34.1.0": "5.0 DP",
    "34.1.1": "5.0.1 DP",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}
"""Exact Jetson Linux (L4T) releases and the JetPack that ships them."""

_JETPACK_MAJOR_FOR_L4T = {32: 4, 34: 5, 35: 5, 36: 6, 38: 7}

_PROFILE_FOR_MODEL = (
    ("Raspberry Pi 5", "rpi5"),
    ("Raspberry Pi 4", "rpi4"),
    ("NVIDIA Jetson Orin Nano", "jetson-orin-nano"),
    ("NVIDIA Jetson Nano", "jetson-nano"),
)
"""Device-tree model prefixes -> the hardware profile of that board, most specific first."""

GPU_GROUPS: dict[Family, tuple[str, ...]] = {"jetson": ("video", "render")}
"""Groups owning the GPU device nodes, joined by the service user where they exist."""

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class Board:
    """What the installer knows about the machine it runs on."""

    arch: str
    """``aarch64`` or ``x86_64`` (aliases folded), else what ``platform.machine()`` says."""
    family: Family
    model: str | None = None
    """The device tree's model string, e.g. ``Raspberry Pi 4 Model B Rev 1.4``."""
    l4t: str | None = None
    """Jetson Linux release, e.g. ``36.4.3``."""
    jetpack: str | None = None
    """JetPack version for an L4T release :data:`JETPACK_FOR_L4T` lists."""
    profile: str | None = None
    """The hardware profile of this board, when it is one edgefleet ships."""

    @property
    def jetpack_major(self) -> int | None:
        if self.l4t is None:
            return None
        return _JETPACK_MAJOR_FOR_L4T.get(int(self.l4t.split(".")[0]))

    def describe(self) -> str:
        facts = [self.arch]
        if self.l4t:
            facts.append(f"L4T {self.l4t}")
            if self.jetpack:
                facts.append(f"JetPack {self.jetpack}")
            elif self.jetpack_major:
                facts.append(f"JetPack {self.jetpack_major}.x")
        if self.profile:
            facts.append(f"profile {self.profile}")
        return f"{self.model or self.family} ({', '.join(facts)})"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _l4t_release(root: Path) -> str | None:
    text = _read_text(root / "etc/nv_tegra_release")
    if text and (match := _L4T_LINE.search(text)):
        return f"{match[1]}.{match[2]}"
    status = _read_text(root / "var/lib/dpkg/status") or ""
    for stanza in status.split("\n\n"):
        lines = stanza.splitlines()
        if "Package: nvidia-l4t-core" in lines:
            for line in lines:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip().split("-")[0]
    return None


def detect_board(root: Path = Path("/"), machine: str | None = None) -> Board:
    """Read the board from ``root``'s device tree, ``/etc`` and dpkg status.

    ``machine`` stands in for ``platform.machine()``; tests pass both to describe a board
    other than the one they run on.
    """
    raw_arch = machine or platform.machine()
    arch = _ARCH_ALIASES.get(raw_arch.lower(), raw_arch)
    model = (
        _read_text(root / "sys/firmware/devicetree/base/model")
        or _read_text(root / "proc/device-tree/model")
        or ""
    ).strip("\0 \n")
    l4t = _l4t_release(root)
    family: Family = "generic"
    if l4t or model.startswith("NVIDIA Jetson"):
        family = "jetson"
    elif model.startswith("Raspberry Pi"):
        family = "raspberry-pi"
    profile = next((p for prefix, p in _PROFILE_FOR_MODEL if model.startswith(prefix)), None)
    return Board(
        arch=arch,
        family=family,
        model=model or None,
        l4t=l4t,
        jetpack=JETPACK_FOR_L4T.get(l4t) if l4t else None,
        profile=profile,
    )


def systemd_booted(root: Path = Path("/")) -> bool:
    """Whether systemd is the init system here (what ``sd_booted()`` checks)."""
    return (root / "run/systemd/system").is_dir()
