"""The agent daemon end to end: ``edgefleet agent enroll`` and ``edgefleet agent run`` as a
user runs them, against a real fleet (HTTP on a loopback port, mosquitto, SQLite).

One device goes through its life: no model (the cloud answers), a rollout installs v1, a
second rollout moves it to v2, telemetry from its local API reaches the fleet, and after
SIGKILL the restarted agent serves v2 at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.http import serve_app
from tests.utils.mqtt import free_port

V1, V2 = "digits-host-1.0.0", "digits-host-1.1.0"
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


@pytest.fixture
def fleet(tmp_path: Path, bundles: tuple[Path, Path]) -> Iterator[tuple[RunningFleet, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        running_fleet(tmp_path / "fleet", public_url=url) as running,
        serve_app(running.client.app, port=port),
    ):
        running.v1 = running.publish(bundles[0], stage="production")  # type: ignore[attr-defined]
        running.v2 = running.publish(bundles[1])  # type: ignore[attr-defined]
        yield running, url


def _enroll(fleet: RunningFleet, url: str, out: Path) -> Path:
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    result = subprocess.run(
        [EDGEFLEET, "agent", "enroll", "--fleet", url, "--token", grant, "--out", str(out),
         "--device-id", "board-1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = out / "agent.toml"
    assert config.stat().st_mode & 0o077 == 0, "agent.toml holds secrets: owner only"
    text = config.read_text().replace("port = 8800", f"port = {free_port()}")
    config.write_text(  # a model name for the cloud to answer under; quick reports
        'model_name = "digits"\n'
        + text
        + "\n[telemetry]\ninterval_s = 0.3\n\n[health]\nwatch_inferences = 0\n"
    )
    return config


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [EDGEFLEET, "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _local(config: Path) -> str:
    import tomllib

    return f"http://127.0.0.1:{tomllib.loads(config.read_text())['api']['port']}"


def _infer(base: str, images: np.ndarray) -> dict[str, Any]:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.ravel().tolist(),
            }
        ]
    }
    response = httpx.post(f"{base}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _rollout_to(fleet: RunningFleet, bundle: dict[str, Any]) -> dict[str, Any]:
    rollout = fleet.api(
        "POST",
        "/rollouts",
        json={"bundle_id": bundle["id"], "waves": ["100"], "gate": {"soak_s": 0}},
    )
    return wait_for(
        lambda: (
            (r := fleet.api("GET", f"/rollouts/{rollout['id']}"))["state"]
            in ("completed", "paused", "rolled_back")
            and r
        ),
        timeout_s=120,
        what="the rollout to finish",
    )


def _device(fleet: RunningFleet) -> dict[str, Any]:
    return dict(fleet.api("GET", "/devices/board-1"))


def test_an_enrolled_agent_installs_rollouts_serves_reports_and_survives_sigkill(
    fleet: tuple[RunningFleet, str], tmp_path: Path
) -> None:
    running, url = fleet
    config = _enroll(running, url, tmp_path / "board")
    log = tmp_path / "agent.log"
    agent = _start_agent(config, log)
    images = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    try:
        wait_for(lambda: _device(running)["online"], timeout_s=60, what="the agent online")
        local = _local(config)
        wait_for(lambda: _ready(local), timeout_s=30, what="the local API")

        # no model yet: the fleet's cloud endpoint (the production v1) answers
        answer = _infer(local, images)
        assert answer["parameters"]["served_by"] == "cloud"
        assert answer["parameters"]["fallback_reason"] == "no_model"

        done = _rollout_to(running, running.v1)  # type: ignore[attr-defined]
        assert done["state"] == "completed", (done["reason"], log.read_text()[-3000:])
        wait_for(lambda: _device(running)["bundle"] == V1, what="status naming v1")
        local_v1 = _infer(local, images)
        assert local_v1["parameters"] == {"served_by": "local", "bundle": V1}
        np.testing.assert_allclose(
            local_v1["outputs"][0]["data"], answer["outputs"][0]["data"], rtol=1e-4, atol=1e-5
        )

        done = _rollout_to(running, running.v2)  # type: ignore[attr-defined]
        assert done["state"] == "completed", (done["reason"], log.read_text()[-3000:])
        assert _infer(local, images)["parameters"]["bundle"] == V2
        wait_for(
            lambda: any(
                r["bundle"] == V2 and r["inferences"] >= 1
                for r in running.api("GET", "/devices/board-1/telemetry")
            ),
            what="telemetry of the local inferences on v2",
        )

        # the truth arrives in the cloud: the fleet relays it, the agent counts it
        body = _infer(local, images[:1])
        predicted = int(np.argmax(body["outputs"][0]["data"]))
        labels = [{"request_id": body["id"], "label": predicted}, {"request_id": "x", "label": 0}]
        running.api("POST", "/devices/board-1/ground-truth", json={"labels": labels})
        wait_for(
            lambda: any(
                r["bundle"] == V2 and r["extra"].get("truth") == {"labelled": 1, "correct": 1}
                for r in running.api("GET", "/devices/board-1/telemetry")
            ),
            what="the relayed label counted in the agent's telemetry",
        )

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        agent = _start_agent(config, log)
        wait_for(lambda: _ready(local), timeout_s=30, what="the local API after a restart")
        assert _infer(local, images)["parameters"] == {"served_by": "local", "bundle": V2}
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()[-3000:]
    wait_for(lambda: not _device(running)["online"], what="the agent's goodbye status")


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_agent_simulate_enrolls_devices_once_and_they_answer_a_rollout(
    fleet: tuple[RunningFleet, str], tmp_path: Path
) -> None:
    running, url = fleet
    grant = running.api("POST", "/enrollment-tokens", json={"profile": "host", "uses": 3})
    credentials = tmp_path / "sim.json"
    command = [
        *(EDGEFLEET, "agent", "simulate", "--devices", "3", "--fleet", url),
        *("--credentials", str(credentials), "--bundle", V1, "--duration", "8", "--json"),
    ]
    simulate = subprocess.Popen(
        [*command, "--token", grant["token"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(
            lambda: len(running.api("GET", "/devices?online=true")) == 3,
            timeout_s=60,
            what="three simulated devices online",
        )
        done = _rollout_to(running, running.v2)  # type: ignore[attr-defined]
        assert done["state"] == "completed", done["reason"]
    finally:
        out, err = simulate.communicate(timeout=60)
    assert simulate.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["devices"] == 3 and summary["commands"] == 3
    assert credentials.stat().st_mode & 0o077 == 0
    # a second run reuses the enrolled devices: no token needed (the grant is used up)
    again = subprocess.run(
        [*command[:-3], "--duration", "1", "--json"], capture_output=True, check=False
    )
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(again.stdout)["connected"] == 3


def test_a_stale_command_is_ignored_a_resent_one_reacked_and_the_status_names_the_last(
    tmp_path: Path,
) -> None:
    """The daemon on a plain broker: a command past its ``expires_at`` gets no ack; a fresh
    one is answered, and its copy re-acked from the record (a shadow stop: answered by the
    agent itself); the retained status then names that command and its final state."""
    import threading
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.config import AgentConfig, ApiConfig, MqttConfig
    from agent.daemon import AgentDaemon
    from contracts.mqtt import Ack, Command, CommandKind, Status, decode_payload, device_topic
    from tests.utils.mqtt import plain_mosquitto

    with plain_mosquitto(tmp_path / "broker") as port:
        config = AgentConfig(
            device_id="board-9",
            data_dir=tmp_path / "data",
            mqtt=MqttConfig(port=port),
            api=ApiConfig(enabled=False),
        )
        seen: list[tuple[str, bytes]] = []
        watcher = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5
        )
        watcher.on_message = lambda _c, _u, m: seen.append(
            (m.topic.rsplit("/", 1)[-1], bytes(m.payload))
        )
        watcher.connect("127.0.0.1", port)
        watcher.subscribe("edgefleet/v1/devices/board-9/+", qos=1)
        watcher.loop_start()
        daemon = AgentDaemon(config)
        daemon.start()
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()

        def acks() -> list[Ack]:
            return [decode_payload(p, Ack) for channel, p in seen if channel == "ack"]

        def statuses() -> list[Status]:
            return [decode_payload(p, Status) for channel, p in seen if channel == "status"]

        def send(command: Command) -> None:
            watcher.publish(device_topic("board-9", "cmd"), command.model_dump_json(), qos=1)

        try:
            wait_for(lambda: any(s.online for s in statuses()), what="the agent online")
            stop = Command(
                id="stop-1",
                kind=CommandKind.SHADOW_STOP,
                issued_at=time.time() - 60,
                expires_at=time.time() - 30,
            )
            send(stop)
            wait_for(lambda: daemon.stale_commands == 1, what="the stale command ignored")
            fresh = stop.model_copy(update={"expires_at": time.time() + 30})
            send(fresh)
            send(fresh)  # a resend
            wait_for(lambda: len(acks()) == 2, what="an ack for each copy of the fresh one")
            assert [(a.command, a.state.value) for a in acks()] == [("stop-1", "rolled_back")] * 2

            def naming() -> Status | None:
                last = statuses()[-1]
                return last if last.last_command else None

            last = wait_for(naming, what="a status naming it")
            assert (last.last_command, last.last_command_state) == ("stop-1", "rolled_back")
            assert daemon.stale_commands == 1
            # the resend changed nothing, so no second status: the fleet resends unfinished
            # commands on every status, and a status per command would loop
            time.sleep(1.0)
            assert sum(s.last_command == "stop-1" for s in statuses()) == 1, statuses()
        finally:
            daemon.request_stop()
            runner.join(10)
            daemon.stop()
            watcher.disconnect()
            watcher.loop_stop()
