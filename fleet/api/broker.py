"""``/api/v1/broker/*``: who may connect to an external broker, and what each client may do.

A broker other than the fleet's mosquitto (EMQX, or any broker whose HTTP auth hook can be
given these shapes) asks these two routes instead of reading mosquitto's files:

- ``POST /api/v1/broker/authenticate`` at each CONNECT, in the shape of EMQX 5's HTTP
  authenticator (https://docs.emqx.com/en/emqx/latest/access-control/authn/http.html):
  a JSON body rendered from the authenticator's template, here
  ``{"username": "${username}", "password": "${password}", "clientid": "${clientid}"}``
  (other placeholders, ``peerhost`` say, may be sent and are ignored), answered 200 with
  ``{"result": "allow" | "deny" | "ignore", "is_superuser": false}``;
- ``POST /api/v1/broker/authorize`` at each PUBLISH and SUBSCRIBE, in the shape of EMQX 5's
  HTTP authorizer (https://docs.emqx.com/en/emqx/latest/access-control/authz/http.html):
  ``{"username": "${username}", "clientid": "${clientid}", "topic": "${topic}",
  "action": "${action}", "qos": ${qos}, "retain": ${retain}}`` (placeholders render as
  strings, ``"1"`` and ``"true"`` are read as 1 and true), answered 200 with
  ``{"result": "allow" | "deny"}``.

The broker proves itself with a shared secret in the ``X-Edgefleet-Broker-Secret`` header
(the server's ``broker_auth_secret_file``; without one configured nobody gets in): else 401,
which EMQX reads as "ignore". Nobody is a superuser.

**Who.** A device logs in with its id as username *and* client id and the password it was
given at enrollment (checked against the ``$7$`` hash the fleet keeps); a revoked device,
a wrong password or another client id is denied. A replica logs in as
``edgefleet-fleet-REPLICA`` (client id the same) with the fleet password of the shared
credential file (:mod:`fleet.broker.credential`). Any other ``edgefleet-`` name is denied;
a username the fleet has never heard of is ``ignore``: the broker's next authenticator, if
any, decides (and refuses it if there is none).

**What.** :func:`fleet.broker.access.allows`, from the same table of rules mosquitto's
dynamic-security roles are written from: a device subscribes to its own ``cmd`` only and
publishes its own ``ack``, ``status`` and ``telemetry`` only; a replica subscribes to the
three shared subscriptions and publishes any device's ``cmd``. EMQX authorizes a shared
subscription by its real topic filter (``$share/fleet/F`` is asked as ``F``), so ``F``
passes for replicas; a device asking for ``$share/...`` in any form is denied. A revoked
device is denied everything from its next check (EMQX caches answers: see docs/scale.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from contracts.ids import check_device_id

from ..broker.access import AccountKind, Action, allows
from ..broker.credential import replica_of
from ..broker.security import verify_password
from ..devices import RESERVED_PREFIX
from ..models import Device, DeviceState
from .deps import ServerDep, SessionDep
from .responses import errors

__all__ = [
    "SECRET_HEADER",
    "AuthenticationRequest",
    "AuthenticationResult",
    "AuthorizationRequest",
    "AuthorizationResult",
    "router",
]

SECRET_HEADER = "X-Edgefleet-Broker-Secret"

_secret = APIKeyHeader(
    name=SECRET_HEADER,
    auto_error=False,
    scheme_name="BrokerSecret",
    description="The secret the broker shares with the fleet (broker_auth_secret_file).",
)


def _the_broker(server: ServerDep, secret: Annotated[str | None, Depends(_secret)]) -> None:
    expected = server.broker_auth_secret
    if expected is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this fleet server answers no broker: start it with --broker-auth-secret-file "
            f"and have the broker send that secret in {SECRET_HEADER}",
        )
    if secret is None or not hmac.compare_digest(secret.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"send the secret of --broker-auth-secret-file in {SECRET_HEADER}",
        )


router = APIRouter(
    prefix="/broker",
    tags=["broker"],
    dependencies=[Depends(_the_broker)],
    responses=errors(400, 401, 413),  # 400: a body that is not JSON
)

_Username = Annotated[str, Field(max_length=1024)]


class AuthenticationRequest(BaseModel):
    """What EMQX's HTTP authenticator sends (its body template, rendered)."""

    model_config = ConfigDict(extra="ignore")

    username: _Username = ""
    password: Annotated[str, Field(max_length=1024)] = ""
    clientid: _Username = ""


class AuthenticationResult(BaseModel):
    result: Literal["allow", "deny", "ignore"]
    is_superuser: bool = False


class AuthorizationRequest(BaseModel):
    """What EMQX's HTTP authorizer sends (its body template, rendered)."""

    model_config = ConfigDict(extra="ignore")

    username: _Username = ""
    clientid: _Username = ""
    topic: Annotated[str, Field(min_length=1, max_length=65535)]
    action: Literal["publish", "subscribe"]
    qos: Annotated[int, Field(ge=0, le=2)] | None = None
    retain: bool | None = None


class AuthorizationResult(BaseModel):
    result: Literal["allow", "deny"]


@router.post("/authenticate")
def authenticate(
    request: AuthenticationRequest, server: ServerDep, session: SessionDep
) -> AuthenticationResult:
    """Whether a client may connect with this username, password and client id."""
    username = request.username
    if replica_of(username) is not None:
        fleet = server.credential.fleet_password if server.credential else None
        granted = (
            fleet is not None
            and request.clientid == username
            and hmac.compare_digest(request.password.encode(), fleet.encode())
        )
        return _authenticated(granted)
    if username.startswith(RESERVED_PREFIX):
        return _authenticated(False)
    device = _device(session, username)
    if device is None:
        return AuthenticationResult(result="ignore")
    granted = (
        device.state == DeviceState.ACTIVE
        and request.clientid == username
        and device.password_hash is not None
        and verify_password(request.password, device.password_hash)
    )
    return _authenticated(granted)


@router.post("/authorize")
def authorize(request: AuthorizationRequest, session: SessionDep) -> AuthorizationResult:
    """Whether this client may publish on, or subscribe to, this topic."""
    username = request.username
    if request.clientid != username:
        return AuthorizationResult(result="deny")
    kind, device_id = AccountKind.FLEET, None
    if replica_of(username) is None:
        device = None if username.startswith(RESERVED_PREFIX) else _device(session, username)
        if device is None or device.state != DeviceState.ACTIVE:
            return AuthorizationResult(result="deny")
        kind, device_id = AccountKind.DEVICE, device.id
    granted = allows(
        kind, Action(request.action), request.topic, device_id=device_id, share_unwrapped=True
    )
    return AuthorizationResult(result="allow" if granted else "deny")


def _device(session: Session, username: str) -> Device | None:
    """The device ``username`` names, if it is a device id the fleet has enrolled."""
    try:
        check_device_id(username)
    except ValueError:
        return None
    return session.get(Device, username)


def _authenticated(granted: bool) -> AuthenticationResult:
    return AuthenticationResult(result="allow" if granted else "deny", is_superuser=False)
