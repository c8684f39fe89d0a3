"""Outages and restarts lose nothing: the fleet's MQTT session outlives it, nothing is
acknowledged before it is stored, a lost final ack is reconciled from the device's retained
status, and a finished rollout never reaches a device.

Real processes on loopback only: mosquitto, ``edgefleet fleet serve`` killed with SIGKILL,
a bridge process killed with SIGKILL, simulated devices over real MQTT, and a TCP proxy
between the fleet and the broker that stalls or cuts the link. The broker is an external
one (``--mqtt-url``) that the tests start and keep running while the fleet is dead.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import Device, TelemetryRecordRow
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from ota.archive import read_manifest
from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.mqtt import free_port, plain_mosquitto
from tests.utils.tcp_proxy import LinkProxy

V1, V2 = "digits-host-1.0.0", "digits-host-1.1.0"
V1_NUMBER = 1_000_000


def _members(fleet: RunningFleet, rollout_id: str) -> dict[str, dict[str, Any]]:
    return {m["device_id"]: m for m in fleet.api("GET", f"/rollouts/{rollout_id}/devices")}


def _online(fleet: RunningFleet, count: int) -> bool:
    return len(fleet.api("GET", "/devices?online=true")) == count


# --- a fleet server killed mid-wave ----------------------------------------------------------


def _serve(data_dir: Path, port: int, mqtt_url: str) -> subprocess.Popen[bytes]:
    log = data_dir.parent / f"serve-{time.time_ns()}.log"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "fleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--mqtt-url",
            mqtt_url,
            "--rollout-tick",
            "0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_for(lambda: _answers(port), timeout_s=60, what="the fleet server to answer")
    return process


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _acks_received(client: httpx.Client) -> float:
    """The fleet process's ``edgefleet_mqtt_messages_total{channel="ack"}``."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith('edgefleet_mqtt_messages_total{channel="ack"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_fleet_killed_mid_wave_loses_nothing_and_judges_the_wave_as_without_the_outage(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """The fleet is SIGKILLed while the wave installs and stays dead while every device
    sends its last three acks (the final one included), a new status and telemetry (about
    6 s: the point of the issue's 30 s outage is that it spans the final acks). Its broker
    runs on, queueing for the fleet's session. Back up, the fleet stores every ack and every
    record sent meanwhile, fails no device, and completes the rollout: what the wave would
    have given without the outage. Its deploy timeout (5 s) is shorter than the outage:
    silence is only counted while the fleet listens."""
    data_dir = tmp_path / "fleet"
    data_dir.mkdir()
    port = free_port()
    with plain_mosquitto(tmp_path / "broker") as broker_port:
        mqtt_url = f"mqtt://127.0.0.1:{broker_port}"
        process = _serve(data_dir, port, mqtt_url)
        token = (data_dir / "admin.token").read_text().strip()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        metrics = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        try:
            for bundle in bundles:
                version = read_manifest(bundle).model.version
                api.post("/models", json={"name": "digits", "version": version})
                v2 = api.post(
                    f"/models/digits/versions/{version}/bundles", content=bundle.read_bytes()
                ).json()
            grant = api.post("/enrollment-tokens", json={"profile": "host", "uses": 10})
            specs = []
            for i in range(10):
                body = api.post(
                    "/enroll", json={"token": grant.json()["token"], "device_id": f"dev-{i}"}
                ).json()
                specs.append(
                    SimulatedDeviceSpec(
                        device_id=body["device_id"],
                        username=body["mqtt"]["username"],
                        password=body["mqtt"]["password"],
                        bundle=V1,
                        bundle_version_number=V1_NUMBER,
                    )
                )
            ids = [s.device_id for s in specs]
            behaviour = Behaviour(install_delay_s=4.0, telemetry_interval_s=0.5)
            with FleetSimulator("127.0.0.1", broker_port, specs, behaviour) as devices:
                devices.start(connect_timeout_s=60)
                wait_for(
                    lambda: len(api.get("/devices?online=true").json()) == 10,
                    what="every device online",
                )
                rollout = api.post(
                    "/rollouts",
                    json={
                        "bundle_id": v2["id"],
                        "waves": ["100"],
                        "gate": {"soak_s": 1, "deploy_timeout_s": 5},
                    },
                ).json()

                def members() -> dict[str, dict[str, Any]]:
                    found = api.get(f"/rollouts/{rollout['id']}/devices").json()
                    return {m["device_id"]: m for m in found}

                wait_for(
                    lambda: all(m["state"] == "in_progress" for m in members().values()),
                    what="every device installing",
                )
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                killed_at = time.time()
                acks_before = {d: len(devices.acks_sent(d)) for d in ids}
                records_before = {d: set(devices.telemetry_sent(d)) for d in ids}
                wait_for(
                    lambda: all(
                        any(a.state == "healthy" for a in devices.acks_sent(d)) for d in ids
                    ),
                    what="every device's final ack, sent to a dead fleet",
                )
                time.sleep(2.0)  # more telemetry to a dead fleet
                sent_while_dead = sum(len(devices.acks_sent(d)) - acks_before[d] for d in ids)
                records_sent = {d: set(devices.telemetry_sent(d)) for d in ids}
                restarted_at = time.time()
                process = _serve(data_dir, port, mqtt_url)

                done = wait_for(
                    lambda: (
                        (r := api.get(f"/rollouts/{rollout['id']}").json())["state"]
                        in ("completed", "paused", "rolled_back")
                        and r
                    ),
                    timeout_s=60,
                    what="the wave's verdict after the restart",
                )
                assert done["state"] == "completed", done["reason"]
                assert done["last_gate"]["outcome"] == "passed"
                finished = members()
                assert {m["state"] for m in finished.values()} == {"healthy"}, finished
                assert {m["last_ack"] for m in finished.values()} == {"healthy"}

                # every final ack went out while the fleet was dead...
                for d in ids:
                    [final] = [a for a in devices.acks_sent(d) if a.state == "healthy"]
                    assert killed_at < final.ts < restarted_at
                # ...and every ack sent meanwhile reached the new process
                assert sent_while_dead >= 30  # verified, installed, healthy from each
                assert _acks_received(metrics) >= sent_while_dead

                # every telemetry record, those sent to the dead fleet included, is stored
                def stored(device_id: str) -> set[str]:
                    rows = api.get(f"/devices/{device_id}/telemetry?limit=1000").json()
                    return {row["record_id"] for row in rows}

                missing: dict[str, set[str]] = {}

                def all_stored() -> bool:
                    missing.clear()
                    missing.update({d: records_sent[d] - stored(d) for d in ids})
                    return not any(missing.values())

                wait_for(all_stored, timeout_s=30, what=f"every record stored ({missing})")
                while_dead = sum(len(records_sent[d] - records_before[d]) for d in ids)
                assert while_dead >= 50  # 10 devices, 0.5 s apart, for more than 2.5 s

                for d in ids:  # resends are recognised: one command id, one install
                    assert {c.id for c in devices.received_commands(d)} == {
                        f"{rollout['id']}:deploy:{d}"
                    }
                    assert devices.current_bundle(d) == V2
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            api.close()
            metrics.close()


# --- an aborted rollout ----------------------------------------------------------------------


def test_an_aborted_rollout_never_reaches_a_device_that_was_away_or_behind_a_stalled_link(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """A rollout is created while ten of its devices are offline and the fleet's link to the
    broker has stalled (its commands wait in the link), then aborted. Once the link moves
    again, past the commands' ``expires_at``, the ten online devices receive the stale
    commands and ignore them; the ten others then come back, and the fleet, whose rollout
    is finished, resends them nothing. No device ever installs the aborted version."""
    with (
        plain_mosquitto(tmp_path / "broker") as broker_port,
        LinkProxy(broker_port) as link,
        running_fleet(
            tmp_path / "fleet",
            mqtt_url=f"mqtt://127.0.0.1:{link.port}",
            command_ttl_s=2.0,
            mqtt_settle_s=0.5,
        ) as fleet,
    ):
        fleet.publish(bundles[0], stage="production")
        v2 = fleet.publish(bundles[1])
        present = fleet.enroll(10, prefix="on", bundle=V1, bundle_version_number=V1_NUMBER)
        away = fleet.enroll(10, prefix="away", bundle=V1, bundle_version_number=V1_NUMBER)
        with FleetSimulator("127.0.0.1", broker_port, present, Behaviour()) as online:
            online.start(connect_timeout_s=60)
            wait_for(lambda: _online(fleet, 10), what="ten devices online")

            link.hold()
            rollout = fleet.api(
                "POST",
                "/rollouts",
                json={"bundle_id": v2["id"], "waves": ["100"], "gate": {"soak_s": 0}},
            )
            wait_for(
                lambda: (
                    {m["state"] for m in _members(fleet, rollout["id"]).values()} == {"commanded"}
                ),
                what="all twenty devices commanded",
            )
            fleet.api("POST", f"/rollouts/{rollout['id']}/abort")
            time.sleep(3.0)  # past the commands' expires_at (2 s)
            link.release()
            wait_for(
                lambda: all(online.received_commands(s.device_id) for s in present),
                what="the stale commands delivered",
            )

            with FleetSimulator("127.0.0.1", broker_port, away, Behaviour(), seed=1) as back:
                back.start(connect_timeout_s=60)
                wait_for(lambda: _online(fleet, 20), what="all twenty devices online")
                time.sleep(1.5)  # what a resend on their return would need to act

                for simulator, specs in ((online, present), (back, away)):
                    for spec in specs:
                        d = spec.device_id
                        assert simulator.current_bundle(d) == V1
                        assert simulator.acks_sent(d) == []
                        received = simulator.received_commands(d)
                        assert received == simulator.ignored_commands(d)
                        assert len(received) == (1 if simulator is online else 0)
        members = _members(fleet, rollout["id"])
        assert {m["state"] for m in members.values()} == {"commanded"}  # none answered
        assert {d["bundle"] for d in fleet.api("GET", "/devices")} == {V1}


def test_a_paused_rollout_is_resent_to_devices_that_were_away_only_once_it_resumes(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """Devices offline when their commands went out come back while the rollout is paused:
    nothing is resent to them (a pause stops the spread). Resumed, the wave sends them their
    commands again, once, and completes."""
    with running_fleet(tmp_path / "fleet") as fleet:
        fleet.publish(bundles[0], stage="production")
        v2 = fleet.publish(bundles[1])
        specs = fleet.enroll(4, bundle=V1, bundle_version_number=V1_NUMBER)
        rollout = fleet.api(
            "POST",
            "/rollouts",
            json={"bundle_id": v2["id"], "waves": ["100"], "gate": {"soak_s": 0}},
        )
        wait_for(
            lambda: {m["state"] for m in _members(fleet, rollout["id"]).values()} == {"commanded"},
            what="the wave commanded while its devices are away",
        )
        fleet.api("POST", f"/rollouts/{rollout['id']}/pause")
        with FleetSimulator("127.0.0.1", fleet.mqtt_port, specs, Behaviour()) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: _online(fleet, 4), what="the devices back")
            time.sleep(1.0)  # what a resend on their return would need to arrive
            assert all(devices.received_commands(s.device_id) == [] for s in specs)

            fleet.api("POST", f"/rollouts/{rollout['id']}/resume")
            wait_for(
                lambda: fleet.api("GET", f"/rollouts/{rollout['id']}")["state"] == "completed",
                what="the resumed rollout to complete",
            )
            assert {m["state"] for m in _members(fleet, rollout["id"]).values()} == {"healthy"}
            for spec in specs:
                assert len(devices.received_commands(spec.device_id)) == 1
                assert devices.current_bundle(spec.device_id) == V2


# --- a final ack lost with the fleet's session ------------------------------------------------


def test_a_final_ack_lost_with_the_fleets_session_is_reconciled_from_the_retained_status(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """The fleet's link is cut while its devices install, for longer than its session lasts
    (1 s here): the broker forgets the session, so the devices' final acks reach no one.
    Their retained statuses name the command they finished: once the link is back, the
    fleet makes the members healthy from them, resends nothing and completes the rollout;
    each device received its command once and answered it once."""
    with (
        plain_mosquitto(tmp_path / "broker") as broker_port,
        LinkProxy(broker_port) as link,
        running_fleet(
            tmp_path / "fleet",
            mqtt_url=f"mqtt://127.0.0.1:{link.port}",
            mqtt_session_expiry_s=1,
            mqtt_settle_s=1.0,
        ) as fleet,
    ):
        fleet.publish(bundles[0], stage="production")
        v2 = fleet.publish(bundles[1])
        specs = fleet.enroll(3, bundle=V1, bundle_version_number=V1_NUMBER)
        ids = [s.device_id for s in specs]
        with FleetSimulator(
            "127.0.0.1", broker_port, specs, Behaviour(install_delay_s=6.0)
        ) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: _online(fleet, 3), what="three devices online")
            rollout = fleet.api(
                "POST",
                "/rollouts",
                json={"bundle_id": v2["id"], "waves": ["100"], "gate": {"soak_s": 0}},
            )
            wait_for(
                lambda: (
                    {m["state"] for m in _members(fleet, rollout["id"]).values()} == {"in_progress"}
                ),
                what="every device installing",
            )
            link.cut()
            wait_for(
                lambda: all(any(a.state == "healthy" for a in devices.acks_sent(d)) for d in ids),
                what="the final acks, sent while the fleet has no session",
            )
            assert {m["state"] for m in _members(fleet, rollout["id"]).values()} == {"in_progress"}
            link.heal()

            done = wait_for(
                lambda: (
                    (r := fleet.api("GET", f"/rollouts/{rollout['id']}"))["state"]
                    in ("completed", "paused")
                    and r
                ),
                timeout_s=60,
                what="the rollout to end once the link is back",
            )
            assert done["state"] == "completed", done["reason"]
            for d, member in _members(fleet, rollout["id"]).items():
                assert member["state"] == "healthy"
                assert member["detail"] == (
                    "from the device's status: it finished this command healthy"
                )
                assert len(devices.received_commands(d)) == 1  # no resend was needed
                assert [a.state.value for a in devices.acks_sent(d)].count("healthy") == 1
                assert devices.current_bundle(d) == V2


# --- the bridge acknowledges only what it committed --------------------------------------------

_BRIDGE = """
import logging, sys, threading
import sqlalchemy as sa
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.metrics import FleetMetrics
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
db = sa.create_engine(sys.argv[1], connect_args={"check_same_thread": False, "timeout": 0.05})
bridge = MqttBridge(
    MqttEndpoint("127.0.0.1", int(sys.argv[2])), db, FleetMetrics(), client_id=sys.argv[3],
    retry_min_s=0.05, retry_max_s=0.2,
)
bridge.start()
threading.Event().wait()
"""


def _records(engine: Engine) -> list[str]:
    with Session(engine) as session:
        query = select(TelemetryRecordRow.record_id).where(
            col(TelemetryRecordRow.device_id) == "dev-1"
        )
        return sorted(session.exec(query).all())


def test_no_message_is_acknowledged_before_it_is_committed(tmp_path: Path) -> None:
    """A bridge process holds five messages it cannot commit (another connection holds
    SQLite's write lock) and is killed with SIGKILL: it had acknowledged none of them, so
    the broker delivers all five again to the next bridge with the same client id, which
    stores each once."""
    path = tmp_path / "fleet.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with Session(engine) as session:
        session.add(Device(id="dev-1", profile="host"))
        session.commit()
    client_id = "edgefleet-fleet-test"
    with plain_mosquitto(tmp_path / "broker") as port:
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
        device.connect("127.0.0.1", port)
        device.loop_start()

        def send(*ids: str) -> None:
            for record_id in ids:
                batch = TelemetryBatch(records=[TelemetryRecord(id=record_id, ts=time.time())])
                payload = encode_telemetry(batch, compress=False)
                info = device.publish(device_topic("dev-1", "telemetry"), payload, qos=1)
                info.wait_for_publish(5)

        log = tmp_path / "bridge.log"
        bridge = subprocess.Popen(
            [sys.executable, "-c", _BRIDGE, f"sqlite:///{path}", str(port), client_id],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        lock = sqlite3.connect(path, isolation_level=None)
        try:

            def subscribed() -> bool:  # the same record id until the bridge stores it
                send("probe")
                time.sleep(0.2)
                return _records(engine) == ["probe"]

            wait_for(subscribed, what="the bridge subscribed and storing")
            lock.execute("BEGIN EXCLUSIVE")
            held = [f"held-{i}" for i in range(5)]
            send(*held)
            wait_for(
                lambda: "the database failed" in log.read_text(),
                what="the bridge holding messages while the database is locked",
            )
            time.sleep(1.0)  # all five reach it (the broker sent them at once); none commits
            bridge.send_signal(signal.SIGKILL)
            bridge.wait(10)
            lock.execute("ROLLBACK")
            assert _records(engine) == ["probe"]

            again = MqttBridge(
                MqttEndpoint("127.0.0.1", port), engine, FleetMetrics(), client_id=client_id
            )
            again.start()
            try:
                wait_for(
                    lambda: _records(engine) == sorted(["probe", *held]),
                    what="the five messages delivered again and stored",
                )
            finally:
                again.stop()
        finally:
            if bridge.poll() is None:
                bridge.kill()
                bridge.wait(10)
            lock.close()
            device.disconnect()
            device.loop_stop()
            engine.dispose()


@pytest.mark.parametrize("replica", ["main", "eu-2"])
def test_a_replicas_client_id_and_broker_account_are_its_own(replica: str) -> None:
    from fleet.config import FleetSettings
    from fleet.server import FLEET_MQTT_USER, fleet_mqtt_user

    settings = FleetSettings(replica_id=replica)
    assert fleet_mqtt_user(settings.replica_id) == f"edgefleet-fleet-{replica}"
    assert FLEET_MQTT_USER == "edgefleet-fleet-main"
    with pytest.raises(ValueError, match="replica_id"):
        FleetSettings(replica_id="Not/A-Name")
