"""initial

Revision ID: 0001
Revises:
Create Date: 2026-11-25 05:32:58.894754

Reviewed after autogenerate: enum columns store the members' names (SQLModel's way), as
native enum types on PostgreSQL and VARCHAR on SQLite; ``drop_table`` leaves those types
behind, so the downgrade drops them. JSON columns are ``JSON`` on both.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apitoken",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("role", sa.Enum("VIEWER", "OPERATOR", "ADMIN", name="role"), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_apitoken_token_hash"), "apitoken", ["token_hash"], unique=True)

    op.create_table(
        "auditentry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("target", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_auditentry_at"), "auditentry", ["at"], unique=False)

    op.create_table(
        "commandrecord",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("rollout_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("last_ack", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_commandrecord_device_id"), "commandrecord", ["device_id"], unique=False
    )
    op.create_index(
        op.f("ix_commandrecord_rollout_id"), "commandrecord", ["rollout_id"], unique=False
    )

    op.create_table(
        "device",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("state", sa.Enum("ACTIVE", "REVOKED", name="devicestate"), nullable=False),
        sa.Column("password_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("certificate_serial", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("api_token_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("agent_version", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("bundle", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("bundle_version_number", sa.Integer(), nullable=True),
        sa.Column("agent_state", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("last_seen", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("enrolled_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_device_api_token_hash"), "device", ["api_token_hash"], unique=False)
    op.create_index(op.f("ix_device_profile"), "device", ["profile"], unique=False)
    op.create_index(op.f("ix_device_state"), "device", ["state"], unique=False)

    op.create_table(
        "enrollmenttoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_enrollmenttoken_token_hash"), "enrollmenttoken", ["token_hash"], unique=True
    )

    op.create_table(
        "modelversion",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("source_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("training_data", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("model_card", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "stage",
            sa.Enum("DEVELOPMENT", "STAGING", "PRODUCTION", "ARCHIVED", name="stage"),
            nullable=False,
        ),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version"),
    )
    op.create_index(op.f("ix_modelversion_name"), "modelversion", ["name"], unique=False)
    op.create_index(op.f("ix_modelversion_stage"), "modelversion", ["stage"], unique=False)

    op.create_table(
        "telemetry",
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("record_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("ts", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("received_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("bundle", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("inferences", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("fallbacks", sa.Integer(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("shadow_bundle", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("shadow_compared", sa.Integer(), nullable=False),
        sa.Column("shadow_agreed", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "record_id"),
    )
    op.create_index("ix_telemetry_bundle_ts", "telemetry", ["bundle", "ts"], unique=False)

    op.create_table(
        "bundle",
        sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("runtime", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("precision", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("version", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("version_number", sa.Integer(), nullable=False),
        sa.Column("target_path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["modelversion.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("target_path"),
    )
    op.create_index(
        op.f("ix_bundle_model_version_id"), "bundle", ["model_version_id"], unique=False
    )

    op.create_table(
        "rollout",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("waves", sa.JSON(), nullable=True),
        sa.Column("gate", sa.JSON(), nullable=True),
        sa.Column("auto_advance", sa.Boolean(), nullable=False),
        sa.Column("on_failure", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("mode", sa.Enum("DEPLOY", "SHADOW", name="rolloutmode"), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "DEPLOYING",
                "SOAKING",
                "AWAITING_APPROVAL",
                "PAUSED",
                "ROLLING_BACK",
                "COMPLETED",
                "ROLLED_BACK",
                "ABORTED",
                name="rolloutstate",
            ),
            nullable=False,
        ),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("soak_started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("last_gate", sa.JSON(), nullable=True),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["bundle_id"],
            ["bundle.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_rollout_state"), "rollout", ["state"], unique=False)

    op.create_table(
        "rolloutdevice",
        sa.Column("rollout_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("rank", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "PENDING",
                "COMMANDED",
                "IN_PROGRESS",
                "HEALTHY",
                "FAILED",
                "ROLLING_BACK",
                "ROLLED_BACK",
                name="rolloutdevicestate",
            ),
            nullable=False,
        ),
        sa.Column("previous_bundle_id", sa.Integer(), nullable=True),
        sa.Column("command_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("last_ack", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("commanded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollout.id"],
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_index(
        op.f("ix_rolloutdevice_command_id"), "rolloutdevice", ["command_id"], unique=False
    )
    op.create_index(
        "ix_rolloutdevice_rollout_wave", "rolloutdevice", ["rollout_id", "wave"], unique=False
    )


def downgrade() -> None:
    op.drop_table("rolloutdevice")
    op.drop_table("rollout")
    op.drop_table("bundle")
    op.drop_table("telemetry")
    op.drop_table("modelversion")
    op.drop_table("enrollmenttoken")
    op.drop_table("device")
    op.drop_table("commandrecord")
    op.drop_table("auditentry")
    op.drop_table("apitoken")
    for enum in (
        "role",
        "devicestate",
        "stage",
        "rolloutmode",
        "rolloutstate",
        "rolloutdevicestate",
    ):
        sa.Enum(name=enum).drop(op.get_bind(), checkfirst=True)
