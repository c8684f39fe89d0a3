"""The A/B updater end to end: a real fleet (its TUF repository served by uvicorn), real
bundles of the digits model on ONNX Runtime, and real SIGKILLs at every state.

The device side is ``agent.updater.Updater`` on a data directory that starts with 1.0.0
installed in slot a (as an image flashed at the factory would). Crash tests run it in a
subprocess (``tests/utils/updater_driver.py``), kill it with ``EDGEFLEET_AGENT_CRASH_AT``,
start it again, and then check from the outside which bundle the slot pointer names and
that it loads and passes its golden vectors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import HealthConfig, OtaConfig
from agent.model import load_installed
from agent.slots import Slots
from agent.updater import (
    ACKS,
    CRASH_AT_ENV,
    RESUME,
    RESUME_AFTER_SWITCH,
    STATE_FILE,
    TRANSITIONS,
    Event,
    State,
    Updater,
)
from contracts.mqtt import Ack, AckState, BundleRef, Command, CommandKind
from ota.bundle import bundle_compile_output
from tests.utils.fleet import RunningFleet, make_bundle, running_fleet
from tests.utils.http import ServedApp, serve_app
from tests.utils.updater_harness import UpdaterRecorder, bundle_label, golden_broken, provision

ROOT = Path(__file__).resolve().parents[1]
V1, V2, BAD_GOLDEN, TAMPERED = "1.0.0", "1.1.0", "1.2.0", "1.3.0"
WATCH = 3
HEALTH = HealthConfig(watch_inferences=WATCH, max_error_rate=0.2, watch_timeout_s=60)


# --- a fleet with four bundles ----------------------------------------------------------------


@dataclass
class Fleet:
    running: RunningFleet
    served: ServedApp
    token: str
    root: Path
    refs: dict[str, BundleRef]

    def command(self, kind: CommandKind, version: str | None) -> Command:
        return Command(
            id=f"cmd-{uuid.uuid4().hex[:12]}",
            kind=kind,
            bundle=self.refs[version] if version else None,
            metadata_url=f"{self.served.url}/ota/metadata/",
            targets_url=f"{self.served.url}/ota/targets/",
            issued_at=time.time(),
        )

    def deploy(self, version: str) -> Command:
        return self.command(CommandKind.DEPLOY, version)

    def target_requests(self, since: int = 0) -> list[str | None]:
        """The Range header of every bundle download since request number ``since``."""
        return [r for p, r in self.served.requests[since:] if p.startswith("/ota/targets/")]


@pytest.fixture(scope="module")
def bundles(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("updater-bundles")
    bad = out / f"digits-{BAD_GOLDEN}.efb"
    bundle_compile_output(
        golden_broken(compiled_digits, out),
        version=BAD_GOLDEN,
        out=bad,
        artifact_id="onnxruntime:fp32",
    )
    made = {v: make_bundle(compiled_digits, out, v) for v in (V1, V2, TAMPERED)}
    return {**made, BAD_GOLDEN: bad}


def _ref(attached: dict[str, Any]) -> BundleRef:
    return BundleRef(
        target_path=attached["target_path"],
        name=attached["bundle_name"].rsplit("-", 1)[0],
        version=attached["version"],
        version_number=attached["version_number"],
        sha256=attached["sha256"],
        length=attached["length"],
    )


@contextmanager
def _serve_fleet(
    directory: Path, bundles: dict[str, Path], versions: tuple[str, ...], **settings: Any
) -> Iterator[Fleet]:
    """A fleet with ``versions`` published, its HTTP app on a real port."""
    with running_fleet(directory, **settings) as running, serve_app(running.client.app) as served:
        refs = {v: _ref(running.publish(bundles[v])) for v in versions}
        yield Fleet(
            running, served, running.token("viewer"), running.server.repository.root_file, refs
        )


@pytest.fixture(scope="module")
def fleet(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """1.0.0, 1.1.0, 1.2.0 (golden vectors that fail) and 1.3.0 (altered on the server)."""
    directory = tmp_path_factory.mktemp("updater-fleet")
    with _serve_fleet(directory, bundles, (V1, V2, BAD_GOLDEN, TAMPERED)) as served:
        ref = served.refs[TAMPERED]
        dirname, _, name = ref.target_path.rpartition("/")
        stored = (
            served.running.server.settings.ota_dir / "targets" / dirname / f"{ref.sha256}.{name}"
        )
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        yield served


# --- devices -----------------------------------------------------------------------------------


def _serves(data_dir: Path, version: str) -> None:
    """From the outside: the slot pointer names ``version``; it loads and answers right."""
    active = Slots(data_dir).active()
    assert active is not None, "no slot is serving"
    model = load_installed(active.path)
    try:
        assert model.manifest.version == version
        golden = model.check_golden_vectors()
        assert golden.passed, golden.detail
    finally:
        model.close()


@dataclass
class Device(UpdaterRecorder):
    """An in-process updater with the acks it sent and the models it handed out."""

    data_dir: Path
    fleet: Fleet

    def start(self, **options: Any) -> Updater:
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {self.fleet.token}"}, timeout=30.0
        )
        self.updater = Updater(
            self.data_dir,
            ack=self.acks.append,
            activate=self._activate,
            ota=OtaConfig(trusted_root=self.fleet.root),
            health=HEALTH,
            http=self.http,
            **options,
        )
        self.updater.recover()
        return self.updater

    def close(self) -> None:
        self.updater.close()
        self.http.close()
        self.close_model()


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet, bundles: dict[str, Path]) -> Iterator[Device]:
    """A device serving 1.0.0, its updater recovered."""
    made = Device(provision(tmp_path / "device", bundles[V1]), fleet)
    made.start()
    yield made
    made.close()


_D, _V, _I, _H, _F, _R = (
    AckState.DOWNLOADING,
    AckState.VERIFIED,
    AckState.INSTALLED,
    AckState.HEALTHY,
    AckState.FAILED,
    AckState.ROLLED_BACK,
)


# --- deploys -----------------------------------------------------------------------------------


def test_a_deploy_acks_each_state_and_the_new_model_serves(device: Device, fleet: Fleet) -> None:
    command = fleet.deploy(V2)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I]
    # the fleet is told what the health check waits for
    assert f"the first {WATCH} inferences (at most 20% failing)" in device.detail(command, _I)
    assert device.updater.state is State.HEALTH_CHECK
    assert device.activated == [bundle_label(V1), bundle_label(V2)]  # serving while it is watched
    for _ in range(WATCH):
        device.updater.observe(local_error=False)
    assert device.acked(command) == [_D, _V, _I, _H]
    assert "0 of the first 3 inferences failed" in device.detail(command, _H)
    assert device.updater.state is State.IDLE
    assert device.updater.serving is not None and device.updater.serving.version == V2
    _serves(device.data_dir, V2)
    previous = Slots(device.data_dir).previous()
    assert previous is not None and previous.manifest().version == V1
    assert json.loads((device.data_dir / STATE_FILE).read_text())["state"] == "idle"
    assert not (device.data_dir / "ota" / "downloads").exists()


def test_a_rollback_command_returns_to_the_previous_bundle_once(
    device: Device, fleet: Fleet
) -> None:
    device.updater.handle(fleet.deploy(V2))
    for _ in range(WATCH):
        device.updater.observe(local_error=False)
    rollback = fleet.command(CommandKind.ROLLBACK, V1)
    device.updater.handle(rollback)
    assert device.acked(rollback) == [_R]
    assert device.activated[-1] == bundle_label(V1)
    _serves(device.data_dir, V1)
    again = fleet.command(CommandKind.ROLLBACK, None)
    device.updater.handle(again)
    assert device.acked(again) == [_F]
    assert "no earlier bundle" in device.detail(again, _F)
    _serves(device.data_dir, V1)


def test_a_rollback_command_changes_nothing_unless_it_names_the_bundle_before(
    device: Device, fleet: Fleet
) -> None:
    already = fleet.command(CommandKind.ROLLBACK, V1)
    device.updater.handle(already)  # serving 1.0.0, nothing before it
    assert device.acked(already) == [_R]
    assert device.detail(already, _R) == f"{bundle_label(V1)} is already serving"
    nothing = fleet.command(CommandKind.ROLLBACK, V2)
    device.updater.handle(nothing)
    assert device.acked(nothing) == [_F]
    assert device.detail(nothing, _F) == "no earlier bundle on this device to go back to"

    device.updater.handle(fleet.deploy(V2))
    for _ in range(WATCH):
        device.updater.observe(local_error=False)
    wrong = fleet.command(CommandKind.ROLLBACK, BAD_GOLDEN)
    device.updater.handle(wrong)
    assert device.acked(wrong) == [_F]
    assert device.detail(wrong, _F) == (
        f"the bundle before this one was {bundle_label(V1)}, "
        f"not {bundle_label(BAD_GOLDEN)}: nothing changed"
    )
    assert device.activated == [bundle_label(V1), bundle_label(V2)]
    _serves(device.data_dir, V2)
    assert device.updater.state is State.IDLE


def test_a_rollback_command_during_the_health_check_undoes_the_deploy(
    device: Device, fleet: Fleet
) -> None:
    deploy = fleet.deploy(V2)
    device.updater.handle(deploy)
    rollback = fleet.command(CommandKind.ROLLBACK, V1)
    device.updater.handle(rollback)
    assert device.acked(deploy) == [_D, _V, _I, _F, _R]
    assert device.acked(rollback) == [_R]
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V1)]
    _serves(device.data_dir, V1)


def test_failing_golden_vectors_roll_back_by_themselves(device: Device, fleet: Fleet) -> None:
    command = fleet.deploy(BAD_GOLDEN)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I, _F, _R]
    assert "golden vectors" in device.detail(command, _F)
    assert "outside tolerance" in device.detail(command, _F)
    assert f"{bundle_label(V1)} is serving again" in device.detail(command, _R)
    assert device.activated == [bundle_label(V1), bundle_label(V1)]  # the broken model never served
    assert device.updater.state is State.IDLE
    _serves(device.data_dir, V1)


def test_a_high_error_rate_on_the_first_inferences_rolls_back(device: Device, fleet: Fleet) -> None:
    command = fleet.deploy(V2)
    device.updater.handle(command)
    device.updater.observe(local_error=False)
    device.updater.observe(local_error=True)  # 1 of 3 is above 20%, whatever comes next
    assert device.acked(command) == [_D, _V, _I, _F, _R]
    assert "error rate" in device.detail(command, _F)
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V1)]
    _serves(device.data_dir, V1)


def test_a_health_check_without_traffic_commits_on_its_golden_vectors(
    tmp_path: Path, fleet: Fleet, bundles: dict[str, Path]
) -> None:
    now = [0.0]
    device = Device(provision(tmp_path / "device", bundles[V1]), fleet)
    updater = device.start(clock=lambda: now[0])
    try:
        command = fleet.deploy(V2)
        updater.handle(command)
        updater.observe(local_error=False)
        updater.poll()
        assert updater.state is State.HEALTH_CHECK
        now[0] = HEALTH.watch_timeout_s
        updater.poll()
        assert device.acked(command) == [_D, _V, _I, _H]
        assert "only 1 of 3 inferences" in device.detail(command, _H)
        _serves(device.data_dir, V2)
    finally:
        device.close()


def test_a_first_install_that_fails_leaves_no_model_and_the_next_one_serves(
    tmp_path: Path, fleet: Fleet
) -> None:
    device = Device(tmp_path / "device", fleet)
    updater = device.start()
    try:
        broken = fleet.deploy(BAD_GOLDEN)
        updater.handle(broken)
        assert device.acked(broken) == [_D, _V, _I, _F, _R]
        assert "first install" in device.detail(broken, _R)
        assert Slots(device.data_dir).active() is None
        working = fleet.deploy(V1)
        updater.handle(working)
        for _ in range(WATCH):
            updater.observe(local_error=False)
        assert device.acked(working) == [_D, _V, _I, _H]
        assert device.activated == [None, None, bundle_label(V1)]
        _serves(device.data_dir, V1)
    finally:
        device.close()


# --- refusals ----------------------------------------------------------------------------------


def test_a_tampered_bundle_is_refused_and_the_old_model_untouched(
    device: Device, fleet: Fleet
) -> None:
    pointer = (device.data_dir / "slots" / "pointer.json").read_bytes()
    command = fleet.deploy(TAMPERED)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _F]
    assert "length and hash" in device.detail(command, _F)
    assert device.activated == [bundle_label(V1)]
    assert (device.data_dir / "slots" / "pointer.json").read_bytes() == pointer
    assert not (device.data_dir / "slots" / "b").exists()
    assert not (device.data_dir / "ota" / "downloads").exists()
    _serves(device.data_dir, V1)


def test_an_older_bundle_is_refused_before_download_and_the_same_one_is_not_reinstalled(
    tmp_path: Path, fleet: Fleet, bundles: dict[str, Path]
) -> None:
    device = Device(provision(tmp_path / "device", bundles[V2]), fleet)
    updater = device.start()
    try:
        since = len(fleet.served.requests)
        older = fleet.deploy(V1)
        updater.handle(older)
        assert device.acked(older) == [_D, _F]
        assert "rollback to version_number 1000000 while 1001000 is installed" in device.detail(
            older, _F
        )
        same = fleet.deploy(V2)
        updater.handle(same)
        assert device.acked(same) == [_H]
        assert "already serving" in device.detail(same, _H)
        assert fleet.target_requests(since) == []
        assert device.activated == [bundle_label(V2)]
        _serves(device.data_dir, V2)
    finally:
        device.close()


def test_expired_metadata_refuses_deploys_and_the_running_model_keeps_serving(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    with _serve_fleet(
        tmp_path / "fleet",
        bundles,
        (V1, V2),
        timestamp_expiry_s=1,
        timestamp_refresh_interval_s=3600,
    ) as fleet:
        device = Device(provision(tmp_path / "device", bundles[V1]), fleet)
        updater = device.start()
        try:
            time.sleep(1.5)  # the timestamp expires and nobody re-signs it
            command = fleet.deploy(V2)
            updater.handle(command)
            assert device.acked(command) == [_D, _F]
            assert "metadata_expired" in device.detail(command, _F)
            assert updater.trust is not None and not updater.trust.can_install
            assert device.activated == [bundle_label(V1)]
            _serves(device.data_dir, V1)
        finally:
            device.close()


def test_a_resent_command_is_acked_again_but_never_installed_twice(
    device: Device, fleet: Fleet
) -> None:
    command = fleet.deploy(V2)
    since = len(fleet.served.requests)
    device.updater.handle(command)
    device.updater.handle(command)  # resent during the health check
    assert device.acked(command) == [_D, _V, _I, _I]
    for _ in range(WATCH):
        device.updater.observe(local_error=False)
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I, _I, _H, _H]
    device.close()
    device.start()  # the agent restarts: handled commands are remembered on disk
    device.updater.handle(command)
    assert device.acked(command) == [_D, _V, _I, _I, _H, _H, _H]
    assert len(fleet.target_requests(since)) == 1
    assert device.activated == [bundle_label(V1), bundle_label(V2), bundle_label(V2)]
    _serves(device.data_dir, V2)


def test_the_last_finished_command_is_kept_for_the_status_across_restarts(
    device: Device, fleet: Fleet
) -> None:
    """What the device's retained status names (the fleet reconciles a lost final ack from
    it), including a command the agent answered itself (shadow)."""
    assert device.updater.last_outcome is None
    command = fleet.deploy(V2)
    device.updater.handle(command)
    assert device.updater.last_outcome is None  # in its health check: not finished yet
    for _ in range(WATCH):
        device.updater.observe(local_error=False)
    outcome = device.updater.last_outcome
    assert outcome is not None and (outcome.command, outcome.state) == (command.id, _H)
    shadow = Ack(command="shadow-1", state=_R, detail="shadow stopped", ts=time.time())
    device.updater.record(shadow)
    device.close()
    device.start()
    assert device.updater.last_outcome == shadow
    assert device.updater.acked("shadow-1") == shadow
    seen = device.updater.acked(command.id)
    assert seen is not None and seen.state is _H


# --- the state machine itself ------------------------------------------------------------------


def test_every_unfinished_state_has_a_failure_edge_and_every_crash_a_resume_point() -> None:
    for state in State:
        exits = {event: target for (s, event), target in TRANSITIONS.items() if s is state}
        if state is State.IDLE:
            assert set(exits) == {Event.DEPLOY, Event.ROLLBACK}
        elif state.outcome:
            assert exits == {Event.DONE: State.IDLE}, f"{state} must only finish"
        else:
            assert Event.FAIL in exits, f"{state} has no failure edge"
    # before the switch a failure only reports (the old model never stopped); from the
    # switch on it rolls back; a failed rollback is reported
    for state in (State.DOWNLOADING, State.VERIFYING, State.STAGED, State.ROLLING_BACK):
        assert TRANSITIONS[(state, Event.FAIL)] is State.FAILED
    for state in (State.SWITCHING, State.HEALTH_CHECK):
        assert TRANSITIONS[(state, Event.FAIL)] is State.ROLLING_BACK
    reachable, frontier = {State.IDLE}, [State.IDLE]
    while frontier:
        here = frontier.pop()
        for (s, _), target in TRANSITIONS.items():
            if s is here and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    assert set(RESUME) == set(State)
    assert State.HEALTH_CHECK not in RESUME.values()  # a crash in the check fails the check
    assert RESUME_AFTER_SWITCH is State.HEALTH_CHECK
    assert all(ACKS[s].final for s in State if s.outcome)


# --- kills -------------------------------------------------------------------------------------


def _drive(
    fleet: Fleet,
    data_dir: Path,
    command: Command | None = None,
    *,
    crash_at: str | None = None,
    max_state_saves: int = 20,
) -> tuple[int, list[dict[str, Any]], str]:
    """Run the updater in its own process; its exit code, JSON lines and stderr."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT_ENV}
    if crash_at:
        env[CRASH_AT_ENV] = crash_at
    args = [
        sys.executable,
        "-m",
        "tests.utils.updater_driver",
        str(data_dir),
        f"--root={fleet.root}",
        f"--token={fleet.token}",
        f"--watch={WATCH}",
        f"--max-state-saves={max_state_saves}",
    ]
    if command is not None:
        args.append(f"--command={command.model_dump_json()}")
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, lines, done.stderr[-3000:]


def _acks(lines: list[dict[str, Any]], command: Command) -> list[AckState]:
    return [
        AckState(x["ack"]["state"]) for x in lines if x.get("ack", {}).get("command") == command.id
    ]


CRASHES = [
    # (kill point, bundle deployed, bundle serving after the restart, the command's last ack)
    ("downloading", V2, V2, _H),
    ("downloading:partial", V2, V2, _H),
    ("verifying", V2, V2, _H),
    ("staged", V2, V2, _H),
    ("switching", V2, V1, _R),  # the pointer had not moved: undone
    ("switching:switched", V2, V2, _H),  # it had: the new model is checked and committed
    ("health_check", V2, V1, _R),  # a crash during the check is a failed check
    ("committed", V2, V2, _H),
    ("idle", V2, V2, _H),
    ("rolling_back", BAD_GOLDEN, V1, _R),
    ("rolled_back", BAD_GOLDEN, V1, _R),
    ("failed", TAMPERED, V1, _F),
]


@pytest.mark.parametrize(
    ("crash_at", "deployed", "serving", "outcome"), CRASHES, ids=[c[0] for c in CRASHES]
)
def test_a_kill_at_any_state_leaves_a_working_model_after_recovery(
    crash_at: str,
    deployed: str,
    serving: str,
    outcome: AckState,
    fleet: Fleet,
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    data_dir = provision(tmp_path / "device", bundles[V1])
    command = fleet.deploy(deployed)
    since = len(fleet.served.requests)
    code, before, stderr = _drive(fleet, data_dir, command, crash_at=crash_at)
    assert code == -signal.SIGKILL, f"not killed at {crash_at} (exit {code}): {stderr}"
    assert "end" not in before[-1]
    code, after, stderr = _drive(fleet, data_dir)
    assert code == 0, stderr
    activated = [x["activate"] for x in after if "activate" in x]
    assert activated and activated[-1] == bundle_label(serving), activated
    assert after[-1] == {"end": "idle"}
    assert _acks(before + after, command)[-1] == outcome
    _serves(data_dir, serving)
    if crash_at == "downloading:partial":
        ranges = fleet.target_requests(since)
        assert len(ranges) == 2 and ranges[0] is None, ranges
        assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


BOOT_LOOPS = [
    # (kill point, cap of state saves, starts until it gives up, the command's acks)
    ("downloading", 3, 4, [_F]),  # before the switch: reported, the old model never stopped
    ("switching:switched", 4, 2, [_D, _V, _F, _R]),  # after it: rolled back
]


@pytest.mark.parametrize(
    ("crash_at", "cap", "starts", "acks"), BOOT_LOOPS, ids=[b[0] for b in BOOT_LOOPS]
)
def test_a_deployment_that_keeps_crashing_is_given_up_on(
    crash_at: str,
    cap: int,
    starts: int,
    acks: list[AckState],
    fleet: Fleet,
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A boot loop: the agent dies at the same point at every start. Past the cap of state
    saves the deployment takes its failure edge instead of being tried again."""
    data_dir = provision(tmp_path / "device", bundles[V1])
    command = fleet.deploy(V2)
    lines: list[dict[str, Any]] = []
    for start in range(starts):
        code, output, stderr = _drive(
            fleet,
            data_dir,
            command if start == 0 else None,
            crash_at=crash_at,
            max_state_saves=cap,
        )
        lines += output
        assert code == (0 if start == starts - 1 else -signal.SIGKILL), stderr
    assert _acks(lines, command) == acks  # a kill right after a save comes before its ack
    failed = next(x["ack"] for x in lines if x.get("ack", {}).get("state") == "failed")
    assert "gave up" in failed["detail"]
    _serves(data_dir, V1)
