"""Offline verification of a side-loaded bundle (a USB stick, a service laptop).

The same python-tuf client workflow as online, with a fetcher that reads a copied
metadata directory instead of a server: the root chain from the trusted ``root.json``,
signatures, thresholds, versions and expiry all apply. Then the bundle must be the target
the signed metadata lists for its manifest (length and SHA-256), and every file in it must
match the manifest.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from .archive import verify_bundle
from .client import translate_tuf_error
from .errors import OtaError, TargetNotFoundError, TrustError
from .manifest import Manifest
from .repository import target_path_for

__all__ = ["VerifiedBundle", "verify_sideloaded"]

_LOCAL = "http://metadata.local/"


class _DirectoryFetcher(FetcherInterface):
    """Serves ``http://metadata.local/NAME`` from a directory; a missing file is a 404."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(_LOCAL)
        path = self._directory / name
        if "/" in name or not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"{name} not in {self._directory}", 404)
        yield path.read_bytes()


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    target: TargetFile


def verify_sideloaded(bundle: Path, trusted_root: Path, metadata_dir: Path) -> VerifiedBundle:
    """Check ``bundle`` against the metadata in ``metadata_dir``, trusting ``trusted_root``.

    The TUF target hash and the per-file hashes are computed side by side on two threads
    (hashlib releases the GIL), so verifying costs about one pass over the file.
    """
    if not metadata_dir.is_dir():
        raise OtaError(
            f"no metadata directory at {metadata_dir}: copy the repository's metadata/ "
            "next to the bundle or pass --metadata DIR"
        )
    with tempfile.TemporaryDirectory(prefix="edgefleet-verify-") as trusted:
        shutil.copyfile(trusted_root, Path(trusted) / "root.json")
        try:
            updater = Updater(
                trusted, _LOCAL, fetcher=_DirectoryFetcher(metadata_dir), bootstrap=None
            )
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            translate_tuf_error(e, f"metadata in {metadata_dir}")
        with ThreadPoolExecutor(max_workers=1) as pool:
            outer = pool.submit(_sha256_and_length, bundle)
            manifest = verify_bundle(bundle)
            digest, length = outer.result()
        target_path = target_path_for(manifest)
        try:
            target = updater.get_targetinfo(target_path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            translate_tuf_error(e, f"looking up {target_path}")
    if target is None:
        raise TargetNotFoundError(
            f"{bundle.name}: its manifest says {target_path}, which the signed targets do not "
            "list: not a released bundle"
        )
    if target.length != length or target.hashes.get("sha256") != digest:
        raise TrustError(
            f"{bundle.name}: refused, the signed targets list {target_path} with SHA-256 "
            f"{target.hashes.get('sha256')} and {target.length} bytes, the file has {digest} "
            f"and {length} bytes: tampered after release"
        )
    return VerifiedBundle(manifest, target)


def _sha256_and_length(path: Path) -> tuple[str, int]:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return digest.hexdigest(), f.tell()
