"""The fleet's X.509 certificate authority: device and broker certificates, and a CRL.

One EC P-256 key (OpenSSL, mosquitto and every TLS client library accept it for client
authentication) signs device certificates (CN = device id, clientAuth), the broker's
server certificate, and the fleet's own client certificate. The directory holds::

    ca.key  ca.pem        the CA (key 0600, directory 0700)
    crl.pem               always present, possibly empty; the broker checks every client
    state.json            revoked serials, CRL number, names reserved for the fleet itself
    server.pem/.key       the broker's certificate, re-issued by each broker start
    client-NAME.pem/.key  the fleet's own broker account (``issue_service_certificate``)

Every file is written to a temporary file in the directory and ``os.replace``d.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contracts.durable import write_atomic
from contracts.ids import check_device_id

from .errors import CertificateError

__all__ = ["CA_VALIDITY", "DEVICE_VALIDITY", "FleetCA", "IssuedCertificate"]

CA_VALIDITY = dt.timedelta(days=3652)
DEVICE_VALIDITY = dt.timedelta(days=365)
_CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this far in the past, so a device whose clock lags accepts them."""
_MIN_RSA_BITS = 2048
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: bytes
    private_key_pem: bytes | None
    """Only when no CSR was given and the CA generated the device's key."""
    serial: int
    not_after: dt.datetime


@dataclass
class _State:
    revoked: dict[int, dt.datetime]
    crl_number: int
    reserved_names: set[str]

    def to_json(self) -> bytes:
        data = {
            "revoked": {str(s): t.isoformat() for s, t in sorted(self.revoked.items())},
            "crl_number": self.crl_number,
            "reserved_names": sorted(self.reserved_names),
        }
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _State:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            revoked={int(s): dt.datetime.fromisoformat(t) for s, t in data["revoked"].items()},
            crl_number=int(data["crl_number"]),
            reserved_names=set(data["reserved_names"]),
        )


class FleetCA:
    """Load with :meth:`load_or_create`; all methods persist before they return."""

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        state: _State,
    ) -> None:
        self._dir = directory
        self._key = key
        self._cert = certificate
        self._state = state

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str = "edgefleet fleet CA") -> FleetCA:
        """The CA in ``directory``; a new one (10 years) if the directory holds none."""
        directory = Path(directory)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
            if not key_path.exists() and not cert_path.exists():
                return cls._create(directory, common_name)
            if not key_path.exists() or not cert_path.exists():
                missing = key_path if not key_path.exists() else cert_path
                raise CertificateError(
                    f"{missing} is missing but the rest of the CA in {directory} is there: "
                    "restore it from a backup (a new CA would invalidate every enrolled "
                    "device), or, if this CA never issued a certificate, empty the directory"
                )
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            state_path = directory / "state.json"
            state = (
                _State.from_json(state_path.read_bytes())
                if state_path.exists()
                else _State(revoked={}, crl_number=0, reserved_names=set())
            )
        except OSError as e:
            raise CertificateError(f"cannot read the fleet CA in {directory}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise CertificateError(f"the fleet CA in {directory} is corrupt: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertificateError(
                f"{key_path} is not the key of {cert_path}: restore the pair from one backup"
            )
        ca = cls(directory, key, cert, state)
        if not ca._crl_is_current():
            ca._write_crl()
        return ca

    @classmethod
    def _create(cls, directory: Path, common_name: str) -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, key, cert, _State(revoked={}, crl_number=0, reserved_names=set()))
        # The certificate last: a crash before it leaves a key alone, which load refuses
        # loudly rather than silently making a second CA.
        _write_atomic(directory / "ca.key", _private_pem(key), mode=0o600)
        ca._write_crl()
        _write_atomic(ca.cert_path, ca.cert_pem)
        return ca

    # --- what the broker and devices are given ----------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self._dir / "ca.pem"

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def crl_path(self) -> Path:
        return self._dir / "crl.pem"

    # --- issuing ------------------------------------------------------------------------------

    def issue_device_certificate(
        self,
        device_id: str,
        csr_pem: bytes | None = None,
        *,
        validity: dt.timedelta = DEVICE_VALIDITY,
    ) -> IssuedCertificate:
        """A client certificate with CN ``device_id``, for the CSR's key or a new one.

        ``CertificateError`` for a CSR that is malformed, badly signed, names another CN or
        holds a weak key, and for a device id reserved for the fleet's own account.
        """
        try:
            check_device_id(device_id)
        except ValueError as e:
            raise CertificateError(f"cannot be a certificate name: {e}") from None
        if device_id in self._state.reserved_names:
            raise CertificateError(
                f"{device_id!r} is the fleet's own broker account; enroll the device under "
                "another id"
            )
        private_pem = None
        if csr_pem is None:
            device_key = ec.generate_private_key(ec.SECP256R1())
            public_key: CertificatePublicKeyTypes = device_key.public_key()
            private_pem = _private_pem(device_key)
        else:
            public_key = _check_csr(csr_pem, device_id)
        cert = self._sign(device_id, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, validity)
        return IssuedCertificate(
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            private_key_pem=private_pem,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )

    def issue_server_certificate(
        self, hostnames: list[str], *, validity: dt.timedelta = DEVICE_VALIDITY
    ) -> tuple[Path, Path]:
        """``server.pem`` and ``server.key`` for the broker; IP addresses become IP SANs."""
        if not hostnames:
            raise ValueError("a server certificate needs at least one host name or address")
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(hostnames):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            hostnames[0], key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, validity, sans
        )
        return self._write_pair("server", cert, key)

    def issue_service_certificate(
        self, name: str, *, validity: dt.timedelta = DEVICE_VALIDITY
    ) -> tuple[Path, Path]:
        """``client-NAME.pem`` and ``.key``: the fleet's own broker account, CN ``name``.

        ``name`` is then reserved: no device certificate is ever issued for it, so no device
        can hold the fleet's identity.
        """
        check_device_id(name)
        if name not in self._state.reserved_names:
            self._state.reserved_names.add(name)
            self._save_state()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(name, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, validity)
        return self._write_pair(f"client-{name}", cert, key)

    def revoke(self, serial: int) -> None:
        """Add ``serial`` to the CRL; the broker enforces it on its next reload."""
        if serial in self._state.revoked:
            return
        self._state.revoked[serial] = _now()
        self._write_crl()

    # --- internals ----------------------------------------------------------------------------

    def _sign(
        self,
        common_name: str,
        public_key: CertificatePublicKeyTypes,
        usage: x509.ObjectIdentifier,
        validity: dt.timedelta,
        sans: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + validity, self._cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(self._authority_key_id(), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())

    def _write_pair(
        self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path, key_path = self._dir / f"{stem}.pem", self._dir / f"{stem}.key"
        _write_atomic(key_path, _private_pem(key), mode=0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def _save_state(self) -> None:
        _write_atomic(self._dir / "state.json", self._state.to_json())

    def _crl_is_current(self) -> bool:
        """Whether crl.pem lists exactly the revoked serials (a crash may have come between
        saving the state and writing the CRL)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return False
        return {r.serial_number for r in crl} == set(self._state.revoked)

    def _write_crl(self) -> None:
        """Save the state with the next CRL number, then sign and write crl.pem."""
        # nextUpdate is the CA's own expiry: the broker (OpenSSL) refuses every client once
        # a CRL's nextUpdate has passed, and it only rereads the file when told to reload.
        self._state.crl_number += 1
        self._save_state()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now)
            .next_update(self._cert.not_valid_after_utc)
            .add_extension(x509.CRLNumber(self._state.crl_number), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )
        for serial, when in sorted(self._state.revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _check_csr(csr_pem: bytes, device_id: str) -> CertificatePublicKeyTypes:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CertificateError(f"the CSR is not a PEM certificate signing request: {e}") from e
    try:
        signature_ok = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"the CSR's key or signature cannot be checked: {e}") from e
    if not signature_ok:
        raise CertificateError(
            "the CSR's signature does not match its public key: it was altered or signed with "
            "another key; create it again with the device's key"
        )
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        found = ", ".join(map(repr, names)) or "none"
        raise CertificateError(
            f"the CSR's common name must be the device id {device_id!r}; found {found}"
        )
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _ACCEPTED_CURVES):
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CertificateError(
        f"the CSR's key ({type(key).__name__}) is not accepted: use EC P-256/P-384, Ed25519 "
        f"or RSA of at least {_MIN_RSA_BITS} bits"
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    try:
        write_atomic(path, data, mode=mode)
    except OSError as e:
        raise CertificateError(f"cannot write {path}: {e}") from e
