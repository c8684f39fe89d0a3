"""Crash-safe writes: a file is whole or not there, and a rename survives a power cut.

A new file is written beside its destination, flushed and fsynced, renamed over the
destination with ``os.replace`` (atomic on POSIX), and then the directory is fsynced so the
rename itself is on disk. Readers see the old bytes or the new ones, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "fsync_directory", "fsync_tree", "write_atomic"]


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


@contextmanager
def atomic_file(path: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A new file to write ``path``'s bytes into, for writers that stream.

    It is a uniquely named temporary file beside ``path`` (file mode ``mode``). When the
    block ends normally it is fsynced and renamed over ``path``, and the folder fsynced;
    when the block raises it is removed and ``path`` is left as it was. Raises ``OSError``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``), as :func:`atomic_file` does."""
    with atomic_file(path, mode=mode) as f:
        f.write(data)
