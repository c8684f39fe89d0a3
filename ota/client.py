"""The device side of TUF: ``tuf.ngclient.Updater`` plus resumable, verified bundle downloads.

``OtaClient`` is what the agent uses and what ``edgefleet ota tuf-client`` (the TUF
conformance suite's command line) drives, so the suite tests the agent's own code path.
python-tuf does every metadata check (signatures and thresholds, rollback, freeze,
mix-and-match, root rotation); this module fetches over one ``httpx.Client`` (so the
agent's TLS settings apply to metadata and bundles alike), resumes bundle downloads, and
turns python-tuf's exceptions into ``ota.errors`` with a message naming the refused check.

Offline policy: expired metadata never touches what is installed. ``check()`` reports the
state (``current``, ``metadata_expired``, ``unreachable``, ``refused``) for the agent to
put in its status; only ``current`` allows a new install.
"""

from __future__ import annotations

import enum
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib import parse

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from .download import download_resumable
from .errors import (
    DownloadError,
    ExpiredMetadataError,
    OtaError,
    RollbackError,
    TargetNotFoundError,
    TrustError,
)

__all__ = [
    "HttpxFetcher",
    "OtaClient",
    "TrustState",
    "TrustStatus",
    "bundle_fields",
    "check_not_older",
    "translate_tuf_error",
]


class HttpxFetcher(FetcherInterface):
    """python-tuf's fetcher interface over an ``httpx.Client``."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise tuf_errors.DownloadHTTPError(
                        f"GET {url}: HTTP {response.status_code}", response.status_code
                    )
                yield from response.iter_bytes(1 << 16)
        except httpx.HTTPError as e:
            raise tuf_errors.DownloadError(f"GET {url}: {e}") from None


def translate_tuf_error(error: Exception, context: str) -> NoReturn:
    """Raise the ``ota.errors`` equivalent of a python-tuf exception, naming the check."""
    if isinstance(error, tuf_errors.ExpiredMetadataError):
        raise ExpiredMetadataError(
            f"{context}: refused, metadata expired ({error}): a freeze attack, or this device "
            "was offline past the expiry; installs wait for fresh metadata"
        ) from None
    if isinstance(error, tuf_errors.BadVersionNumberError):
        raise RollbackError(
            f"{context}: refused, rollback or mix-and-match of metadata versions ({error})"
        ) from None
    if isinstance(error, tuf_errors.UnsignedMetadataError):
        raise TrustError(
            f"{context}: refused, signature check failed ({error}): signed by a key the "
            "trusted root does not list (wrong or revoked key) or by fewer keys than the "
            "threshold"
        ) from None
    if isinstance(error, tuf_errors.LengthOrHashMismatchError):
        raise TrustError(
            f"{context}: refused, length or hash mismatch ({error}): a tampered file, or "
            "metadata mixed from different repository versions"
        ) from None
    if isinstance(error, tuf_errors.RepositoryError):
        raise TrustError(f"{context}: refused, invalid metadata ({error})") from None
    if isinstance(error, tuf_errors.DownloadError):
        raise DownloadError(f"{context}: repository unreachable ({error})") from None
    raise error


def bundle_fields(target: TargetFile) -> dict[str, Any]:
    """The signed edgefleet custom fields of a bundle target (name, version_number, ...)."""
    custom = target.custom if isinstance(target.custom, dict) else {}
    fields = custom.get("edgefleet")
    if not isinstance(fields, dict) or not isinstance(fields.get("version_number"), int):
        raise TrustError(f"{target.path} is not an edgefleet bundle target (no custom fields)")
    return fields


def check_not_older(target: TargetFile, installed_version_number: int) -> None:
    """Refuse a bundle whose signed version_number is below the installed one.

    TUF stops replays of old metadata; this stops an old bundle that is still validly
    listed (or re-listed by a compromised targets key) from being installed over a newer
    one. The same number is allowed: reinstalling the running bundle changes nothing.
    """
    number = bundle_fields(target)["version_number"]
    if number < installed_version_number:
        raise RollbackError(
            f"{target.path}: refused, rollback to version_number {number} while "
            f"{installed_version_number} is installed"
        )


class TrustState(enum.StrEnum):
    CURRENT = "current"
    METADATA_EXPIRED = "metadata_expired"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"


@dataclass(frozen=True)
class TrustStatus:
    state: TrustState
    detail: str

    @property
    def can_install(self) -> bool:
        return self.state is TrustState.CURRENT

    def as_report(self) -> dict[str, Any]:
        return {"state": str(self.state), "detail": self.detail, "can_install": self.can_install}


class OtaClient:
    """One device's trusted view of one repository.

    ``metadata_dir`` holds the metadata the device trusts (``root.json`` first, from
    provisioning); ``target_dir`` the verified bundles. Each ``refresh()`` builds a new
    ``Updater``: python-tuf allows one refresh per instance.
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        *,
        targets_url: str | None = None,
        target_dir: Path | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.metadata_url = metadata_url
        self.targets_url = targets_url
        self.target_dir = target_dir
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=30.0, follow_redirects=True)
        self._updater: Updater | None = None

    @staticmethod
    def init(metadata_dir: Path, trusted_root: Path) -> None:
        """Provision ``metadata_dir`` with the root the device trusts; no network."""
        metadata_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trusted_root, metadata_dir / "root.json")

    def _new_updater(self) -> Updater:
        if not (self.metadata_dir / "root.json").exists():
            raise OtaError(
                f"{self.metadata_dir} has no root.json: provision the device with the "
                "repository's root metadata first"
            )
        try:
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                str(self.target_dir) if self.target_dir else None,
                self.targets_url,
                fetcher=HttpxFetcher(self._http),
                bootstrap=None,
            )
        except (tuf_errors.RepositoryError, ValueError) as e:
            raise TrustError(
                f"{self.metadata_dir}/root.json is not valid root metadata: {e}"
            ) from None

    def refresh(self) -> None:
        """Fetch and verify root, timestamp, snapshot and targets, in the TUF order."""
        updater = self._new_updater()
        try:
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            translate_tuf_error(e, "refresh")
        self._updater = updater

    def check(self) -> TrustStatus:
        """Refresh, and say what that means for installing (never raises on bad metadata)."""
        try:
            self.refresh()
        except ExpiredMetadataError as e:
            return TrustStatus(TrustState.METADATA_EXPIRED, str(e))
        except DownloadError as e:
            return TrustStatus(TrustState.UNREACHABLE, str(e))
        except TrustError as e:
            return TrustStatus(TrustState.REFUSED, str(e))
        return TrustStatus(TrustState.CURRENT, "metadata verified and current")

    def _refreshed(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def target(self, target_path: str) -> TargetFile:
        """The signed description (length, hashes, custom fields) of ``target_path``."""
        try:
            info = self._refreshed().get_targetinfo(target_path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            translate_tuf_error(e, f"looking up {target_path}")
        if info is None:
            raise TargetNotFoundError(f"{target_path} is not listed in the signed targets")
        return info

    def local_path(self, target: TargetFile) -> Path:
        """Where ``download`` stores ``target``: the same name each time, for caching."""
        if self.target_dir is None:
            raise ValueError("this client was made without a target_dir")
        return self.target_dir / parse.quote(target.path, "")

    def download(self, target: TargetFile, *, attempts: int = 3) -> Path:
        """``target`` verified against its signed length and hashes; resumes, and skips the
        download when a verified copy is already there."""
        dest = self.local_path(target)
        if dest.exists():
            try:
                self._verify(target, dest)
                return dest
            except TrustError:
                dest.unlink()
        if self.targets_url is None:
            raise ValueError("this client was made without a targets_url")
        dest.parent.mkdir(parents=True, exist_ok=True)
        return download_resumable(
            self._http,
            self._target_url(target),
            dest,
            length=target.length,
            check=lambda path: self._verify(target, path),
            attempts=attempts,
        )

    def _target_url(self, target: TargetFile) -> str:
        assert self.targets_url is not None
        root = Metadata[Root].from_file(str(self.metadata_dir / "root.json")).signed
        path = target.path
        if root.consistent_snapshot:
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(target.hashes.values()))}.{basename}"
        return self.targets_url.rstrip("/") + "/" + path

    @staticmethod
    def _verify(target: TargetFile, path: Path) -> None:
        try:
            with path.open("rb") as f:
                target.verify_length_and_hashes(f)
        except tuf_errors.LengthOrHashMismatchError as e:
            raise TrustError(
                f"{target.path}: refused, the downloaded file does not have the length and "
                f"hash the signed targets list ({e}): tampered in transit or on the server"
            ) from None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()
