"""The TUF repository: a plain directory of signed metadata and bundles.

::

    REPO/metadata/1.root.json, 2.root.json, ...   every root version (clients walk the chain)
    REPO/metadata/root.json                       the newest root, to give to new devices
    REPO/metadata/N.targets.json, N.snapshot.json, timestamp.json
    REPO/targets/PROFILE/SHA256.NAME-VERSION.efb  bundles, named by hash (consistent snapshots)
    REPO/edgefleet-repository.json                expiry settings

Nothing here needs a server: the fleet server serves the directory over HTTP, and it could
as well sit behind a CDN or in an object store. Writes go to a temporary file and are
renamed, and ``timestamp.json`` (the only file that changes name-for-name) is written last,
so a client never sees a half-published version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from contracts.durable import atomic_file, write_atomic

from .archive import verify_bundle
from .errors import KeyStoreError, OtaError, RollbackError
from .keys import ROLES, KeyStore
from .manifest import Manifest

__all__ = ["ExpiryPolicy", "OtaRepository", "bundle_custom", "target_path_for"]

_SETTINGS = "edgefleet-repository.json"


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed, in seconds.

    Timestamp is short on purpose: a device that cannot get a fresh one within this
    window stops installing (it keeps serving), which is what defeats a freeze attack.
    """

    root_s: int = 365 * 86400
    targets_s: int = 90 * 86400
    snapshot_s: int = 7 * 86400
    timestamp_s: int = 86400

    def for_role(self, role: str) -> dt.timedelta:
        return dt.timedelta(seconds=getattr(self, f"{role}_s"))


def target_path_for(manifest: Manifest) -> str:
    """The TUF target path of a bundle: ``PROFILE/NAME-VERSION.efb``."""
    return f"{manifest.profile}/{manifest.name}-{manifest.version}.efb"


def bundle_custom(manifest: Manifest) -> dict[str, Any]:
    """The signed custom fields a device reads to choose a bundle without downloading it."""
    return {
        "edgefleet": {
            "name": manifest.name,
            "version": manifest.version,
            "version_number": manifest.version_number,
            "profile": manifest.profile,
            "runtime": manifest.runtime,
            "model": manifest.model.name,
            "model_version": manifest.model.version,
            "min_agent_version": manifest.min_agent_version,
        }
    }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class OtaRepository:
    """Signs and publishes bundles into a repository directory with keys from a ``KeyStore``."""

    def __init__(self, path: Path, keys: KeyStore) -> None:
        self.path = path
        self.keys = keys
        try:
            settings = json.loads((path / _SETTINGS).read_text())
        except FileNotFoundError:
            raise OtaError(
                f"{path} is not an OTA repository: create one with `edgefleet ota keys init`"
            ) from None
        self.expiry = ExpiryPolicy(**settings["expiry"])

    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    @property
    def root_file(self) -> Path:
        """The newest root metadata; what a device is provisioned with."""
        return self.metadata_dir / "root.json"

    # --- creation -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        keys: KeyStore,
        *,
        expiry: ExpiryPolicy | None = None,
        key_counts: dict[str, int] | None = None,
        thresholds: dict[str, int] | None = None,
    ) -> OtaRepository:
        """New keys for every role and version 1 of every metadata file."""
        expiry = expiry or ExpiryPolicy()
        key_counts = {role: 1 for role in ROLES} | (key_counts or {})
        thresholds = {role: 1 for role in ROLES} | (thresholds or {})
        for role in ROLES:
            if not 1 <= thresholds[role] <= key_counts[role]:
                raise ValueError(
                    f"{role}: a threshold of {thresholds[role]} needs between 1 and "
                    f"{key_counts[role]} keys"
                )
        if (path / _SETTINGS).exists():
            raise OtaError(f"{path} already holds a repository; rotate keys with `ota keys rotate`")
        path.mkdir(parents=True, exist_ok=True)
        (path / "metadata").mkdir(exist_ok=True)
        (path / "targets").mkdir(exist_ok=True)
        settings = json.dumps({"expiry": asdict(expiry)}, indent=2) + "\n"
        write_atomic(path / _SETTINGS, settings.encode())

        now = _now()
        root = Root(expires=now + expiry.for_role("root"), consistent_snapshot=True)
        for role in ROLES:
            root.roles[role] = Role([], thresholds[role])
            for _ in range(key_counts[role]):
                root.add_key(keys.generate(role).public_key, role)
        repo = cls(path, keys)
        repo._publish_root(Metadata(root))
        targets = Targets(expires=now + expiry.for_role("targets"))
        repo._publish_chain(targets)
        return repo

    # --- reading the current metadata ------------------------------------------------------

    def _file(self, name: str) -> str:
        return str(self.metadata_dir / name)

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_file(self._file("root.json"))

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(self._file("timestamp.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_file(self._file(f"{version}.snapshot.json"))

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return Metadata[Targets].from_file(self._file(f"{version}.targets.json"))

    # --- publishing bundles ---------------------------------------------------------------

    def add_bundle(self, bundle: Path) -> TargetFile:
        """Verify ``bundle``, copy it into ``targets/`` and sign it as a new target.

        A released path is immutable: publishing different bytes under the same name and
        version, or a ``version_number`` not above every earlier bundle of the same name,
        is refused.
        """
        manifest = verify_bundle(bundle)
        target_path = target_path_for(manifest)
        target = TargetFile.from_file(target_path, str(bundle), ["sha256"])
        target.unrecognized_fields["custom"] = bundle_custom(manifest)
        current = self.targets().signed
        existing = current.targets.get(target_path)
        if existing is not None:
            if existing.hashes == target.hashes:
                return existing
            raise RollbackError(
                f"{target_path} is already published with other contents: a released version "
                "never changes; bump --version"
            )
        same_name = [
            fields
            for other in current.targets.values()
            if isinstance(other.custom, dict)
            and (fields := other.custom.get("edgefleet", {})).get("name") == manifest.name
        ]
        newest = max(same_name, key=lambda f: f["version_number"], default=None)
        if newest is not None and newest["version_number"] >= manifest.version_number:
            raise RollbackError(
                f"{manifest.name} {manifest.version} has version_number "
                f"{manifest.version_number}, not above the {newest['version_number']} of the "
                f"published {newest['version']}: devices would refuse it as a rollback"
            )
        self._copy_target(bundle, target)
        current.targets[target_path] = target
        self._publish_chain(current)
        return target

    def _copy_target(self, bundle: Path, target: TargetFile) -> None:
        dest = self.target_file(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open("rb") as src, atomic_file(dest) as f:
            shutil.copyfileobj(src, f)

    def target_file(self, target: TargetFile) -> Path:
        """Where the bytes of ``target`` lie in ``targets/``."""
        dirname, _, basename = target.path.rpartition("/")
        return self.targets_dir / dirname / f"{target.hashes['sha256']}.{basename}"

    # --- freshness ------------------------------------------------------------------------

    def refresh_timestamp(self, *, within: dt.timedelta | None = None) -> bool:
        """Re-sign timestamp when it expires within ``within`` (default: half its lifetime).

        Returns whether a new timestamp was published. The fleet server calls this on a
        timer; a cron job can run ``edgefleet ota refresh`` instead.
        """
        within = within if within is not None else self.expiry.for_role("timestamp") / 2
        if self.timestamp().signed.expires - _now() > within:
            return False
        self._publish_timestamp()
        return True

    # --- key rotation ---------------------------------------------------------------------

    def rotate(self, role: str) -> list[str]:
        """Replace every key of ``role`` with a new one and re-sign what it signs.

        A new root version lists the new keys; it is signed by the old root keys and, for a
        root rotation, by the new ones too, so devices verify the step from the root they
        trust. The old keys are deleted: anything they sign from now on is refused.
        Returns the new key ids.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
        root_md = self.root()
        root = root_md.signed
        old_root_signers = self._signers("root", root)
        old_keyids = list(root.roles[role].keyids)
        new_signers = [self.keys.generate(role) for _ in old_keyids]
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        for signer in new_signers:
            root.add_key(signer.public_key, role)
        root.version += 1
        root.expires = _now() + self.expiry.for_role("root")
        self._publish_root(Metadata(root), extra_signers=old_root_signers)
        for keyid in old_keyids:
            self.keys.remove(role, keyid)
        if role == "targets":
            self._publish_chain(self.targets().signed)
        elif role == "snapshot":
            self._publish_chain(None)
        elif role == "timestamp":
            self._publish_timestamp()
        return [s.public_key.keyid for s in new_signers]

    # --- signing and writing --------------------------------------------------------------

    def _signers(self, role: str, root: Root) -> list[Signer]:
        delegation = root.roles[role]
        signers: list[Signer] = list(self.keys.signers(role, list(delegation.keyids)))
        if len(signers) < delegation.threshold:
            raise KeyStoreError(
                f"{role} needs {delegation.threshold} signatures but {self.keys.directory} "
                f"holds {len(signers)} of its keys"
            )
        return signers

    def _sign(self, md: Metadata[Any], root: Root, extra_signers: Sequence[Signer] = ()) -> None:
        md.signatures.clear()
        for signer in [*extra_signers, *self._signers(md.signed.type, root)]:
            if signer.public_key.keyid not in md.signatures:
                md.sign(signer, append=True)

    def _publish_root(self, md: Metadata[Root], extra_signers: Sequence[Signer] = ()) -> None:
        self._sign(md, md.signed, extra_signers)
        data = md.to_bytes(JSONSerializer(compact=False))
        write_atomic(self.metadata_dir / f"{md.signed.version}.root.json", data)
        write_atomic(self.root_file, data)

    def _publish_chain(self, targets: Targets | None) -> None:
        """New versions of targets (when given), snapshot and timestamp, in that order."""
        now = _now()
        root = self.root().signed
        snapshot_version = 0
        snapshot_meta: dict[str, MetaFile] = {}
        if (self.metadata_dir / "timestamp.json").exists():
            old_snapshot = self.snapshot().signed
            snapshot_version = old_snapshot.version
            snapshot_meta = dict(old_snapshot.meta)
        if targets is not None:
            previous = snapshot_meta.get("targets.json")
            targets.version = previous.version + 1 if previous else 1
            targets.expires = now + self.expiry.for_role("targets")
            write_atomic(
                self.metadata_dir / f"{targets.version}.targets.json",
                self._signed_bytes(targets, root),
            )
            snapshot_meta["targets.json"] = MetaFile(version=targets.version)
        snapshot = Snapshot(
            version=snapshot_version + 1,
            expires=now + self.expiry.for_role("snapshot"),
            meta=snapshot_meta,
        )
        snapshot_bytes = self._signed_bytes(snapshot, root)
        write_atomic(self.metadata_dir / f"{snapshot.version}.snapshot.json", snapshot_bytes)
        self._publish_timestamp(
            MetaFile(
                version=snapshot.version,
                length=len(snapshot_bytes),
                hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
            )
        )

    def _publish_timestamp(self, snapshot_meta: MetaFile | None = None) -> None:
        """A new timestamp version with a fresh expiry, pointing at ``snapshot_meta`` (by
        default at the snapshot the current timestamp points at)."""
        path = self.metadata_dir / "timestamp.json"
        previous = self.timestamp().signed if path.exists() else None
        if snapshot_meta is None:
            if previous is None:
                raise RuntimeError("no timestamp yet: publish a snapshot first")
            snapshot_meta = previous.snapshot_meta
        timestamp = Timestamp(
            version=previous.version + 1 if previous else 1,
            expires=_now() + self.expiry.for_role("timestamp"),
            snapshot_meta=snapshot_meta,
        )
        write_atomic(path, self._signed_bytes(timestamp, self.root().signed))

    def _signed_bytes(self, signed: Root | Targets | Snapshot | Timestamp, root: Root) -> bytes:
        md: Metadata[Any] = Metadata(signed)
        self._sign(md, root)
        return md.to_bytes(JSONSerializer(compact=False))
