"""replicas and the rollout lease

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 22:54:49.671322

Reviewed after autogenerate: ``rolloutlease`` says which replica drives rollouts (its
holder, the term's ``epoch`` and its expiry; ``fleet.rollouts.lease``), ``fleetreplica``
each replica's heartbeat. The lease's one row is created here, free and long expired, so
replicas only ever update it: locking a row that exists is what fences them (two first
INSERTs would race instead).
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LONG_AGO = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def upgrade() -> None:
    op.create_table(
        "fleetreplica",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("seen_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("drained_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    lease = op.create_table(
        "rolloutlease",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("acquired_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(
        lease,
        [{"id": 1, "holder": None, "epoch": 0, "expires_at": _LONG_AGO, "acquired_at": _LONG_AGO}],
    )


def downgrade() -> None:
    op.drop_table("rolloutlease")
    op.drop_table("fleetreplica")
