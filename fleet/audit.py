"""The audit log: every mutating call leaves who, what, when, and the record before/after."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, SQLModel

from .models import AuditEntry

__all__ = ["record", "snapshot"]


def snapshot(row: SQLModel | None, *, exclude: set[str] | None = None) -> dict[str, Any] | None:
    """A JSON-ready copy of ``row`` for ``before``/``after``; secrets are left out."""
    if row is None:
        return None
    secret = {"password_hash", "api_token_hash", "token_hash"}
    return row.model_dump(mode="json", exclude=secret | (exclude or set()))


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Add an entry to ``session``; it commits with the change it describes."""
    session.add(AuditEntry(actor=actor, action=action, target=target, before=before, after=after))
