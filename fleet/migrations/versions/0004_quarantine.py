"""quarantine, health windows on the fleet's clock, 64-bit device version numbers

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 21:31:22.828142

Reviewed after autogenerate: ``quarantine`` keeps the device messages the database refused,
one row each, instead of the batches they came in (``fleet.bridge``). Health gates now cut
telemetry windows on ``received_at``, the fleet's clock, rather than ``ts``, the device's:
``ix_telemetry_bundle_ts`` gives way to ``ix_telemetry_bundle_received_at``.
``device.bundle_version_number`` becomes BIGINT: the MQTT contract allows version numbers
up to 2^53 - 1 and PostgreSQL's INTEGER stops at 2^31 - 1 (SQLite's integers are 64-bit
either way; batch mode copies the table there). A downgrade cannot keep the numbers over
INTEGER's range and clears them; the device's next status reports its number again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("topic", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.Column("payload_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_quarantine_device_id"), "quarantine", ["device_id"], unique=False)
    op.create_index(op.f("ix_quarantine_received_at"), "quarantine", ["received_at"], unique=False)

    op.drop_index("ix_telemetry_bundle_ts", table_name="telemetry")
    op.create_index(
        "ix_telemetry_bundle_received_at", "telemetry", ["bundle", "received_at"], unique=False
    )

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.alter_column(
            "bundle_version_number",
            existing_type=sa.Integer(),
            type_=sa.BigInteger(),
            existing_nullable=True,
        )


def downgrade() -> None:
    op.execute(
        "UPDATE device SET bundle_version_number = NULL WHERE bundle_version_number > 2147483647"
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.alter_column(
            "bundle_version_number",
            existing_type=sa.BigInteger(),
            type_=sa.Integer(),
            existing_nullable=True,
        )

    op.drop_index("ix_telemetry_bundle_received_at", table_name="telemetry")
    op.create_index("ix_telemetry_bundle_ts", "telemetry", ["bundle", "ts"], unique=False)

    op.drop_table("quarantine")
