"""The ``edgefleet`` command line against a real ``fleet serve`` process: list commands,
``--json``, the rollout dry run, refusals before anything is sent, one-line errors, and
``fleet serve`` refusing a busy port before it sets anything up.

Commands run through typer's runner in this process, talking real HTTP to the served
fleet; the exit-code checks of ``fleet serve`` run the installed script.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from contracts.cli import EXIT_CANNOT_START, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from edgefleet.cli import app
from fleet import cli as fleet_cli
from fleet.models import RolloutCreate, RolloutState, Stage
from ota.archive import write_bundle
from tests.utils.bundles import toy_manifest
from tests.utils.http import serve_app
from tests.utils.mqtt import free_port
from tests.utils.served_fleet import EDGEFLEET, ServedFleet, serve_fleet

runner = CliRunner()

DEVICES = 6
CANARIES = {"sim-000", "sim-003"}

# Commands that print no result of their own, so have no --json; each says why.
NO_RESULT = {
    ("fleet", "serve"),  # a long-running server: it prints where it listens, then logs
    ("fleet", "broker"),  # a long-running broker, likewise
    ("agent", "run"),  # the device daemon: logs only
    ("demo",),  # a narrated walkthrough; its results are the files it writes
    # The TUF conformance suite's client (ota/conformance_cli.py): CLIENT-CLI.md fixes its
    # interface; it prints nothing on success and answers with its exit code.
    ("ota", "tuf-client", "init"),
    ("ota", "tuf-client", "refresh"),
    ("ota", "tuf-client", "download"),
}


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf command under ``command`` with its path (groups are walked, not yielded)."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in subcommands.items():
        yield from _commands(sub, (*path, name))


LEAVES = dict(_commands(typer.main.get_command(app)))


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def _one_error_line(result: Any) -> str:
    """The ``error:`` line a failed command printed, checking that it is the only output
    on stderr and that no traceback came with it."""
    assert result.exit_code == EXIT_ERROR, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "[{" not in result.stderr
    return str(lines[0])


# --- --json everywhere ----------------------------------------------------------------------


def test_every_command_that_prints_a_result_has_json() -> None:
    assert not NO_RESULT - set(LEAVES), f"stale exclusions: {NO_RESULT - set(LEAVES)}"
    missing = [
        " ".join(path)
        for path, command in LEAVES.items()
        if path not in NO_RESULT and not any("--json" in param.opts for param in command.params)
    ]
    assert not missing, f"commands without --json: {missing}"


def test_the_cli_choices_are_the_servers() -> None:
    """The CLI repeats these values to refuse a typo before sending; they must not drift."""
    on_failure = typing.get_args(RolloutCreate.model_fields["on_failure"].annotation)
    assert {c.value for c in fleet_cli.OnFailure} == set(on_failure)
    assert {c.value for c in fleet_cli.RolloutStateName} == {s.value for s in RolloutState}
    assert {c.value for c in fleet_cli.StageName} == {s.value for s in Stage}


def test_a_misspelt_on_failure_is_a_usage_error_that_lists_the_choices() -> None:
    result = _run("fleet", "rollout", "create", "--bundle", "1", "--on-failure", "rolback")
    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "'rolback'" in errors[0] and "'pause'" in errors[0] and "'rollback'" in errors[0]
    assert "Traceback" not in result.output


# --- refused before anything is sent ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["fleet", "enrollment-token", "--profile", "rpi44"],
        ["fleet", "enrollment-token", "--profile", "host", "--tags", "lab,bad tag"],
        ["fleet", "rollout", "create", "--bundle", "1", "--waves", "canary,1 0"],
        ["fleet", "rollout", "create", "--bundle", "1", "--waves", "1,150"],
        ["fleet", "rollout", "create", "--bundle", "1", "--tags", "a/b"],
    ],
    ids=["unknown-profile", "bad-tag", "bad-cohort", "bad-percentage", "bad-rollout-tag"],
)
def test_a_mistake_the_cli_can_see_is_refused_before_anything_is_sent(args: list[str]) -> None:
    """The server given does not listen: a refusal that names the mistake, rather than
    ``cannot reach``, proves that nothing was sent."""
    closed = f"http://127.0.0.1:{free_port()}"
    line = _one_error_line(_run(*args, "--server", closed, "--token", "t"))
    assert "cannot reach" not in line
    assert any(word in line for word in ("rpi44", "bad tag", "1 0", "150", "a/b")), line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fleet", "admin-token", "--database-url", "not-a-url"], "--database-url: "),
        (
            ["fleet", "admin-token", "--database-url", "postgresql://nobody@127.0.0.1:1/x"],
            "Connection refused",
        ),
        (["fleet", "simulate", "--devices", "1", "--token", "t", "--fleet", "CLOSED"], "reach"),
        (["fleet", "simulate", "--devices", "1", "--credentials", "BROKEN"], "not a simulator"),
    ],
    ids=["bad-database-url", "database-down", "simulate-unreachable", "simulate-credentials"],
)
def test_other_mistakes_are_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"hosts": 1}')
    replace = {
        "CLOSED": f"http://127.0.0.1:{free_port()}",
        "BROKEN": str(broken),
    }
    args = [replace.get(a, a) for a in args]
    if "--credentials" not in args:
        args += ["--credentials", str(tmp_path / "none.json")] if "simulate" in args else []
    assert expected in _one_error_line(_run(*args))


# --- against a served fleet -------------------------------------------------------------------


def _bundle(directory: Path) -> Path:
    """A small valid bundle of model ``digits`` 1.0.0 for ``host`` (its model file is random
    bytes: nothing here runs it)."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {"model.onnx": b"not really a model", "golden.npz": b"golden vectors"}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    manifest = toy_manifest(contents, model_version="1.0.0", year=2026)
    return write_bundle(
        manifest, {name: directory / name for name in contents}, directory / "digits.efb"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedFleet]:
    """A served fleet with six enrolled host devices (two tagged ``canary``) and the
    ``digits`` 1.0.0 bundle published."""
    root = tmp_path_factory.mktemp("cli-fleet")
    fleet = serve_fleet(root / "fleet-data", None)
    try:
        grant = fleet.ok("POST", "/enrollment-tokens", json={"profile": "host", "uses": DEVICES})
        for i in range(DEVICES):
            device = f"sim-{i:03d}"
            fleet.ok("POST", "/enroll", json={"token": grant["token"], "device_id": device})
            if device in CANARIES:
                fleet.ok("PUT", f"/devices/{device}/tags", json={"tags": ["canary"]})
        fleet.publish(_bundle(root / "bundle"))
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def cli(served: ServedFleet) -> Callable[..., Any]:
    """Run an ``edgefleet`` command with the served fleet's --server and admin token."""
    token = (served.data_dir / "admin.token").read_text().strip()

    def run(*args: str) -> Any:
        return _run(*args, env={"EDGEFLEET_SERVER": served.url, "EDGEFLEET_TOKEN": token})

    return run


def _bundle_id(served: ServedFleet) -> int:
    (version,) = served.ok("GET", "/models", params={"name": "digits"})
    return int(version["bundles"][0]["id"])


def test_models_list_shows_versions_stages_and_bundles(
    served: ServedFleet, cli: Callable[..., Any]
) -> None:
    listed = cli("fleet", "models", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == served.ok("GET", "/models")
    table = cli("fleet", "models", "list")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "digits" in line)
    for text in ("1.0.0", "development", f"#{_bundle_id(served)} host onnxruntime fp32"):
        assert text in row, table.stdout
    none = cli("fleet", "models", "list", "--stage", "production", "--json")
    assert json.loads(none.stdout) == []


def test_a_dry_run_shows_each_wave_by_cohort_and_creates_nothing(
    served: ServedFleet, cli: Callable[..., Any]
) -> None:
    before = served.ok("GET", "/rollouts")
    args = ["fleet", "rollout", "create", "--bundle", str(_bundle_id(served))]
    shown = cli(*args, "--waves", "canary,100", "--dry-run")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("dry run, nothing created")
    assert lines[1].startswith("  wave 1 (canary): 2 devices: ")
    assert set(lines[1].split(": ", 2)[2].split(", ")) == CANARIES
    assert lines[2].startswith(f"  wave 2 (100 %): {DEVICES - 2} devices: ")
    as_json = json.loads(cli(*args, "--waves", "canary,100", "--dry-run", "--json").stdout)
    assert [(w["label"], w["devices"]) for w in as_json["waves"]] == [
        ("canary", 2),
        ("100", DEVICES - 2),
    ]
    assert served.ok("GET", "/rollouts") == before
    # the printed --id creates exactly the waves the dry run showed
    created = cli(
        *args, "--waves", "canary,100", "--id", as_json["id"], "--compare-baseline", "--json"
    )
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["id"] == as_json["id"]
    assert json.loads(created.stdout)["gate"]["compare"] == "baseline"
    members = served.ok("GET", f"/rollouts/{as_json['id']}/devices", params={"wave": 1})
    ids = {m["device_id"] for m in members if m["wave"] == 1}
    assert ids == set(as_json["waves"][1]["sample"])
    served.ok("POST", f"/rollouts/{as_json['id']}/abort", json={"reason": "test"})


def test_rollout_list_filters_by_state_and_model(
    served: ServedFleet, cli: Callable[..., Any]
) -> None:
    created = cli("fleet", "rollout", "create", "--bundle", str(_bundle_id(served)), "--json")
    assert created.exit_code == 0, created.output
    rollout = json.loads(created.stdout)["id"]
    served.ok("POST", f"/rollouts/{rollout}/pause", json={"reason": "listed"})

    def listed(*options: str) -> set[str]:
        result = cli("fleet", "rollout", "list", "--json", *options)
        assert result.exit_code == 0, result.output
        return {r["id"] for r in json.loads(result.stdout)}

    assert rollout in listed()
    assert rollout in listed("--state", "paused", "--model", "digits")
    assert rollout not in listed("--state", "completed")
    assert rollout not in listed("--model", "other")
    table = cli("fleet", "rollouts", "list")  # the plural reads as well
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if rollout in line)
    assert "digits 1.0.0" in row and "paused" in row and "1/4" in row, table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines()), table.stdout
    served.ok("POST", f"/rollouts/{rollout}/abort", json={"reason": "test"})


def test_a_misspelt_cohort_is_the_servers_refusal_in_one_line(
    served: ServedFleet, cli: Callable[..., Any]
) -> None:
    before = served.ok("GET", "/rollouts")
    for dry_run in ((), ("--dry-run",)):
        result = cli(
            "fleet", "rollout", "create", "--bundle", str(_bundle_id(served)),
            "--waves", "canry,100", *dry_run,
        )  # fmt: skip
        line = _one_error_line(result)
        assert "'canry'" in line and "canary" in line, line
    assert served.ok("GET", "/rollouts") == before


def test_a_field_the_server_refuses_is_one_line_naming_it(cli: Callable[..., Any]) -> None:
    result = cli("fleet", "rollout", "create", "--bundle", "1", "--soak", "-5")
    line = _one_error_line(result)
    assert line.startswith("error: 422: gate.soak_s: "), line


def test_a_profile_only_the_server_lacks_is_its_refusal_in_one_line(
    cli: Callable[..., Any], write_profile: Callable[..., Path]
) -> None:
    """This process knows ``myboard`` (a user profile), the served fleet does not."""
    write_profile("myboard")
    line = _one_error_line(cli("fleet", "enrollment-token", "--profile", "myboard"))
    assert "profile: no hardware profile 'myboard'" in line and "Value error" not in line, line


def test_a_wrong_token_or_server_is_one_line(served: ServedFleet) -> None:
    refused = _run("fleet", "devices", "--server", served.url, "--token", "eft_wrong")
    assert "refused the API token (401" in _one_error_line(refused)
    closed = _run("fleet", "devices", "--server", f"http://127.0.0.1:{free_port()}", "--token", "t")
    assert "cannot reach the fleet server" in _one_error_line(closed)
    no_scheme = _run("fleet", "devices", "--server", "localhost:8000", "--token", "t")
    assert "localhost:8000" in _one_error_line(no_scheme)


async def _not_a_fleet(scope: Any, receive: Any, send: Any) -> None:
    """A stand-in for what sits in front of a fleet that is down (a proxy's error page on
    /api/v1/devices) or for a URL that is not a fleet at all (an HTML page elsewhere): a
    real fleet does not answer either way."""
    failing = scope["path"] == "/api/v1/devices"
    body = b"<html>\n<h1>502 Bad Gateway</h1>\n</html>\n" if failing else b"<html>hi</html>"
    await send(
        {
            "type": "http.response.start",
            "status": 502 if failing else 200,
            "headers": [(b"content-type", b"text/html")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def test_a_failing_server_or_one_that_is_no_fleet_is_one_line() -> None:
    with serve_app(_not_a_fleet) as proxy:
        failed = _run("fleet", "devices", "--server", proxy.url, "--token", "t")
        line = _one_error_line(failed)
        assert "fleet server failed (502: <html> <h1>502 Bad Gateway</h1> </html>)" in line
        listed = _run("fleet", "models", "list", "--server", proxy.url, "--token", "t")
        assert "is --server an edgefleet fleet server?" in _one_error_line(listed)


def test_enrollment_token_enroll_and_revoke_print_json(
    served: ServedFleet, cli: Callable[..., Any], tmp_path: Path
) -> None:
    issued = cli("fleet", "enrollment-token", "--profile", "host", "--tags", "lab", "--json")
    assert issued.exit_code == 0, issued.output
    grant = json.loads(issued.stdout)
    assert grant["profile"] == "host" and grant["tags"] == ["lab"] and grant["token"]
    enrolled = _run(
        "agent", "enroll", "--fleet", served.url, "--token", grant["token"],
        "--out", str(tmp_path / "etc"), "--device-id", "cli-json", "--json",
    )  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    assert json.loads(enrolled.stdout) == {
        "device_id": "cli-json",
        "config": str(tmp_path / "etc" / "agent.toml"),
    }
    revoked = cli("fleet", "revoke", "cli-json", "--json")
    assert revoked.exit_code == 0, revoked.output
    device = json.loads(revoked.stdout)
    assert device["id"] == "cli-json" and device["state"] == "revoked"


# --- fleet serve: ports first -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["--port", "--mqtt-port"])
def test_serve_refuses_a_busy_port_before_setting_anything_up(which: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"--port": str(free_port()), "--mqtt-port": str(free_port()), which: str(busy)}
        data_dir = tmp_path / "fleet-data"
        result = subprocess.run(
            [EDGEFLEET, "fleet", "serve", "--data-dir", str(data_dir),
             *(item for pair in ports.items() for item in pair)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
    assert result.returncode == EXIT_CANNOT_START, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert f"127.0.0.1:{busy}" in result.stderr and "in use" in result.stderr
    assert which in result.stderr
    assert not data_dir.exists(), "keys, database or broker were made before the port check"
    assert result.stdout == ""


def test_ota_commands_print_one_json_document(tmp_path: Path) -> None:
    """publish, refresh and keys rotate, through the installed script: stdout is exactly
    one JSON document (what pipes into ``jq``)."""
    env = {**os.environ, "EDGEFLEET_KEY_PASSPHRASE": "an operator's passphrase"}

    def run(*args: str) -> Any:
        result = subprocess.run(
            [EDGEFLEET, "ota", *args, "--json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    run("keys", "init")
    bundle = _bundle(tmp_path / "bundle")
    published = run("publish", str(bundle))
    assert published == {
        "target": "host/digits-host-1.0.0.efb",
        "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        "length": bundle.stat().st_size,
    }
    assert run("refresh")["renewed"] is False
    rotated = run("keys", "rotate", "--role", "targets")
    assert rotated["role"] == "targets" and rotated["root_version"] == 2
    assert len(rotated["keyids"]) == 1


def test_the_readme_lists_every_exit_code() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(code) for code in re.findall(r"^\| `(\d+)` \|", section, re.M)}
    used = {0, EXIT_ERROR, EXIT_USAGE, EXIT_CANNOT_START, EXIT_INTERRUPTED}
    assert used <= listed, f"exit codes missing from the README: {used - listed}"
