"""enrollment tokens that may re-enroll a revoked device id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 22:10:00.000000

Reviewed after autogenerate: ``enrollmenttoken.reenroll_revoked`` says whether a token may
enroll an id that was revoked (an admin's explicit choice; without it such an id answers
409). Tokens already stored may not, through a server default the models do not declare
(autogenerate does not compare server defaults).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("enrollmenttoken", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reenroll_revoked", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("enrollmenttoken", schema=None) as batch_op:
        batch_op.drop_column("reenroll_revoked")
