"""Devices: enrollment with one-time tokens, per-device identity, revocation, presence.

Enrollment trades a token for an identity: an X.509 client certificate from the fleet CA
(mTLS to the broker), or, with TLS off, a broker password; plus an API token for HTTP
(bundle downloads, cloud inference). The server keeps only hashes of the secrets.

Enrollment is one transaction that commits last: the token's use (one atomic ``UPDATE``
whose row count decides, so concurrent requests cannot share a use), the device row, then
the broker, which must accept the device before anything is committed. When the broker
fails nothing is stored and the token is left as it was; when the commit fails after the
broker accepted, the device is taken out of the broker again. The device's profile and
tags come from the token alone. Revocation is stored first (the API token dies, the
certificate goes on the CRL), then the broker cuts the device; it may be repeated.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from contracts.ids import check_device_id
from contracts.mqtt import Status

from . import audit
from .broker import DeviceAccounts, DeviceCredential, hash_password
from .ca import FleetCA
from .errors import BrokerError, CertificateError, ConflictError, EnrollmentError, NotFoundError
from .models import Device, DeviceState, EnrollmentToken, EnrollmentTokenCreate, utcnow
from .security import hash_token, new_token

__all__ = [
    "RESERVED_PREFIX",
    "Enrollment",
    "StatusesApplied",
    "apply_statuses",
    "broker_credentials",
    "create_enrollment_token",
    "enroll",
    "get_device",
    "revoke",
    "set_all_offline",
]


log = logging.getLogger(__name__)

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
        reenroll_revoked=data.reenroll_revoked,
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
    broker: DeviceAccounts | None,
) -> Enrollment:
    """Create ``device_id`` from a valid token and commit; ``ca`` given: mTLS.

    ``broker``: the broker's accounts (embedded, or a standalone mosquitto's plugin),
    which must accept the device before it is stored (``None``: an external broker that
    asks the fleet, or whose accounts are its operator's). ``BrokerError``
    when it does not: nothing is stored and the token keeps its use.
    """
    try:
        check_device_id(device_id)
    except ValueError as e:
        raise EnrollmentError(str(e)) from None
    if device_id.startswith(RESERVED_PREFIX):
        raise EnrollmentError(f"device ids starting with {RESERVED_PREFIX!r} are the fleet's own")
    try:
        enrollment = _enroll(session, token=token, device_id=device_id, csr_pem=csr_pem, ca=ca)
        if broker is not None:
            broker.add_device(device_id, password=enrollment.mqtt_password)
    except BaseException:
        session.rollback()
        raise
    try:
        session.commit()
    except BaseException:
        session.rollback()
        if broker is not None:
            try:
                broker.remove_device(device_id)
            except BrokerError:
                log.exception(
                    "enrolling %s failed after the broker accepted it, and the broker did not "
                    "confirm its removal: restart the fleet server to rebuild the broker's "
                    "accounts from the database",
                    device_id,
                )
        raise
    return enrollment


def _use_token(session: Session, token: str) -> EnrollmentToken:
    """Take one use of ``token`` in one statement, or say why it cannot be used."""
    digest = hash_token(token)
    used = session.exec(
        update(EnrollmentToken)
        .where(
            col(EnrollmentToken.token_hash) == digest,
            col(EnrollmentToken.uses_left) > 0,
            col(EnrollmentToken.expires_at) > utcnow(),
        )
        .values(uses_left=col(EnrollmentToken.uses_left) - 1)
        .execution_options(synchronize_session=False)
    )
    grant = session.exec(
        select(EnrollmentToken)
        .where(EnrollmentToken.token_hash == digest)
        .execution_options(populate_existing=True)
    ).first()
    if used.rowcount == 1 and grant is not None:
        return grant
    if grant is None:
        raise EnrollmentError("unknown enrollment token: ask the fleet operator for a new one")
    if grant.uses_left < 1:
        raise EnrollmentError("this enrollment token has been used up: ask for a new one")
    raise EnrollmentError(
        f"this enrollment token expired at {grant.expires_at:%Y-%m-%d %H:%M} UTC: ask for a new one"
    )


def _enroll(
    session: Session, *, token: str, device_id: str, csr_pem: str | None, ca: FleetCA | None
) -> Enrollment:
    """Everything but the broker and the commit; the device row is flushed."""
    grant = _use_token(session, token)
    device = session.exec(
        select(Device)
        .where(Device.id == device_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    before = audit.snapshot(device)
    if device is not None and device.state == DeviceState.ACTIVE:
        raise ConflictError(
            f"device {device_id} is already enrolled; revoke it first to enroll it again"
        )
    if device is not None and not grant.reenroll_revoked:
        raise ConflictError(
            f"device {device_id} was revoked; enrolling that id again needs an enrollment "
            'token an admin created with "reenroll_revoked": true'
        )

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
    fresh = Device(
        id=device_id,
        profile=grant.profile,
        tags=sorted(set(grant.tags)),
        password_hash=hash_password(password) if password else None,
        certificate_serial=serial,
        api_token_hash=hash_token(api_token),
    )
    if device is None:
        device = fresh
    else:  # a revoked id enrolled again: a new identity, nothing kept from the old one
        for name in Device.model_fields:
            setattr(device, name, getattr(fresh, name))
    session.add(device)
    try:
        session.flush()
    except IntegrityError:
        raise ConflictError(
            f"device {device_id} was enrolled by another request at the same time"
        ) from None
    audit.record(
        session,
        actor=f"device:{device_id}",
        action="device.enroll",
        target=f"device:{device_id}",
        before=before,
        after=audit.snapshot(device),
    )
    return Enrollment(device, api_token, password, certificate, key)


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r} is enrolled")
    return device


def revoke(
    session: Session,
    *,
    device: Device,
    actor: str,
    ca: FleetCA | None,
    broker: DeviceAccounts | None,
) -> None:
    """Revoke and commit, then cut the device off at ``broker``.

    The database comes first: its API token stops working and its certificate is on the
    CRL even when the broker then fails (``BrokerError``); revoking a revoked device only
    asks the broker again, so a failed cut can be retried.
    """
    if device.state != DeviceState.REVOKED:
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
        session.commit()
    if broker is not None:
        broker.remove_device(device.id)


def broker_credentials(session: Session) -> list[DeviceCredential]:
    """Every active device's broker identity, for the broker's start.

    A row that is not a valid identity (an id from before the identifier policy, a
    reserved id, a password hash mosquitto cannot load) is left out with a warning: the
    broker starts without it, and that device cannot connect until it is fixed.
    """
    rows = session.exec(
        select(Device.id, Device.password_hash)
        .where(Device.state == DeviceState.ACTIVE)
        .order_by(col(Device.id))
    ).all()
    credentials = []
    for device_id, password_hash in rows:
        try:
            if device_id.startswith(RESERVED_PREFIX):
                raise ValueError(f"ids starting with {RESERVED_PREFIX!r} are the fleet's own")
            credentials.append(DeviceCredential(device_id=device_id, password_hash=password_hash))
        except ValueError as e:
            log.warning(
                "device row %r is left out of the broker, so it cannot connect: %s; revoke it "
                "(POST /api/v1/devices/ID/revoke) and enroll the device again under a valid id",
                device_id,
                e,
            )
    return credentials


@dataclass(frozen=True)
class StatusesApplied:
    """What a batch of statuses did to the devices they came from."""

    online: list[tuple[str, Status]]
    """The active devices' online statuses, in arrival order (to reconcile their rollout
    members from)."""
    came_online: list[str]
    """The active devices that went from offline to online in the batch, each once: what
    they were sent while away is sent again."""


def apply_statuses(session: Session, statuses: Sequence[tuple[str, Status]]) -> StatusesApplied:
    """Record devices' retained statuses (or Last Wills), in arrival order: one query
    reads the devices' presence, one ``executemany`` per kind of status writes the last of
    each device. Statuses of unknown or revoked devices are ignored.

    A device comes online when an online status finds it offline: a fleet that restarted
    marked every device offline (:func:`set_all_offline`), so each reconnected device's
    status counts; a status that only repeats it is online (progress, a resent retained
    status) does not.
    """
    ids = {device_id for device_id, _ in statuses}
    active = session.connection().execute(
        sa_select(col(Device.id), col(Device.online)).where(
            col(Device.id).in_(ids), col(Device.state) == DeviceState.ACTIVE
        )
    )
    online = {device_id: is_online for device_id, is_online in active}
    reported: list[tuple[str, Status]] = []
    came_online: dict[str, None] = {}
    last: dict[str, Status] = {}
    for device_id, status in statuses:
        if device_id not in online:
            continue
        if status.online:
            reported.append((device_id, status))
            if not online[device_id]:
                came_online[device_id] = None
        online[device_id] = status.online
        last[device_id] = status
    now = utcnow()
    table = cast(Table, Device.__table__)  # type: ignore[attr-defined]
    for went_online in (True, False):
        fields = _STATUS_COLUMNS if went_online else {}
        rows = [
            {"b_id": device_id, **{f"b_{name}": getattr(status, name) for name in fields}}
            for device_id, status in last.items()
            if status.online is went_online
        ]
        if rows:
            session.connection().execute(
                update(table)
                .where(table.c.id == bindparam("b_id"))
                .values(
                    online=went_online,
                    last_seen=now,
                    **{column: bindparam(f"b_{name}") for name, column in fields.items()},
                ),
                rows,
            )
    return StatusesApplied(online=reported, came_online=list(came_online))


_STATUS_COLUMNS = {
    "agent_version": "agent_version",
    "bundle": "bundle",
    "bundle_version_number": "bundle_version_number",
    "state": "agent_state",
}
"""What an online status reports, and the :class:`Device` column that keeps it."""


def set_all_offline(session: Session) -> int:
    """Mark every device offline, as when the broker that held their connections is gone
    (its Last Wills with it); each is online again once its new status arrives. How many
    were online."""
    result = session.exec(
        update(Device)
        .where(col(Device.online).is_(True))
        .values(online=False)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)
