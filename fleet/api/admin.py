"""``/api/v1/tokens``, ``/api/v1/whoami`` and ``/api/v1/audit``: API tokens with roles,
and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from sqlmodel import col, select

from .. import tokens
from ..bounds import MAX_ROW_ID, Name
from ..models import ApiToken, ApiTokenCreate, ApiTokenPublic, AuditEntry, Role
from .deps import Admin, SessionDep, Viewer
from .responses import errors

router = APIRouter(tags=["admin"], responses=errors(401, 403))


class ApiTokenIssued(ApiTokenPublic):
    token: str
    """Shown once."""


class Caller(BaseModel):
    name: str
    role: Role


@router.get("/whoami")
def whoami(who: Viewer) -> Caller:
    """The calling token's name and role: what a client may offer its user."""
    assert who.role is not None  # a device's token never passes Viewer
    return Caller(name=who.name, role=who.role)


@router.post("/tokens", status_code=201, responses=errors(400))
def create_token(data: ApiTokenCreate, session: SessionDep, who: Admin) -> ApiTokenIssued:
    row, token = tokens.issue_api_token(session, name=data.name, role=data.role, actor=who.name)
    session.commit()
    return ApiTokenIssued.model_validate(row, update={"token": token})


@router.get("/tokens")
def list_tokens(session: SessionDep, _: Admin) -> list[ApiTokenPublic]:
    return [ApiTokenPublic.model_validate(t) for t in session.exec(select(ApiToken))]


@router.delete("/tokens/{token_id}", responses=errors(404, 409))
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], session: SessionDep, who: Admin
) -> ApiTokenPublic:
    """Revoke a token. The last active admin token cannot be revoked (409)."""
    row = tokens.revoke_api_token(session, token_id=token_id, actor=who.name)
    session.commit()
    return ApiTokenPublic.model_validate(row)


@router.get("/audit")
def audit_log(
    session: SessionDep,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    action: Name | None = None,
) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    return list(session.exec(query))
