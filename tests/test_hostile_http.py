"""Hostile clients against the fleet's HTTP API, each finding of the issue as a test.

Most run against ``edgefleet fleet serve`` itself, started as a user starts it, over real
HTTP: a 200 MB body (streamed, never allocated) is answered 413 while the server's peak
memory (``VmHWM`` in ``/proc/PID/status``) stays put; deep JSON, 2^70 ids and a century of
``ttl_s`` are refused as client errors, never 500; an existing ``--data-dir`` keeps its
mode. The rest start the app in this process (uvicorn on a loopback port) with the
settings they need.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.utils.fleet import running_fleet
from tests.utils.http import serve_app
from tests.utils.mqtt import free_port

EDGEFLEET = [sys.executable, "-m", "edgefleet"]
MB = 1 << 20


@dataclass
class Served:
    url: str
    port: int
    pid: int
    data_dir: Path
    admin_token: str
    log: Path

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        headers.update(kwargs.pop("headers", {}))
        return httpx.request(method, f"{self.url}/api/v1{path}", headers=headers, **kwargs)

    def peak_rss(self) -> int:
        """The server process's peak resident memory so far, in bytes."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def rss(self) -> int:
        return _status_kib(self.pid, "VmRSS") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``edgefleet fleet serve`` on a data directory that exists already, mode 0755."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    log = data_dir.parent / "serve.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*EDGEFLEET, "fleet", "serve", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"fleet serve exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"fleet serve did not start: {log.read_text()}"
            time.sleep(0.2)
        token = (data_dir / "admin.token").read_text().strip()
        yield Served(url, port, process.pid, data_dir, token, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- bodies ----------------------------------------------------------------------------------


def _head(path: str, *, content_length: int | None, port: int) -> bytes:
    framing = (
        f"Content-Length: {content_length}"
        if content_length is not None
        else "Transfer-Encoding: chunked"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def _stream(port: int, path: str, total: int, *, chunked: bool) -> tuple[int, bytes, int]:
    """POST ``total`` bytes to ``path`` from one reused 64 KiB buffer, stopping as soon as
    the server answers. Returns the status, the answer's body and the bytes sent."""
    chunk = b" " * (64 << 10)
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n" if chunked else chunk
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_head(path, content_length=None if chunked else total, port=port))
        try:
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                sock.sendall(framed)
                sent += len(chunk)
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering; the answer is still to be read
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer) < _expected_length(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head, f"no answer after {sent} bytes"
    return int(head.split()[1]), body, sent


def _expected_length(answer: bytes) -> int:
    head, _, _ = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(answer) + 1


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_200_mb_unauthenticated_enroll_is_refused_without_the_server_growing(
    served: Served, chunked: bool
) -> None:
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200
    before = max(served.peak_rss(), served.rss())
    status, body, sent = _stream(served.port, "/api/v1/enroll", 200 * MB, chunked=chunked)
    grown = served.peak_rss() - before
    assert status == 413, f"expected 413 for a 200 MB body, got {status}: {body[:300]!r}"
    assert "at most 1048576 bytes" in json.loads(body)["detail"]
    assert sent < 200 * MB, "the server read the whole body before answering"
    assert grown < 32 * MB, f"the server's peak memory grew by {grown / MB:.0f} MB on one body"
    # and it still serves
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200


def test_bundle_uploads_and_inference_have_their_own_limits(tmp_path: Path) -> None:
    with (
        running_fleet(
            tmp_path / "fleet", max_bundle_bytes=200_000, max_inference_bytes=100_000
        ) as fleet,
        serve_app(fleet.client.app) as app,
    ):
        fleet.api("POST", "/models", json={"name": "m", "version": "1.0.0"})
        upload = "/api/v1/models/m/versions/1.0.0/bundles"
        # a body under the JSON limit but over max_bundle_bytes, declared and streamed
        status, _, _ = _stream(app.port, upload, 300_000, chunked=False)
        assert status == 413  # the declared length is refused before anything else
        auth = {"Authorization": f"Bearer {fleet.admin_token}"}
        too_big = httpx.post(f"{app.url}{upload}", content=b"x" * 300_000, headers=auth)
        assert too_big.status_code == 413, too_big.text
        assert "at most 200000 bytes" in too_big.json()["detail"]
        streamed = httpx.post(
            f"{app.url}{upload}", content=iter([b"x" * 100_000] * 3), headers=auth
        )
        assert streamed.status_code == 413, streamed.text
        under = httpx.post(f"{app.url}{upload}", content=b"x" * 150_000, headers=auth)
        assert under.status_code == 400, "a body over the JSON limit but under the bundle's"
        assert not list((fleet.server.settings.data_dir / "uploads").iterdir())
        # inference answers in its protocol's shape
        infer = httpx.post(f"{app.url}/v2/models/m/infer", content=b"x" * 150_000, headers=auth)
        assert infer.status_code == 413 and "at most 100000" in infer.json()["error"]


# --- values ----------------------------------------------------------------------------------


def test_deeply_nested_json_in_hyperparameters_is_refused_not_a_500(served: Served) -> None:
    deep = '{"a":' * 900 + "1" + "}" * 900
    body = '{"name": "deep", "version": "1", "hyperparameters": ' + deep + "}"
    answer = served.call(
        "POST", "/models", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert "nested over 8 levels" in answer.text
    assert served.call("GET", "/models/deep/versions/1").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("DELETE", f"/tokens/{2**70}", None),
        ("GET", f"/devices?offset={2**70}", None),
        ("GET", f"/devices?limit={2**70}", None),
        ("GET", f"/audit?limit={2**70}", None),
        ("GET", f"/devices/{2**70}/telemetry?limit={2**70}", None),
        ("POST", "/rollouts", {"bundle_id": 2**70}),
        ("POST", "/rollouts", {"bundle_id": 1, "gate": {"min_inferences": 2**70}}),
        ("POST", "/enrollment-tokens", {"profile": "host", "uses": 2**70}),
    ],
)
def test_integers_past_64_bits_are_refused_not_a_500(
    served: Served, method: str, path: str, body: Any
) -> None:
    answer = served.call(method, path, json=body)
    assert answer.status_code == 422, f"{method} {path} {body}: {answer.status_code} {answer.text}"


def test_an_enrollment_token_lives_a_year_at_most(served: Served) -> None:
    answer = served.call("POST", "/enrollment-tokens", json={"profile": "host", "ttl_s": 2**57})
    assert answer.status_code == 422, answer.text
    assert "less than or equal to 31622400" in answer.text


@pytest.mark.parametrize(
    "body",
    [
        {"name": "m", "version": "1", "metrics": {"acc": "NaN"}},
        {"name": "m", "version": "1", "description": "a\x00b"},
        {"name": "m\n", "version": "1"},
        {"name": "m", "version": "1", "owner": "x" * 5000},
    ],
    ids=["nan", "nul", "newline-in-name", "long-owner"],
)
def test_bad_text_and_numbers_are_refused_not_stored(served: Served, body: Any) -> None:
    content = json.dumps(body).replace('"NaN"', "NaN")
    answer = served.call(
        "POST", "/models", content=content, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 422, answer.text


def test_waves_are_percentages_or_cohort_tags(served: Served) -> None:
    for wave in ("nan", "inf", "1e2", "150", "can ary"):
        answer = served.call("POST", "/rollouts", json={"bundle_id": 1, "waves": [wave]})
        assert answer.status_code == 422, f"wave {wave!r}: {answer.text}"


def test_an_unknown_profile_is_refused_naming_the_known_ones(served: Served) -> None:
    result = subprocess.run(
        [*EDGEFLEET, "fleet", "enrollment-token", "--profile", "rpi44"],
        env={**os.environ, "EDGEFLEET_SERVER": served.url, "EDGEFLEET_TOKEN": served.admin_token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "rpi44" in result.stderr  # refused by the CLI before sending (tests/test_cli_fleet.py)
    assert "rpi4, rpi5" in result.stderr, result.stderr
    answer = served.call("POST", "/enrollment-tokens", json={"profile": "rpi44"})
    assert answer.status_code == 422 and "rpi4, rpi5" in answer.text, answer.text


# --- the data directory and the admin tokens -----------------------------------------------------


def test_an_existing_data_dir_keeps_its_mode_and_the_secrets_stay_private(served: Served) -> None:
    assert stat.S_IMODE(served.data_dir.stat().st_mode) == 0o755
    assert "has mode 0755" in served.log.read_text()
    for secret in ("admin.token", "ota-keys.passphrase", "mqtt-fleet.password"):
        assert stat.S_IMODE((served.data_dir / secret).stat().st_mode) == 0o600, secret
    for directory in ("ota-repo", "ota-keys", "mosquitto"):
        assert stat.S_IMODE((served.data_dir / directory).stat().st_mode) == 0o700, directory


def test_a_new_data_dir_is_created_0700(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "new" / "data") as fleet:
        assert stat.S_IMODE(fleet.server.settings.data_dir.stat().st_mode) == 0o700


def _admin_token_cli(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEFLEET, "fleet", "admin-token", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_last_admin_token_cannot_be_revoked_and_the_cli_mints_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "fleet"
    with running_fleet(data_dir) as fleet, serve_app(fleet.client.app) as app:

        def call(method: str, path: str, token: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.request(method, f"{app.url}/api/v1{path}", headers=headers)

        first = fleet.admin_token
        (mine,) = [t for t in fleet.api("GET", "/tokens") if t["role"] == "admin"]
        itself = call("DELETE", f"/tokens/{mine['id']}", first)
        assert itself.status_code == 409, itself.text
        assert "last active admin token" in itself.json()["detail"]
        assert call("GET", "/tokens", first).status_code == 200
        # with a second admin the first may go; then the second is the last
        second = fleet.api("POST", "/tokens", json={"name": "second", "role": "admin"})
        assert call("DELETE", f"/tokens/{mine['id']}", second["token"]).status_code == 200
        assert call("GET", "/tokens", first).status_code == 401
        last = call("DELETE", f"/tokens/{second['id']}", second["token"])
        assert last.status_code == 409, last.text
        # recovery from the data directory, with the server up
        minted = _admin_token_cli(data_dir, "--name", "recovered", "--json")
        assert minted.returncode == 0, minted.stderr
        issued = json.loads(minted.stdout)
        assert issued["name"] == "recovered" and issued["role"] == "admin"
        assert call("GET", "/tokens", issued["token"]).status_code == 200
        audit = fleet.api("GET", "/audit?action=token.create", token=issued["token"])
        assert audit[0]["actor"] == "cli:admin-token" and "token_hash" not in audit[0]["after"]
    # and with the server down
    printed = _admin_token_cli(data_dir)
    assert printed.returncode == 0, printed.stderr
    token = printed.stdout.strip()
    with running_fleet(data_dir) as fleet:
        assert fleet.call("GET", "/tokens", token=token).status_code == 200


def test_admin_token_refuses_a_directory_without_a_fleet(tmp_path: Path) -> None:
    result = _admin_token_cli(tmp_path)
    assert result.returncode != 0 and "no fleet database" in result.stderr
    bad_name = _admin_token_cli(tmp_path, "--name", "bad name")
    assert bad_name.returncode != 0 and "--name" in bad_name.stderr


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_need_an_api_token_unless_made_public(served: Served, tmp_path: Path) -> None:
    metrics = f"{served.url}/metrics"
    assert httpx.get(metrics).status_code == 401
    viewer = served.call("POST", "/tokens", json={"name": "prometheus", "role": "viewer"})
    scraped = httpx.get(metrics, headers={"Authorization": f"Bearer {viewer.json()['token']}"})
    assert scraped.status_code == 200 and "edgefleet_devices_online" in scraped.text
    with running_fleet(tmp_path / "public", metrics_public=True) as public:
        assert public.client.get("/metrics").status_code == 200


# --- the schema ------------------------------------------------------------------------------


def test_the_openapi_documents_the_error_statuses_with_unique_operation_ids(
    served: Served,
) -> None:
    schema = httpx.get(f"{served.url}/openapi.json").json()
    operations = [
        (method.upper(), path, operation)
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    ]
    ids = [operation["operationId"] for _, _, operation in operations]
    assert len(ids) == len(set(ids)), f"duplicate operation ids: {sorted(ids)}"
    for method, path, operation in operations:
        statuses = set(operation["responses"])
        assert "413" in statuses, f"{method} {path} does not document 413"
        if path.startswith("/api/v1/broker/"):  # the broker's secret, not a token: no role
            assert "401" in statuses, f"{method} {path}: {sorted(statuses)}"
        elif path.startswith("/api/v1/") and path != "/api/v1/enroll":
            assert {"401", "403"} <= statuses, f"{method} {path}: {sorted(statuses)}"
        if re.search(r"\{(\w+_id|version)\}", path):
            assert "404" in statuses, f"{method} {path}: {sorted(statuses)}"
    revoke = schema["paths"]["/api/v1/tokens/{token_id}"]["delete"]["responses"]
    assert "409" in revoke
    assert schema["paths"]["/api/v1/models"]["post"]["responses"]["409"]
