"""Deltas between bundles: ship what changed, rebuild the new bundle bit for bit.

A delta file is ``EFDELTA1\\n``, one JSON header line (algorithm, the SHA-256 and size of
the old and of the new bundle), then the payload:

- ``zstd``: the new bundle compressed by zstandard with the old one as a raw-content
  dictionary (zstd's ``--patch-from``), long-distance matching on. Fast, and the default.
- ``bsdiff``: bsdiff4's patch. Slower and memory-hungry on big files (suffix sorting),
  sometimes smaller on weights that shifted a little.

``apply_delta`` checks that the old file is the one the delta was made from, and that the
result has the new hash — and the caller passes the hash the signed TUF target lists, so
a rebuilt bundle is trusted exactly as a downloaded one would be.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from contracts.durable import atomic_file, write_atomic

from .errors import DeltaError

__all__ = ["DeltaAlgorithm", "DeltaHeader", "apply_delta", "make_delta", "read_delta_header"]

DeltaAlgorithm = Literal["zstd", "bsdiff"]
_MAGIC = b"EFDELTA1\n"
_MAX_HEADER = 4096


@dataclass(frozen=True)
class DeltaHeader:
    algorithm: DeltaAlgorithm
    old_sha256: str
    old_size: int
    new_sha256: str
    new_size: int


def _window_log(size: int) -> int:
    """zstd's window must span the dictionary and the new file for matches to reach back."""
    import zstandard

    return max(
        zstandard.WINDOWLOG_MIN, min(zstandard.WINDOWLOG_MAX, (2 * size - 1).bit_length() + 1)
    )


def make_delta(
    old: Path, new: Path, out: Path, *, algorithm: DeltaAlgorithm = "zstd", level: int = 19
) -> DeltaHeader:
    """Write the delta that turns ``old`` into ``new`` to ``out``."""
    old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    header = DeltaHeader(
        algorithm=algorithm,
        old_sha256=hashlib.sha256(old_bytes).hexdigest(),
        old_size=len(old_bytes),
        new_sha256=hashlib.sha256(new_bytes).hexdigest(),
        new_size=len(new_bytes),
    )
    if algorithm == "zstd":
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            window_log=_window_log(max(len(old_bytes), len(new_bytes))),
            enable_ldm=True,
        )
        dictionary = zstandard.ZstdCompressionDict(
            old_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT
        )
        payload = zstandard.ZstdCompressor(
            dict_data=dictionary, compression_params=params
        ).compress(new_bytes)
    elif algorithm == "bsdiff":
        import bsdiff4

        payload = bsdiff4.diff(old_bytes, new_bytes)
    else:
        raise ValueError(f"unknown delta algorithm {algorithm!r}; use zstd or bsdiff")
    with atomic_file(out) as f:
        f.write(_MAGIC + json.dumps(header.__dict__, sort_keys=True).encode() + b"\n")
        f.write(payload)
    return header


def read_delta_header(data: bytes) -> tuple[DeltaHeader, int]:
    """The header of delta bytes and where the payload starts; ``DeltaError`` if malformed."""
    if not data.startswith(_MAGIC):
        raise DeltaError("not an edgefleet delta (bad magic); make one with `edgefleet ota delta`")
    end = data.find(b"\n", len(_MAGIC), len(_MAGIC) + _MAX_HEADER)
    if end < 0:
        raise DeltaError("delta header is missing or longer than 4 KiB")
    try:
        raw = json.loads(data[len(_MAGIC) : end])
        header = DeltaHeader(**raw)
    except (ValueError, TypeError) as e:
        raise DeltaError(f"delta header is malformed: {e}") from None
    if header.algorithm not in ("zstd", "bsdiff"):
        raise DeltaError(f"delta uses unknown algorithm {header.algorithm!r}")
    return header, end + 1


def apply_delta(old: Path, delta: Path, out: Path, *, expected_sha256: str | None = None) -> Path:
    """Rebuild the new bundle from ``old`` and ``delta`` into ``out``, verified.

    ``expected_sha256`` is the hash the signed TUF target lists; without it only the
    delta's own header vouches for the result (fine for a local check, not for installs).
    """
    data = delta.read_bytes()
    header, start = read_delta_header(data)
    old_bytes = old.read_bytes()
    if hashlib.sha256(old_bytes).hexdigest() != header.old_sha256:
        raise DeltaError(
            f"{delta.name} was made from another old bundle (SHA-256 {header.old_sha256}) than "
            f"{old.name}: download the full bundle instead"
        )
    payload = data[start:]
    try:
        if header.algorithm == "zstd":
            import zstandard

            dictionary = zstandard.ZstdCompressionDict(
                old_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
            new_bytes = zstandard.ZstdDecompressor(
                dict_data=dictionary,
                max_window_size=1 << _window_log(max(header.old_size, header.new_size)),
            ).decompress(payload, max_output_size=header.new_size)
        else:
            import bsdiff4

            new_bytes = bsdiff4.patch(old_bytes, payload)
    except Exception as e:  # both libraries raise their own types on corrupt payloads
        raise DeltaError(f"{delta.name}: the delta payload is corrupt: {e}") from None
    digest = hashlib.sha256(new_bytes).hexdigest()
    for wanted, source in ((header.new_sha256, "the delta header"), (expected_sha256, "TUF")):
        if wanted is not None and digest != wanted:
            raise DeltaError(
                f"{delta.name}: the rebuilt bundle has SHA-256 {digest}, {source} says {wanted}"
            )
    write_atomic(out, new_bytes)
    return out
