"""Secrets the fleet hands out: API, enrollment and device tokens.

A token is shown once, when it is created; only its SHA-256 is stored, so a copy of the
database lets nobody in. The prefix says what a token is for when one turns up in a log.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["hash_token", "new_token"]


def new_token(prefix: str) -> str:
    """``PREFIX_`` + 43 URL-safe characters (256 random bits)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
