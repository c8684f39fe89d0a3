"""``edgefleet fleet serve`` restarted under its devices, and the address they are told.

A fleet with simulated devices and one real agent is stopped (SIGTERM) or killed (SIGKILL,
which leaves its mosquitto running) in the middle of a rollout and started again with the
same command line, which names no broker port: the broker comes back on the port the first
start chose, every device is online again within its reconnect backoff (set short here),
the rollout completes, and the agent has logged the outage and its reconnection.

And the address rules: a broker that would listen beyond loopback in clear is refused
unless ``--mqtt-allow-plaintext`` says so; devices are told ``--public-url``'s host with
the broker's port, or ``--mqtt-public-url`` when given. And the agent's outage log: one
line when it begins, at most one a minute while it lasts, one when it ends.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent._broker_log import ConnectionLog
from contracts.mqtt import Status, device_topic
from fleet.broker import MqttEndpoint
from fleet.simulator import Behaviour, FleetSimulator
from fleet.simulator import loop as simulator_loop
from tests.utils.fleet import wait_for
from tests.utils.mqtt import free_port, mqtt_pub
from tests.utils.served_fleet import (
    EDGEFLEET,
    ServedFleet,
    enroll_agent,
    enroll_simulated,
    running,
    serve_fleet,
    start_agent,
)

V2 = "digits-host-1.1.0"
SIMULATED = 20
RECONNECT_MAX_S = 2.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restarted_fleet_keeps_its_broker_port_and_every_device_comes_back(
    tmp_path: Path,
    bundles: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    signum: signal.Signals,
) -> None:
    monkeypatch.setattr(simulator_loop, "_RECONNECT_MAX_S", RECONNECT_MAX_S)
    data_dir, port = tmp_path / "fleet", free_port()
    fleet = serve_fleet(data_dir, port)
    agent_log = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    try:
        bundle = fleet.publish(bundles[1])
        specs, told = enroll_simulated(fleet, SIMULATED, tags=["sim"])
        agent = start_agent(enroll_agent(fleet, tmp_path / "board", "board-1"), agent_log)
        mqtt_port = told
        everyone = {spec.device_id for spec in specs} | {"board-1"}
        behaviour = Behaviour(install_delay_s=1.0)
        with FleetSimulator("127.0.0.1", mqtt_port, specs, behaviour) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: fleet.online() == everyone, timeout_s=60, what="every device online")
            rollout = fleet.ok(
                "POST",
                "/rollouts",
                json={
                    "bundle_id": bundle["id"],
                    "waves": ["50", "100"],
                    "tags": ["sim"],
                    "gate": {"soak_s": 2},
                },
            )
            wait_for(
                lambda: any(devices.received_commands(spec.device_id) for spec in specs),
                what="the rollout's first command at a device",
            )
            mosquitto = fleet.mosquitto_pid()
            fleet.stop(signum)
            # SIGKILL: mosquitto outlives the fleet and holds on to the devices meanwhile,
            # and what they publish queues for the fleet's session
            assert running(mosquitto) == (signum == signal.SIGKILL)
            if signum == signal.SIGKILL:
                assert devices.publish_telemetry() == SIMULATED

            fleet = serve_fleet(data_dir, port)
            started = time.monotonic()
            wait_for(
                lambda: fleet.online() == everyone,
                timeout_s=30,
                what="every device online after the restart",
            )
            online_s = time.monotonic() - started
            assert fleet.mqtt_port() == mqtt_port, fleet.printed()
            assert not running(mosquitto), "the old mosquitto still runs"
            if signum == signal.SIGKILL:
                assert f"stopping mosquitto (pid {mosquitto}) left running" in fleet.log()
            assert online_s < 4 * RECONNECT_MAX_S, f"devices took {online_s:.1f} s to return"
            if signum == signal.SIGKILL:  # the queue survived the old mosquitto's stop
                wait_for(
                    lambda: all(
                        fleet.ok("GET", f"/devices/{spec.device_id}/telemetry") for spec in specs
                    ),
                    timeout_s=30,
                    what="the telemetry sent while the fleet was dead",
                )
            done = fleet.rollout_done(rollout["id"], timeout_s=60)
            assert done["state"] == "completed", done
            assert all(devices.current_bundle(spec.device_id) == V2 for spec in specs)

        said = agent_log.read_text()
        assert "lost the connection to the broker" in said, said[-3000:]
        assert "again after" in said, said[-3000:]
        if signum == signal.SIGTERM:  # the broker was gone while the fleet restarted
            assert f"cannot reach the broker at 127.0.0.1:{mqtt_port}" in said, said[-3000:]
        print(f"fleet {signum.name}: {len(everyone)} devices online {online_s:.2f} s after restart")
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        fleet.stop()


def _refused(data_dir: Path, *options: str) -> str:
    """``fleet serve`` with ``options`` must exit 1 at once; its message."""
    command = [EDGEFLEET, "fleet", "serve", "--data-dir", str(data_dir), "--port", str(free_port())]
    done = subprocess.run(
        [*command, *options], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    return done.stderr


def _enroll(fleet: ServedFleet, device_id: str) -> dict[str, object]:
    grant = fleet.ok("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    enrolled: dict[str, object] = fleet.ok(
        "POST", "/enroll", json={"token": grant, "device_id": device_id}
    )
    return enrolled


def test_serve_refuses_plaintext_beyond_loopback_and_tells_devices_the_public_host(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "fleet", free_port()
    said = _refused(data_dir, "--host", "0.0.0.0")
    assert "0.0.0.0" in said and "--mqtt-tls" in said and "--mqtt-allow-plaintext" in said
    assert not data_dir.exists(), "a refused start must leave nothing behind"
    said = _refused(data_dir, "--mqtt-public-url", "mqtts://broker.example:8883")
    assert "--mqtt-public-url" in said and "--mqtt-tls" in said

    public = ("--public-url", "http://fleet.example:8011")
    fleet = serve_fleet(data_dir, port, "--host", "0.0.0.0", "--mqtt-allow-plaintext", *public)
    try:
        assert "without TLS (--mqtt-allow-plaintext)" in fleet.log()
        mqtt_port = fleet.mqtt_port()
        enrolled = _enroll(fleet, "dev-1")
        mqtt = enrolled["mqtt"]
        assert isinstance(mqtt, dict)
        assert (mqtt["host"], mqtt["port"], mqtt["tls"]) == ("fleet.example", mqtt_port, False)
        assert enrolled["api_url"] == "http://fleet.example:8011"
        printed = fleet.printed()
        assert f"MQTT listens on mqtt://0.0.0.0:{mqtt_port}; devices are told " in printed
        assert f"devices are told mqtt://fleet.example:{mqtt_port}" in printed
        assert "devices are told http://fleet.example:8011" in printed
        # what the device was given works on the port it was told (here, over loopback)
        device = MqttEndpoint("127.0.0.1", mqtt_port, username="dev-1", password=mqtt["password"])
        status = Status(online=True).model_dump_json()
        assert mqtt_pub(device, device_topic("dev-1", "status"), status)[::2] == (0, "")
    finally:
        fleet.stop()

    broker = ("--mqtt-public-url", "mqtt://broker.example:1883")
    fleet = serve_fleet(data_dir, port, *public, *broker)
    try:
        mqtt = _enroll(fleet, "dev-2")["mqtt"]
        assert isinstance(mqtt, dict)
        assert (mqtt["host"], mqtt["port"]) == ("broker.example", 1883)
        assert f"MQTT listens on mqtt://127.0.0.1:{mqtt_port}; devices are told " in fleet.printed()
        assert "devices are told mqtt://broker.example:1883" in fleet.printed()
    finally:
        fleet.stop()


def test_the_agent_reports_an_outage_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    link = ConnectionLog("broker.example:8883", clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="agent._broker_log")
    link.connected()
    link.lost("Unspecified error")
    for _ in range(61):  # paho's attempts, 2 s apart
        now[0] += 2
        link.failed("[Errno 111] Connection refused")
    link.connected()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "connected to the broker at broker.example:8883"
    assert lines[1].startswith("lost the connection to the broker at broker.example:8883")
    failures = [line for line in lines if line.startswith("cannot reach the broker")]
    assert [line.split("(failed attempt ")[1].split(",")[0] for line in failures] == [
        "1",
        "31",
        "61",
    ]
    assert "[Errno 111] Connection refused" in failures[0]
    assert lines[-1] == (
        "connected to the broker at broker.example:8883 again after 122.0 s out of reach "
        "and 61 failed attempt(s)"
    )
    assert len(lines) == 6
