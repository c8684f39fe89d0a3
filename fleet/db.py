"""The database: one engine per server, schema brought up to date by Alembic at start."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

__all__ = ["make_engine", "session_scope"]


def make_engine(url: str, *, idle_in_transaction_s: float | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    ``postgresql://`` URLs use psycopg 3 (SQLAlchemy's default driver name is psycopg2).
    ``idle_in_transaction_s`` (PostgreSQL): the server ends a session whose transaction
    waits that long for its next statement, so a process paused or stalled mid-transaction
    (SIGSTOP, a VM frozen) does not hold its row locks over every other replica.
    """
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if idle_in_transaction_s is not None:
        timeout_ms = max(1, round(idle_in_transaction_s * 1000))
        kwargs["connect_args"] = {
            "options": f"-c idle_in_transaction_session_timeout={timeout_ms}",
            **kwargs.get("connect_args", {}),
        }
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **kwargs)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
