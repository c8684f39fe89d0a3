"""Whether this machine can run emulated boards, and what to do when it cannot."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["emulation_unavailable"]

_BINFMT = Path("/proc/sys/fs/binfmt_misc")


def _binfmt_entry(arch: str) -> tuple[bool, str]:
    """Whether qemu's binfmt_misc entry for ``arch`` is enabled, and its flags."""
    try:
        text = (_BINFMT / f"qemu-{arch}").read_text()
    except OSError:
        return False, ""
    flags = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")),
        "",
    )
    return text.splitlines()[0].strip() == "enabled", flags


def emulation_unavailable(arch: str) -> str | None:
    """Why emulated ``arch`` boards cannot run here, with the fix; ``None`` when they can.

    A board needs Linux, root (it mounts an overlay and ``chroot``\\ s), util-linux, and
    qemu's user-mode emulator registered with binfmt_misc with the F flag (Debian's
    ``qemu-user-static``): the flag opens the emulator when it is registered, so binaries
    inside a ``chroot`` find it. When the entry is only disabled or binfmt_misc is not
    mounted (a container, a machine without the binfmt-support service running), it is
    enabled here with ``update-binfmts``, as that service would at boot.
    """
    if sys.platform != "linux":
        return f"emulated boards need Linux, and this is {sys.platform}"
    if platform.machine() == arch:
        return f"this machine is {arch} itself: its artifacts run natively, nothing to emulate"
    if os.geteuid() != 0:
        return (
            "emulated boards need root (they mount an overlay and chroot into an arm64 "
            "userland): run as root"
        )
    for tool, package in (
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("chroot", "coreutils"),
        ("mount", "mount"),
    ):
        if shutil.which(tool) is None:
            return f"emulated boards need {tool}, which is not on PATH: apt-get install {package}"
    if shutil.which(f"qemu-{arch}-static") is None:
        return (
            f"qemu-{arch}-static is not installed: apt-get install qemu-user-static "
            "binfmt-support (make setup installs them)"
        )
    enabled, flags = _binfmt_entry(arch)
    if not enabled and shutil.which("update-binfmts") is not None:
        subprocess.run(
            ["update-binfmts", "--enable", f"qemu-{arch}"], capture_output=True, check=False
        )
        enabled, flags = _binfmt_entry(arch)
    if not enabled:
        return (
            f"binfmt_misc has no enabled qemu-{arch} entry, so the kernel cannot hand {arch} "
            f"binaries to qemu: apt-get install binfmt-support, then update-binfmts --enable "
            f"qemu-{arch}"
        )
    if "F" not in flags:
        return (
            f"binfmt_misc's qemu-{arch} entry lacks the F flag (flags: {flags or 'none'}), so "
            "binaries inside a chroot cannot find the emulator: use Debian's qemu-user-static"
        )
    return None
