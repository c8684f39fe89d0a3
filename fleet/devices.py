"""Devices: enrollment with one-time tokens, per-device identity, revocation, presence.

Enrollment trades a token for an identity: an X.509 client certificate from the fleet CA
(mTLS to the broker), or, with TLS off, a broker password; plus an API token for HTTP
(bundle downloads, cloud inference). The server keeps only hashes of the secrets.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, select

from contracts.ids import check_device_id
from contracts.mqtt import Status

from . import audit
from .broker import DeviceCredential, hash_password
from .ca import FleetCA
from .errors import CertificateError, ConflictError, EnrollmentError, NotFoundError
from .models import Device, DeviceState, EnrollmentToken, EnrollmentTokenCreate, utcnow
from .security import hash_token, new_token

__all__ = [
    "RESERVED_PREFIX",
    "Enrollment",
    "apply_statuses",
    "broker_credentials",
    "create_enrollment_token",
    "enroll",
    "get_device",
    "revoke",
]


RESERVED_PREFIX = "edgefleet-"
"""The fleet's own broker account and client ids start with it; no device may."""


@dataclass(frozen=True)
class Enrollment:
    """What a newly enrolled device receives, once."""

    device: Device
    api_token: str
    mqtt_password: str | None
    certificate_pem: str | None
    private_key_pem: str | None
    """Only when the device sent no CSR and the fleet generated its key."""


def create_enrollment_token(
    session: Session, *, data: EnrollmentTokenCreate, actor: str
) -> tuple[EnrollmentToken, str]:
    token = new_token("efe")
    row = EnrollmentToken(
        token_hash=hash_token(token),
        profile=data.profile,
        tags=data.tags,
        uses_left=data.uses,
        expires_at=utcnow() + dt.timedelta(seconds=data.ttl_s),
        created_by=actor,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="enrollment_token.create",
        target=f"enrollment:{row.id}",
        after=audit.snapshot(row),
    )
    return row, token


def enroll(
    session: Session,
    *,
    token: str,
    device_id: str,
    csr_pem: str | None,
    ca: FleetCA | None,
    tags: list[str] | None = None,
) -> Enrollment:
    """Create ``device_id`` from a valid token; ``ca`` given: the broker uses mTLS."""
    try:
        check_device_id(device_id)
    except ValueError as e:
        raise EnrollmentError(str(e)) from None
    if device_id.startswith(RESERVED_PREFIX):
        raise EnrollmentError(f"device ids starting with {RESERVED_PREFIX!r} are the fleet's own")
    grant = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    ).first()
    if grant is None:
        raise EnrollmentError("unknown enrollment token: ask the fleet operator for a new one")
    if grant.uses_left < 1:
        raise EnrollmentError("this enrollment token has been used up: ask for a new one")
    if grant.expires_at < utcnow():
        raise EnrollmentError(
            f"this enrollment token expired at {grant.expires_at:%Y-%m-%d %H:%M} UTC"
        )
    if session.get(Device, device_id) is not None:
        raise ConflictError(
            f"device {device_id} is already enrolled; revoke it first to enroll it again"
        )
    grant.uses_left -= 1
    session.add(grant)

    api_token = new_token("efd")
    password = None if ca is not None else secrets.token_urlsafe(24)
    certificate = key = None
    serial = None
    if ca is not None:
        try:
            issued = ca.issue_device_certificate(device_id, csr_pem.encode() if csr_pem else None)
        except CertificateError as e:
            raise EnrollmentError(f"cannot issue a certificate for {device_id}: {e}") from e
        certificate = issued.certificate_pem.decode()
        key = issued.private_key_pem.decode() if issued.private_key_pem else None
        serial = str(issued.serial)
    device = Device(
        id=device_id,
        profile=grant.profile,
        tags=sorted(set(grant.tags) | set(tags or [])),
        password_hash=hash_password(password) if password else None,
        certificate_serial=serial,
        api_token_hash=hash_token(api_token),
    )
    session.add(device)
    session.flush()
    audit.record(
        session,
        actor=f"device:{device_id}",
        action="device.enroll",
        target=f"device:{device_id}",
        after=audit.snapshot(device),
    )
    return Enrollment(device, api_token, password, certificate, key)


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r} is enrolled")
    return device


def revoke(session: Session, *, device: Device, actor: str, ca: FleetCA | None) -> None:
    """Mark revoked and drop its secrets; the caller then re-syncs the broker."""
    if device.state == DeviceState.REVOKED:
        return
    before = audit.snapshot(device)
    if ca is not None and device.certificate_serial:
        ca.revoke(int(device.certificate_serial))
    device.state = DeviceState.REVOKED
    device.revoked_at = utcnow()
    device.password_hash = None
    device.api_token_hash = None
    device.online = False
    session.add(device)
    audit.record(
        session,
        actor=actor,
        action="device.revoke",
        target=f"device:{device.id}",
        before=before,
        after=audit.snapshot(device),
    )


def broker_credentials(session: Session) -> list[DeviceCredential]:
    """Every active device's broker identity, for the generated password file and ACL."""
    rows = session.exec(
        select(Device.id, Device.password_hash)
        .where(Device.state == DeviceState.ACTIVE)
        .order_by(col(Device.id))
    ).all()
    return [DeviceCredential(device_id=i, password_hash=h) for i, h in rows]


def apply_statuses(session: Session, statuses: Sequence[tuple[str, Status]]) -> list[str]:
    """Record devices' retained statuses (or Last Wills), in arrival order, with one query.

    Returns the active devices that came online; statuses of unknown or revoked devices
    are ignored.
    """
    ids = {device_id for device_id, _ in statuses}
    devices = {
        d.id: d
        for d in session.exec(
            select(Device).where(col(Device.id).in_(ids), Device.state == DeviceState.ACTIVE)
        )
    }
    now = utcnow()
    online: list[str] = []
    for device_id, status in statuses:
        device = devices.get(device_id)
        if device is None:
            continue
        device.online = status.online
        device.last_seen = now
        if status.online:
            device.agent_version = status.agent_version
            device.bundle = status.bundle
            device.bundle_version_number = status.bundle_version_number
            device.agent_state = status.state
            online.append(device_id)
        session.add(device)
    return online
