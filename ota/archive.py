"""The ``.efb`` archive: a deterministic, uncompressed ustar file, manifest first.

Same manifest and files give the same bytes: entries sorted by path, mtime 0, owner 0,
mode 0644, regular files only. It is not compressed, so a delta between two bundles sees
the model bytes themselves (``ota.delta`` compresses the difference instead).

Reading treats the file as untrusted: the first entry must be ``manifest.json``; every other
entry must be a regular file the manifest lists, with the size it lists, at most once; the
SHA-256 of each is checked while it streams. Anything else raises a ``BundleError``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from contracts.durable import atomic_file, fsync_directory, fsync_tree

from .errors import ArchiveError, BundleError, BundleIntegrityError
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, BundleFile, Manifest, parse_manifest

__all__ = ["extract_bundle", "read_manifest", "verify_bundle", "write_bundle"]

_CHUNK = 1 << 20

FileSink = Callable[[BundleFile], IO[bytes]]


def _entry(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(manifest: Manifest, sources: Mapping[str, Path], out: Path) -> Path:
    """Write ``manifest`` and the files it lists (``sources[path]`` on disk) to ``out``.

    Written to a temporary file beside ``out`` and renamed, so ``out`` is whole or absent.
    """
    listed = {f.path for f in manifest.files}
    if listed != set(sources):
        raise ValueError(f"sources {sorted(sources)} do not match the manifest's {sorted(listed)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_file(out) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        manifest_bytes = manifest.to_json()
        tar.addfile(_entry(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
        for entry in sorted(manifest.files, key=lambda f: f.path):
            with sources[entry.path].open("rb") as src:
                tar.addfile(_entry(entry.path, entry.size), src)
    return out


def read_manifest(path: Path) -> Manifest:
    """The manifest of the bundle at ``path``, validated; file contents are not read."""
    return _scan(path, None, check_files=False)


def verify_bundle(path: Path) -> Manifest:
    """The manifest, after checking every file against it (size and SHA-256)."""
    return _scan(path, None, check_files=True)


def extract_bundle(path: Path, dest: Path) -> Manifest:
    """Verify and unpack the bundle into ``dest`` (created; must not exist).

    Files are unpacked into a temporary directory beside ``dest`` and renamed into place
    only when every file matched and is on disk, so ``dest`` never holds part of a bundle.
    """
    if dest.exists():
        raise ValueError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()

    def sink(entry: BundleFile) -> IO[bytes]:
        target = tmp / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("wb")

    try:
        manifest = _scan(path, sink, check_files=True)
        fsync_tree(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(dest.parent)
    return manifest


def _scan(path: Path, sink: FileSink | None, *, check_files: bool) -> Manifest:
    name = path.name
    try:
        with tarfile.open(path, mode="r:") as tar:
            manifest = _read_manifest_entry(tar, name)
            if check_files:
                _check_files(tar, manifest, sink, name)
            return manifest
    except BundleError:
        raise
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such bundle file") from None
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as e:
        raise ArchiveError(f"{name}: not a readable bundle archive (truncated?): {e}") from None


def _read_manifest_entry(tar: tarfile.TarFile, name: str) -> Manifest:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or not first.isreg():
        found = "nothing" if first is None else repr(first.name)
        raise ArchiveError(
            f"{name}: not a bundle: the first entry must be {MANIFEST_NAME}, found {found}"
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{name}: {MANIFEST_NAME} is {first.size} bytes, more than 1 MiB")
    stream = tar.extractfile(first)
    assert stream is not None  # a regular file always has a stream
    data = stream.read()
    if len(data) != first.size:
        raise ArchiveError(f"{name}: truncated inside {MANIFEST_NAME}")
    return parse_manifest(data)


def _check_files(
    tar: tarfile.TarFile, manifest: Manifest, sink: FileSink | None, name: str
) -> None:
    listed = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    while (member := tar.next()) is not None:
        entry = listed.get(member.name)
        if entry is None:
            raise ArchiveError(f"{name}: entry {member.name!r} is not listed in the manifest")
        if not member.isreg():
            raise ArchiveError(
                f"{name}: entry {member.name!r} is not a regular file "
                "(links and directories are refused)"
            )
        if member.name in seen:
            raise ArchiveError(f"{name}: entry {member.name!r} appears twice")
        if member.size != entry.size:
            raise BundleIntegrityError(
                f"{name}: {member.name!r} is {member.size} bytes, the manifest lists {entry.size}"
            )
        seen.add(member.name)
        stream = tar.extractfile(member)
        assert stream is not None
        digest = _copy_and_hash(stream, entry, sink, name)
        if digest != entry.sha256:
            raise BundleIntegrityError(
                f"{name}: {member.name!r} has SHA-256 {digest}, the manifest lists "
                f"{entry.sha256}: the bundle was altered after it was built"
            )
    missing = sorted(set(listed) - seen)
    if missing:
        raise ArchiveError(
            f"{name}: files listed in the manifest are missing: {', '.join(missing)}"
        )


def _copy_and_hash(stream: IO[bytes], entry: BundleFile, sink: FileSink | None, name: str) -> str:
    digest = hashlib.sha256()
    remaining = entry.size
    out = sink(entry) if sink else None
    try:
        while remaining:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise ArchiveError(f"{name}: truncated inside {entry.path!r}")
            digest.update(chunk)
            if out:
                out.write(chunk)
            remaining -= len(chunk)
    finally:
        if out:
            out.close()
    return digest.hexdigest()
