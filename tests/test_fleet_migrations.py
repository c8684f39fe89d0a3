"""The packaged migrations against real SQLite and PostgreSQL databases.

``test_head_matches_the_models`` is the guard: it fails when a model changes without a
migration (``python -m fleet.migrate revision "..."`` writes one).
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select
from sqlmodel.sql.sqltypes import AutoString

from fleet import migrate
from fleet.db import make_engine
from fleet.migrate import check_schema, current_revision, downgrade, head_revision, upgrade
from fleet.models import (
    ApiToken,
    AuditEntry,
    Bundle,
    CommandRecord,
    Device,
    DeviceState,
    EnrollmentToken,
    FleetReplica,
    ModelVersion,
    Role,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutMode,
    RolloutState,
    Stage,
    TelemetryRecordRow,
)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_engine(postgres_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    name = re.sub(r"\W", "_", request.node.name)[:63]
    server = make_engine(postgres_url).execution_options(isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    server.dispose()
    engine = make_engine(f"{postgres_url.rsplit('/', 1)[0]}/{name}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """An empty database of each kind."""
    fixture: Engine = request.getfixturevalue(f"{request.param}_engine")
    return fixture


@pytest.fixture
def probe_table() -> Iterator[sa.Table]:
    """A table in the models that no migration creates, as a forgotten revision leaves."""
    table = sa.Table(
        "probe",
        SQLModel.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", AutoString(length=32), nullable=False),
    )
    yield table
    SQLModel.metadata.remove(table)


@pytest.fixture
def migrations_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged migrations copied and used in their place, to add revisions to."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", copy)
    return copy


def _next_revision() -> str:
    return f"{int(head_revision()) + 1:04d}"


def _add_revision(migrations: Path, upgrade_body: str) -> None:
    """A revision on top of the packaged head, as the next one written would be."""
    (migrations / "versions" / f"{_next_revision()}_extra.py").write_text(
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        f"revision = {_next_revision()!r}\n"
        f"down_revision = {head_revision()!r}\n\n\n"
        f"def upgrade() -> None:\n{upgrade_body}\n"
    )


def test_head_matches_the_models(engine: Engine) -> None:
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert check_schema(engine) == []


def test_upgrading_twice_is_a_no_op(engine: Engine) -> None:
    upgrade(engine)
    with Session(engine) as session:
        session.add(Device(id="dev-1", profile="rpi4", tags=["canary"]))
        session.commit()
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with Session(engine) as session:
        assert session.exec(select(Device.tags)).all() == [["canary"]]
    assert check_schema(engine) == []


def test_json_and_enum_columns_round_trip(engine: Engine) -> None:
    upgrade(engine)
    at = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    gate = {"min_healthy_ratio": 0.95, "soak_s": 60.0}
    with Session(engine) as session:
        version = ModelVersion(
            name="digits",
            version="1.0",
            stage=Stage.PRODUCTION,
            metrics={"accuracy": 0.97},
            hyperparameters={"layers": [64, 10], "dropout": None},
        )
        session.add(version)
        session.flush()
        assert version.id is not None
        bundle = Bundle(
            profile="rpi4",
            runtime="tflite",
            precision="int8",
            version="1.0",
            version_number=1,
            target_path="rpi4/digits-1.0.efb",
            sha256="0" * 64,
            length=123,
            model_version_id=version.id,
            bundle_name="digits-1.0",
        )
        session.add(bundle)
        session.flush()
        assert bundle.id is not None
        session.add_all(
            [
                Device(
                    id="dev-1", profile="rpi4", tags=["canary", "lab"], state=DeviceState.REVOKED
                ),
                Rollout(
                    id="r1",
                    bundle_id=bundle.id,
                    profile="rpi4",
                    tags=["lab"],
                    waves=["canary", "50", "100"],
                    gate=gate,
                    mode=RolloutMode.SHADOW,
                    state=RolloutState.AWAITING_APPROVAL,
                    last_gate={"verdict": "pass", "ratios": [1.0, 0.0]},
                    wave_started_at=at,
                ),
            ]
        )
        session.flush()
        session.add_all(
            [
                RolloutDevice(
                    rollout_id="r1",
                    device_id="dev-1",
                    wave=0,
                    rank="ab",
                    state=RolloutDeviceState.ROLLING_BACK,
                ),
                TelemetryRecordRow(
                    device_id="dev-1", record_id="rec-1", ts=at, extra={"temp_c": 51.5}
                ),
                CommandRecord(id="c1", device_id="dev-1", kind="deploy", payload={"n": [1, 2]}),
                AuditEntry(actor="fleet", action="pause", target="r1", after={"state": "paused"}),
                ApiToken(name="ops", role=Role.OPERATOR, token_hash="h1"),
                EnrollmentToken(
                    token_hash="h2",
                    profile="rpi4",
                    tags=["lab"],
                    uses_left=1,
                    expires_at=at,
                    created_by="ops",
                ),
            ]
        )
        session.commit()

    with Session(engine) as session:
        model = session.exec(select(ModelVersion)).one()
        assert (model.stage, model.metrics) == (Stage.PRODUCTION, {"accuracy": 0.97})
        assert model.hyperparameters == {"layers": [64, 10], "dropout": None}
        device = session.get_one(Device, "dev-1")
        assert (device.tags, device.state) == (["canary", "lab"], DeviceState.REVOKED)
        rollout = session.get_one(Rollout, "r1")
        assert (rollout.waves, rollout.gate, rollout.tags) == (
            ["canary", "50", "100"],
            gate,
            ["lab"],
        )
        assert (rollout.state, rollout.mode) == (RolloutState.AWAITING_APPROVAL, RolloutMode.SHADOW)
        assert rollout.last_gate == {"verdict": "pass", "ratios": [1.0, 0.0]}
        assert rollout.wave_started_at == at
        assert (
            session.get_one(RolloutDevice, ("r1", "dev-1")).state is RolloutDeviceState.ROLLING_BACK
        )
        record = session.get_one(TelemetryRecordRow, ("dev-1", "rec-1"))
        assert (record.extra, record.ts) == ({"temp_c": 51.5}, at)
        assert session.get_one(CommandRecord, "c1").payload == {"n": [1, 2]}
        audit = session.exec(select(AuditEntry)).one()
        assert (audit.before, audit.after) == (None, {"state": "paused"})
        assert session.exec(select(ApiToken.role)).one() is Role.OPERATOR
        assert session.exec(select(EnrollmentToken.tags)).one() == ["lab"]
        assert session.exec(
            select(Rollout).where(Rollout.state == RolloutState.AWAITING_APPROVAL)
        ).all()


def test_downgrade_to_base_then_upgrade(engine: Engine) -> None:
    upgrade(engine)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    inspector = sa.inspect(engine)
    assert set(inspector.get_table_names()) <= {"alembic_version"}
    if engine.dialect.name == "postgresql":
        assert inspector.get_enums() == []  # type: ignore[attr-defined]
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert check_schema(engine) == []


def test_check_schema_sees_what_no_migration_made(engine: Engine, probe_table: sa.Table) -> None:
    upgrade(engine)
    assert check_schema(engine) == ["add_table probe"]


def test_check_schema_sees_enum_members_on_postgresql(postgres_engine: Engine) -> None:
    """Autogenerate does not compare enum members; a PostgreSQL enum type rejects new ones."""
    upgrade(postgres_engine)
    with postgres_engine.begin() as connection:
        connection.exec_driver_sql("ALTER TYPE rolloutstate ADD VALUE 'STALE'")
    assert check_schema(postgres_engine) == [
        "enum rolloutstate (rollout.state): the database lacks [] and has extra ['STALE']"
    ]


def test_check_schema_sees_an_old_revision(sqlite_engine: Engine) -> None:
    upgrade(sqlite_engine)
    downgrade(sqlite_engine, "base")
    problems = check_schema(sqlite_engine)
    assert problems[0] == f"database at revision None, the migrations' head is {head_revision()}"
    assert "add_table rollout" in problems


def test_a_failed_migration_leaves_the_previous_revision(
    engine: Engine, migrations_copy: Path
) -> None:
    head = head_revision()
    upgrade(engine)
    _add_revision(
        migrations_copy,
        '    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))\n'
        '    raise RuntimeError("failed halfway")',
    )
    with pytest.raises(RuntimeError, match="failed halfway"):
        upgrade(engine)
    assert current_revision(engine) == head
    assert "half_done" not in sa.inspect(engine).get_table_names()


def test_sqlite_migration_leaving_broken_foreign_keys_is_refused(
    sqlite_engine: Engine, migrations_copy: Path
) -> None:
    """Foreign keys are off while migrating on SQLite, so they are checked before commit."""
    head = head_revision()
    upgrade(sqlite_engine)
    _add_revision(
        migrations_copy,
        "    op.execute(\n"
        '        "INSERT INTO rolloutdevice (rollout_id, device_id, wave, rank, state, detail, "\n'
        "        \"updated_at) VALUES ('gone', 'gone', 0, 'a', 'PENDING', '', '2025-01-01')\"\n"
        "    )",
    )
    with pytest.raises(RuntimeError, match="foreign keys point nowhere"):
        upgrade(sqlite_engine)
    assert current_revision(sqlite_engine) == head
    with Session(sqlite_engine) as session:
        assert session.exec(select(RolloutDevice)).all() == []


def test_sqlite_foreign_keys_are_on_again_after_migrating(sqlite_engine: Engine) -> None:
    upgrade(sqlite_engine)
    with sqlite_engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(sa.exc.IntegrityError), Session(sqlite_engine) as session:
        session.add(RolloutDevice(rollout_id="nope", device_id="nope", wave=0, rank="a"))
        session.commit()


def test_new_revision_writes_the_missing_migration(
    tmp_path: Path, migrations_copy: Path, probe_table: sa.Table
) -> None:
    """The developer's workflow, on a copy of the migrations: generate, then it applies."""
    head, expected = head_revision(), _next_revision()
    path = migrate.new_revision("add probe", f"sqlite:///{tmp_path / 'dev.db'}")

    assert path == migrations_copy / "versions" / f"{expected}_add_probe.py"
    text = path.read_text()
    assert f'down_revision: str | Sequence[str] | None = "{head}"' in text
    assert 'op.create_table(\n        "probe",' in text
    assert 'op.drop_table("probe")' in text
    assert '"note", sqlmodel.sql.sqltypes.AutoString(length=32)' in text
    for check in (["check"], ["format", "--check"]):  # alembic ran ruff on the new file
        lint = subprocess.run(
            [sys.executable, "-m", "ruff", *check, "--no-cache", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
    fresh = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        upgrade(fresh)
        assert current_revision(fresh) == expected
        assert check_schema(fresh) == []
    finally:
        fresh.dispose()


def test_0002_counts_step_failures_from_zero_and_clears_untyped_verdicts(engine: Engine) -> None:
    """Rollouts stored before 0002 get ``step_failures`` 0, and lose a ``last_gate`` of the
    old shape, which ``RolloutPublic`` could not read; a downgrade drops the column."""
    upgrade(engine, "0001")
    old_verdict = '{"healthy_ratio": 1.0, "failures": ["error rate 40.0% > ..."], "waiting": ""}'
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO modelversion (id, name, version, description, owner, stage, "
            "created_at, created_by) VALUES (1, 'digits', '1.0', '', '', 'PRODUCTION', "
            "'2025-01-01', '')"
        )
        connection.exec_driver_sql(
            "INSERT INTO bundle (id, profile, runtime, precision, version, version_number, "
            "target_path, sha256, length, model_version_id, bundle_name, created_at) VALUES "
            "(1, 'host', 'onnxruntime', 'fp32', '1.0', 1, 'host/digits-1.0.efb', '0', 1, 1, "
            "'digits-1.0', '2025-01-01')"
        )
        connection.execute(
            sa.text(
                "INSERT INTO rollout (id, bundle_id, profile, auto_advance, on_failure, mode, "
                "state, wave, wave_started_at, reason, last_gate, created_by, created_at, "
                "updated_at) VALUES ('r1', 1, 'host', true, 'pause', 'DEPLOY', 'PAUSED', 0, "
                "'2025-01-01', 'gate failed', :verdict, '', '2025-01-01', '2025-01-01')"
            ),
            {"verdict": old_verdict},
        )

    upgrade(engine)
    with Session(engine) as session:
        rollout = session.get_one(Rollout, "r1")
        assert (rollout.step_failures, rollout.last_gate) == (0, None)
        assert (rollout.state, rollout.reason) == (RolloutState.PAUSED, "gate failed")
    assert check_schema(engine) == []

    downgrade(engine, "0001")
    columns = {c["name"] for c in sa.inspect(engine).get_columns("rollout")}
    assert "step_failures" not in columns and "last_gate" in columns
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT state FROM rollout").scalar() == "PAUSED"


def test_0004_widens_device_version_numbers_and_its_downgrade_clears_what_int_cannot_hold(
    engine: Engine,
) -> None:
    """A status may report a version number up to 2^53 - 1, past PostgreSQL's INTEGER: 0004
    makes the column BIGINT. Going back to 0003 clears the numbers INTEGER cannot hold,
    keeps the others, and drops the quarantine table."""
    upgrade(engine)
    with Session(engine) as session:
        session.add(Device(id="big", profile="host", bundle_version_number=2**53 - 1))
        session.add(Device(id="small", profile="host", bundle_version_number=7))
        session.commit()
    with Session(engine) as session:
        assert session.get_one(Device, "big").bundle_version_number == 2**53 - 1

    downgrade(engine, "0003")
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT id, bundle_version_number FROM device ORDER BY id"
        ).all()
    assert [tuple(row) for row in rows] == [("big", None), ("small", 7)]
    assert "quarantine" not in sa.inspect(engine).get_table_names()
    upgrade(engine)
    assert check_schema(engine) == []


def test_0008_gives_replicas_registered_before_it_no_ingest_workers(engine: Engine) -> None:
    """A replica row from before 0008 reads 0 workers (nothing to drain, as before); a
    downgrade drops the count and keeps the replicas."""
    upgrade(engine, "0007")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO fleetreplica (id, started_at, seen_at) "
            "VALUES ('old', '2026-11-30 09:00:00', '2026-11-30 09:00:00')"
        )
    upgrade(engine)
    with Session(engine) as session:
        assert session.get_one(FleetReplica, "old").ingest_workers == 0
        session.add(
            FleetReplica(
                id="new",
                started_at=dt.datetime(2026, 11, 30, 10, tzinfo=dt.UTC),
                seen_at=dt.datetime(2026, 11, 30, 10, tzinfo=dt.UTC),
                ingest_workers=3,
            )
        )
        session.commit()
    with Session(engine) as session:
        assert session.get_one(FleetReplica, "new").ingest_workers == 3

    downgrade(engine, "0007")
    assert "ingest_workers" not in {
        c["name"] for c in sa.inspect(engine).get_columns("fleetreplica")
    }
    with engine.connect() as connection:
        ids = connection.exec_driver_sql("SELECT id FROM fleetreplica ORDER BY id").scalars()
        assert list(ids) == ["new", "old"]
    upgrade(engine)
    assert check_schema(engine) == []
