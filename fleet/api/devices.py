"""``/api/v1/devices``, ``/api/v1/enroll``: enrollment, listing, tags, revocation."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import col, select

from contracts.mqtt import TOPIC_PREFIX

from .. import audit, devices
from ..models import Device, DevicePublic, EnrollmentTokenCreate, TelemetryRecordRow
from .deps import Admin, Operator, ServerDep, SessionDep, Viewer

router = APIRouter(tags=["devices"])


class EnrollmentTokenIssued(BaseModel):
    token: str
    """Shown once: give it to the device (or the install script)."""
    profile: str
    tags: list[str]
    uses: int
    expires_at: dt.datetime


class EnrollRequest(BaseModel):
    token: str
    device_id: str
    csr_pem: str | None = None
    """A PKCS#10 request for the device's own key (TLS on); without it the fleet makes one."""
    tags: list[str] = []


class MqttAccess(BaseModel):
    host: str
    port: int
    tls: bool
    username: str
    password: str | None
    ca_pem: str | None
    topic_prefix: str


class Enrolled(BaseModel):
    device_id: str
    profile: str
    tags: list[str]
    api_url: str
    api_token: str
    mqtt: MqttAccess
    certificate_pem: str | None
    private_key_pem: str | None
    ota_metadata_url: str
    ota_targets_url: str
    ota_root: dict[str, Any]
    """The TUF root the device trusts from now on (it follows rotations itself)."""


class TagsUpdate(BaseModel):
    tags: list[str] = Field(max_length=64)


@router.post("/enrollment-tokens", status_code=201)
def create_enrollment_token(
    data: EnrollmentTokenCreate, session: SessionDep, who: Admin
) -> EnrollmentTokenIssued:
    row, token = devices.create_enrollment_token(session, data=data, actor=who.name)
    session.commit()
    return EnrollmentTokenIssued(
        token=token, profile=row.profile, tags=row.tags, uses=data.uses, expires_at=row.expires_at
    )


@router.post("/enroll", status_code=201)
def enroll(request: EnrollRequest, server: ServerDep, session: SessionDep) -> Enrolled:
    """A device trades its enrollment token for its identity. No API token needed."""
    result = devices.enroll(
        session,
        token=request.token,
        device_id=request.device_id,
        csr_pem=request.csr_pem,
        ca=server.ca,
        tags=request.tags,
    )
    session.commit()
    server.sync_broker()
    endpoint = server.device_mqtt
    base = server.settings.base_url
    return Enrolled(
        device_id=result.device.id,
        profile=result.device.profile,
        tags=result.device.tags,
        api_url=base,
        api_token=result.api_token,
        mqtt=MqttAccess(
            host=endpoint.host,
            port=endpoint.port,
            tls=endpoint.tls,
            username=result.device.id,
            password=result.mqtt_password,
            ca_pem=server.ca.cert_pem.decode() if server.ca else None,
            topic_prefix=f"{TOPIC_PREFIX}/{result.device.id}/",
        ),
        certificate_pem=result.certificate_pem,
        private_key_pem=result.private_key_pem,
        ota_metadata_url=f"{base}/ota/metadata/",
        ota_targets_url=f"{base}/ota/targets/",
        ota_root=json.loads(server.repository.root_file.read_bytes()),
    )


@router.get("/devices")
def list_devices(
    session: SessionDep,
    _: Viewer,
    profile: str | None = None,
    tag: str | None = None,
    online: bool | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> list[DevicePublic]:
    query = select(Device).order_by(col(Device.id))
    if profile is not None:
        query = query.where(Device.profile == profile)
    if online is not None:
        query = query.where(Device.online == online)
    rows = session.exec(query).all()
    if tag is not None:
        rows = [d for d in rows if tag in d.tags]
    return [DevicePublic.model_validate(d) for d in rows[offset : offset + limit]]


@router.get("/devices/{device_id}")
def get_device(device_id: str, session: SessionDep, _: Viewer) -> DevicePublic:
    return DevicePublic.model_validate(devices.get_device(session, device_id))


@router.put("/devices/{device_id}/tags")
def set_tags(
    device_id: str, update: TagsUpdate, session: SessionDep, who: Operator
) -> DevicePublic:
    device = devices.get_device(session, device_id)
    before = audit.snapshot(device)
    device.tags = sorted(set(update.tags))
    session.add(device)
    audit.record(
        session,
        actor=who.name,
        action="device.tags",
        target=f"device:{device_id}",
        before=before,
        after=audit.snapshot(device),
    )
    session.commit()
    return DevicePublic.model_validate(device)


@router.get("/devices/{device_id}/telemetry")
def device_telemetry(
    device_id: str, session: SessionDep, _: Viewer, limit: int = 100
) -> list[TelemetryRecordRow]:
    """The device's latest telemetry records, newest first."""
    devices.get_device(session, device_id)  # 404 for an unknown device
    return list(
        session.exec(
            select(TelemetryRecordRow)
            .where(TelemetryRecordRow.device_id == device_id)
            .order_by(col(TelemetryRecordRow.ts).desc())
            .limit(min(max(limit, 1), 1000))
        )
    )


@router.post("/devices/{device_id}/revoke")
def revoke(device_id: str, server: ServerDep, session: SessionDep, who: Admin) -> DevicePublic:
    """Revoke at once: the broker drops its connection and refuses it from now on."""
    device = devices.get_device(session, device_id)
    devices.revoke(session, device=device, actor=who.name, ca=server.ca)
    session.commit()
    server.sync_broker()
    return DevicePublic.model_validate(device)
