"""The A/B updater in one process, fast: every state, edge, refusal and resume, with exact
acks and details, so that ``make mutate`` (.ci/mutate.py) reaches and judges its mutants.

The parts are real: a TUF repository signed by ``ota.repository.OtaRepository`` and served
over HTTP by the standard library's server (no fleet, no database), bundles of the compiled
digits model on ONNX Runtime, slots on disk. One thing is simulated: a crash.
``Device.crash_at`` makes the ack callback raise ``_SimulatedCrash`` right after the updater
saved that state, and the test then starts a new updater on the same data directory; a
SIGKILL would end the test run itself. The real SIGKILLs at every state are in
tests/test_agent_updater.py.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Route

from agent import _crashpoints
from agent.config import HealthConfig, OtaConfig
from agent.origin import Origin
from agent.slots import Slots
from agent.updater import (
    ACKS,
    CRASH_AT_ENV,
    MAX_STATE_SAVES,
    RESUME,
    STATE_FILE,
    TRANSITIONS,
    Event,
    State,
    Updater,
)
from contracts.bounded import DETAIL_MAX_CHARS
from contracts.mqtt import Ack, AckState, BundleRef, Command, CommandKind
from ota.bundle import bundle_compile_output
from ota.keys import KeyStore
from ota.repository import ExpiryPolicy, OtaRepository
from tests.utils.http import serve_app
from tests.utils.http_files import FileServer, serve_directory, serve_directory_threaded
from tests.utils.updater_harness import UpdaterRecorder, bundle_label, golden_broken, provision

V1, V2, V3, BAD = "1.0.0", "1.1.0", "1.3.0", "1.2.0"
WATCH = 3
HEALTH = HealthConfig(watch_inferences=WATCH, max_error_rate=0.2, watch_timeout_s=60)
_D, _V, _I, _H, _F, _R = (
    AckState.DOWNLOADING,
    AckState.VERIFIED,
    AckState.INSTALLED,
    AckState.HEALTHY,
    AckState.FAILED,
    AckState.ROLLED_BACK,
)


# --- a served TUF repository with four bundles --------------------------------------------


@dataclass
class Repo:
    served: FileServer
    root: Path
    refs: dict[str, BundleRef]
    bundles: dict[str, Path]
    repository: OtaRepository

    def command(self, kind: CommandKind, version: str | None, **fields: Any) -> Command:
        urls = {
            "metadata_url": f"{self.served.url}/metadata/",
            "targets_url": f"{self.served.url}/targets/",
        }
        return Command(
            id=f"cmd-{uuid.uuid4().hex[:12]}",
            kind=kind,
            bundle=self.refs[version] if version else None,
            issued_at=time.time(),
            **(urls | fields),
        )

    def deploy(self, version: str, **fields: Any) -> Command:
        return self.command(CommandKind.DEPLOY, version, **fields)

    def rollback(self, version: str | None) -> Command:
        return self.command(CommandKind.ROLLBACK, version)


_YEAR_S = 365 * 86400
_BUILT = ".built"
_MODELS_CACHE_ENV = "EDGEFLEET_TEST_MODELS"  # tests/conftest.py's MODELS_CACHE_ENV


def _build_repository(compiled: Path, out: Path) -> None:
    # bundle_compile_output itself, not tests/utils/fleet.py's make_bundle: that module
    # imports the fleet app, which doubles the memory every mutant's run is forked from
    sources = {V1: compiled, V2: compiled, V3: compiled, BAD: golden_broken(compiled, out)}
    bundles = {v: out / f"digits-{v}.efb" for v in sources}
    for version, source in sources.items():
        bundle_compile_output(
            source, version=version, out=bundles[version], artifact_id="onnxruntime:fp32"
        )
    # valid for a year: make mutate keeps this repository as long as the compiled model
    expiry = ExpiryPolicy(targets_s=_YEAR_S, snapshot_s=_YEAR_S, timestamp_s=_YEAR_S)
    repository = OtaRepository.create(out / "repo", KeyStore(out / "keys", b"unit"), expiry=expiry)
    for version in (V1, V2, BAD, V3):
        repository.add_bundle(bundles[version])
    (out / _BUILT).touch()


@pytest.fixture(scope="module")
def repo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Repo]:
    """The repository, built once per session, or once for every mutant's test run when
    ``EDGEFLEET_TEST_MODELS`` names a cache (tests/conftest.py, .ci/mutate.py). The digits
    model is asked for only to build it: its fixture imports the compiler, ~0.3 s a run."""
    cache = os.environ.get(_MODELS_CACHE_ENV)
    out = Path(cache) / "updater-unit" if cache else tmp_path_factory.mktemp("updater-unit")
    if not (out / _BUILT).is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        _build_repository(request.getfixturevalue("compiled_digits"), out)
    repository = OtaRepository(out / "repo", KeyStore(out / "keys", b"unit"))
    bundles = {v: out / f"digits-{v}.efb" for v in (V1, V2, BAD, V3)}
    refs = {}
    for target in repository.targets().signed.targets.values():
        fields = target.custom["edgefleet"]
        refs[fields["version"]] = BundleRef(
            target_path=target.path,
            name=fields["name"],
            version=fields["version"],
            version_number=fields["version_number"],
            sha256=target.hashes["sha256"],
            length=target.length,
        )
    with serve_directory_threaded(repository.path) as served:
        yield Repo(served, repository.root_file, refs, bundles, repository)


# --- a device --------------------------------------------------------------------------------


_TLS = ssl.create_default_context()
"""One TLS context for every client: the repository is plain HTTP, and loading the CA
bundle anew for each ``httpx.Client`` took a quarter of these tests' time."""


class _SimulatedCrash(Exception):
    """The process dying right after a state was saved, or half-way through a download (a
    fake: see the module docstring)."""


@dataclass
class Device(UpdaterRecorder):
    data_dir: Path
    repo: Repo
    crash_at: AckState | None = None
    clock_s: float = 1000.0
    options: dict[str, Any] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    """The path of every request made through the device's HTTP client."""

    def start(self, **options: Any) -> Updater:
        self.options = options
        hooks = {"request": [lambda request: self.fetched.append(request.url.path)]}
        self.http = httpx.Client(timeout=30.0, verify=_TLS, event_hooks=hooks)
        self.updater = Updater(
            self.data_dir,
            ack=self._ack,
            activate=self._activate,
            ota=options.pop("ota", OtaConfig(trusted_root=self.repo.root)),
            health=options.pop("health", HEALTH),
            http=options.pop("http", self.http),
            clock=lambda: self.clock_s,
            **options,
        )
        self.updater.recover()
        return self.updater

    def restart(self, **options: Any) -> Updater:
        """A new updater on the same data directory, as after a crash."""
        self.crash_at = None
        self.http.close()
        return self.start(**options)

    def _ack(self, ack: Ack) -> None:
        self.acks.append(ack)
        if ack.state is self.crash_at:
            raise _SimulatedCrash(ack.state)

    def saved(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.data_dir / STATE_FILE).read_text())
        return data

    def serving_version(self) -> str | None:
        active = Slots(self.data_dir).active()
        return active.manifest().version if active else None

    def close(self) -> None:
        self.updater.close()
        self.http.close()
        self.close_model()


@pytest.fixture
def device(tmp_path: Path, repo: Repo) -> Iterator[Device]:
    """A device serving 1.0.0 (slot a), its updater recovered."""
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start()
    yield made
    made.close()


@pytest.fixture
def blank(tmp_path: Path, repo: Repo) -> Iterator[Device]:
    """A device with nothing installed."""
    made = Device(tmp_path / "blank", repo)
    made.start()
    yield made
    made.close()


def _watch_through(device: Device, errors: int = 0) -> None:
    for n in range(WATCH):
        device.updater.observe(local_error=n < errors)


# --- the tables ---------------------------------------------------------------------------


def test_every_state_but_idle_and_the_outcomes_has_a_failure_edge() -> None:
    failing = {state for state, event in TRANSITIONS if event is Event.FAIL}
    assert failing == set(State) - {State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED}
    assert {s for s in State if s.outcome} == {State.COMMITTED, State.ROLLED_BACK, State.FAILED}
    assert all(TRANSITIONS[(s, Event.DONE)] is State.IDLE for s in State if s.outcome)
    assert set(RESUME) == set(State)
    assert ACKS[State.ROLLING_BACK] is AckState.FAILED


# --- deploys --------------------------------------------------------------------------------


def test_a_deploy_acks_each_state_then_commits_after_the_watch(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I]
    assert device.detail(command, _I) == (
        "health check: golden vectors, then the first 3 inferences (at most 20% failing) or "
        "60 s, whichever comes first"
    )
    assert {a.bundle_version for a in device.acks} == {bundle_label(V2)}
    assert device.updater.state is State.HEALTH_CHECK
    saved = device.saved()
    assert (saved["state"], saved["slot"], saved["fallback"], saved["saves"]) == (
        "health_check",
        "b",
        "a",
        5,
    )
    assert saved["command"]["id"] == command.id
    assert saved["target"]["length"] == repo.refs[V2].length
    # through the caller's HTTP client
    assert "/metadata/timestamp.json" in device.fetched
    assert device.fetched[-1].endswith(f".{bundle_label(V2)}.efb")  # hash-prefixed
    assert device.activated == [bundle_label(V1), bundle_label(V2)]
    device.updater.observe(local_error=False)
    device.updater.observe(local_error=False)
    assert device.acked(command) == [_D, _V, _I]
    device.updater.observe(local_error=False)
    assert device.acked(command) == [_D, _V, _I, _H]
    assert device.detail(command, _H) == "0 of the first 3 inferences failed (at most 20% allowed)"
    assert device.updater.state is State.IDLE
    assert device.updater.serving is not None and device.updater.serving.version == V2
    assert device.updater.last_outcome == device.acks[-1]
    assert device.updater.acked(command.id) == device.acks[-1]
    assert device.serving_version() == V2
    saved = device.saved()
    assert (saved["state"], saved["command"], saved["target"], saved["saves"]) == (
        "idle",
        None,
        None,
        0,
    )
    assert list(saved["acks"]) == [command.id]
    assert not (device.data_dir / "ota" / "downloads").exists()
    # observing after the outcome changes nothing
    device.updater.observe(local_error=True)
    device.updater.poll()
    assert device.acked(command) == [_D, _V, _I, _H]


def test_inferences_that_fail_in_the_watch_roll_back(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    device.updater.observe(local_error=True)
    assert device.acked(command) == [_D, _V, _I, _F, _R]
    failed = "1 of the first 1 inferences failed: the error rate over 3 is above the 20% allowed"
    assert device.detail(command, _F) == failed
    assert device.detail(command, _R) == f"{failed}; {bundle_label(V1)} is serving again"
    assert all(a.bundle_version == bundle_label(V2) for a in device.acks)
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V1)]
    assert device.serving_version() == V1
    assert device.updater.state is State.IDLE
    assert device.updater.last_outcome is not None
    assert device.updater.last_outcome.state is _R


def test_a_watch_of_one_error_in_five_commits(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(health=HealthConfig(watch_inferences=5, max_error_rate=0.2, watch_timeout_s=60))
    try:
        command = repo.deploy(V2)
        made.updater.handle(command)
        for error in (True, False, False, False):
            made.updater.observe(local_error=error)
            assert made.acked(command) == [_D, _V, _I]
        made.updater.observe(local_error=False)
        assert made.detail(command, _H) == (
            "1 of the first 5 inferences failed (at most 20% allowed)"
        )
    finally:
        made.close()


def test_a_quiet_watch_commits_when_its_time_is_up(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    device.updater.observe(local_error=False)
    device.clock_s += 59.5
    device.updater.poll()
    assert device.acked(command) == [_D, _V, _I]
    device.clock_s += 0.5  # exactly the deadline
    device.updater.poll()
    assert device.acked(command) == [_D, _V, _I, _H]
    assert device.detail(command, _H) == (
        "only 1 of 3 inferences (0 failed) in 60 s: committed on the golden vectors"
    )
    assert device.serving_version() == V2


def test_no_watch_commits_on_the_golden_vectors(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(health=HealthConfig(watch_inferences=0))
    try:
        command = repo.deploy(V2)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _V, _I, _H]
        assert made.detail(command, _I) == "health check: golden vectors"
        assert made.detail(command, _H).endswith(" golden vectors within tolerance")
        assert made.updater.state is State.IDLE
    finally:
        made.close()


def test_failing_golden_vectors_roll_back_and_the_broken_model_never_serves(
    device: Device, repo: Repo
) -> None:
    command = repo.deploy(BAD)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I, _F, _R]
    assert device.detail(command, _F).startswith(
        f"health check of {bundle_label(BAD)} failed: golden vectors: "
    )
    assert device.detail(command, _R).endswith(f"; {bundle_label(V1)} is serving again")
    assert device.activated == [bundle_label(V1), bundle_label(V1)]
    assert device.serving_version() == V1
    previous = Slots(device.data_dir).previous()
    assert previous is None or previous.manifest().version != BAD


def test_a_first_install_that_fails_leaves_no_model_serving(blank: Device, repo: Repo) -> None:
    assert blank.activated == [None]
    command = repo.deploy(BAD)
    blank.updater.handle(command)
    assert blank.acked(command) == [_D, _V, _I, _F, _R]
    assert blank.detail(command, _R).endswith("; no model is serving (this was the first install)")
    assert blank.activated == [None, None]
    assert blank.updater.serving is None
    assert Slots(blank.data_dir).active() is None


def test_a_first_install_commits(blank: Device, repo: Repo) -> None:
    command = repo.deploy(V1)
    blank.updater.handle(command)
    _watch_through(blank)
    assert blank.acked(command) == [_D, _V, _I, _H]
    assert blank.serving_version() == V1
    assert blank.saved()["acks"][command.id]["state"] == "healthy"


# --- refusals ---------------------------------------------------------------------------------


def test_the_serving_bundle_is_already_healthy(device: Device, repo: Repo) -> None:
    command = repo.deploy(V1)
    device.updater.handle(command)
    assert device.acked(command) == [_H]
    assert device.detail(command, _H) == f"{bundle_label(V1)} is already serving"
    assert device.acks[-1].bundle_version == bundle_label(V1)
    assert device.updater.state is State.IDLE
    assert device.saved()["acks"][command.id]["state"] == "healthy"


def test_a_deploy_without_a_bundle_is_refused(device: Device, repo: Repo) -> None:
    command = repo.command(CommandKind.DEPLOY, None)
    device.updater.handle(command)
    assert device.acked(command) == [_F]
    assert device.detail(command, _F) == "a deploy command needs a bundle; none was sent"
    assert device.acks[-1].bundle_version is None


def test_a_command_while_busy_is_refused_and_the_first_goes_on(device: Device, repo: Repo) -> None:
    first = repo.deploy(V2)
    device.updater.handle(first)
    busy = repo.deploy(V3)
    device.updater.handle(busy)
    assert device.acked(busy) == [_F]
    assert device.detail(busy, _F) == (
        f"busy: command {first.id} is in health_check; resend this one when it has finished"
    )
    assert device.updater.state is State.HEALTH_CHECK
    _watch_through(device)
    assert device.acked(first) == [_D, _V, _I, _H]


def test_earlier_commands_are_still_known_after_a_new_deploy(device: Device, repo: Repo) -> None:
    first = repo.deploy(V2)
    device.updater.handle(first)
    _watch_through(device)
    device.updater.handle(repo.deploy(V3))
    _watch_through(device)
    device.updater.handle(first)  # resent late: acked again, not installed again
    assert device.acked(first) == [_D, _V, _I, _H, _H]
    assert device.serving_version() == V3


def test_a_command_to_an_updater_stuck_mid_deploy_is_refused_as_busy(
    device: Device, repo: Repo
) -> None:
    """A step that raised what it does not handle (here the ack callback) leaves the state."""
    first = repo.deploy(V2)
    device.crash_at = _D
    with pytest.raises(_SimulatedCrash):
        device.updater.handle(first)
    device.crash_at = None
    for command in (repo.rollback(V1), repo.deploy(V3)):
        device.updater.handle(command)
        assert device.acked(command) == [_F]
        assert device.detail(command, _F) == (
            f"busy: command {first.id} is in downloading; resend this one when it has finished"
        )


def test_a_rollback_command_on_a_device_with_nothing_installed_fails(
    blank: Device, repo: Repo
) -> None:
    rollback = repo.rollback(V1)
    blank.updater.handle(rollback)
    assert blank.acked(rollback) == [_F]
    assert blank.detail(rollback, _F) == "no earlier bundle on this device to go back to"
    assert blank.activated == [None]


def test_a_resent_command_is_only_acked_again(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    _watch_through(device)
    first = device.acks[-1]
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I, _H, _H]
    again = device.acks[-1]
    assert again.model_dump(exclude={"ts"}) == first.model_dump(exclude={"ts"})
    assert again.ts > first.ts  # sent now, not a copy of the old one


def test_commands_naming_another_origin_are_refused_before_any_fetch(
    tmp_path: Path, repo: Repo
) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(origin=Origin.of(repo.served.url))
    try:
        since = len(repo.served.requests)
        foreign = repo.deploy(V2, targets_url="http://elsewhere.example/targets/")
        made.updater.handle(foreign)
        assert made.acked(foreign) == [_F]
        assert made.detail(foreign, _F).startswith("refused: the command's targets_url names ")
        assert "elsewhere.example" in made.detail(foreign, _F)
        assert repo.served.requests[since:] == []
        own = repo.deploy(V2)
        made.updater.handle(own)
        assert made.acked(own) == [_D, _V, _I]
    finally:
        made.close()


def test_a_deploy_whose_metadata_cannot_be_fetched_is_refused(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2, metadata_url=f"{repo.served.url}/gone/")
    device.updater.handle(command)
    assert device.acked(command) == [_D, _F]
    detail = device.detail(command, _F)
    assert detail.startswith("installs are blocked, the TUF metadata is unreachable: ")
    assert detail.endswith(
        ". The running model keeps serving; resend the deploy once the device can fetch "
        "current metadata"
    )
    assert device.activated == [bundle_label(V1)]
    assert device.serving_version() == V1
    # a detail longer than an ack holds is cut to fit (the URL is in the transport error)
    long = repo.deploy(V2, metadata_url=f"{repo.served.url}/{'x' * 1900}/")
    device.updater.handle(long)
    assert device.acked(long) == [_D, _F]
    assert len(device.detail(long, _F)) == DETAIL_MAX_CHARS


def test_the_updaters_own_http_client_follows_redirects_and_closes_with_it(
    tmp_path: Path, repo: Repo
) -> None:
    """Made without the caller's client, the updater makes its own: metadata and bundles
    may sit behind a redirect (a CDN, object storage)."""

    async def moved(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{repo.served.url}{request.url.path}", status_code=307)

    with serve_app(Starlette(routes=[Route("/{path:path}", moved)])) as redirector:
        made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
        made.start(http=None)
        command = repo.deploy(
            V2, metadata_url=f"{redirector.url}/metadata/", targets_url=f"{redirector.url}/targets/"
        )
        made.updater.handle(command)
        assert made.acked(command) == [_D, _V, _I]
        assert made.fetched == []  # not through the device's client
        own = made.updater._http
        made.close()
        assert own.is_closed


def test_misuse_raises(tmp_path: Path, repo: Repo) -> None:
    fresh = tmp_path / "new" / "device"
    updater = Updater(fresh, ack=lambda ack: None, activate=lambda model: None)
    # what the agent may report before recovering: nothing yet
    assert (updater.state, updater.serving, updater.last_outcome) == (State.IDLE, None, None)
    with pytest.raises(RuntimeError) as raised:
        updater.handle(repo.deploy(V2))
    assert str(raised.value) == "call Updater.recover() once before handle()"
    updater.recover()
    with pytest.raises(ValueError, match="takes deploy and rollback commands, not shadow"):
        updater.handle(repo.command(CommandKind.SHADOW, V2))
    updater.close()
    assert (fresh / STATE_FILE).exists() is False


def test_closing_the_updater_leaves_the_callers_http_client_open(device: Device) -> None:
    device.updater.close()
    assert not device.http.is_closed


@pytest.mark.parametrize("missing", ["metadata_url", "targets_url"])
def test_a_command_without_urls_and_no_configured_repository_fails(
    device: Device, repo: Repo, missing: str
) -> None:
    command = repo.deploy(V2, **{missing: None})
    device.updater.handle(command)
    assert device.acked(command) == [_D, _F]
    assert device.detail(command, _F) == (
        "no TUF repository: the command carries no metadata_url/targets_url and agent.toml "
        "sets no ota.metadata_url/ota.targets_url"
    )
    assert device.updater.state is State.IDLE
    assert device.activated == [bundle_label(V1)]


def test_urls_from_the_config_stand_in_for_the_commands(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(
        ota=OtaConfig(
            trusted_root=repo.root,
            metadata_url=f"{repo.served.url}/metadata/",
            targets_url=f"{repo.served.url}/targets/",
        )
    )
    try:
        command = repo.deploy(V2, metadata_url=None, targets_url=None)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _V, _I]
    finally:
        made.close()


def test_no_trusted_root_fails_the_download(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(ota=OtaConfig())
    try:
        command = repo.deploy(V2)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _F]
        assert made.detail(command, _F) == (
            "no trusted TUF root: set ota.trusted_root in agent.toml to the fleet's root.json "
            "(enrollment writes it)"
        )
        assert not (made.data_dir / "ota" / "metadata" / "root.json").exists()
    finally:
        made.close()


def test_the_trusted_root_is_copied_into_the_data_directory(device: Device, repo: Repo) -> None:
    (device.data_dir / "ota" / "metadata").mkdir(parents=True)  # left empty by a power cut
    command = repo.deploy(V2)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I]
    kept = device.data_dir / "ota" / "metadata" / "root.json"
    assert kept.read_bytes() == repo.root.read_bytes()


def test_a_command_that_disagrees_with_the_signed_target_is_refused(
    device: Device, repo: Repo
) -> None:
    ref = repo.refs[V2]
    wrong = ref.model_copy(update={"length": ref.length + 1})
    command = repo.deploy(V2).model_copy(update={"bundle": wrong})
    device.updater.handle(command)
    assert device.acked(command) == [_D, _F]
    assert device.detail(command, _F) == (
        f"{ref.target_path}: refused, the command names sha256 {ref.sha256} of "
        f"{ref.length + 1} bytes but the signed targets list {ref.sha256} of {ref.length}: "
        "the fleet's bundle record and its TUF repository disagree"
    )
    other = ref.model_copy(update={"sha256": "0" * 64})
    command = repo.deploy(V2).model_copy(update={"bundle": other})
    device.updater.handle(command)
    assert device.acked(command) == [_D, _F]
    assert "names sha256 " + "0" * 64 in device.detail(command, _F)
    assert device.serving_version() == V1


def test_an_older_bundle_than_the_installed_one_is_refused(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V2]), repo)
    made.start()
    try:
        command = repo.deploy(V1)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _F]
        number = repo.refs[V1].version_number
        assert made.detail(command, _F) == (
            f"{repo.refs[V1].target_path}: refused, rollback to version_number {number} while "
            f"{repo.refs[V2].version_number} is installed"
        )
    finally:
        made.close()


def test_a_deployment_that_saves_too_often_is_failed(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(max_state_saves=2)
    try:
        command = repo.deploy(V2)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _F]
        assert made.detail(command, _F) == (
            f"gave up on {bundle_label(V2)} after 2 state saves (the agent keeps restarting during "
            "the update?), instead of entering staged"
        )
        assert made.serving_version() == V1
        assert made.updater.state is State.IDLE
    finally:
        made.close()
    assert MAX_STATE_SAVES == 20


def test_five_saves_are_allowed_for_a_clean_deploy(tmp_path: Path, repo: Repo) -> None:
    made = Device(provision(tmp_path / "device", repo.bundles[V1]), repo)
    made.start(max_state_saves=5)
    try:
        command = repo.deploy(V2)
        made.updater.handle(command)
        assert made.acked(command) == [_D, _V, _I]
        assert made.saved()["saves"] == 5
    finally:
        made.close()


# --- rollback commands ----------------------------------------------------------------------


def test_a_rollback_command_returns_to_the_bundle_before(device: Device, repo: Repo) -> None:
    device.updater.handle(repo.deploy(V2))
    _watch_through(device)
    rollback = repo.rollback(V1)
    device.updater.handle(rollback)
    assert device.acked(rollback) == [_R]
    assert device.detail(rollback, _R) == f"{bundle_label(V1)} is serving again"
    assert device.acks[-1].bundle_version == bundle_label(V1)
    assert device.activated[-1] == bundle_label(V1)
    assert device.serving_version() == V1
    assert device.updater.state is State.IDLE
    again = repo.rollback(None)
    device.updater.handle(again)
    assert device.acked(again) == [_F]
    assert device.detail(again, _F) == "no earlier bundle on this device to go back to"


def test_a_rollback_command_without_a_bundle_goes_to_the_one_before(
    device: Device, repo: Repo
) -> None:
    device.updater.handle(repo.deploy(V2))
    _watch_through(device)
    rollback = repo.rollback(None)
    device.updater.handle(rollback)
    assert device.acked(rollback) == [_R]
    assert device.serving_version() == V1


def test_a_rollback_command_changes_nothing_unless_it_names_the_bundle_before(
    device: Device, repo: Repo
) -> None:
    already = repo.rollback(V1)
    device.updater.handle(already)
    assert device.acked(already) == [_R]
    assert device.detail(already, _R) == f"{bundle_label(V1)} is already serving"
    nothing = repo.rollback(V2)
    device.updater.handle(nothing)
    assert device.acked(nothing) == [_F]
    assert device.detail(nothing, _F) == "no earlier bundle on this device to go back to"
    device.updater.handle(repo.deploy(V2))
    _watch_through(device)
    wrong = repo.rollback(BAD)
    device.updater.handle(wrong)
    assert device.acked(wrong) == [_F]
    assert device.detail(wrong, _F) == (
        f"the bundle before this one was {bundle_label(V1)}, "
        f"not {bundle_label(BAD)}: nothing changed"
    )
    assert device.activated == [bundle_label(V1), bundle_label(V2)]
    assert device.serving_version() == V2


def test_a_rollback_command_during_the_health_check_undoes_the_deploy(
    device: Device, repo: Repo
) -> None:
    deploy = repo.deploy(V2)
    device.updater.handle(deploy)
    rollback = repo.rollback(V1)
    device.updater.handle(rollback)
    assert device.acked(deploy) == [_D, _V, _I, _F, _R]
    reason = f"rollback command {rollback.id} arrived during the health check"
    assert device.detail(deploy, _F) == reason
    assert device.detail(deploy, _R) == f"{reason}; {bundle_label(V1)} is serving again"
    assert device.acked(rollback) == [_R]
    assert device.detail(rollback, _R) == f"{reason}; {bundle_label(V1)} is serving again"
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V1)]
    assert device.serving_version() == V1
    assert device.updater.state is State.IDLE
    # the watch is over: inferences no longer decide anything
    _watch_through(device)
    assert device.acked(deploy) == [_D, _V, _I, _F, _R]


def test_a_rollback_to_a_slot_that_does_not_load_fails(device: Device, repo: Repo) -> None:
    device.updater.handle(repo.deploy(V2))
    _watch_through(device)
    previous = Slots(device.data_dir).previous()
    assert previous is not None
    next(p for p in previous.path.iterdir() if p.suffix == ".onnx").write_bytes(b"not a model")
    rollback = repo.rollback(V1)
    device.updater.handle(rollback)
    assert device.acked(rollback) == [_F]
    assert device.detail(rollback, _F).startswith(
        f"rolled back to slot {previous.name}, but it does not load: "
    )
    assert device.updater.state is State.IDLE


def test_records_are_kept_for_the_last_64_commands(device: Device, repo: Repo) -> None:
    made = [
        Ack(command=f"cmd-{n}", state=AckState.HEALTHY, detail=str(n), ts=time.time())
        for n in range(66)
    ]
    for ack in made:
        device.updater.record(ack)
    assert device.updater.acked("cmd-0") is None
    assert device.updater.acked("cmd-1") is None
    assert device.updater.acked("cmd-2") == made[2]
    assert list(device.saved()["acks"]) == [f"cmd-{n}" for n in range(2, 66)]
    device.updater.record(made[2].model_copy(update={"detail": "again"}))
    assert list(device.saved()["acks"])[-1] == "cmd-2"
    assert device.updater.last_outcome is not None
    assert device.updater.last_outcome.detail == "again"
    assert device.acks == []  # recorded, not sent


# --- recovery -------------------------------------------------------------------------------


def test_a_new_device_serves_nothing_and_keeps_no_state(blank: Device) -> None:
    assert blank.activated == [None]
    assert blank.updater.state is State.IDLE
    assert blank.updater.last_outcome is None
    assert blank.updater.trust is None
    assert not (blank.data_dir / STATE_FILE).exists()


def test_unreadable_state_is_kept_aside_and_the_device_starts_idle(
    device: Device, repo: Repo
) -> None:
    device.close()
    (device.data_dir / STATE_FILE).write_text('{"format": 2, "state": "idle"}')
    device.start()
    assert device.updater.state is State.IDLE
    assert (device.data_dir / f"{STATE_FILE}.unreadable").read_text().startswith('{"format": 2')
    assert not (device.data_dir / STATE_FILE).exists()
    assert device.activated == [bundle_label(V1), bundle_label(V1)]


def test_a_slot_that_does_not_load_at_start_serves_nothing(device: Device) -> None:
    device.close()
    active = Slots(device.data_dir).active()
    assert active is not None
    (active.path / "manifest.json").unlink()
    device.start()
    assert device.activated == [bundle_label(V1), None]
    assert device.updater.serving is None


def _crash(device: Device, command: Command, at: AckState) -> None:
    device.crash_at = at
    with pytest.raises(_SimulatedCrash):
        device.updater.handle(command)
    device.updater.close()


def test_a_crash_while_downloading_resumes_the_download(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _D)
    assert device.saved()["state"] == "downloading"
    device.restart()
    assert device.acked(command) == [_D, _D, _V, _I]
    assert device.saved()["saves"] == 6
    assert device.activated == [bundle_label(V1), bundle_label(V1), bundle_label(V2)]


def test_a_download_cut_half_way_resumes_from_its_part_file(
    device: Device, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's own kill point in the middle of the bundle (agent/_crashpoints.py), with
    the SIGKILL replaced by ``_SimulatedCrash``. Served by Starlette, which does Range (the
    module's repository server ignores it): the rest comes as a 206 and is appended, and
    the bundle's hash checks out."""

    def crash() -> None:
        raise _SimulatedCrash("downloading:partial")

    monkeypatch.setattr(_crashpoints, "_kill_self", crash)
    monkeypatch.setenv(CRASH_AT_ENV, "downloading:partial")
    device.close()
    device.start()
    with serve_directory(repo.repository.path) as ranged:
        command = repo.deploy(
            V2, metadata_url=f"{ranged.url}/metadata/", targets_url=f"{ranged.url}/targets/"
        )
        with pytest.raises(_SimulatedCrash):
            device.updater.handle(command)
        device.updater.close()
        (part,) = (device.data_dir / "ota" / "downloads").glob("*.part")
        kept, length = part.stat().st_size, repo.refs[V2].length
        assert length // 2 <= kept < length
        monkeypatch.delenv(CRASH_AT_ENV)
        since = len(ranged.requests)
        answers: list[tuple[str, int]] = []
        hooks = {"response": [lambda r: answers.append((r.request.url.path, r.status_code))]}
        with httpx.Client(timeout=30.0, verify=_TLS, event_hooks=hooks) as http:
            device.restart(http=http)
            assert device.acked(command) == [_D, _D, _V, _I]
    bundle = f".{bundle_label(V2)}.efb"
    resumed = [asked for p, asked in ranged.requests[since:] if p.endswith(bundle)]
    assert resumed == [f"bytes={kept}-"]  # once, for the rest: not started over
    assert [status for p, status in answers if p.endswith(bundle)] == [206]


def test_a_crash_after_staging_checks_the_slot_and_switches(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    assert device.saved()["state"] == "staged"
    device.restart()
    assert device.acked(command) == [_D, _V, _V, _I]
    assert device.activated == [bundle_label(V1), bundle_label(V1), bundle_label(V2)]
    _watch_through(device)
    assert device.serving_version() == V2


def test_a_staged_slot_that_holds_another_bundle_is_refused(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    slots = Slots(device.data_dir)
    shutil.rmtree(slots.inactive().path)
    slots.stage(repo.bundles[V3])
    device.restart()
    assert device.acked(command) == [_D, _V, _V, _F]
    v2, v3 = repo.refs[V2], repo.refs[V3]
    assert device.detail(command, _F) == (
        f"slot b holds digits-host {V3} (version_number {v3.version_number}) but the signed "
        f"target {v2.target_path} is digits-host {V2} ({v2.version_number}): refused"
    )
    assert device.serving_version() == V1


def _saved_as(device: Device, state: State, **fields: Any) -> None:
    """Edit the saved record as if the updater had saved ``state`` (and ``fields``)."""
    path = device.data_dir / STATE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | fields | {"state": state.value}))


def test_a_crash_while_verifying_with_the_download_gone_fails(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.VERIFYING)
    shutil.rmtree(device.data_dir / "ota" / "downloads")
    device.restart()
    assert device.acked(command) == [_D, _V, _F]
    assert device.detail(command, _F).startswith("the downloaded bundle ")
    assert device.detail(command, _F).endswith(
        " is gone (removed, or lost in a power cut before it reached the disk): resend the deploy"
    )
    assert device.serving_version() == V1


def test_a_download_altered_on_disk_fails_verification(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.VERIFYING)
    (download,) = (p for p in (device.data_dir / "ota" / "downloads").rglob("*") if p.is_file())
    data = bytearray(download.read_bytes())
    data[len(data) // 2] ^= 0xFF
    download.write_bytes(bytes(data))
    device.restart()
    assert device.acked(command) == [_D, _V, _F]
    detail = device.detail(command, _F)
    assert detail.startswith(f"{download} no longer has the signed length and hash (")
    assert detail.endswith("): the storage changed it after the download; resend the deploy")


def test_a_signed_target_that_misnames_its_bundle_fails_verification(
    device: Device, repo: Repo
) -> None:
    """The signed target as a repository that labels a bundle wrongly would sign it: the
    saved record is where it is kept from the download to the verification."""
    command = repo.deploy(V2)
    _crash(device, command, _V)
    target = device.saved()["target"]
    target["custom"]["edgefleet"]["version"] = V3
    _saved_as(device, State.VERIFYING, target=target)
    device.restart()
    assert device.acked(command) == [_D, _V, _F]
    v2 = repo.refs[V2]
    assert device.detail(command, _F) == (
        f"the bundle {v2.target_path} holds digits-host {V2} (version_number "
        f"{v2.version_number}) but the signed target {v2.target_path} is digits-host {V3} "
        f"({v2.version_number}): refused"
    )
    assert device.serving_version() == V1


def test_a_crash_while_verifying_verifies_again(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.VERIFYING)
    device.restart()
    assert device.acked(command) == [_D, _V, _V, _I]


def test_a_crash_before_the_pointer_moved_undoes_the_switch(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.SWITCHING)
    device.restart()
    assert device.acked(command) == [_D, _V, _F, _R]
    stopped = (
        f"the agent stopped during switching of {bundle_label(V2)} "
        "(a crash, a kill or a power cut): "
        "counted as a failure, so the update was undone"
    )
    assert device.detail(command, _F) == stopped
    assert device.detail(command, _R) == f"{stopped}; {bundle_label(V1)} is serving again"
    assert device.activated == [bundle_label(V1), bundle_label(V1)]
    assert device.serving_version() == V1


def test_a_first_install_stopped_before_the_switch_leaves_nothing_serving(
    blank: Device, repo: Repo
) -> None:
    command = repo.deploy(V1)
    _crash(blank, command, _V)
    _saved_as(blank, State.SWITCHING)
    blank.restart()
    assert blank.acked(command) == [_D, _V, _F, _R]
    assert blank.detail(command, _R).endswith("; no model is serving (this was the first install)")
    assert blank.activated == [None, None]
    assert Slots(blank.data_dir).active() is None


def test_a_crash_after_the_pointer_moved_goes_on_to_the_health_check(
    device: Device, repo: Repo
) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.SWITCHING)
    Slots(device.data_dir).switch()
    device.restart()
    assert device.acked(command) == [_D, _V, _I]
    assert device.activated == [bundle_label(V1), bundle_label(V2)]
    _watch_through(device)
    assert device.acked(command) == [_D, _V, _I, _H]
    assert device.serving_version() == V2


def test_a_crash_during_the_health_check_rolls_back(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _I)
    device.restart()
    assert device.acked(command) == [_D, _V, _I, _F, _R]
    assert device.detail(command, _F).startswith(
        f"the agent stopped during health_check of {bundle_label(V2)} "
    )
    assert device.activated == [bundle_label(V1), bundle_label(V1)]
    assert device.serving_version() == V1


def test_a_crash_after_the_outcome_finishes_it(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    device.crash_at = _H
    with pytest.raises(_SimulatedCrash):
        _watch_through(device)
    assert device.saved()["state"] == "committed"
    device.restart()
    assert device.acked(command) == [_D, _V, _I, _H, _H]
    assert device.updater.state is State.IDLE
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V2)]
    assert not (device.data_dir / "ota" / "downloads").exists()


def test_a_crash_while_rolling_back_rolls_back_again(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    device.updater.handle(command)
    device.crash_at = _F
    with pytest.raises(_SimulatedCrash):
        device.updater.observe(local_error=True)
    assert device.saved()["state"] == "rolling_back"
    device.restart()
    assert device.acked(command) == [_D, _V, _I, _F, _F, _R]
    assert device.serving_version() == V1
    assert device.activated[-1] == bundle_label(V1)


def test_a_rollback_that_cannot_find_its_slot_fails(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    _saved_as(device, State.ROLLING_BACK, fallback="b")
    device.restart()
    assert device.acked(command) == [_D, _V, _F, _F]
    assert device.detail(command, _F) == ""
    assert device.acks[-1].detail == (
        "cannot roll back to slot b: the pointer names slot a and before it None"
    )
    assert device.updater.state is State.IDLE


def test_state_without_its_data_fails_cleanly(device: Device, repo: Repo) -> None:
    command = repo.deploy(V2)
    _crash(device, command, _V)
    staged = device.saved()
    del staged["state"]
    _saved_as(device, State.STAGED, target=None)
    device.restart()
    assert device.acks[-1].state is _F
    assert device.acks[-1].detail == "the saved update state holds no signed target"
    _saved_as(device, State.STAGED, **(staged | {"slot": None}))
    device.restart()
    assert device.acks[-1].detail == "the saved update state names no slot"
    bare = command.model_copy(update={"bundle": None}).model_dump(mode="json")
    _saved_as(device, State.DOWNLOADING, **(staged | {"command": bare}))
    device.restart()
    assert device.acks[-1].detail == "the saved update state names no bundle"
    assert device.acks[-1].bundle_version is None
    assert device.updater.state is State.IDLE
