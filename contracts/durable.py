"""Crash-safe writes: a file is whole or not there, and a rename survives a power cut.

A new file is written beside its destination, flushed and fsynced, renamed over the
destination with ``os.replace`` (atomic on POSIX), and then the directory is fsynced so the
rename itself is on disk. Readers see the old bytes or the new ones, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "fsync_tree", "write_atomic"]


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` (a new file, a rename, a removal) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Fsync every file under ``root``, then every directory from the deepest up."""
    directories = []
    for current, _, files in os.walk(root):
        directories.append(Path(current))
        for name in files:
            fd = os.open(Path(current) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in reversed(directories):
        fsync_directory(directory)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``): a uniquely named temporary file
    beside it, fsync, ``os.replace``, fsync of the folder. Raises ``OSError``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
