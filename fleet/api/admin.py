"""``/api/v1/tokens`` and ``/api/v1/audit``: API tokens with roles, and the audit log."""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import col, select

from .. import audit
from ..errors import NotFoundError
from ..models import ApiToken, ApiTokenCreate, ApiTokenPublic, AuditEntry, utcnow
from ..security import hash_token, new_token
from .deps import Admin, SessionDep

router = APIRouter(tags=["admin"])


class ApiTokenIssued(ApiTokenPublic):
    token: str
    """Shown once."""


@router.post("/tokens", status_code=201)
def create_token(data: ApiTokenCreate, session: SessionDep, who: Admin) -> ApiTokenIssued:
    token = new_token("efa")
    row = ApiToken(name=data.name, role=data.role, token_hash=hash_token(token))
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=who.name,
        action="token.create",
        target=f"token:{row.id}",
        after=audit.snapshot(row),
    )
    session.commit()
    return ApiTokenIssued.model_validate(row, update={"token": token})


@router.get("/tokens")
def list_tokens(session: SessionDep, _: Admin) -> list[ApiTokenPublic]:
    return [ApiTokenPublic.model_validate(t) for t in session.exec(select(ApiToken))]


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: int, session: SessionDep, who: Admin) -> ApiTokenPublic:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token with id {token_id}")
    before = audit.snapshot(row)
    row.revoked_at = row.revoked_at or utcnow()
    session.add(row)
    audit.record(
        session,
        actor=who.name,
        action="token.revoke",
        target=f"token:{token_id}",
        before=before,
        after=audit.snapshot(row),
    )
    session.commit()
    return ApiTokenPublic.model_validate(row)


@router.get("/audit")
def audit_log(
    session: SessionDep, _: Admin, limit: int = 100, action: str | None = None
) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(min(limit, 10_000))
    if action is not None:
        query = query.where(AuditEntry.action == action)
    return list(session.exec(query))
