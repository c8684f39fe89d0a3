"""Signing keys on disk: Ed25519, PKCS#8 PEM encrypted with a passphrase, mode 0600.

One file per key, ``ROLE.KEYID.pem`` (the TUF key id), so a role with a threshold above 1
has several. The passphrase comes from an environment variable
(``EDGEFLEET_KEY_PASSPHRASE`` unless told otherwise), never from the command line, where
it would land in shell history and ``ps``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from contracts.durable import write_atomic

from .errors import KeyStoreError

__all__ = ["PASSPHRASE_ENV", "ROLES", "KeyStore"]

PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"
ROLES = ("root", "targets", "snapshot", "timestamp")


class KeyStore:
    """The private keys of a repository's roles in one directory."""

    def __init__(self, directory: Path, passphrase: bytes) -> None:
        if not passphrase:
            raise KeyStoreError("an empty passphrase would leave the signing keys unencrypted")
        self.directory = directory
        self._passphrase = passphrase

    @classmethod
    def from_env(cls, directory: Path, env_var: str = PASSPHRASE_ENV) -> KeyStore:
        passphrase = os.environ.get(env_var, "")
        if not passphrase:
            raise KeyStoreError(
                f"set the environment variable {env_var} to the passphrase of the signing "
                f"keys in {directory} (it encrypts them on disk)"
            )
        return cls(directory, passphrase.encode())

    def generate(self, role: str) -> CryptoSigner:
        """A new Ed25519 key for ``role``, saved encrypted; returns its signer."""
        self._check_role(role)
        private_key = Ed25519PrivateKey.generate()
        signer = CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key()))
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self._path(role, signer.public_key.keyid), pem, mode=0o600)
        return signer

    def signers(self, role: str, keyids: list[str]) -> list[CryptoSigner]:
        """The signers of ``role`` among ``keyids`` that this store holds."""
        self._check_role(role)
        found = []
        for keyid in keyids:
            path = self._path(role, keyid)
            if path.exists():
                found.append(self._load(path))
        return found

    def remove(self, role: str, keyid: str) -> None:
        """Delete a revoked key: nobody should sign with it again."""
        self._path(role, keyid).unlink(missing_ok=True)

    def _load(self, path: Path) -> CryptoSigner:
        try:
            private_key = serialization.load_pem_private_key(path.read_bytes(), self._passphrase)
        except (ValueError, TypeError) as e:
            raise KeyStoreError(
                f"cannot decrypt {path}: wrong passphrase, or the file is damaged ({e})"
            ) from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path} is not an Ed25519 key")
        return CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key()))

    def _path(self, role: str, keyid: str) -> Path:
        return self.directory / f"{role}.{keyid}.pem"

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
