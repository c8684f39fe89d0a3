"""What routes depend on: the server, a database session, and who is calling.

Callers present ``Authorization: Bearer TOKEN``: an API token (a role: viewer, operator,
admin; each role can do what the ones before it can) or a device's token (enough to fetch
bundles and call the cloud inference endpoint, nothing else).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, col, select

from ..models import ApiToken, Device, DeviceState, Role
from ..security import hash_token

if TYPE_CHECKING:
    from ..server import FleetServer

__all__ = [
    "Admin",
    "DeviceOrViewer",
    "Operator",
    "Principal",
    "ServerDep",
    "SessionDep",
    "Viewer",
    "require",
]


def _server(request: Request) -> FleetServer:
    server: FleetServer = request.app.state.fleet
    return server


ServerDep = Annotated["FleetServer", Depends(_server)]


def _session(server: ServerDep) -> Iterator[Session]:
    with Session(server.db) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]

_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``name`` goes into the audit log."""

    name: str
    role: Role | None
    device_id: str | None = None


def _principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send an API token: Authorization: Bearer TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_token(credentials.credentials)
    token = session.exec(
        select(ApiToken).where(ApiToken.token_hash == digest, col(ApiToken.revoked_at).is_(None))
    ).first()
    if token is not None:
        return Principal(name=token.name, role=token.role)
    device = session.exec(
        select(Device).where(Device.api_token_hash == digest, Device.state == DeviceState.ACTIVE)
    ).first()
    if device is not None:
        return Principal(name=f"device:{device.id}", role=None, device_id=device.id)
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "unknown or revoked token",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if principal.role is None or not principal.role.allows(role):
            held = principal.role.value if principal.role else "device"
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this needs the {role.value} role; the token is {held}"
            )
        return principal

    return check


def _device_or_viewer(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    return principal  # any valid token: a device's, or any role's


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
DeviceOrViewer = Annotated[Principal, Depends(_device_or_viewer)]
