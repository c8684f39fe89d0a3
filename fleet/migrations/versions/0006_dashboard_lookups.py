"""indexes for the dashboard's lookups by device and by audit target

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:12:03.114520

Reviewed after autogenerate: a device's page reads its rollout memberships
(``rolloutdevice`` is keyed by rollout first, so finding one device's rows scanned every
rollout's), and a rollout's or a device's history reads the audit entries about it, newest
last (``auditentry`` had only its time indexed).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_rolloutdevice_device_id", "rolloutdevice", ["device_id"], unique=False)
    op.create_index("ix_auditentry_target_id", "auditentry", ["target", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_auditentry_target_id", table_name="auditentry")
    op.drop_index("ix_rolloutdevice_device_id", table_name="rolloutdevice")
