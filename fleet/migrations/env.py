"""Alembic's entry point, run by ``fleet.migrate``, which passes the connection in.

Batch mode is on for every backend: SQLite needs it to alter a table (it copies the
table), and PostgreSQL runs the same batch operations as plain ``ALTER TABLE``, so one
revision serves both whichever database it was generated against.
"""

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import fleet.models  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "fleet's migrations run through fleet.migrate (upgrade, new_revision), "
        "which passes a connection in config.attributes['connection']; "
        "offline (--sql) mode is not supported"
    )
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
