"""Every example under examples/ runs as its README says (tests/utils/walkthrough.py), and
leaves what it promises. examples/digits is run by tests/conftest.py's ``digits``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils.postgres import DATABASE, USER, postgres_available, postgres_server
from tests.utils.walkthrough import ROOT, run_walkthrough

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
EM_AARCH64 = 183


def test_every_example_has_a_readme_and_a_test() -> None:
    tested = {"digits", "keras_tflite", "custom_profile", "postgres_scale"}
    found = {p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert found == tested
    for name in found:
        assert (EXAMPLES / name / "README.md").is_file(), name


def test_keras_tflite_deploys_an_int8_litert_model_to_an_agent(tmp_path: Path) -> None:
    result = run_walkthrough(
        EXAMPLES / "keras_tflite" / "README.md",
        tmp_path,
        copies=["examples/keras_tflite"],
        env={},
        timeout_s=600,
    )
    assert "served by local with wine-rpi4-1.0.0" in result.stdout
    report = json.loads((tmp_path / "build" / "wine-rpi4" / "report.json").read_text())
    assert report["profile"] == "rpi4"
    assert "litert:int8" in {a["id"] for a in report["artifacts"]}


def test_custom_profile_compiles_for_a_board_of_its_own(tmp_path: Path) -> None:
    result = run_walkthrough(
        EXAMPLES / "custom_profile" / "README.md",
        tmp_path,
        copies=["examples/custom_profile", "examples/digits/train.py"],
        env={},
        timeout_s=600,
    )
    assert "rk3588" in result.stdout and "cortex-a76" in result.stdout
    out = tmp_path / "build" / "rk3588"
    assert json.loads((out / "report.json").read_text())["profile"] == "rk3588"
    assert (out / "tvm-fp32.so").read_bytes()[18] == EM_AARCH64
    assert (out / "onnxruntime-int8.onnx").is_file()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster's database, through its Unix socket: the walkthrough's
    private network namespace has a loopback of its own, the file system is shared."""
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are needed: install postgresql")
    logs = tmp_path / "postgres"
    logs.mkdir()
    with postgres_server(logs) as url:
        port = url.rsplit(":", 1)[1].split("/", 1)[0]
        sockets = list(Path(tempfile.gettempdir()).glob(f"edgefleet-pg-*/.s.PGSQL.{port}"))
        assert len(sockets) == 1, sockets
        yield f"postgresql://{USER}@/{DATABASE}?host={sockets[0].parent}&port={port}"


def test_postgres_scale_runs_two_replicas_on_one_database(
    tmp_path: Path, database_url: str
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_walkthrough(
        EXAMPLES / "postgres_scale" / "README.md",
        workdir,
        copies=["examples/postgres_scale"],
        env={"DATABASE_URL": database_url},
        timeout_s=600,
    )
    # Twenty devices enrolled through b, listed through a; both replicas alive, one leader.
    assert sum(line.startswith("sim-") for line in result.stdout.splitlines()) == 20
    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8001"):
        assert f"{url}: replicas " in result.stdout
    assert "a (alive)" in result.stdout and "b (alive)" in result.stdout
