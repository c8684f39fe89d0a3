"""model health: drift references, hourly drift and ground-truth sums, drift alerts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 03:40:00.000000

Reviewed after autogenerate: ``bundle.drift_reference`` keeps a bundle's
``drift-reference.json`` as parsed at upload; ``modelhealth`` holds, per model version,
cohort and hour, the devices' drift summaries merged and their ground-truth counts, kept
at ingest so the drift and accuracy views read a bounded number of rows
(``fleet.drift``); ``driftalert`` remembers each cohort's last verdict so an alert is
raised once per crossing (``fleet.drift_alerts``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drift_reference", sa.JSON(), nullable=True))

    op.create_table(
        "modelhealth",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("cohort", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("hour", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("summaries", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("drift", sa.JSON(), nullable=True),
        sa.Column("labelled", sa.BigInteger(), nullable=False),
        sa.Column("correct", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["modelversion.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_version_id", "cohort", "hour"),
    )

    op.create_table(
        "driftalert",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("cohort", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("drifting", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("changed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["modelversion.id"]),
        sa.PrimaryKeyConstraint("model_version_id", "cohort"),
    )


def downgrade() -> None:
    op.drop_table("driftalert")
    op.drop_table("modelhealth")
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.drop_column("drift_reference")
