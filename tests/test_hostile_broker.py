"""A compromised device against the broker: it holds valid credentials and tries everything.

Real mosquitto with its dynamic-security plugin, real paho / mosquitto clients, and the
real fleet (its bridge storing what it receives) where the harm would show there. Every
test runs with passwords and with mTLS certificates, where both apply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.mqtt import (
    Status,
    TelemetryBatch,
    TelemetryRecord,
    device_topic,
    shared_subscription,
)
from fleet.broker import DeviceCredential, MosquittoBroker, MqttEndpoint, hash_password
from fleet.ca import FleetCA
from fleet.config import FleetSettings
from fleet.errors import BrokerError
from tests.utils.fleet import RunningFleet, device_endpoint, running_fleet, wait_for
from tests.utils.mqtt import ACCEPTED, REFUSED, PahoClient, free_port, mqtt_pub

MODES = ["password", "mtls"]
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")

FORBIDDEN_FILTERS = (
    shared_subscription("telemetry"),
    shared_subscription("status"),
    shared_subscription("ack"),
    "$share/spies/edgefleet/v1/devices/+/telemetry",
    "#",
    "edgefleet/#",
    "edgefleet/v1/devices/+/cmd",
    "edgefleet/v1/devices/+/telemetry",
    device_topic("dev-b", "cmd"),
    f"$share/fleet/{device_topic('dev-a', 'cmd')}",
    "$CONTROL/dynamic-security/v1/response",
    "$SYS/#",
)


# --- a broker of its own, in either mode -----------------------------------------------------


@dataclasses.dataclass
class Broker:
    broker: MosquittoBroker
    ca: FleetCA | None
    directory: Path

    def device(self, device_id: str) -> MqttEndpoint:
        """The endpoint ``device_id`` connects with (its password is its id + "-pw")."""
        if self.ca is None:
            return dataclasses.replace(
                self.broker.endpoint, username=device_id, password=f"{device_id}-pw"
            )
        issued = self.ca.issue_device_certificate(device_id)
        assert issued.private_key_pem is not None
        cert = self.directory / f"{device_id}-{issued.serial}.pem"
        key = cert.with_suffix(".key")
        cert.write_bytes(issued.certificate_pem)
        key.write_bytes(issued.private_key_pem)
        return dataclasses.replace(self.broker.endpoint, cert_file=cert, key_file=key)

    def password(self, device_id: str) -> str | None:
        return None if self.ca is not None else f"{device_id}-pw"


def start_broker(directory: Path, mode: str, **options: Any) -> Broker:
    ca = FleetCA.load_or_create(directory / "ca") if mode == "mtls" else None
    devices = [
        DeviceCredential(d, None if ca else hash_password(f"{d}-pw")) for d in ("dev-a", "dev-b")
    ]
    broker = MosquittoBroker(directory / "mosquitto", ca=ca, **options)
    broker.start(fleet_username="fleet", fleet_password="fleet-pw", devices=devices)
    return Broker(broker, ca, directory)


@pytest.fixture(params=MODES)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    started = start_broker(tmp_path, request.param, control_timeout_s=1.5, reload_timeout_s=2)
    with started.broker:
        yield started


def test_a_device_cannot_subscribe_beyond_its_own_cmd(broker: Broker) -> None:
    device = PahoClient(broker.device("dev-a"), "dev-a")
    try:
        for topic in FORBIDDEN_FILTERS:
            assert device.subscribe(topic) == REFUSED, topic
        assert device.subscribe(device_topic("dev-a", "cmd")) == 1
        # a refused filter delivers nothing: B's command, sent first, never arrives
        for owner in ("dev-b", "dev-a"):
            assert mqtt_pub(broker.broker.endpoint, device_topic(owner, "cmd"), owner)[2] == ""
        assert device.next_message() == (device_topic("dev-a", "cmd"), b"dev-a")
        assert device.messages.empty()
        # and it publishes as itself only
        assert device.publish(device_topic("dev-a", "telemetry"), "t") in ACCEPTED
        for forged in (device_topic("dev-b", "telemetry"), device_topic("dev-a", "cmd"), "x"):
            assert device.publish(forged, "forged") == REFUSED, forged
    finally:
        device.close()


def accepted(endpoint: MqttEndpoint, device_id: str) -> bool:
    """Whether the broker takes ``device_id``'s status from ``endpoint``."""
    rc, _, err = mqtt_pub(endpoint, device_topic(device_id, "status"), "{}")
    return rc == 0 and err == ""


def test_a_broker_that_stops_answering_or_dies_fails_changes_cleanly(broker: Broker) -> None:
    mosquitto = broker.broker.pid
    assert mosquitto is not None
    os.kill(mosquitto, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match=r"did not answer|did not reread"):
            broker.broker.add_device("dev-c", password=broker.password("dev-c"))
        assert time.monotonic() - started < 5
        with pytest.raises(BrokerError, match=r"did not answer|did not reread"):
            broker.broker.remove_device("dev-b")
    finally:
        os.kill(mosquitto, signal.SIGCONT)
    # the add it answered late was taken back behind it: dev-c is not in
    clients = broker.broker.control([{"command": "listClients"}])[0]["data"]["clients"]
    assert "dev-c" not in clients and "dev-a" in clients
    assert not accepted(broker.device("dev-c"), "dev-c")
    # the same changes, sent again, are carried out
    broker.broker.add_device("dev-c", password=broker.password("dev-c"))
    assert accepted(broker.device("dev-c"), "dev-c")
    broker.broker.remove_device("dev-b")
    assert not accepted(broker.device("dev-b"), "dev-b")
    assert accepted(broker.device("dev-a"), "dev-a")
    # killed: the change is refused at once, saying so
    os.kill(mosquitto, signal.SIGKILL)
    wait_for(lambda: broker.broker.pid is None, timeout_s=5, what="mosquitto to die")
    with pytest.raises(BrokerError, match=r"mosquitto has exited \(status -9\)"):
        broker.broker.add_device("dev-d", password=broker.password("dev-d"))


# --- against the running fleet ---------------------------------------------------------------


@pytest.fixture(params=MODES)
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet", mqtt_tls=request.param == "mtls") as running:
        yield running


def enroll(fleet: RunningFleet, directory: Path, *device_ids: str) -> list[MqttEndpoint]:
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host", "uses": 10})
    endpoints = []
    for device_id in device_ids:
        body = fleet.api("POST", "/enroll", json={"token": grant["token"], "device_id": device_id})
        endpoints.append(device_endpoint(body, directory))
    return endpoints


def test_intruders_on_the_fleets_shared_subscription_steal_no_telemetry(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    ids = ["neighbour", "intruder-1", "intruder-2", "intruder-3"]
    neighbour, *intruders = enroll(fleet, tmp_path / "devices", *ids)
    thieves = [PahoClient(e, i) for e, i in zip(intruders, ids[1:], strict=True)]
    sender = PahoClient(neighbour, "neighbour")
    try:
        subacks = [
            thief.subscribe(shared_subscription(channel))
            for thief in thieves
            for channel in ("telemetry", "status", "ack")
        ]
        for i in range(40):
            batch = TelemetryBatch(records=[TelemetryRecord(id=f"r{i}", ts=time.time())])
            topic = device_topic("neighbour", "telemetry")
            assert sender.publish(topic, batch.model_dump_json()) in ACCEPTED

        def stored() -> int:
            return len(fleet.api("GET", "/devices/neighbour/telemetry?limit=1000"))

        # with the subscriptions granted, the thieves would take three shares in four
        wait_for(lambda: stored() == 40, timeout_s=20, what="all 40 records at the fleet")
        assert subacks == [REFUSED] * 9
        assert all(thief.messages.empty() for thief in thieves)
    finally:
        for client in (sender, *thieves):
            client.close()


def test_a_client_id_takeover_kicks_nobody_and_marks_nobody_offline(
    fleet: RunningFleet, tmp_path: Path
) -> None:
    victim_endpoint, attacker_endpoint = enroll(fleet, tmp_path / "devices", "victim", "attacker")
    status = device_topic("victim", "status")
    victim = PahoClient(
        victim_endpoint, "victim", will=(status, Status(online=False).model_dump_json())
    )
    attacker = None
    try:
        online = Status(online=True).model_dump_json()
        assert victim.publish(status, online, retain=True) in ACCEPTED
        wait_for(lambda: fleet.api("GET", "/devices/victim")["online"], what="victim online")
        # the attacker's own credentials with the victim's client id (and Last Will)
        attacker = PahoClient(
            attacker_endpoint, "victim", will=(status, Status(online=False).model_dump_json())
        )
        time.sleep(2)  # the victim's paho would have reconnected and the two would flap
        assert not victim.disconnected.is_set()
        assert not attacker.disconnected.is_set()
        assert fleet.api("GET", "/devices/victim")["online"] is True
        broker = fleet.server.broker
        assert broker is not None
        log = broker.log_path.read_text()
        assert "as attacker (" in log and log.count("as victim (") == 1
    finally:
        victim.close()
        if attacker is not None:
            attacker.close()


def test_a_broker_change_that_hangs_refuses_the_enrollment_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path / "fleet") as fleet:
        broker = fleet.server.broker
        assert broker is not None and broker.pid is not None
        grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
        request = {"token": grant, "device_id": "late"}
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            answer = fleet.client.post("/api/v1/enroll", json=request)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert answer.status_code == 503, answer.text
        assert "nothing was stored" in answer.json()["detail"]
        assert fleet.call("GET", "/devices/late").status_code == 404
        # mosquitto carried out the add when it woke, then the removal sent behind it (the
        # admin connection keeps their order, so this answer comes after both)
        clients = broker.control([{"command": "listClients"}])[0]["data"]["clients"]
        assert "late" not in clients
        again = fleet.client.post("/api/v1/enroll", json=request)
        assert again.status_code == 201, again.text
        endpoint = device_endpoint(again.json(), tmp_path)
        assert mqtt_pub(endpoint, device_topic("late", "status"), "{}")[:3:2] == (0, "")


# --- a bad row in the database ---------------------------------------------------------------


def _insert_like(db: Path, model_id: str, rows: dict[str, str | None]) -> None:
    """Copy the device row ``model_id`` under each id of ``rows`` (its password hash)."""
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        model = dict(
            connection.execute("SELECT * FROM device WHERE id = ?", (model_id,)).fetchone()
        )
        for device_id, password_hash in rows.items():
            row = {**model, "id": device_id, "password_hash": password_hash}
            names = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            connection.execute(f"INSERT INTO device ({names}) VALUES ({marks})", list(row.values()))


def _telemetry_arrives(api: httpx.Client, endpoint: MqttEndpoint, device_id: str) -> bool:
    """Publish one record (the same one each time: it is stored once) and say whether the
    fleet has it; the fleet's bridge may still be subscribing when ``fleet serve`` answers."""
    batch = TelemetryBatch(records=[TelemetryRecord(id="r1", ts=time.time())])
    topic = device_topic(device_id, "telemetry")
    assert mqtt_pub(endpoint, topic, batch.model_dump_json())[:3:2] == (0, "")
    return bool(api.get(f"/api/v1/devices/{device_id}/telemetry").json())


def test_a_bad_device_row_does_not_stop_fleet_serve(tmp_path: Path) -> None:
    data_dir = tmp_path / "fleet"
    with running_fleet(data_dir) as fleet:
        grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host", "uses": 2})
        passwords = {}
        for device_id in ("good-1", "good-2"):
            body = fleet.api(
                "POST", "/enroll", json={"token": grant["token"], "device_id": device_id}
            )
            passwords[device_id] = body["mqtt"]["password"]
        admin = fleet.admin_token
    good_hash = hash_password("whatever")
    bad = {"zz\n": good_hash, "a/b": good_hash, "edgefleet-fleet-admin": good_hash, "x": "plain"}
    _insert_like(data_dir / "fleet.db", "good-1", bad)

    port, mqtt_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [EDGEFLEET, "fleet", "serve", "--data-dir", str(data_dir), "--port", str(port),
             "--mqtt-port", str(mqtt_port)],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {admin}"}
        )

        def ready() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                return api.get("/v2/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s=60, what="fleet serve to answer")
        # each bad row is reported...
        reported = log.read_text()
        for device_id in bad:
            assert f"device row {device_id!r} is left out of the broker" in reported, reported
        # ...and never reaches the broker's file
        stored = json.loads(
            (FleetSettings(data_dir=data_dir).broker_dir / "dynamic-security.json").read_text()
        )
        # compare names, not text: a password hash may contain "zz" by chance
        usernames = {client["username"] for client in stored["clients"]}
        rolenames = {role["rolename"] for role in stored["roles"]}
        for device_id in ("zz\n", "a/b", "x"):
            assert device_id not in usernames and f"device-{device_id}" not in rolenames
        assert {"good-1", "good-2"} <= usernames
        # the good devices work
        for device_id, password in passwords.items():
            endpoint = MqttEndpoint("127.0.0.1", mqtt_port, username=device_id, password=password)
            wait_for(
                lambda e=endpoint, d=device_id: _telemetry_arrives(api, e, d),
                what=f"{device_id}'s telemetry at the fleet",
            )
        api.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
