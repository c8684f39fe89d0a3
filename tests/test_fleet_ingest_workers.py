"""``fleet serve --ingest-workers N`` (fleet/ingest_workers.py): telemetry stored by worker
processes through the shared subscription, a worker killed and restarted losing nothing.

One process-level test (a served fleet on PostgreSQL, its embedded mosquitto, devices as
plain MQTT clients that never resend: a record the fleet lost stays lost) and in-process
checks of the settings and the metrics relay.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from fleet.bridge import MqttBridge, drain_session
from fleet.broker import MosquittoBroker, MqttEndpoint
from fleet.broker.credential import ingest_username, replica_of
from fleet.config import FleetSettings, is_in_memory_sqlite
from fleet.db import make_engine
from fleet.errors import BrokerError
from fleet.ingest_workers import (
    IngestWorkers,
    IngestWorkerSpec,
    _relay,
    add_counts,
    counter_totals,
    drain_ingest_sessions,
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
    killed: its workers exit by themselves, and what devices send meanwhile queues in
    every session (its mosquitto lives on); a new one started with one worker empties
    worker 2's session, so all is stored, and stops its worker cleanly."""
    database_url = fresh_database(postgres_url, f"ingest_{time.time_ns()}")
    options = ("--database-url", database_url, "--ingest-workers", "2")
    fleet = serve_fleet(tmp_path / "data", None, *options)
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
        for index in (1, 2):
            assert fleet.metric("edgefleet_ingest_worker_records_total", f'worker="{index}"', 0) > 0

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
        # its mosquitto lives on: it queues a share of this in each session, worker 2's too
        sent |= _send(devices, "orphaned", 10)
        fleet = serve_fleet(tmp_path / "data", None, *options[:-1], "1")
        wait_for(lambda: set(_worker_pids(fleet)) == {1}, what="one worker up again")
        wait_for(lambda: stored() == sent, timeout_s=60, what="worker 2's session emptied")
        assert "emptying the MQTT sessions of ingest workers 2 to 2" in fleet.log()

        def recorded() -> list[int]:
            with Session(engine) as session:
                return [r.ingest_workers for r in session.exec(select(FleetReplica))]

        # recorded once the drain (a thread of its own, off the start) has let go
        wait_for(lambda: recorded() == [1], timeout_s=30, what="one worker recorded")
    finally:
        for client in devices.values():
            client.close()
        pids = [pid for started in _worker_pids(fleet).values() for pid in started]
        fleet.stop()
        engine.dispose()
    assert "did not stop in time" not in fleet.log()
    # it stored what it held and left its session unsubscribed
    assert "ingest worker 1 stopped" in fleet.log()
    assert not [pid for pid in pids if running(pid)], "an ingest worker outlived fleet serve"


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"mqtt_tls": True}, "--mqtt-tls makes every account a certificate"),
        ({"mqtt_url": "mqtt://broker:1883"}, "needs --mqtt-credential-file"),
        ({"database_url": "sqlite://"}, "in-memory SQLite"),
        ({"database_url": "sqlite:///:memory:"}, "in-memory SQLite"),
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
    worker.receipts_unqueued.inc(6)
    heard, relay = multiprocessing.Pipe(duplex=False)  # as a worker sends its counters
    sent = _relay(worker, {}, relay)
    add_counts(server, heard.recv())
    worker.telemetry_records.inc(4)
    sent = _relay(worker, sent, relay)
    add_counts(server, heard.recv())
    _relay(worker, sent, relay)
    assert not heard.poll(0.1), "counters that did not move were sent again"
    totals = counter_totals(server)
    assert totals[("telemetry_records", ())] == 12
    assert totals[("messages", (("channel", "telemetry"),))] == 2
    assert totals[("quarantined", (("channel", "telemetry"),))] == 1
    assert totals[("receipts_unqueued", ())] == 6
    add_counts(server, {("telemetry_records", ()): -7, ("registry", ()): 1})  # never down
    assert counter_totals(server)[("telemetry_records", ())] == 12


def test_a_workers_account_is_its_replicas_with_its_number() -> None:
    """The broker (fleet/api/broker.py) knows a worker's account as its replica's, whatever
    the replica id's length; a replica id that reads like a worker's is refused."""
    assert ingest_username("eu-2", 3) == "edgefleet-fleet-eu-2-ingest-3"
    assert replica_of("edgefleet-fleet-eu-2-ingest-3") == "eu-2"
    longest = "a" * 32
    assert replica_of(ingest_username(longest, 32)) == longest
    FleetSettings(  # so its workers may use an external broker that asks the fleet
        mqtt_url="mqtt://broker:1883", mqtt_credential_file=Path("broker-credential.json"),
        replica_id=longest, ingest_workers=32,
    )  # fmt: skip
    for refused in ("edgefleet-fleet-a-ingest-2-ingest-1", "edgefleet-fleet-a-admin-ingest-1"):
        assert replica_of(refused) is None
    with pytest.raises(ValueError, match="numbered from 1"):
        ingest_username("eu-2", 0)
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
    worker_id = ingest_username("a", 2)
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
        assert drain_ingest_sessions(  # a restart with both workers: none to empty
            endpoint, engine, FleetMetrics(), replica_id="a", session_expiry_s=60, beyond=2
        )
        assert drain_session(  # a probe done at once, not after a quiet hour (or its timeout)
            endpoint, engine, FleetMetrics(), client_id=ingest_username("b", 1),
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
        ingest_username("a", 1),
        worker_id,
        ingest_username("b", 1),
    ]


def _restarts(metrics: FleetMetrics) -> float:
    return sum(
        sample.value
        for family in metrics.ingest_worker_restarts.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def test_a_worker_whose_start_fails_is_started_again(tmp_path: Path) -> None:
    """A start that raises (spawn cannot pickle this spec) is logged, counted as a restart
    and tried again after the backoff: the worker's supervision does not end with it."""
    spec = IngestWorkerSpec(
        index=1,
        endpoint=MqttEndpoint("127.0.0.1", free_port()),
        db_url=threading.Lock(),  # type: ignore[arg-type]  # not picklable: start() raises
        session_expiry_s=60,
        idle_in_transaction_s=60,
    )
    metrics = FleetMetrics()
    workers = IngestWorkers([spec], metrics, restart_min_s=0.01, restart_max_s=0.05)
    workers.start()
    try:
        wait_for(lambda: _restarts(metrics) >= 3, what="three failed starts, each tried again")
    finally:
        workers.stop()
    assert workers.pids() == {}


def test_a_worker_that_exits_is_restarted_and_pids_names_only_live_ones(tmp_path: Path) -> None:
    """A real worker whose broker is not there exits (1); while it waits for its restart
    ``pids()`` does not name the dead process."""
    spec = IngestWorkerSpec(
        index=1,
        endpoint=MqttEndpoint("127.0.0.1", free_port()),  # nothing listens: it exits
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        session_expiry_s=60,
        idle_in_transaction_s=60,
    )
    metrics = FleetMetrics()
    workers = IngestWorkers([spec], metrics, restart_min_s=600)
    workers.start()
    try:
        wait_for(lambda: _restarts(metrics) == 1, timeout_s=60, what="the worker exiting")
        assert workers.pids() == {}
    finally:
        workers.stop()


def test_a_worker_that_cannot_be_heard_is_stopped_not_left_running() -> None:
    """Its relay garbled (not a pickle): the supervisor ends the worker before it starts
    another under the same account."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=time.sleep, args=(600,))
    process.start()
    heard, said = context.Pipe(duplex=False)
    said.send_bytes(b"not a pickle")
    workers = IngestWorkers([], FleetMetrics())
    try:
        workers._relay_until_exit(1, process, heard)
        assert not process.is_alive() and process.exitcode == -signal.SIGTERM
    finally:
        process.kill()
        said.close()


def test_a_probe_leaves_no_session_and_a_bridge_of_all_channels_in_any_order_is_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe (``if_present``) for a session the broker did not hold has it discard the one
    its connection made. A bridge given the three channels in another order is a replica's
    whole bridge (its first-start log speaks of rollouts); one given a channel twice is
    refused."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(engine)
    probed = ingest_username("gone", 1)
    with plain_mosquitto(tmp_path / "broker") as port:
        endpoint = MqttEndpoint("127.0.0.1", port)
        assert drain_session(
            endpoint, engine, FleetMetrics(), client_id=probed, session_expiry_s=3600,
            if_present=True,
        )  # fmt: skip
        second = MqttBridge(endpoint, engine, FleetMetrics(), client_id=probed, drain=True)
        second.start()
        try:
            assert not second.session_present, "the probe left a session behind"
        finally:
            second.stop(discard_session=True)
        whole = MqttBridge(
            endpoint, engine, FleetMetrics(), client_id="whole",
            channels=("telemetry", "ack", "status"),
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="fleet.bridge"):
            whole.start()
            whole.stop()
    engine.dispose()
    assert "the rollout engine reconciles" in caplog.text
    with pytest.raises(ValueError, match="each once"):
        MqttBridge(endpoint, engine, FleetMetrics(), channels=("telemetry", "telemetry"))


@pytest.mark.parametrize(
    ("database_url", "in_memory"),
    [
        ("sqlite://", True),
        ("sqlite+pysqlite://", True),
        ("sqlite:///:memory:", True),
        ("sqlite:///file:fleet?mode=memory&cache=shared&uri=true", True),
        ("sqlite:////var/lib/fleet/memory.db", False),  # a file, whatever its name
        ("sqlite:///fleet.db", False),
        ("postgresql://fleet@db/memory", False),
    ],
)
def test_workers_are_refused_an_in_memory_sqlite_database_only(
    database_url: str, in_memory: bool
) -> None:
    assert is_in_memory_sqlite(database_url) is in_memory
    if in_memory:
        with pytest.raises(ValueError, match="in-memory SQLite"):
            FleetSettings(database_url=database_url, ingest_workers=2)
    else:
        assert FleetSettings(database_url=database_url, ingest_workers=2).ingest_workers == 2


def test_a_refused_connection_fails_the_start_at_once_with_the_brokers_reason(
    tmp_path: Path,
) -> None:
    """A connection the broker refuses (an account it does not know, as a probe for a
    worker that never ran may be) fails ``start`` with the CONNACK's reason, not after the
    start's timeout: here a minute, which would fail on the message."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    with MosquittoBroker(tmp_path / "mosquitto") as broker:
        broker.start(fleet_username="fleet", fleet_password="fleet-pw", devices=[])
        stranger = dataclasses.replace(broker.endpoint, username="fleet", password="wrong")
        bridge = MqttBridge(stranger, engine, FleetMetrics(), drain=True)
        with pytest.raises(BrokerError, match="refused the fleet's connection as fleet: Not"):
            bridge.start(timeout_s=60)
    engine.dispose()
