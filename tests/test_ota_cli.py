"""``edgefleet ota`` as an operator and the TUF conformance client use it, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils.http_files import serve_directory

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def _run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture
def operator() -> dict[str, str]:
    """The environment of an operator who holds the keys' passphrase."""
    return {"EDGEFLEET_KEY_PASSPHRASE": "an operator's passphrase"}


def test_an_operator_signs_publishes_and_a_device_downloads(
    compiled_digits: Path, tmp_path: Path, operator: dict[str, str]
) -> None:
    init = _run("ota", "keys", "init", "--root-keys", "3", "--root-threshold", "2", "--json",
                cwd=tmp_path, env=operator)  # fmt: skip
    assert init.returncode == 0, init.stderr
    roles = json.loads(init.stdout)["roles"]
    assert roles["root"]["threshold"] == 2 and len(roles["root"]["keyids"]) == 3

    built = _run("ota", "bundle", str(compiled_digits), "--version", "2.0.0", "--artifact",
                 "tvm:fp32", "--out", "digits.efb", "--json", cwd=tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["runtime"] == "tvm"
    published = _run("ota", "publish", "digits.efb", cwd=tmp_path, env=operator)
    assert published.returncode == 0, published.stderr
    assert "host/digits-host-2.0.0.efb" in published.stdout

    with serve_directory(tmp_path / "ota-repo") as server:
        client = ["ota", "tuf-client", "--metadata-dir", "device/md"]
        remote = ["--metadata-url", f"{server.url}/metadata"]
        root = str(tmp_path / "ota-repo" / "metadata" / "root.json")
        assert _run(*client, "init", root, cwd=tmp_path).returncode == 0
        assert _run(*client, *remote, "refresh", cwd=tmp_path).returncode == 0
        download = _run(*client, *remote, "--target-name", "host/digits-host-2.0.0.efb",
                        "--target-base-url", f"{server.url}/targets", "--target-dir",
                        "device/bundles", "download", cwd=tmp_path)  # fmt: skip
        assert download.returncode == 0, download.stderr
        missing = _run(*client, *remote, "--target-name", "host/nothing.efb",
                       "--target-base-url", f"{server.url}/targets", "--target-dir",
                       "device/bundles", "download", cwd=tmp_path)  # fmt: skip
        assert missing.returncode == 1
        assert "not listed in the signed targets" in missing.stderr
    fetched = list((tmp_path / "device" / "bundles").iterdir())
    assert [p.read_bytes() for p in fetched] == [(tmp_path / "digits.efb").read_bytes()]

    verified = _run("ota", "verify", "digits.efb", "--root", root, "--metadata",
                    "ota-repo/metadata", cwd=tmp_path)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("OK digits.efb: host/digits-host-2.0.0.efb")

    data = bytearray((tmp_path / "digits.efb").read_bytes())
    data[-20000] ^= 0x01
    (tmp_path / "tampered.efb").write_bytes(bytes(data))
    tampered = _run("ota", "verify", "tampered.efb", "--root", root, "--metadata",
                    "ota-repo/metadata", cwd=tmp_path)  # fmt: skip
    assert tampered.returncode == 1
    assert "error:" in tampered.stderr and "traceback" not in tampered.stderr.lower()


def test_keys_rotate_and_refresh_from_the_command_line(
    tmp_path: Path, operator: dict[str, str]
) -> None:
    assert _run("ota", "keys", "init", "--timestamp-expiry", "1h", cwd=tmp_path,
                env=operator).returncode == 0  # fmt: skip
    rotated = _run("ota", "keys", "rotate", "--role", "timestamp", cwd=tmp_path, env=operator)
    assert rotated.returncode == 0, rotated.stderr
    assert "root is now version 2" in rotated.stdout
    refreshed = _run("ota", "refresh", "--within", "2h", cwd=tmp_path, env=operator)
    assert refreshed.returncode == 0 and "renewed" in refreshed.stdout
    wrong = _run("ota", "refresh", "--within", "2h", cwd=tmp_path,
                 env={"EDGEFLEET_KEY_PASSPHRASE": "not it"})  # fmt: skip
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    unset = _run("ota", "publish", "x.efb", cwd=tmp_path, env={"EDGEFLEET_KEY_PASSPHRASE": ""})
    assert unset.returncode == 1 and "EDGEFLEET_KEY_PASSPHRASE" in unset.stderr
    bad_role = _run("ota", "keys", "rotate", "--role", "admin", cwd=tmp_path, env=operator)
    assert bad_role.returncode == 1 and "unknown role 'admin'" in bad_role.stderr


def test_delta_and_patch_round_trip_on_the_command_line(
    compiled_digits: Path, tmp_path: Path
) -> None:
    for version in ("1.0.0", "1.0.1"):
        made = _run("ota", "bundle", str(compiled_digits), "--version", version, "--artifact",
                    "onnxruntime:fp32", "--out", f"{version}.efb", cwd=tmp_path)  # fmt: skip
        assert made.returncode == 0, made.stderr
    delta = _run("ota", "delta", "1.0.0.efb", "1.0.1.efb", "--out", "d.delta", "--json",
                 cwd=tmp_path)  # fmt: skip
    assert delta.returncode == 0, delta.stderr
    ratio = json.loads(delta.stdout)["ratio"]
    assert 0 < ratio < 0.1  # only the manifest's version changed
    patched = _run("ota", "patch", "1.0.0.efb", "d.delta", "--out", "rebuilt.efb", cwd=tmp_path)
    assert patched.returncode == 0, patched.stderr
    assert (tmp_path / "rebuilt.efb").read_bytes() == (tmp_path / "1.0.1.efb").read_bytes()
    wrong_base = _run("ota", "patch", "1.0.1.efb", "d.delta", "--out", "x.efb", cwd=tmp_path)
    assert wrong_base.returncode == 1 and "another old bundle" in wrong_base.stderr
