"""The output directory: what a compile may replace, and how it publishes into it.

A compile never deletes what it did not make. Its ``--out`` may be a directory that does
not exist, an empty one, or an earlier compile's output — a ``report.json`` that reads as a
compile report, and nothing but the files that report names — which it then replaces as
one rename. Anything else (a directory with other files, the current directory or one
above it, a directory holding the source model) is refused before any work starts, with
what to do instead; ``--force`` replaces a non-empty directory that is not an earlier
output, but never the current directory, one above it, or one holding the model.

Publishing moves the staged directory in with renames: every staged file is on disk before
the renames, and the renames before the old directory goes, so a reader sees the old
output or the new one, and a crash leaves one of them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from contracts.drift import DRIFT_REFERENCE_FILE
from contracts.durable import fsync_directory, fsync_tree
from contracts.errors import ReportError
from contracts.report import REPORT_NAME, parse_report

from .errors import OutputDirError

__all__ = ["MODEL_CARD_NAME", "check_output_dir", "publish"]

MODEL_CARD_NAME = "MODEL_CARD.md"


def check_output_dir(out: Path, *, source: Path, force: bool) -> None:
    """Raise :class:`OutputDirError` if a compile may not replace ``out``; see the module."""
    out, source = out.resolve(), source.resolve()
    here = Path.cwd().resolve()
    if here == out or here.is_relative_to(out):
        raise OutputDirError(
            f"--out {out} is the current directory or one above it, which a compile would "
            "replace as a whole: name a directory of its own, e.g. --out build/MODEL-PROFILE"
        )
    if source == out or source.is_relative_to(out):
        raise OutputDirError(
            f"--out {out} holds the source model {source}, which replacing it would delete: "
            "name another directory"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a directory: name a directory")
    strangers = _not_from_a_compile(out)
    if strangers and not force:
        shown = ", ".join(strangers[:5]) + (
            f" and {len(strangers) - 5} more" if len(strangers) > 5 else ""
        )
        raise OutputDirError(
            f"--out {out} is not empty and not an earlier edgefleet compile output ({shown}): "
            "a compile replaces its output directory as a whole, so it leaves this one alone. "
            "Name another --out, or pass --force to replace this directory and everything in it"
        )


def publish(staging: Path, out: Path, *, source: Path, force: bool) -> None:
    """Swap ``staging`` in for ``out`` (checked again, as it may have changed meanwhile)."""
    check_output_dir(out, source=source, force=force)
    out = out.resolve()
    fsync_tree(staging)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _not_from_a_compile(directory: Path) -> list[str]:
    """The entries of ``directory`` an earlier compile did not write (all of them when it has
    no readable report); empty when the directory is empty or wholly an earlier output."""
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return []
    try:
        report = parse_report((directory / REPORT_NAME).read_bytes())
    except (OSError, ReportError):
        return entries
    ours = {REPORT_NAME, MODEL_CARD_NAME, DRIFT_REFERENCE_FILE}
    for artifact in report.artifacts:
        ours.update(artifact.files().values())
    return [name for name in entries if name not in ours or not (directory / name).is_file()]
