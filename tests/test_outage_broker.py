"""The fleet's embedded mosquitto killed under a running fleet, with SIGKILL, for real.

``edgefleet fleet serve`` runs as a process with simulated devices (``fleet/simulator``)
and one real agent (``edgefleet agent run``); a rollout to the simulated devices is in
flight when mosquitto is killed. Within a moment the fleet says so (a log line, readiness
503 while liveness stays 200, ``edgefleet_broker_up`` 0, every device offline) and refuses
an enrollment with 503, its token unused; then mosquitto is back on the same port, every
device online again, the rollout completes, the same token enrolls, and the agent has
logged the outage and its return.

A broker that hangs (SIGSTOP) rather than dies is noticed by its silent admin connection,
stopped and restarted the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from contracts.mqtt import Status, device_topic
from fleet.bridge import MqttBridge
from fleet.broker import (
    BrokerSupervisor,
    DeviceCredential,
    MosquittoBroker,
    MqttEndpoint,
    hash_password,
)
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.simulator import Behaviour, FleetSimulator
from fleet.simulator import loop as simulator_loop
from tests.utils.fleet import wait_for
from tests.utils.mqtt import free_port, mqtt_pub
from tests.utils.served_fleet import (
    enroll_agent,
    enroll_simulated,
    running,
    serve_fleet,
    start_agent,
)

V2 = "digits-host-1.1.0"
SIMULATED = 20
RESTART_DELAY_S = 3.0
"""How long the fleet waits before restarting mosquitto: the outage the test watches."""


def test_a_killed_broker_is_noticed_and_restarted_on_its_port_and_nothing_is_lost(
    tmp_path: Path, bundles: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulator_loop, "_RECONNECT_MAX_S", 2.0)  # short reconnect backoffs
    fleet = serve_fleet(
        tmp_path / "fleet", free_port(), "--mqtt-restart-delay", str(RESTART_DELAY_S)
    )
    agent: subprocess.Popen[bytes] | None = None
    agent_log = tmp_path / "agent.log"
    try:
        bundle = fleet.publish(bundles[1])
        specs, told = enroll_simulated(fleet, SIMULATED, tags=["sim"])
        agent = start_agent(enroll_agent(fleet, tmp_path / "board", "board-1"), agent_log)
        port = fleet.mqtt_port()
        assert told == port, fleet.printed()
        everyone = {spec.device_id for spec in specs} | {"board-1"}
        behaviour = Behaviour(install_delay_s=2.0)
        with FleetSimulator("127.0.0.1", port, specs, behaviour) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: fleet.online() == everyone, timeout_s=60, what="every device online")
            assert fleet.health("ready") == 200
            assert fleet.metric("edgefleet_broker_up") == 1
            rollout = fleet.ok(
                "POST",
                "/rollouts",
                json={
                    "bundle_id": bundle["id"],
                    "waves": ["50", "100"],
                    "tags": ["sim"],
                    "gate": {"soak_s": 1},
                },
            )
            wait_for(
                lambda: any(devices.received_commands(spec.device_id) for spec in specs),
                what="the rollout's first command at a device",
            )
            grant = fleet.ok("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
            late = {"token": grant, "device_id": "late-1"}

            mosquitto = fleet.mosquitto_pid()
            killed = time.monotonic()
            os.kill(mosquitto, signal.SIGKILL)
            wait_for(lambda: fleet.health("ready") == 503, timeout_s=2, what="readiness 503")
            noticed_s = time.monotonic() - killed
            assert fleet.health("live") == 200
            wait_for(lambda: fleet.metric("edgefleet_broker_up") == 0, timeout_s=1, what="gauge 0")
            wait_for(
                lambda: fleet.metric("edgefleet_devices_online") == 0 and not fleet.online(),
                timeout_s=3,
                what="every device offline",
            )
            offline_s = time.monotonic() - killed
            said = f"the MQTT broker is down: mosquitto (pid {mosquitto}) exited with status -9"
            assert said in fleet.log(), fleet.log()[-3000:]
            refused = fleet.api("POST", "/enroll", json=late)
            assert refused.status_code == 503, refused.text
            assert "token was not used" in refused.json()["detail"]
            assert time.monotonic() - killed < RESTART_DELAY_S, "the outage ended too early"

            wait_for(lambda: fleet.health("ready") == 200, timeout_s=30, what="readiness 200")
            back_s = time.monotonic() - killed
            assert running(fleet.mosquitto_pid()) and fleet.mosquitto_pid() != mosquitto
            assert (fleet.data_dir / "mosquitto" / "port").read_text().strip() == str(port)
            assert fleet.metric("edgefleet_broker_up") == 1
            assert fleet.metric("edgefleet_broker_restarts_total") == 1
            assert "the MQTT broker is back on" in fleet.log()
            # the devices know only the old port: their return shows the broker is there
            wait_for(
                lambda: fleet.online() == everyone, timeout_s=30, what="every device online again"
            )
            online_s = time.monotonic() - killed

            done = fleet.rollout_done(rollout["id"], timeout_s=60)
            assert done["state"] == "completed", done
            assert all(devices.current_bundle(spec.device_id) == V2 for spec in specs)

            enrolled = fleet.api("POST", "/enroll", json=late)
            assert enrolled.status_code == 201, enrolled.text
            mqtt = enrolled.json()["mqtt"]
            assert (mqtt["host"], mqtt["port"]) == ("127.0.0.1", port)
            endpoint = MqttEndpoint("127.0.0.1", port, username="late-1", password=mqtt["password"])
            status = Status(online=True).model_dump_json()
            assert mqtt_pub(endpoint, device_topic("late-1", "status"), status)[::2] == (0, "")

        said = agent_log.read_text()
        assert "lost the connection to the broker" in said, said[-3000:]
        assert "cannot reach the broker" in said and "again after" in said, said[-3000:]
        print(
            f"broker SIGKILL: readiness 503 after {noticed_s:.2f} s, devices offline after "
            f"{offline_s:.2f} s, ready again after {back_s:.2f} s (restart delay "
            f"{RESTART_DELAY_S} s), {len(everyone)} devices online after {online_s:.2f} s"
        )
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        fleet.stop()


def test_a_hung_broker_is_stopped_and_restarted_on_its_port(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto", control_keepalive_s=2)
    news: list[str] = []
    supervisor = BrokerSupervisor(
        broker,
        fleet_username="fleet",
        fleet_password="fleet-pw",
        credentials=lambda: [DeviceCredential("dev-a", hash_password("pw-a"))],
        on_down=news.append,
        on_up=lambda: news.append("up"),
        check_interval_s=0.1,
        unresponsive_s=1.0,
        restart_delay_s=0.2,
    )
    port = supervisor.start().port
    try:
        hung = broker.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: not supervisor.up, timeout_s=15, what="the hung broker noticed")
        noticed_s = time.monotonic() - stopped
        os.kill(hung, signal.SIGCONT)  # it takes the SIGTERM it was sent meanwhile
        wait_for(lambda: supervisor.up, timeout_s=20, what="the broker back")
        assert not running(hung) and broker.pid not in (None, hung)
        assert len(news) == 2 and news[1] == "up", news
        assert "does not keep the fleet's admin connection for 1 s" in news[0], news
        assert supervisor.restarts == 1 and broker.endpoint.port == port
        device = MqttEndpoint("127.0.0.1", port, username="dev-a", password="pw-a")
        assert mqtt_pub(device, device_topic("dev-a", "status"), "{}")[::2] == (0, "")
        print(f"hung broker: noticed after {noticed_s:.1f} s (admin keepalive 2 s)")
    finally:
        supervisor.stop()


def test_the_fleets_session_is_back_within_seconds_of_a_broker_that_was_down_long(
    tmp_path: Path,
) -> None:
    """The broker is killed and stays down for 20 s (the supervisor's crash-loop backoff
    keeps it down up to 30 s); the fleet's bridge is connected again within seconds of its
    return, not after a reconnect backoff grown as long as the outage."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest file {tmp_path / 'mosquitto.log'}\n"
        + ("user root\n" if os.getuid() == 0 else "")
    )

    def mosquitto() -> subprocess.Popen[bytes]:
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _listens(port), timeout_s=10, what="mosquitto to listen")
        return broker

    broker = mosquitto()
    bridge = MqttBridge(MqttEndpoint("127.0.0.1", port), engine, FleetMetrics())
    bridge.start()
    try:
        broker.kill()
        broker.wait(10)
        wait_for(lambda: bridge.link() is None, timeout_s=10, what="the bridge to notice")
        time.sleep(20)
        broker = mosquitto()
        back = time.monotonic()
        wait_for(lambda: bridge.link(), timeout_s=60, what="the bridge connected again")
        lag_s = time.monotonic() - back
        assert lag_s < 6, f"the bridge came back {lag_s:.1f} s after the broker"
        print(f"bridge connected {lag_s:.1f} s after a broker that was down for 20 s")
    finally:
        bridge.stop()
        broker.terminate()
        broker.wait(10)


def _listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
