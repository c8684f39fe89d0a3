"""rollout step failures, typed gate verdicts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 20:56:30.635063

Reviewed after autogenerate: ``rollout.step_failures`` counts the engine's failed steps in
a row on a rollout (it is paused at ``rollout_max_step_failures``). Rollouts already stored
start at 0, through a server default the models do not declare (autogenerate does not
compare server defaults). ``rollout.last_gate`` now holds a typed ``GateVerdict``; the
verdicts stored before have another shape, which the API could not read, so they are
cleared: the audit log's rollout snapshots keep them, and the rollout's ``reason`` keeps
the words of the last one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("step_failures", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute("UPDATE rollout SET last_gate = NULL")


def downgrade() -> None:
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.drop_column("step_failures")
