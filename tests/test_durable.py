"""``contracts.durable``: a destination is whole or absent, whatever happens to the writer."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contracts.durable import atomic_file, write_atomic

OLD = b"the old bytes\n"


class WriterFailed(Exception):
    pass


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_streamed_file_appears_whole_with_its_mode(tmp_path: Path) -> None:
    dest = tmp_path / "bundle.efb"
    with atomic_file(dest, mode=0o600) as f:
        for chunk in (b"a" * 100_000, b"b" * 100_000):
            f.write(chunk)
        assert not dest.exists()  # nothing at the destination until the block ends
    assert dest.read_bytes() == b"a" * 100_000 + b"b" * 100_000
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert _names(tmp_path) == ["bundle.efb"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_a_writer_that_raises_midway_leaves_the_destination_as_it_was(
    tmp_path: Path, existing: bool
) -> None:
    dest = tmp_path / "report.json"
    if existing:
        dest.write_bytes(OLD)
    with pytest.raises(WriterFailed), atomic_file(dest) as f:
        f.write(b'{"half": ')
        raise WriterFailed
    if existing:
        assert dest.read_bytes() == OLD
    else:
        assert not dest.exists()
    assert _names(tmp_path) == (["report.json"] if existing else [])  # no temporary left


def test_write_atomic_replaces_the_bytes_and_sets_the_mode(tmp_path: Path) -> None:
    dest = tmp_path / "key.pem"
    dest.write_bytes(OLD)
    write_atomic(dest, b"new", mode=0o600)
    assert dest.read_bytes() == b"new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert _names(tmp_path) == ["key.pem"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_a_writer_killed_midway_leaves_the_destination_as_it_was(
    tmp_path: Path, existing: bool
) -> None:
    """A real SIGKILL in the middle of a streamed write: no handler runs, and still the
    destination holds the old bytes or nothing."""
    dest = tmp_path / "bundle.efb"
    if existing:
        dest.write_bytes(OLD)
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from contracts.durable import atomic_file

        with atomic_file(Path({str(dest)!r})) as f:
            f.write(b"x" * 1_000_000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, check=False)
    assert result.returncode == -signal.SIGKILL
    if existing:
        assert dest.read_bytes() == OLD
    else:
        assert not dest.exists()
    leftovers = [name for name in _names(tmp_path) if name != dest.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{dest.name}.")  # hidden temporary
    assert os.path.getsize(tmp_path / leftovers[0]) == 1_000_000
