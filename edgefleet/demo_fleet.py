"""The demo's second half: a fleet server, a real agent and simulated devices on this machine.

Everything runs for real and on loopback: ``fleet.app`` under uvicorn with its own
mosquitto and SQLite, ``agent.daemon.AgentDaemon`` enrolled through the HTTP API, and
``fleet.simulator`` devices speaking the same MQTT protocol. The story: releases 1.0.0 and
1.1.0 of the artifact the host compile selected roll out in waves (a canary cohort first);
a broken 1.2.0 fails the canary's gate and is rolled back automatically, its cause shown;
the agent answers locally, then, made to miss its latency budget, through the cloud.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from contracts.cli import fail, wait_for_stop

SIMULATED_DEVICES = 20
CANARY = "canary"
CANARY_SIMULATED = 2
"""Simulated devices that join the real agent in the canary cohort, the first wave."""
RELEASES = ("1.0.0", "1.1.0")
BROKEN = "1.2.0"
CLOUD_ARTIFACT = "onnxruntime:fp32"
"""What the fleet's cloud endpoint runs (fleet/inference.py: ONNX Runtime)."""
UNMEETABLE_LATENCY_BUDGET_MS = 0.001


def run_fleet_demo(console: Console, out: Path, *, keep_running: bool = False) -> None:
    console.rule("5. Start the fleet server: SQLite, its own mosquitto, TUF repository")
    fleet_dir = out / "fleet"
    shutil.rmtree(fleet_dir, ignore_errors=True)
    shipped, cloud = _release_bundles(console, out)
    with ExitStack() as stack:
        url = stack.enter_context(_fleet_server(fleet_dir))
        token = (fleet_dir / "admin.token").read_text().strip()
        api = stack.enter_context(
            httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"})
        )
        published = [_publish(api, bundle) for bundle in shipped]
        for bundle in cloud:
            _publish(api, bundle)
        _call(api, "PUT", "/models/digits/versions/1.0.0/stage", json={"stage": "production"})
        console.print(f"fleet at {url}: dashboard at /, API docs at /docs")
        console.print(f"admin token in {fleet_dir / 'admin.token'}")
        console.print(
            f"published digits {', '.join(RELEASES)} (1.0.0 in production), each signed as a "
            "TUF target"
        )

        console.rule(
            f"6. Enroll an agent on this machine and {SIMULATED_DEVICES} simulated devices"
        )
        board = _Board(stack, url, api, out)
        _simulated_devices(api, stack)  # they run until the stack closes
        _wait(lambda: len(_call(api, "GET", "/devices?online=true")) == SIMULATED_DEVICES + 1,
              "every device online")  # fmt: skip
        console.print(
            f"the agent (demo-board) and sim-00, sim-01 form the {CANARY!r} cohort; agent "
            f"config in {board.config_path}; its local API on port {board.port}"
        )
        console.print("the agent has no model yet; its local API asks the fleet's cloud endpoint:")
        _ask(console, board.local, out)

        waves = [CANARY, "50", "100"]
        for step, release in enumerate(published, start=7):
            console.rule(f"{step}. Roll out {release['bundle_name']} in waves {', '.join(waves)}")
            _roll_out(console, api, release, waves, expect="completed")
            _wait(lambda name=release["bundle_name"]: board.serving() == name, "the new release")
            _ask(console, board.local, out)

        console.rule(f"9. Roll out a broken {BROKEN}: its canary wave fails, it rolls back")
        broken = _publish(api, _broken_bundle(console, out))
        rollout = _roll_out(console, api, broken, [CANARY, "100"], expect="rolled_back")
        _show_cause(console, api, rollout, board)
        _wait(lambda: board.serving() == published[-1]["bundle_name"], "the agent's own rollback")
        console.print(f"the agent serves {board.serving()} again:")
        _ask(console, board.local, out)

        console.rule("10. Make the local model fail: the cloud answers instead")
        board.restart(latency_budget_ms=UNMEETABLE_LATENCY_BUDGET_MS)
        console.print(
            f"the agent restarted with fallback.latency_budget_ms = "
            f"{UNMEETABLE_LATENCY_BUDGET_MS}, a budget no local answer meets:"
        )
        _ask(console, board.local, out)

        console.rule("Done")
        _keep_exploring(console, url, token, fleet_dir, rollout["id"], keep_running)
        if keep_running:
            _until_interrupted(console)


class _Board:
    """The real agent on this machine, enrolled in the canary cohort, run in this process."""

    def __init__(self, stack: ExitStack, url: str, api: httpx.Client, out: Path) -> None:
        from agent.enroll import enroll_device

        grant = _call(
            api,
            "POST",
            "/enrollment-tokens",
            json={"profile": "host", "tags": [CANARY], "uses": 1 + CANARY_SIMULATED},
        )["token"]
        self.grant = grant
        self.port = _free_port()
        enrolled = enroll_device(
            url, grant, out / "device", device_id="demo-board", api_port=self.port
        )
        self.config_path = enrolled.config_path
        self.local = f"http://127.0.0.1:{self.port}"
        self._daemon: Any = None
        stack.callback(lambda: self._daemon.stop() if self._daemon else None)
        self._start()

    def _start(self, **fallback: Any) -> None:
        from agent.config import load_config
        from agent.daemon import AgentDaemon

        config = load_config(self.config_path)
        config = config.model_copy(
            update={
                "model_name": "digits",
                "telemetry": config.telemetry.model_copy(update={"interval_s": 1.0}),
                "health": config.health.model_copy(update={"watch_inferences": 0}),
                "fallback": config.fallback.model_copy(update=fallback),
            }
        )
        self._daemon = AgentDaemon(config)
        self._daemon.start()
        threading.Thread(target=self._daemon.run, name="demo-agent", daemon=True).start()

    def restart(self, **fallback: Any) -> None:
        self._daemon.stop()
        self._daemon = None
        self._start(**fallback)

    def verdict(self, command_id: str) -> str | None:
        """``failed: WHY`` once the agent finished the command, from its updater's record."""
        ack = self._daemon.updater.acked(command_id)
        if ack is None or not ack.state.final:
            return None
        return f"{ack.state}: {ack.detail}" if ack.detail else str(ack.state)

    def serving(self) -> str | None:
        manifest = self._daemon.updater.serving
        return f"{manifest.name}-{manifest.version}" if manifest else None


def _simulated_devices(api: httpx.Client, stack: ExitStack) -> None:
    """Twenty simulated devices; the first two in the canary cohort. They cannot run a model
    (fleet/simulator), so they are told to fail the broken release's health check as the
    real agent does."""
    from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec

    canary = _call(
        api,
        "POST",
        "/enrollment-tokens",
        json={"profile": "host", "tags": [CANARY], "uses": CANARY_SIMULATED},
    )["token"]
    rest = _call(
        api,
        "POST",
        "/enrollment-tokens",
        json={"profile": "host", "uses": SIMULATED_DEVICES - CANARY_SIMULATED},
    )["token"]
    specs = []
    for i in range(SIMULATED_DEVICES):
        grant = canary if i < CANARY_SIMULATED else rest
        body = _call(api, "POST", "/enroll", json={"token": grant, "device_id": f"sim-{i:02d}"})
        specs.append(
            SimulatedDeviceSpec(
                device_id=body["device_id"],
                username=body["mqtt"]["username"],
                password=body["mqtt"]["password"],
            )
        )
    behaviour = Behaviour(telemetry_interval_s=1.0, failing_bundles={f"digits-host-{BROKEN}"})
    simulator = FleetSimulator(body["mqtt"]["host"], body["mqtt"]["port"], specs, behaviour)
    stack.enter_context(simulator)
    simulator.start()


def _release_bundles(console: Console, out: Path) -> tuple[list[Path], list[Path]]:
    """The releases devices get (the artifact the host compile selected) and, when that is
    not ONNX Runtime fp32, the bundles the fleet's cloud endpoint runs for fallback."""
    from contracts.report import CompileReport
    from ota.bundle import bundle_compile_output

    report = CompileReport.model_validate_json((out / "host" / "report.json").read_text())
    if report.selected:
        shipped_artifact = report.selected
        console.print(f"devices get {shipped_artifact}, the artifact the host compile selected")
    else:
        shipped_artifact = CLOUD_ARTIFACT
        console.print(f"the host compile selected nothing; devices get {CLOUD_ARTIFACT}")
    shipped, cloud = [], []
    for version in RELEASES:
        path = out / "bundles" / f"digits-host-{version}.efb"
        bundle_compile_output(out / "host", version=version, out=path, artifact_id=shipped_artifact)
        shipped.append(path)
        if shipped_artifact != CLOUD_ARTIFACT:
            path = out / "bundles" / f"digits-cloud-{version}.efb"
            bundle_compile_output(
                out / "host",
                version=version,
                out=path,
                artifact_id=CLOUD_ARTIFACT,
                name="digits-cloud",
            )
            cloud.append(path)
    if cloud:
        console.print(
            f"the fleet's cloud fallback runs ONNX Runtime: each version gets a {CLOUD_ARTIFACT} "
            "bundle too (digits-cloud), which no device is sent"
        )
    return shipped, cloud


def _broken_bundle(console: Console, out: Path) -> Path:
    """Release BROKEN: the host build's ONNX model with every weight's sign flipped after
    compiling; it loads and runs, and answers wrong, so the golden vectors catch it."""
    import onnx
    from onnx import numpy_helper

    from contracts.report import CompileReport
    from ota.bundle import bundle_compile_output

    broken_dir = out / "host-broken"
    shutil.rmtree(broken_dir, ignore_errors=True)
    shutil.copytree(out / "host", broken_dir)
    report = CompileReport.model_validate_json((broken_dir / "report.json").read_text())
    artifact = next(a for a in report.artifacts if a.id == CLOUD_ARTIFACT)
    model = onnx.load(str(broken_dir / artifact.path))
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype.kind == "f":
            tensor.CopyFrom(numpy_helper.from_array(-weights, tensor.name))
    onnx.save(model, str(broken_dir / artifact.path))
    # The report describes the damaged file as its own, as a bad export's report would.
    raw = json.loads((broken_dir / "report.json").read_text())
    entry = next(a for a in raw["artifacts"] if a["id"] == CLOUD_ARTIFACT)
    data = (broken_dir / artifact.path).read_bytes()
    entry["sha256"], entry["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (broken_dir / "report.json").write_text(json.dumps(raw, indent=2))
    path = out / "bundles" / f"digits-host-{BROKEN}.efb"
    bundle_compile_output(broken_dir, version=BROKEN, out=path, artifact_id=CLOUD_ARTIFACT)
    console.print(
        f"{path.name}: {CLOUD_ARTIFACT} with every weight's sign flipped after compiling "
        "(signed and intact, and wrong)"
    )
    return path


def _show_cause(
    console: Console, api: httpx.Client, rollout: dict[str, Any], board: _Board
) -> None:
    """The failed gate's reason, from the rollout's history (its own reason moved on), and
    the agent's own verdict on the bundle."""
    history = _call(api, "GET", f"/rollouts/{rollout['id']}/history")
    failures = [e for e in history if e["action"] in ("failed", "rollback") and e["reason"]]
    cause = failures[0]["reason"] if failures else rollout["reason"]
    console.print(f"  [red]cause:[/] {cause}")
    commands = _call(api, "GET", "/devices/demo-board/history")["commands"]
    deploy = next(
        c["id"] for c in commands if c["rollout_id"] == rollout["id"] and c["kind"] == "deploy"
    )
    # The gate may stop the wave on the simulated devices' acks before the agent's arrives,
    # and the rollback's ack replaces the deploy's at the fleet: ask the agent's own record.
    _wait(lambda: board.verdict(deploy) is not None, "the agent's own verdict")
    verdict = str(board.verdict(deploy))
    console.print(f"  demo-board: {verdict}")
    if verdict.startswith("healthy"):
        fail(f"the agent took the broken {BROKEN} as healthy: {verdict}")


def _keep_exploring(
    console: Console, url: str, token: str, fleet_dir: Path, rollout_id: str, keep_running: bool
) -> None:
    """Commands that work from here: against the running fleet with ``--keep-running``;
    on the fleet's data in ``fleet_dir`` once it stopped (tests/test_demo.py runs them)."""
    console.print("Keep exploring:")

    def line(text: str) -> None:
        console.print(f"  {text}", soft_wrap=True, highlight=False, markup=False)

    if keep_running:
        auth = f"--server {url} --token {token}"
        line(f"dashboard: {url}/ (log in with the token {token})")
        line(f"edgefleet fleet devices {auth}")
        line(f"edgefleet fleet rollout list {auth}")
        line(f"edgefleet fleet rollout status {rollout_id} {auth}")
        line(f"edgefleet fleet models list {auth}")
        line("after Ctrl-C, this fleet again, its data kept (on port 8000; the token above):")
    else:
        line("edgefleet demo --keep-running   (the story again; the fleet stays up until Ctrl-C)")
        line(f"this fleet again, its data kept (on port 8000; the token in {fleet_dir}):")
    line(f"edgefleet fleet serve --data-dir {fleet_dir}")
    line("docs/concepts.md, docs/fleet.md, docs/agent.md")


def _until_interrupted(console: Console) -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM (contracts/cli.py: a background shell job
    ignores SIGINT, so this does not rely on KeyboardInterrupt)."""
    console.print("The fleet, the agent and the simulated devices run until Ctrl-C.")
    wait_for_stop()
    console.print("stopping the fleet, the agent and the simulated devices")


@contextmanager
def _fleet_server(data_dir: Path) -> Iterator[str]:
    import uvicorn

    from fleet.app import create_app
    from fleet.config import FleetSettings

    port = _free_port()
    app = create_app(FleetSettings(data_dir=data_dir, port=port, rollout_tick_s=0.2))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="demo-fleet", daemon=True)
    thread.start()
    _wait(lambda: server.started or not thread.is_alive(), "the fleet server to start")
    if not server.started:
        fail(f"the fleet server did not start; see {data_dir}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _publish(api: httpx.Client, bundle: Path) -> dict[str, Any]:
    from ota.archive import read_manifest

    manifest = read_manifest(bundle)
    version = manifest.model.version
    if api.get(f"/models/digits/versions/{version}").status_code == 404:
        _call(api, "POST", "/models", json={"name": "digits", "version": version, "owner": "demo"})
    return _call(
        api, "POST", f"/models/digits/versions/{version}/bundles", content=bundle.read_bytes()
    )


def _roll_out(
    console: Console, api: httpx.Client, bundle: dict[str, Any], waves: list[str], *, expect: str
) -> dict[str, Any]:
    """Create the rollout (rolled back on a failed gate), print each change, wait for its end."""
    rollout = _call(
        api,
        "POST",
        "/rollouts",
        json={
            "bundle_id": bundle["id"],
            "waves": waves,
            "gate": {"soak_s": 1, "max_failure_ratio": 0.1},
            "on_failure": "rollback",
        },
    )
    seen = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = _call(api, "GET", f"/rollouts/{rollout['id']}")
        now = (state["state"], state["wave"])
        if now != seen:
            wave = f"wave {state['wave'] + 1}/{len(waves)}"
            console.print(f"  {rollout['id']} {wave} {state['state']}: {state['reason']}")
            seen = now
        if state["state"] in ("completed", "paused", "rolled_back", "aborted"):
            break
        time.sleep(0.2)
    members = _call(api, "GET", f"/rollouts/{rollout['id']}/devices")
    healthy = sum(m["state"] == "healthy" for m in members)
    console.print(f"  {healthy} of {len(members)} devices healthy on {bundle['bundle_name']}")
    if state["state"] != expect:
        fail(f"the rollout ended {state['state']}, not {expect}: {state['reason']}")
    return dict(state)


def _ask(console: Console, local: str, out: Path) -> None:
    with np.load(out / "digits" / "digits.npz") as data:
        images, labels = data["image"][:8].astype(np.float32), data["labels"][:8]
    body = {
        "inputs": [
            {"name": "image", "shape": list(images.shape), "datatype": "FP32",
             "data": images.ravel().tolist()}
        ]
    }  # fmt: skip
    _wait(lambda: _ready(local), "the agent's local API")
    answer = httpx.post(f"{local}/v2/models/digits/infer", json=body, timeout=30).json()
    if "error" in answer:
        fail(f"the agent's local API said: {answer['error']}")
    output = answer["outputs"][0]
    predicted = np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1)
    parameters = answer["parameters"]
    table = Table("served by", "why", "bundle", "predicted", "labels")
    table.add_row(
        parameters["served_by"],
        str(parameters.get("fallback_reason") or "-"),
        str(parameters.get("bundle") or "-"),
        " ".join(map(str, predicted)),
        " ".join(map(str, labels)),
    )
    console.print(table)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _call(api: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = api.request(method, path, **kwargs)
    if response.is_error:
        fail(f"{method} {path}: {response.status_code} {response.text}")
    return response.json()


def _wait(probe: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
