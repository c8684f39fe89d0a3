"""``/api/v1/devices``, ``/api/v1/enroll``: enrollment, listing, tags, revocation."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, Field, model_validator
from sqlmodel import col, select

from contracts.mqtt import TOPIC_PREFIX, GroundTruthBatch

from .. import audit, devices
from ..bounds import MAX_ROW_ID, BundleLabel, DeviceId, Name, Tag
from ..errors import BrokerError, ConflictError
from ..inventory import (
    DeviceFilter,
    DeviceHistory,
    DeviceSummary,
    device_history,
    device_summary,
    find_devices,
)
from ..models import DevicePublic, DeviceState, EnrollmentTokenCreate, TelemetryRecordRow
from .deps import Admin, Operator, ServerDep, SessionDep, Viewer
from .responses import errors

log = logging.getLogger(__name__)

# /enroll answers 403 for a bad enrollment token and 409 for an enrolled device id
router = APIRouter(tags=["devices"], responses=errors(400, 401, 403, 404, 409))


class EnrollmentTokenIssued(BaseModel):
    token: str
    """Shown once: give it to the device (or the install script)."""
    profile: str
    tags: list[str]
    uses: int
    expires_at: dt.datetime
    reenroll_revoked: bool


class EnrollRequest(BaseModel):
    token: Annotated[str, Field(max_length=256)]
    device_id: DeviceId
    csr_pem: Annotated[str, Field(max_length=16384)] | None = None
    """A PKCS#10 request for the device's own key (TLS on); without it the fleet makes one."""

    @model_validator(mode="before")
    @classmethod
    def _no_tags(cls, data: Any) -> Any:
        """Agents before 0.2 send ``"tags": []``; an empty list asks for nothing and passes."""
        if isinstance(data, dict) and data.get("tags", []) != []:
            raise ValueError(
                "a device cannot choose its tags: they come from the enrollment token "
                "(POST /enrollment-tokens with tags), or an operator sets them later "
                "(PUT /devices/ID/tags); send the request without tags"
            )
        return data


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
    tags: list[Tag] = Field(max_length=64)


@router.post("/enrollment-tokens", status_code=201)
def create_enrollment_token(
    data: EnrollmentTokenCreate, session: SessionDep, who: Admin
) -> EnrollmentTokenIssued:
    row, token = devices.create_enrollment_token(session, data=data, actor=who.name)
    session.commit()
    return EnrollmentTokenIssued(
        token=token,
        profile=row.profile,
        tags=row.tags,
        uses=data.uses,
        expires_at=row.expires_at,
        reenroll_revoked=row.reenroll_revoked,
    )


@router.post("/enroll", status_code=201, responses=errors(503))
def enroll(request: EnrollRequest, server: ServerDep, session: SessionDep) -> Enrolled:
    """A device trades its enrollment token for its identity. No API token needed.

    503: the broker did not accept the device; nothing was stored and the token was not
    used, so the same request may be sent again.
    """
    try:
        result = devices.enroll(
            session,
            token=request.token,
            device_id=request.device_id,
            csr_pem=request.csr_pem,
            ca=server.ca,
            broker=server.accounts,
        )
    except BrokerError as e:
        log.error("enrolling %s: the broker did not accept it: %s", request.device_id, e)
        raise HTTPException(
            503,
            "the fleet's MQTT broker did not accept the device (the fleet server's log says "
            "why); nothing was stored and the enrollment token was not used: try again later",
            headers={"Retry-After": "10"},
        ) from None
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


_TOTAL_COUNT: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "X-Total-Count": {
                "description": "how many devices match the filters, across every page",
                "schema": {"type": "integer"},
            }
        }
    }
}


@router.get("/devices", responses=_TOTAL_COUNT)
def list_devices(
    session: SessionDep,
    response: Response,
    _: Viewer,
    profile: Name | None = None,
    tag: Annotated[list[Tag] | None, Query(max_length=16)] = None,
    bundle: BundleLabel | None = None,
    online: bool | None = None,
    agent_state: Name | None = None,
    state: DeviceState | None = None,
    q: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
) -> list[DevicePublic]:
    """Devices by id matching every filter: ``tag`` may repeat (all of them), ``bundle`` is
    the ``NAME-VERSION`` served, ``agent_state`` the updater's last reported state, ``q``
    a part of the id. ``X-Total-Count`` says how many match in all."""
    where = DeviceFilter(
        profile=profile,
        tags=tag or (),
        bundle=bundle,
        online=online,
        agent_state=agent_state,
        state=state,
        id_contains=q,
    )
    page, total = find_devices(session, where, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [DevicePublic.model_validate(d) for d in page]


@router.get("/device-summary")
def summary(session: SessionDep, _: Viewer) -> DeviceSummary:
    """How many devices there are, online and revoked, and each filter's values with their
    counts (profiles, bundles served, updater states, tags)."""
    return device_summary(session)


@router.get("/devices/{device_id}")
def get_device(device_id: DeviceId, session: SessionDep, _: Viewer) -> DevicePublic:
    return DevicePublic.model_validate(devices.get_device(session, device_id))


@router.put("/devices/{device_id}/tags")
def set_tags(
    device_id: DeviceId, update: TagsUpdate, session: SessionDep, who: Operator
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
    device_id: DeviceId,
    session: SessionDep,
    _: Viewer,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[TelemetryRecordRow]:
    """The device's latest telemetry records, newest first."""
    devices.get_device(session, device_id)  # 404 for an unknown device
    return list(
        session.exec(
            select(TelemetryRecordRow)
            .where(TelemetryRecordRow.device_id == device_id)
            .order_by(col(TelemetryRecordRow.ts).desc())
            .limit(limit)
        )
    )


@router.get("/devices/{device_id}/history")
def history(
    device_id: DeviceId,
    session: SessionDep,
    _: Viewer,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> DeviceHistory:
    """The device's latest rollouts (with the reason it failed, if it did), commands and
    audit entries, newest first, ``limit`` of each."""
    devices.get_device(session, device_id)  # 404 for an unknown device
    return device_history(session, device_id, limit=limit)


@router.post("/devices/{device_id}/revoke", responses=errors(503))
def revoke(device_id: str, server: ServerDep, session: SessionDep, who: Admin) -> DevicePublic:
    """Revoke at once: the broker drops its connection and refuses it from now on.

    503: revoked in the database, but the broker did not confirm the cut; send it again.
    """
    device = devices.get_device(session, device_id)
    try:
        devices.revoke(session, device=device, actor=who.name, ca=server.ca, broker=server.accounts)
    except BrokerError as e:
        raise HTTPException(
            503,
            f"device {device_id} is revoked in the database (its API token no longer works"
            f"{', its certificate is on the CRL' if server.ca else ''}), but the broker did "
            f"not confirm cutting it off: {e}; send the revoke again",
        ) from None
    return DevicePublic.model_validate(device)


class TruthRelayed(BaseModel):
    device_id: str
    relayed: int
    """Labels handed to the broker for the device; what they matched, it counts in its
    telemetry (``extra["truth"]``)."""


@router.post("/devices/{device_id}/ground-truth", status_code=202, responses=errors(503))
def relay_ground_truth(
    device_id: DeviceId,
    batch: GroundTruthBatch,
    server: ServerDep,
    session: SessionDep,
    _: Operator,
) -> TruthRelayed:
    """True labels of the device's earlier answers, by request id, relayed to it on its
    ``truth`` topic (QoS 1); it applies them as its local ``POST /v2/ground-truth`` does.

    409: the device is revoked, or offline: the broker keeps no session for a device
    while it is away, so labels sent then would be lost; send them once ``online`` (as
    ``GET /devices/ID`` says). A device that drops off between that check and the
    delivery misses them: the 202 says the broker has them, not that the device did.
    503: not even this replica's MQTT client queued them; send them again.
    """
    device = devices.get_device(session, device_id)
    if device.state is not DeviceState.ACTIVE:
        raise ConflictError(f"device {device_id} is {device.state.value}: it takes no labels")
    if not device.online:
        raise ConflictError(
            f"device {device_id} is offline, and the broker keeps nothing for it while it "
            "is away: send the labels again once it is online"
        )
    try:
        server.bridge.relay_truth(device_id, batch)
    except BrokerError as e:
        raise HTTPException(
            503, f"{e}; send the labels again", headers={"Retry-After": "5"}
        ) from None
    log.info("relayed %d ground-truth label(s) to %s", len(batch.labels), device_id)
    return TruthRelayed(device_id=device_id, relayed=len(batch.labels))
