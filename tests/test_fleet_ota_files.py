"""The OTA repository served by the fleet's router under uvicorn, fetched by the device client.

The repository is signed by ``OtaRepository`` with a bundle written by ``write_bundle``; the
device is ``OtaClient``. Connections are cut by a real TCP proxy, and the timestamp
refresher runs as an asyncio task against real short-lived metadata.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response

from fleet.ota_files import TimestampRefresher, ota_router
from ota.archive import write_bundle
from ota.client import OtaClient, TrustState
from ota.download import part_path
from ota.errors import DownloadError
from ota.keys import KeyStore
from ota.repository import ExpiryPolicy, OtaRepository
from tests.utils.bundles import toy_manifest
from tests.utils.tcp_proxy import CuttingProxy

PASSPHRASE = b"correct horse battery staple"
TARGET = "host/digits-host-1.0.0.efb"
TOKEN = "device-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _bundle(directory: Path) -> Path:
    """A valid bundle of 300 kB: enough for a connection to be cut in the middle of it."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {"model.onnx": os.urandom(300_000), "golden.npz": b"golden vectors"}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    manifest = toy_manifest(contents)
    return write_bundle(
        manifest, {name: directory / name for name in contents}, directory / "bundle.efb"
    )


def _repository(tmp_path: Path, timestamp_s: int = 86400) -> OtaRepository:
    keys = KeyStore(tmp_path / "keys", PASSPHRASE)
    repo = OtaRepository.create(
        tmp_path / "repo", keys, expiry=ExpiryPolicy(timestamp_s=timestamp_s)
    )
    repo.add_bundle(_bundle(tmp_path / "bundle"))
    return repo


@dataclass
class Served:
    url: str
    port: int
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # path, Range, status

    def targets(self) -> list[tuple[str | None, int]]:
        """Range and status of each request for a bundle."""
        return [
            (r, status) for path, r, status in self.requests if path.startswith("/ota/targets/")
        ]


def _require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401, "send the device token")


@contextmanager
def _serve(repository_dir: Path) -> Iterator[Served]:
    """The router in a FastAPI app under uvicorn on a free loopback port; requests logged."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    served = Served(url=f"http://127.0.0.1:{port}", port=port)
    app = FastAPI()
    app.include_router(ota_router(repository_dir, dependencies=[Depends(_require_token)]))

    @app.middleware("http")
    async def log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        served.requests.append(
            (request.url.path, request.headers.get("range"), response.status_code)
        )
        return response

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> OtaRepository:
    return _repository(tmp_path_factory.mktemp("ota"))


@pytest.fixture(scope="module")
def server(repo: OtaRepository) -> Iterator[Served]:
    with _serve(repo.path) as served:
        yield served


@pytest.fixture
def log(server: Served) -> Served:
    server.requests.clear()
    return server


@pytest.fixture
def device_http() -> Iterator[httpx.Client]:
    """What a device sends its requests with: its token on every request."""
    with httpx.Client(headers=AUTH, timeout=10) as client:
        yield client


def _device(
    tmp_path: Path, repo: OtaRepository, url: str, client: httpx.Client, targets_url: str = ""
) -> OtaClient:
    device = tmp_path / "device"
    OtaClient.init(device / "metadata", repo.root_file)
    return OtaClient(
        device / "metadata",
        f"{url}/ota/metadata",
        targets_url=targets_url or f"{url}/ota/targets",
        target_dir=device / "bundles",
        http=client,
    )


def _bundle_bytes(repo: OtaRepository) -> bytes:
    return repo.target_file(repo.targets().signed.targets[TARGET]).read_bytes()


def _target_url(server: Served, repo: OtaRepository) -> str:
    path = repo.target_file(repo.targets().signed.targets[TARGET]).relative_to(repo.targets_dir)
    return f"{server.url}/ota/targets/{path}"


# --- the device client through the router -------------------------------------------------


def test_a_device_refreshes_and_downloads_a_verified_bundle(
    tmp_path: Path, repo: OtaRepository, log: Served, device_http: httpx.Client
) -> None:
    client = _device(tmp_path, repo, log.url, device_http)
    assert client.check().state is TrustState.CURRENT
    path = client.download(client.target(TARGET))
    assert path.read_bytes() == _bundle_bytes(repo)
    assert log.targets() == [(None, 200)]
    assert ("/ota/metadata/timestamp.json", None, 200) in log.requests


def test_metadata_is_public_and_bundles_need_the_token(
    tmp_path: Path, repo: OtaRepository, server: Served
) -> None:
    with httpx.Client(timeout=10) as anonymous:
        client = _device(tmp_path, repo, server.url, anonymous)
        target = client.target(TARGET)  # metadata refreshed without a token
        with pytest.raises(DownloadError, match="HTTP 401"):
            client.download(target, attempts=1)


def test_an_interrupted_download_resumes_with_a_range_request(
    tmp_path: Path, repo: OtaRepository, log: Served, device_http: httpx.Client
) -> None:
    size = len(_bundle_bytes(repo))
    with CuttingProxy(log.port, cut_after=size // 2, cuts=1) as proxy:
        targets_url = f"http://127.0.0.1:{proxy.port}/ota/targets"
        client = _device(tmp_path, repo, log.url, device_http, targets_url)
        target = client.target(TARGET)
        with pytest.raises(DownloadError):
            client.download(target, attempts=1)
        kept = part_path(client.local_path(target)).stat().st_size
        assert 0 < kept < size
        path = client.download(target, attempts=1)
    assert path.read_bytes() == _bundle_bytes(repo)
    assert log.targets() == [(None, 200), (f"bytes={kept}-", 206)]


# --- HTTP semantics -----------------------------------------------------------------------


def test_a_range_is_answered_206_with_those_bytes(repo: OtaRepository, server: Served) -> None:
    data, url = _bundle_bytes(repo), _target_url(server, repo)
    size = len(data)
    response = httpx.get(url, headers=AUTH | {"Range": "bytes=1000-1999"})
    assert response.status_code == 206
    assert response.content == data[1000:2000]
    assert response.headers["content-range"] == f"bytes 1000-1999/{size}"
    assert response.headers["cache-control"] == "max-age=31536000, immutable"
    response = httpx.get(url, headers=AUTH | {"Range": "bytes=-10"})
    assert (response.status_code, response.content) == (206, data[-10:])
    response = httpx.get(url, headers=AUTH | {"Range": f"bytes={size}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    response = httpx.head(url, headers=AUTH)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == str(size)
    assert response.headers["accept-ranges"] == "bytes"


def test_metadata_is_served_whole_and_never_cached(repo: OtaRepository, server: Served) -> None:
    response = httpx.get(f"{server.url}/ota/metadata/timestamp.json")
    assert response.status_code == 200
    assert response.content == (repo.metadata_dir / "timestamp.json").read_bytes()
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content)["signed"]["_type"] == "timestamp"
    head = httpx.head(f"{server.url}/ota/metadata/1.root.json")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str((repo.metadata_dir / "1.root.json").stat().st_size)
    assert httpx.get(f"{server.url}/ota/metadata/9.root.json").status_code == 404


def _raw_get(server: Served, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written: no client-side normalization of ``..``."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers=AUTH)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    [
        "/ota/targets/../edgefleet-repository.json",
        "/ota/targets/%2e%2e/edgefleet-repository.json",
        "/ota/targets/host/../../metadata/root.json",
        "/ota/metadata/..%2Fedgefleet-repository.json",
        "/ota/metadata/%2e%2e",
        "/ota/targets//etc/passwd",
        "/ota/targets/%2Fetc%2Fpasswd",
        "/ota/targets/host/escape.efb",
        "/ota/targets/host/.bundle.efb.tmp-1234",
        "/ota/targets/host",
        "/ota/targets/host/nul%00.efb",
    ],
)
def test_paths_leaving_the_directory_are_not_found(
    repo: OtaRepository, server: Served, path: str
) -> None:
    escape = repo.targets_dir / "host" / "escape.efb"
    if not escape.is_symlink():
        escape.symlink_to(repo.path / "edgefleet-repository.json")
        (repo.targets_dir / "host" / ".bundle.efb.tmp-1234").write_bytes(b"half written")
    status, body = _raw_get(server, path)
    assert status == 404
    assert b"expiry" not in body and b"root:" not in body and b"half written" not in body


def test_a_file_inside_is_served_by_the_same_raw_request(
    repo: OtaRepository, server: Served
) -> None:
    """The control for the test above: the raw requests reach the router."""
    path = _target_url(server, repo).removeprefix(server.url)
    assert _raw_get(server, path) == (200, _bundle_bytes(repo))
    inner = repo.targets_dir / "host" / "alias.efb"
    inner.symlink_to(repo.target_file(repo.targets().signed.targets[TARGET]))
    assert _raw_get(server, "/ota/targets/host/alias.efb") == (200, _bundle_bytes(repo))


# --- the timestamp refresher --------------------------------------------------------------


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_refresher_re_signs_a_short_lived_timestamp(
    tmp_path: Path, device_http: httpx.Client
) -> None:
    repo = _repository(tmp_path, timestamp_s=2)
    before = repo.timestamp().signed

    async def scenario() -> TimestampRefresher:
        refresher = TimestampRefresher(repo, interval_s=0.05)
        task = asyncio.create_task(refresher.run())
        await _until(lambda: refresher.refreshed >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return refresher

    refresher = asyncio.run(scenario())
    after = repo.timestamp().signed
    assert after.version > before.version and after.expires > before.expires
    assert (refresher.failures, refresher.last_error) == (0, None)
    with _serve(repo.path) as served:
        assert _device(tmp_path, repo, served.url, device_http).check().state is TrustState.CURRENT


def test_a_failing_refresh_is_counted_and_the_loop_lives_on(tmp_path: Path) -> None:
    repo = _repository(tmp_path, timestamp_s=2)
    before = repo.timestamp().signed.version
    aside = tmp_path / "keys-aside"
    aside.mkdir()
    for key in repo.keys.directory.glob("timestamp.*"):
        shutil.move(key, aside / key.name)

    async def scenario() -> TimestampRefresher:
        refresher = TimestampRefresher(repo, interval_s=0.05)
        task = asyncio.create_task(refresher.run())
        await _until(lambda: refresher.failures >= 3)
        assert not task.done()
        assert refresher.last_error is not None and "KeyStoreError" in refresher.last_error
        assert "timestamp needs 1 signatures" in refresher.last_error
        assert refresher.refreshed == 0
        for key in aside.iterdir():
            shutil.move(key, repo.keys.directory / key.name)
        await _until(lambda: refresher.refreshed >= 1)
        assert refresher.last_error is None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return refresher

    asyncio.run(scenario())
    assert repo.timestamp().signed.version > before


def test_the_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_s must be above 0"):
        TimestampRefresher(_repository(tmp_path), interval_s=0)
