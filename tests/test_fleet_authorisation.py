"""Who is calling, decided by ``fleet/api/deps.py`` on a real SQLite database: the
answer for each kind of token, and for each role against each role a route needs.

The route table (tests/test_fleet_route_roles.py) checks every route through HTTP; this
checks the dependencies themselves, with the messages and headers a caller is given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator

import pytest
from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, create_engine

from fleet.api.deps import Principal, _principal, require
from fleet.models import ApiToken, Device, DeviceState, Role
from fleet.security import hash_token, new_token

BEARER = {"WWW-Authenticate": "Bearer"}


@pytest.fixture
def session() -> Iterator[Session]:
    engine: Engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(ApiToken(name="ops", role=Role.OPERATOR, token_hash=hash_token("efa_ops")))
        session.add(
            ApiToken(
                name="gone",
                role=Role.ADMIN,
                token_hash=hash_token("efa_gone"),
                revoked_at=dt.datetime.now(dt.UTC),
            )
        )
        session.add(Device(id="cam-1", profile="host", api_token_hash=hash_token("efd_cam1")))
        session.add(
            Device(
                id="cam-2",
                profile="host",
                api_token_hash=hash_token("efd_cam2"),
                state=DeviceState.REVOKED,
            )
        )
        session.commit()
        yield session
    engine.dispose()


def bearer(token: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def test_an_api_token_is_its_name_and_role(session: Session) -> None:
    assert _principal(session, bearer("efa_ops")) == Principal(name="ops", role=Role.OPERATOR)


def test_a_device_token_is_the_device_without_a_role(session: Session) -> None:
    principal = _principal(session, bearer("efd_cam1"))
    assert principal == Principal(name="device:cam-1", role=None, device_id="cam-1")


REFUSED = {
    "no token": (None, "send an API token: Authorization: Bearer TOKEN"),
    "an unknown token": (bearer("efa_nobody"), "unknown or revoked token"),
    "a revoked API token": (bearer("efa_gone"), "unknown or revoked token"),
    "a revoked device's token": (bearer("efd_cam2"), "unknown or revoked token"),
}


@pytest.mark.parametrize(("credentials", "detail"), REFUSED.values(), ids=REFUSED)
def test_a_caller_without_a_valid_token_is_told_401_and_how_to_authenticate(
    session: Session, credentials: HTTPAuthorizationCredentials | None, detail: str
) -> None:
    with pytest.raises(HTTPException) as refused:
        _principal(session, credentials)
    assert (refused.value.status_code, refused.value.detail) == (401, detail)
    assert refused.value.headers == BEARER


VIEWER = Principal(name="v", role=Role.VIEWER)
OPERATOR = Principal(name="o", role=Role.OPERATOR)
ADMIN = Principal(name="a", role=Role.ADMIN)
DEVICE = Principal(name="device:cam-1", role=None, device_id="cam-1")

# (who, needed) -> what the token is called in the 403, or None: let in
ROLES = {
    (VIEWER, Role.VIEWER): None,
    (VIEWER, Role.OPERATOR): "viewer",
    (VIEWER, Role.ADMIN): "viewer",
    (OPERATOR, Role.VIEWER): None,
    (OPERATOR, Role.OPERATOR): None,
    (OPERATOR, Role.ADMIN): "operator",
    (ADMIN, Role.VIEWER): None,
    (ADMIN, Role.OPERATOR): None,
    (ADMIN, Role.ADMIN): None,
    (DEVICE, Role.VIEWER): "device",
    (DEVICE, Role.OPERATOR): "device",
    (DEVICE, Role.ADMIN): "device",
}


@pytest.mark.parametrize(
    ("who", "needed", "held"),
    [(who, needed, held) for (who, needed), held in ROLES.items()],
    ids=[f"{who.name} needs {needed}" for who, needed in ROLES],
)
def test_each_role_passes_only_where_its_rank_allows(
    who: Principal, needed: Role, held: str | None
) -> None:
    check = require(needed)
    if held is None:
        assert check(who) is who
        return
    with pytest.raises(HTTPException) as refused:
        check(who)
    assert refused.value.status_code == 403
    assert refused.value.detail == f"this needs the {needed.value} role; the token is {held}"


def test_tokens_are_long_random_and_stored_as_their_sha256() -> None:
    first, second = new_token("efa"), new_token("efa")
    assert re.fullmatch(r"efa_[A-Za-z0-9_-]{43}", first)
    assert first != second
    assert hash_token(first) == hashlib.sha256(first.encode()).hexdigest()
