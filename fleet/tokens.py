"""API tokens: issue one, revoke one, and never leave the fleet without an admin.

The API, the server's first start and ``edgefleet fleet admin-token`` all issue tokens
here, so each leaves an audit entry. Revoking refuses to take away the last active admin
token (nobody could make tokens again); the check holds when two admins revoke each other
at once: on PostgreSQL the active admin rows are locked first, and on SQLite the count is
taken inside the write transaction the revocation opened.
"""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from . import audit
from .errors import ConflictError, NotFoundError
from .models import ApiToken, Role, utcnow
from .security import hash_token, new_token

__all__ = ["TOKEN_PREFIX", "active_admins", "issue_api_token", "revoke_api_token"]

TOKEN_PREFIX = "efa"


def issue_api_token(session: Session, *, name: str, role: Role, actor: str) -> tuple[ApiToken, str]:
    """A new token (its row, flushed, and the secret, which is never stored)."""
    token = new_token(TOKEN_PREFIX)
    row = ApiToken(name=name, role=role, token_hash=hash_token(token))
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="token.create",
        target=f"token:{row.id}",
        after=audit.snapshot(row),
    )
    return row, token


def active_admins(session: Session) -> int:
    return session.exec(
        select(func.count())
        .select_from(ApiToken)
        .where(ApiToken.role == Role.ADMIN, col(ApiToken.revoked_at).is_(None))
    ).one()


def revoke_api_token(session: Session, *, token_id: int, actor: str) -> ApiToken:
    """Revoke ``token_id`` (again: a no-op); ``ConflictError`` if it is the last active
    admin token. The caller commits."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token with id {token_id}")
    if row.revoked_at is not None:
        return row
    last_admin_check = row.role == Role.ADMIN
    if last_admin_check:
        session.exec(
            select(ApiToken.id)
            .where(ApiToken.role == Role.ADMIN, col(ApiToken.revoked_at).is_(None))
            .with_for_update()
        ).all()
    before = audit.snapshot(row)
    row.revoked_at = utcnow()
    session.add(row)
    session.flush()
    if last_admin_check and active_admins(session) == 0:
        raise ConflictError(
            f"token {token_id} ({row.name}) is the last active admin token: revoking it would "
            "leave nobody able to make tokens; create another admin token first "
            "(POST /api/v1/tokens, or `edgefleet fleet admin-token` on the server)"
        )
    audit.record(
        session,
        actor=actor,
        action="token.revoke",
        target=f"token:{token_id}",
        before=before,
        after=audit.snapshot(row),
    )
    return row
