"""The ``edgefleet`` command line, through typer's runner and the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from contracts.cli import EXIT_ERROR
from edgefleet.cli import app
from hw_profiles import load_profile

from .conftest import SHIPPED_PROFILES

runner = CliRunner()


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and group under ``command`` (typer ships its own click: duck-typed)."""
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


ALL_COMMANDS = sorted(_command_paths(typer.main.get_command(app)))


def test_the_cli_has_a_group_per_package() -> None:
    top_level = {path[0] for path in ALL_COMMANDS if len(path) == 1}
    assert top_level == {"profiles", "compile", "ota", "fleet", "agent", "demo"}


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "edgefleet")
def test_every_command_has_help_readable_at_80_columns(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines()), result.output
    assert "<bool>" not in result.output and "…" not in result.output
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    for param in getattr(command, "params", []):
        if getattr(param, "hidden", False):
            continue
        for option in param.opts:
            if option.startswith("--"):
                assert option in result.output, f"{option} is cut from the help"


def test_version_prints_the_installed_version() -> None:
    import importlib.metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"edgefleet {importlib.metadata.version('edgefleet')}"


@pytest.mark.parametrize(
    "args",
    [
        ["ota", "delta", "missing-old.efb", "missing-new.efb", "--out", "d.delta"],
        ["ota", "patch", "missing-old.efb", "missing.delta", "--out", "x.efb"],
        ["ota", "verify", "missing.efb", "--root", "missing-root.json"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_missing_file_is_one_error_line_not_a_traceback(args: list[str], tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(script), *args], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert result.returncode == EXIT_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) <= 3


def test_profiles_list_shows_the_six_profiles() -> None:
    result = runner.invoke(app, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    for name in SHIPPED_PROFILES:
        assert name in result.output
    assert "cortex-a72" in result.output and "sm_87" in result.output


def test_profiles_list_json_is_every_profile_in_full() -> None:
    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0, result.output
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert set(listed) == SHIPPED_PROFILES
    assert listed["rpi5"] == load_profile("rpi5").model_dump(mode="json")


def test_profiles_list_reports_a_broken_user_profile_and_still_lists_the_rest(
    write_profile: Callable[..., Path],
) -> None:
    path = write_profile("broken", lambda t: t.replace("cores = 4", "cores = -1"))
    result = runner.invoke(app, ["profiles", "list"])
    assert result.exit_code == EXIT_ERROR
    assert "rpi4" in result.stdout
    assert str(path) in result.stderr.replace("\n", "")
    assert "resources.cores" in result.stderr


def test_profiles_show_json_round_trips() -> None:
    result = runner.invoke(app, ["profiles", "show", "jetson-nano", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == load_profile("jetson-nano").model_dump(mode="json")


def test_profiles_show_prints_the_whole_profile() -> None:
    result = runner.invoke(app, ["profiles", "show", "rpi4"])
    assert result.exit_code == 0, result.output
    for text in ("cortex-a72", "aarch64-linux-gnu-gcc", "min_top1_agreement", "Bookworm"):
        assert text in result.output


def test_profiles_show_unknown_name_fails_with_the_available_names() -> None:
    result = runner.invoke(app, ["profiles", "show", "rpi9"])
    assert result.exit_code == EXIT_ERROR
    assert "no hardware profile named 'rpi9'" in result.stderr
    assert "rpi4" in result.stderr


def test_the_installed_console_script_runs() -> None:
    script = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(script), "profiles", "show", "rpi4", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"]["cpu"]["mcpu"] == "cortex-a72"


def test_the_cli_starts_on_a_device_without_the_compiler_libraries() -> None:
    """An edgefleet[agent] install has no onnx, TVM or TensorFlow; --help must still work."""
    blocked = ["onnx", "tvm", "tensorflow", "keras", "tf2onnx", "fastapi", "sqlmodel"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from edgefleet.cli import app\n"
        "app(['--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "profiles" in result.stdout
