"""``fleet serve --ingest-workers N`` (fleet/ingest_workers.py): telemetry stored by worker
processes through the shared subscription, a worker killed and restarted losing nothing.

One process-level test (a served fleet on PostgreSQL, its embedded mosquitto, devices as
plain MQTT clients that never resend: a record the fleet lost stays lost) and in-process
checks of the settings and the metrics relay.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from fleet.bridge import MqttBridge, drain_session
from fleet.broker import MqttEndpoint
from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.ingest_workers import (
    add_counts,
    counter_totals,
    drain_ingest_sessions,
    ingest_client_id,
)
from fleet.metrics import FleetMetrics
from fleet.migrate import upgrade
from fleet.models import Device, FleetReplica, TelemetryRecordRow
from fleet.rollouts.lease import LeaseKeeper
from tests.utils.fleet import wait_for
from tests.utils.mqtt import ACCEPTED, PahoClient, free_port, plain_mosquitto
from tests.utils.replicas import fresh_database
from tests.utils.served_fleet import ServedFleet, enroll_simulated, running, serve_fleet

_WORKER_UP = re.compile(r"ingest worker (\d+) \(pid (\d+)\) stores telemetry")


def _worker_pids(fleet: ServedFleet) -> dict[int, list[int]]:
    """Each worker's process ids in the order they started."""
    pids: dict[int, list[int]] = {}
    for index, pid in _WORKER_UP.findall(fleet.log()):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def _worker_records(fleet: ServedFleet, index: int) -> float:
    token = (fleet.data_dir / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    text = httpx.get(f"{fleet.url}/metrics", headers=headers, timeout=30).text
    found = re.search(
        rf'^edgefleet_ingest_worker_records_total{{worker="{index}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def _send(devices: dict[str, PahoClient], prefix: str, count: int) -> set[tuple[str, str]]:
    """``count`` telemetry messages from each device, one record each, every one PUBACKed
    by the broker; the ``(device, record)`` pairs sent."""
    sent = set()
    for n in range(count):
        for device_id, client in devices.items():
            record = TelemetryRecord(id=f"{prefix}-{n}", ts=time.time())
            payload = encode_telemetry(TelemetryBatch(records=[record]), compress=False)
            assert client.publish(device_topic(device_id, "telemetry"), payload) in ACCEPTED
            sent.add((device_id, record.id))
    return sent


def test_workers_store_telemetry_once_and_one_killed_is_restarted_losing_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two workers and the server's bridge split the telemetry; worker 1 is frozen
    (SIGSTOP) while its share of a burst reaches it unacknowledged, then SIGKILLed: the
    server restarts it, it takes its session back and the broker delivers that share
    again. Every record PUBACKed to a device is stored, once. Then ``fleet serve`` is
    killed: its workers exit by themselves; a new one starts two again, and stops them
    cleanly."""
    database_url = fresh_database(postgres_url, f"ingest_{time.time_ns()}")
    options = ("--database-url", database_url, "--ingest-workers", "2")
    fleet = serve_fleet(tmp_path / "data", free_port(), *options)
    engine = make_engine(database_url)
    devices: dict[str, PahoClient] = {}
    try:
        wait_for(lambda: set(_worker_pids(fleet)) == {1, 2}, what="both ingest workers up")
        specs, port = enroll_simulated(fleet, 3, tags=["ingest"])
        for spec in specs:
            endpoint = MqttEndpoint(
                "127.0.0.1", port, username=spec.username, password=spec.password
            )
            devices[spec.device_id] = PahoClient(endpoint, spec.device_id)

        def stored() -> set[tuple[str, str]]:
            with Session(engine) as session:
                rows = session.exec(
                    select(TelemetryRecordRow.device_id, TelemetryRecordRow.record_id)
                )
                return set(rows.all())

        sent = _send(devices, "calm", 30)
        wait_for(lambda: stored() == sent, what="the first 90 records stored")
        wait_for(  # the workers relay their counts once a second
            lambda: fleet.metric("edgefleet_telemetry_records_total") == len(sent),
            what="every record counted in the server's /metrics",
        )
        assert _worker_records(fleet, 1) > 0 and _worker_records(fleet, 2) > 0

        (first_pid,) = _worker_pids(fleet)[1]
        os.kill(first_pid, signal.SIGSTOP)
        sent |= _send(devices, "burst", 30)  # a third of it goes to the frozen worker
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: len(_worker_pids(fleet)[1]) == 2, what="worker 1 restarted")
        assert not running(first_pid)
        wait_for(lambda: stored() == sent, timeout_s=60, what="the burst stored, none lost")
        assert "ingest worker 1 (pid" in fleet.log() and "exited with -9" in fleet.log()
        with Session(engine) as session:
            assert len(session.exec(select(TelemetryRecordRow)).all()) == len(sent)
            # for whoever empties its workers' sessions should it die
            assert [r.ingest_workers for r in session.exec(select(FleetReplica))] == [2]

        orphans = [started[-1] for started in _worker_pids(fleet).values()]
        fleet.stop(signal.SIGKILL)
        wait_for(
            lambda: not any(running(pid) for pid in orphans),
            timeout_s=15,
            what="the workers of a killed fleet serve exiting by themselves",
        )
        fleet = serve_fleet(tmp_path / "data", free_port(), *options)
        wait_for(lambda: set(_worker_pids(fleet)) == {1, 2}, what="both workers up again")
    finally:
        for client in devices.values():
            client.close()
        pids = [pid for started in _worker_pids(fleet).values() for pid in started]
        fleet.stop()
        engine.dispose()
    assert "did not stop in time" not in fleet.log()
    for index in (1, 2):  # each stored what it held and left its session unsubscribed
        assert f"ingest worker {index} stopped" in fleet.log()
    assert not [pid for pid in pids if running(pid)], "an ingest worker outlived fleet serve"


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"mqtt_tls": True}, "--mqtt-tls makes every account a certificate"),
        ({"mqtt_url": "mqtt://broker:1883"}, "needs --mqtt-credential-file"),
        ({"database_url": "sqlite://"}, "in-memory SQLite"),
        ({"database_url": "sqlite:///:memory:"}, "in-memory SQLite"),
        (
            {
                "mqtt_url": "mqtt://broker:1883",
                "mqtt_credential_file": Path("broker-credential.json"),
                "replica_id": "a-replica-with-a-long-name-x",
            },
            "choose a shorter --replica-id",
        ),
    ],
)
def test_ingest_workers_are_refused_where_they_cannot_connect(
    options: dict[str, object], refusal: str
) -> None:
    FleetSettings(**options)  # fine without workers
    with pytest.raises(ValueError, match=re.escape(refusal)):
        FleetSettings(ingest_workers=2, **options)


def test_a_workers_counters_reach_the_servers_once_each() -> None:
    worker, server = FleetMetrics(), FleetMetrics()
    server.telemetry_records.inc(5)  # the server's own bridge
    worker.telemetry_records.inc(3)
    worker.messages.labels("telemetry").inc(2)
    worker.quarantined.labels("telemetry").inc()
    first = counter_totals(worker)
    add_counts(server, first)
    worker.telemetry_records.inc(4)
    later = counter_totals(worker)
    add_counts(server, {key: later[key] - first.get(key, 0.0) for key in later})
    totals = counter_totals(server)
    assert totals[("telemetry_records", ())] == 12
    assert totals[("messages", (("channel", "telemetry"),))] == 2
    assert totals[("quarantined", (("channel", "telemetry"),))] == 1
    add_counts(server, {("telemetry_records", ()): -7, ("registry", ()): 1})  # never down
    assert counter_totals(server)[("telemetry_records", ())] == 12


def test_a_workers_client_id_is_its_replicas_with_its_number() -> None:
    assert ingest_client_id("edgefleet-fleet-eu-2", 3) == "edgefleet-fleet-eu-2-ingest-3"
    with pytest.raises(ValueError, match="ends like an ingest worker's account"):
        FleetSettings(replica_id="eu-2-ingest-3")  # it would be eu-2's worker 3


def test_a_replica_records_its_worker_count_for_whoever_drains_it(tmp_path: Path) -> None:
    """The count a replica registers with is in its row, written again if the row is lost;
    a row from before the count was recorded reads 0."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    keeper = LeaseKeeper(engine, "a", ingest_workers=3)
    keeper.register()
    LeaseKeeper(engine, "old").register()
    with Session(engine) as session:
        assert session.get_one(FleetReplica, "a").ingest_workers == 3
        assert session.get_one(FleetReplica, "old").ingest_workers == 0
        session.delete(session.get_one(FleetReplica, "a"))
        session.commit()
    keeper.keep()  # its heartbeat finds the row gone and adds it back
    with Session(engine) as session:
        assert session.get_one(FleetReplica, "a").ingest_workers == 3
    engine.dispose()
    with pytest.raises(ValueError, match="ingest_workers must be 0 or more"):
        LeaseKeeper(engine, "a", ingest_workers=-1)
    unreadable = make_engine(f"sqlite:///{tmp_path / 'not-migrated.db'}")
    try:  # no fleetreplica table: nothing drained, and a later try is due
        assert not drain_ingest_sessions(
            MqttEndpoint("127.0.0.1", free_port()), unreadable, FleetMetrics(),
            replica_id="a", session_expiry_s=60,
        )  # fmt: skip
    finally:
        unreadable.dispose()


def _connected_as(log: Path, prefix: str) -> list[str]:
    """The client ids starting with ``prefix`` that connected to the broker, in order."""
    return re.findall(
        rf"New client connected from \S+ as ({re.escape(prefix)}\S*) ", log.read_text()
    )


def test_the_lease_holder_empties_a_dead_replicas_worker_sessions(tmp_path: Path) -> None:
    """Replica ``a`` ran two workers; worker 2 left its session subscribed (killed with its
    replica), and telemetry queued there is stored by :func:`drain_ingest_sessions`, which
    connects as exactly the workers ``a`` recorded (worker 1 stopped cleanly: a connection,
    nothing to store) and as none for a replica that recorded none."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    LeaseKeeper(engine, "a", ingest_workers=2).register()
    LeaseKeeper(engine, "c").register()
    with Session(engine) as session:
        session.add(Device(id="dev-1", profile="host"))
        session.commit()
    worker_id = ingest_client_id("edgefleet-fleet-a", 2)
    with plain_mosquitto(tmp_path / "broker") as port:
        endpoint = MqttEndpoint("127.0.0.1", port)
        worker = MqttBridge(
            endpoint, engine, FleetMetrics(), client_id=worker_id, channels=("telemetry",)
        )
        worker.start()
        worker.stop()  # its session stays, subscribed: the broker queues for it
        device = PahoClient(endpoint, "dev-1")
        try:
            for n in range(5):
                record = TelemetryRecord(id=f"queued-{n}", ts=time.time())
                payload = encode_telemetry(TelemetryBatch(records=[record]), compress=False)
                assert device.publish(device_topic("dev-1", "telemetry"), payload) in ACCEPTED
        finally:
            device.close()
        with Session(engine) as session:
            assert session.exec(select(TelemetryRecordRow)).all() == []
        for replica in ("a", "c", "never-registered"):
            assert drain_ingest_sessions(
                endpoint, engine, FleetMetrics(), replica_id=replica, session_expiry_s=60
            )
        assert drain_session(  # a probe done at once, not after a quiet hour (or its timeout)
            endpoint, engine, FleetMetrics(), client_id=ingest_client_id("edgefleet-fleet-b", 1),
            session_expiry_s=60, quiet_s=3600, timeout_s=5, if_present=True,
        )  # fmt: skip
        log = tmp_path / "broker" / "mosquitto.log"
        wait_for(lambda: "edgefleet-fleet-b-ingest-1" in log.read_text(), timeout_s=10)
        connected = _connected_as(log, "edgefleet-fleet-")
    with Session(engine) as session:
        stored = sorted(r.record_id for r in session.exec(select(TelemetryRecordRow)))
    engine.dispose()
    assert stored == [f"queued-{n}" for n in range(5)]
    assert connected == [  # the worker's start, then the drain: workers 1 and 2, then b's probe
        worker_id,
        ingest_client_id("edgefleet-fleet-a", 1),
        worker_id,
        ingest_client_id("edgefleet-fleet-b", 1),
    ]
