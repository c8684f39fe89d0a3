"""Resumable downloads: HTTP Range from where the last attempt stopped, then a hash check.

Bytes go to ``.DEST.part`` (hidden, beside ``DEST``). A cut connection leaves the part
file; the next attempt asks for ``Range: bytes=N-`` and appends. A server that ignores
Range (200) or refuses it (416) makes the download start over. Only when the whole file
passes ``check`` (the TUF target's length and hashes) is it renamed to ``DEST``, so
nothing ever uses an unverified file.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from contracts.durable import fsync_directory

from .errors import DownloadError, TrustError

__all__ = ["download_resumable", "part_path"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def part_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def download_resumable(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    length: int,
    check: Callable[[Path], None],
    attempts: int = 3,
    backoff_s: float = 0.5,
) -> Path:
    """Fetch ``url`` (``length`` bytes) to ``dest``, resuming, and verify it with ``check``.

    ``check`` raises when the file is not the one expected; the part file is then deleted
    (starting over cannot help a file that was complete). Transport errors retry
    ``attempts`` times with doubling backoff, each attempt resuming; the last one raises
    ``DownloadError`` and keeps the part file for a later call.
    """
    part = part_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _fetch_rest(client, url, part, length)
            break
        except DownloadError:
            if attempt == attempts:
                raise
            time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
        check(part)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)  # the part file was fsynced as it was written
    fsync_directory(dest.parent)
    return dest


def _fetch_rest(client: httpx.Client, url: str, part: Path, length: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if offset > length:
        part.unlink()
        offset = 0
    if offset == length:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:  # our part file no longer matches: start over
                part.unlink(missing_ok=True)
                return _fetch_rest(client, url, part, length)
            if response.status_code == 206:
                start = _range_start(response.headers.get("content-range", ""))
                if start != offset:
                    raise DownloadError(f"GET {url}: asked for bytes from {offset}, got {start}")
            elif response.status_code == 200:
                offset = 0
            else:
                raise DownloadError(f"GET {url}: HTTP {response.status_code}")
            with part.open("r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                written = offset
                for chunk in response.iter_bytes():  # as received: a cut keeps what arrived
                    written += len(chunk)
                    if written > length:
                        f.close()
                        part.unlink()
                        raise TrustError(
                            f"GET {url}: the server sent more than the {length} bytes the "
                            "signed metadata lists (endless-data attack?)"
                        )
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    except httpx.HTTPError as e:
        raise DownloadError(f"GET {url} failed after {offset} bytes: {e}") from None
    if part.stat().st_size < length:
        raise DownloadError(
            f"GET {url}: connection closed at {part.stat().st_size} of {length} bytes"
        )


def _range_start(content_range: str) -> int:
    match = _CONTENT_RANGE.match(content_range.strip())
    return int(match[1]) if match else -1
