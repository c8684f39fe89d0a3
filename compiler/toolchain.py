"""Link TVM-built modules with the C compiler a hardware profile names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hw_profiles import Profile

from .errors import ToolchainError

__all__ = ["export_library", "find_compiler"]


def find_compiler(profile: Profile) -> str:
    """Absolute path of the profile's compiler, or a ToolchainError saying how to install it."""
    found = shutil.which(profile.toolchain.cc)
    if found is None:
        raise ToolchainError(
            f"profile {profile.name!r} links with {profile.toolchain.cc!r}, which is not on "
            f"PATH; {_install_hint(profile)}"
        )
    return found


def _install_hint(profile: Profile) -> str:
    packages = " ".join(profile.toolchain.apt_packages)
    if packages:
        return f"install it with `apt-get install -y {packages}` (or run `make setup`)"
    return "install it and put it on PATH"


def export_library(executable: Any, path: Path, profile: Profile) -> Path:
    """Write ``executable`` (the result of ``tvm.compile``) as a shared library for the board.

    The library is linked by the profile's compiler, so an aarch64 profile built on an
    x86-64 machine yields an AArch64 ELF that the board's TVM runtime can load.
    """
    from tvm.support import cc

    compiler = find_compiler(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    fcompile = cc.cross_compiler(compiler, options=list(profile.toolchain.cc_options))
    try:
        executable.export_library(str(path), fcompile=fcompile)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        raise ToolchainError(
            f"linking with {compiler} failed for profile {profile.name!r} "
            f"({_install_hint(profile)} if a file such as crti.o is missing): {e}"
        ) from e
    return path
