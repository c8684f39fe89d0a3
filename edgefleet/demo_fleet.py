"""The demo's second half: a fleet server, a real agent and simulated devices on this machine.

Everything runs for real and on loopback: ``fleet.app`` under uvicorn with its own
mosquitto and SQLite, ``agent.daemon.AgentDaemon`` enrolled through the HTTP API, and
``fleet.simulator`` devices speaking the same MQTT protocol.
"""

from __future__ import annotations

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

from contracts.cli import fail

SIMULATED_DEVICES = 20


def run_fleet_demo(console: Console, out: Path) -> None:
    from agent.config import load_config
    from agent.daemon import AgentDaemon
    from agent.enroll import enroll_device
    from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
    from ota.bundle import bundle_compile_output

    console.rule("5. Start the fleet server: SQLite, its own mosquitto, TUF repository")
    fleet_dir = out / "fleet"
    shutil.rmtree(fleet_dir, ignore_errors=True)
    # ONNX Runtime bundles: the fleet's cloud endpoint runs the production one for fallback
    releases = [out / "bundles" / f"digits-host-ort-{v}.efb" for v in ("1.0.0", "1.1.0")]
    for path, version in zip(releases, ("1.0.0", "1.1.0"), strict=True):
        bundle_compile_output(
            out / "host", version=version, out=path, artifact_id="onnxruntime:fp32"
        )
    with ExitStack() as stack:
        url = stack.enter_context(_fleet_server(fleet_dir))
        token = (fleet_dir / "admin.token").read_text().strip()
        api = stack.enter_context(
            httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"})
        )
        published = [_publish(api, bundle) for bundle in releases]
        _call(api, "PUT", "/models/digits/versions/1.0.0/stage", json={"stage": "production"})
        console.print(f"fleet at {url}: API docs at /docs, dashboard at /")
        console.print(f"admin token in {fleet_dir / 'admin.token'}")
        console.print("published digits 1.0.0 (production) and 1.1.0, each signed as a TUF target")

        console.rule(
            f"6. Enroll an agent on this machine and {SIMULATED_DEVICES} simulated devices"
        )
        grant = _call(
            api,
            "POST",
            "/enrollment-tokens",
            json={"profile": "host", "uses": SIMULATED_DEVICES + 1},
        )["token"]
        enrolled = enroll_device(url, grant, out / "device", device_id="demo-board")
        config = load_config(enrolled.config_path)
        config = config.model_copy(
            update={
                "model_name": "digits",
                "api": config.api.model_copy(update={"port": _free_port()}),
                "telemetry": config.telemetry.model_copy(update={"interval_s": 1.0}),
                "health": config.health.model_copy(update={"watch_inferences": 0}),
            }
        )
        agent = AgentDaemon(config)
        agent.start()
        stack.callback(agent.stop)
        threading.Thread(target=agent.run, name="demo-agent", daemon=True).start()
        specs = []
        for i in range(SIMULATED_DEVICES):
            body = _call(api, "POST", "/enroll", json={"token": grant, "device_id": f"sim-{i:02d}"})
            specs.append(
                SimulatedDeviceSpec(
                    device_id=body["device_id"],
                    username=body["mqtt"]["username"],
                    password=body["mqtt"]["password"],
                )
            )
        simulator = FleetSimulator(
            body["mqtt"]["host"], body["mqtt"]["port"], specs, Behaviour(telemetry_interval_s=1.0)
        )
        stack.enter_context(simulator)
        simulator.start()
        _wait(lambda: len(_call(api, "GET", "/devices?online=true")) == SIMULATED_DEVICES + 1,
              "every device online")  # fmt: skip
        console.print(
            f"agent config in {enrolled.config_path}; local API on port {config.api.port}"
        )

        local = f"http://127.0.0.1:{config.api.port}"
        console.print("the agent has no model yet; its local API asks the fleet's cloud endpoint:")
        _ask(console, local, out)

        for step, (release, waves) in enumerate(
            [(published[0], ["10", "50", "100"]), (published[1], ["10", "50", "100"])], start=7
        ):
            console.rule(f"{step}. Roll out {release['bundle_name']} in waves {', '.join(waves)} %")
            _roll_out(console, api, release, waves)
            _wait(lambda name=release["bundle_name"]: _serving(agent) == name, "the new release")
            _ask(console, local, out)
        console.rule("Done")
        console.print(
            "Keep exploring: edgefleet fleet serve --data-dir " + str(fleet_dir) + " (the same "
            "fleet again), edgefleet agent run --config " + str(enrolled.config_path) + "; "
            "docs/fleet.md and docs/agent.md."
        )


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
    _call(api, "POST", "/models", json={"name": "digits", "version": version, "owner": "demo"})
    return _call(
        api, "POST", f"/models/digits/versions/{version}/bundles", content=bundle.read_bytes()
    )


def _roll_out(
    console: Console, api: httpx.Client, bundle: dict[str, Any], waves: list[str]
) -> None:
    rollout = _call(
        api,
        "POST",
        "/rollouts",
        json={"bundle_id": bundle["id"], "waves": waves, "gate": {"soak_s": 1}},
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
    if state["state"] != "completed":
        fail(f"the rollout ended {state['state']}: {state['reason']}")


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
    table = Table("served by", "bundle", "predicted", "labels")
    table.add_row(
        answer["parameters"]["served_by"],
        str(answer["parameters"]["bundle"]),
        " ".join(map(str, predicted)),
        " ".join(map(str, labels)),
    )
    console.print(table)


def _serving(agent: Any) -> str | None:
    manifest = agent.updater.serving
    return f"{manifest.name}-{manifest.version}" if manifest else None


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
