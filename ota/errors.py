"""Errors the OTA package raises; each message says what was wrong and what to do.

Three families meet the user, as in python-tuf's ``tuf.api.exceptions``:

- ``BundleError``: a bundle or manifest that is not what it claims (malformed, tampered,
  truncated, unsafe paths). Every reader of untrusted bundle bytes raises only these.
- ``TrustError``: TUF refused the metadata or a target (bad signature, threshold not met,
  rollback, freeze, mix-and-match, a hash the repository never signed), or an install that
  would go back to an older bundle version.
- ``DownloadError``: the transport failed (connection cut, HTTP status); safe to retry,
  and a retry resumes.

``KeyStoreError`` covers the signing keys on disk (missing passphrase, wrong passphrase).
Misuse by a caller raises ``ValueError`` / ``RuntimeError`` as usual.
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "BundleError",
    "BundleIntegrityError",
    "DeltaError",
    "DownloadError",
    "ExpiredMetadataError",
    "KeyStoreError",
    "ManifestError",
    "OtaError",
    "RollbackError",
    "TargetNotFoundError",
    "TrustError",
]


class OtaError(Exception):
    """Base of every error this package raises."""


class BundleError(OtaError, ValueError):
    """A bundle is malformed or does not match its own manifest."""


class ManifestError(BundleError):
    """``manifest.json`` is missing, not JSON, or does not follow the manifest schema."""


class ArchiveError(BundleError):
    """The archive is truncated, not a bundle, or holds an entry that is not allowed."""


class BundleIntegrityError(BundleError):
    """A file in the bundle does not have the size or SHA-256 its manifest lists."""


class DeltaError(BundleError):
    """A delta is malformed, or was made for another old bundle than the one given."""


class TrustError(OtaError):
    """TUF metadata or a target was refused; the message says which check failed."""


class ExpiredMetadataError(TrustError):
    """Trusted metadata expired (a freeze attack, or a device offline for long)."""


class RollbackError(TrustError):
    """Metadata or a bundle is older than what the device already trusts or runs."""


class TargetNotFoundError(TrustError):
    """The signed targets metadata does not list the bundle asked for."""


class DownloadError(OtaError, ConnectionError):
    """Fetching metadata or a bundle failed in transit; retrying resumes the download."""


class KeyStoreError(OtaError):
    """Signing keys are missing, unreadable, or the passphrase does not open them."""
