"""each replica's ingest worker count

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 10:05:00.000000

Reviewed after autogenerate: ``fleetreplica.ingest_workers`` records a replica's
``--ingest-workers`` when it registers, so the replica that empties a dead one's MQTT
sessions takes over exactly its workers' (``fleet.ingest_workers.drain_ingest_sessions``)
instead of probing every possible worker number, which left an empty session on the
broker for each number that never ran. Rows from before get 0: no workers to empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fleetreplica", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ingest_workers", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("fleetreplica", schema=None) as batch_op:
        batch_op.drop_column("ingest_workers")
