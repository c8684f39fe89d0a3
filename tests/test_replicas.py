"""Several fleet replicas on one PostgreSQL and one broker: exactly one drives rollouts,
another takes over when it dies, a paused one applies nothing, and every replica enrolls,
revokes and answers an external broker's authentication and authorization.

Real processes on loopback: a PostgreSQL server, ``edgefleet fleet broker`` (mosquitto
with its dynamic-security plugin, accounts from the database), ``edgefleet fleet serve``
replicas killed with SIGKILL or paused with SIGSTOP, simulated devices over real MQTT.
"""

from __future__ import annotations

import collections
import datetime as dt
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from fleet.api.broker import SECRET_HEADER
from fleet.broker import MqttEndpoint
from fleet.broker.credential import BrokerCredential
from fleet.db import make_engine, session_scope
from fleet.errors import LeaseLost
from fleet.migrate import upgrade
from fleet.models import AuditEntry
from fleet.rollouts.lease import (
    TRANSITIONS,
    LeaseEvent,
    LeaseKeeper,
    LeaseRole,
    LeaseView,
    decide,
)
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from tests.utils.fleet import wait_for
from tests.utils.mqtt import ACCEPTED, REFUSED, PahoClient, mqtt_pub
from tests.utils.postgres import postgres_available, postgres_server
from tests.utils.replicas import BROKER_SECRET, Cluster, fresh_database, replica_cluster
from tests.utils.served_fleet import ServedFleet

LEASE_S = 3.0
V1, V2 = "digits-host-1.0.0", "digits-host-1.1.0"
V1_NUMBER = 1_000_000

pytestmark = pytest.mark.skipif(
    not postgres_available(),
    reason="PostgreSQL server binaries (initdb, pg_ctl) are needed: install postgresql",
)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


def _enroll(replica: ServedFleet, device_ids: list[str]) -> list[SimulatedDeviceSpec]:
    grant = replica.ok(
        "POST", "/enrollment-tokens", json={"profile": "host", "uses": len(device_ids)}
    )["token"]
    specs = []
    for device_id in device_ids:
        body = replica.ok("POST", "/enroll", json={"token": grant, "device_id": device_id})
        specs.append(
            SimulatedDeviceSpec(
                device_id=device_id,
                username=body["mqtt"]["username"],
                password=body["mqtt"]["password"],
                bundle=V1,
                bundle_version_number=V1_NUMBER,
            )
        )
    return specs


def _members(replica: ServedFleet, rollout_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = replica.ok("GET", f"/rollouts/{rollout_id}/devices")
    return found


def _transitions(replica: ServedFleet, rollout_id: str) -> list[dict[str, Any]]:
    """The rollout's audit entries, oldest first."""
    entries = replica.ok("GET", "/audit", params={"limit": 10_000})
    return [e for e in reversed(entries) if e["target"] == f"rollout:{rollout_id}"]


def _each_wave_moved_once(transitions: list[dict[str, Any]], waves: int) -> None:
    """Every wave installed once, passed once (but the last), one completion."""
    moved = collections.Counter(
        (e["action"], e["before"]["wave"])
        for e in transitions
        if e["action"] in ("rollout.installed", "rollout.passed", "rollout.complete")
    )
    expected = collections.Counter(
        {
            **{("rollout.installed", w): 1 for w in range(waves)},
            **{("rollout.passed", w): 1 for w in range(waves - 1)},
            ("rollout.complete", waves - 1): 1,
        }
    )
    assert moved == expected, f"transitions per wave: {sorted(moved.items())}"


def _each_device_acted_once(devices: FleetSimulator, rollout_id: str, ids: list[str]) -> None:
    """Each device got its one command id (resent perhaps, never another), installed it
    once, and serves the new bundle."""
    for device in ids:
        got = devices.received_commands(device)
        assert {c.id for c in got} == {f"{rollout_id}:deploy:{device}"}, (device, got)
        starts = [a for a in devices.acks_sent(device) if a.state == "downloading"]
        assert len(starts) == 1, f"{device} started installing {len(starts)} times"
        assert devices.current_bundle(device) == V2


def _every_record_stored(
    replica: ServedFleet, devices: FleetSimulator, ids: list[str]
) -> dict[str, set[str]]:
    """Wait until every record the devices sent is stored; the stored ids per device."""
    sent = {d: set(devices.telemetry_sent(d)) for d in ids}
    stored: dict[str, list[str]] = {}

    def complete() -> bool:
        for d in ids:
            rows = replica.ok("GET", f"/devices/{d}/telemetry", params={"limit": 1000})
            stored[d] = [row["record_id"] for row in rows]
        return all(sent[d] <= set(stored[d]) for d in ids)

    wait_for(complete, timeout_s=60, what="every telemetry record stored")
    for d in ids:
        assert len(stored[d]) == len(set(stored[d])), f"{d}: a record stored twice"
        assert set(stored[d]) <= set(devices.telemetry_sent(d)), f"{d}: records nobody sent"
    return {d: set(rows) for d, rows in stored.items()}


# --- the lease's table and its decision ------------------------------------------------------


def test_the_lease_table_has_a_failure_edge_from_every_role_and_decides_as_documented() -> None:
    for role in LeaseRole:
        assert (role, LeaseEvent.FAILED) in TRANSITIONS, f"{role} has no failure edge"
        assert TRANSITIONS[(role, LeaseEvent.FAILED)] is LeaseRole.FOLLOWER
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    later, earlier = now + dt.timedelta(seconds=5), now - dt.timedelta(seconds=1)
    cases = [
        (LeaseView(None, 0, earlier), "a", None, LeaseEvent.ACQUIRED),  # free
        (LeaseView("b", 3, earlier), "a", None, LeaseEvent.ACQUIRED),  # expired
        (LeaseView("b", 3, later), "a", None, LeaseEvent.HELD_ELSEWHERE),
        (LeaseView("a", 3, later), "a", 3, LeaseEvent.RENEWED),
        (LeaseView("a", 3, earlier), "a", 3, LeaseEvent.ACQUIRED),  # lapsed: a new term
        (LeaseView("a", 3, later), "a", None, LeaseEvent.ACQUIRED),  # this id, restarted
        (LeaseView("a", 4, later), "a", 3, LeaseEvent.HELD_ELSEWHERE),  # a twin took it
    ]
    for view, me, epoch, event in cases:
        assert decide(view, me=me, epoch=epoch, now=now) is event, (view, me, epoch)


@pytest.fixture(params=["sqlite", "postgres"])
def lease_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        url = fresh_database(request.getfixturevalue("postgres_url"), f"lease_{time.time_ns()}")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_a_term_that_ended_while_its_transaction_was_open_commits_nothing(
    lease_db: Engine,
) -> None:
    """Replica a makes a change in a transaction of its term, is "paused" past its lease
    while b takes over, then commits: the fence refuses, nothing of it lands, a follows.
    And a fenced transaction holds the lease row to its end: b's takeover waits for it."""
    a = LeaseKeeper(lease_db, "a", lease_s=1.0)
    b = LeaseKeeper(lease_db, "b", lease_s=1.0)
    assert a.keep() is LeaseEvent.ACQUIRED
    assert b.keep() is LeaseEvent.HELD_ELSEWHERE
    term = a.term()
    assert term is not None

    with session_scope(lease_db) as session:  # a's fence holds the row until the commit
        a.fence(session, term.epoch)
        taking = threading.Thread(target=b.keep)
        taking.start()
        time.sleep(0.5)
        assert taking.is_alive(), "b's attempt did not wait for a's fenced transaction"
    taking.join(10)
    assert b.role is LeaseRole.FOLLOWER

    with (
        pytest.raises(LeaseLost, match="no longer holds rollout term"),
        session_scope(lease_db) as session,
    ):
        session.add(AuditEntry(actor="fleet:a", action="probe", target="stale"))
        time.sleep(1.2)  # a's term expires while it is "paused" mid-step
        assert b.keep() is LeaseEvent.ACQUIRED
        a.fence(session, term.epoch)  # as the engine's before_commit does
    with session_scope(lease_db) as session:
        assert session.exec(select(AuditEntry).where(AuditEntry.action == "probe")).all() == []
    assert a.role is LeaseRole.FOLLOWER and a.term() is None
    assert a.keep() is LeaseEvent.HELD_ELSEWHERE
    held = b.term()
    assert held is not None and held.epoch == term.epoch + 1


# --- the leader killed mid-wave ----------------------------------------------------------------


def test_the_leader_killed_mid_wave_is_replaced_within_the_lease_and_the_rollout_completes_once(
    tmp_path: Path, postgres_url: str, bundles: tuple[Path, Path]
) -> None:
    """Two replicas, eight devices reporting telemetry every 0.5 s, three waves. The leader
    is SIGKILLed while the second wave installs. The other takes over within the lease
    time, takes over the dead replica's MQTT session (its share of acks and telemetry),
    and finishes the rollout: each wave moved once, each device got its one command id
    and installed it once, every telemetry record stored once."""
    with replica_cluster(tmp_path, postgres_url, ["a", "b"], lease_s=LEASE_S) as cluster:
        a, b = cluster.replicas["a"], cluster.replicas["b"]
        assert cluster.leader("b") == "a"
        v2 = a.publish(bundles[1])
        ids = [f"sim-{i}" for i in range(8)]
        specs = _enroll(a, ids[:4]) + _enroll(b, ids[4:])
        behaviour = Behaviour(install_delay_s=3.0, telemetry_interval_s=0.5)
        with FleetSimulator("127.0.0.1", cluster.broker_port, specs, behaviour) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: b.online() == set(ids), timeout_s=30, what="every device online")
            rollout = b.ok(  # made on the follower: the leader picks it up
                "POST",
                "/rollouts",
                json={
                    "bundle_id": v2["id"],
                    "waves": ["25", "50", "100"],
                    "gate": {"soak_s": 1, "deploy_timeout_s": 60},
                },
            )
            rid = rollout["id"]
            wait_for(
                lambda: any(
                    m["wave"] == 1 and m["state"] == "in_progress" for m in _members(b, rid)
                ),
                timeout_s=60,
                what="the second wave installing",
            )
            assert cluster.leader("b") == "a"
            a.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            a.process.wait(10)
            wait_for(
                lambda: cluster.leader("b") == "b",
                timeout_s=LEASE_S + 5,
                what="b to take the lease",
            )
            takeover_s = time.monotonic() - killed
            assert takeover_s <= LEASE_S + 1.0, f"b took over {takeover_s:.1f} s after the kill"
            print(f"takeover {takeover_s:.2f} s after SIGKILL (lease {LEASE_S} s)")

            done = b.rollout_done(rid, timeout_s=90)
            assert done["state"] == "completed", done["reason"]
            transitions = _transitions(b, rid)
            _each_wave_moved_once(transitions, waves=3)
            actors = [e["actor"] for e in transitions]
            assert "fleet:a" in actors and "fleet:b" in actors, actors
            _each_device_acted_once(devices, rid, ids)
            _every_record_stored(b, devices, ids)

        dead = next(r for r in cluster.lease("b")["replicas"] if r["id"] == "a")
        assert not dead["alive"] and dead["drained_at"] is not None
        assert b.metric("edgefleet_mqtt_sessions_drained_total") >= 1
        assert b.metric("edgefleet_rollout_leader") == 1


# --- a leader paused past its lease ------------------------------------------------------------


def test_a_leader_paused_past_its_lease_applies_nothing_once_resumed(
    tmp_path: Path, postgres_url: str, bundles: tuple[Path, Path]
) -> None:
    """The leader is SIGSTOPped while a wave installs, the other takes over and moves the
    rollout on, then the first is SIGCONTed: it steps down, and no transition of it is
    dated after the takeover; the rollout completes with each wave moved once."""
    with replica_cluster(tmp_path, postgres_url, ["a", "b"], lease_s=LEASE_S) as cluster:
        a, b = cluster.replicas["a"], cluster.replicas["b"]
        v2 = a.publish(bundles[1])
        ids = [f"sim-{i}" for i in range(6)]
        specs = _enroll(a, ids)
        behaviour = Behaviour(install_delay_s=2.0, telemetry_interval_s=0.5)
        with FleetSimulator("127.0.0.1", cluster.broker_port, specs, behaviour) as devices:
            devices.start(connect_timeout_s=60)
            wait_for(lambda: a.online() == set(ids), timeout_s=30, what="every device online")
            rid = a.ok(
                "POST",
                "/rollouts",
                json={"bundle_id": v2["id"], "waves": ["50", "100"], "gate": {"soak_s": 1}},
            )["id"]
            wait_for(
                lambda: any(m["state"] == "in_progress" for m in _members(a, rid)),
                timeout_s=60,
                what="the first wave installing",
            )
            assert cluster.leader("b") == "a"
            a.process.send_signal(signal.SIGSTOP)
            try:
                wait_for(
                    lambda: cluster.leader("b") == "b",
                    timeout_s=LEASE_S + 5,
                    what="b to take the lease from the paused a",
                )
                took = dt.datetime.fromisoformat(cluster.lease("b")["lease"]["acquired_at"])
                wait_for(  # b moves the rollout on while a sleeps
                    lambda: any(e["actor"] == "fleet:b" for e in _transitions(b, rid)),
                    timeout_s=60,
                    what="a transition by b",
                )
            finally:
                a.process.send_signal(signal.SIGCONT)
            wait_for(
                lambda: a.metric("edgefleet_rollout_leader") == 0,
                timeout_s=10,
                what="the resumed a to step down",
            )
            done = b.rollout_done(rid, timeout_s=90)
            assert done["state"] == "completed", done["reason"]

        transitions = _transitions(b, rid)
        _each_wave_moved_once(transitions, waves=2)
        late = [
            e
            for e in transitions
            if e["actor"] == "fleet:a" and dt.datetime.fromisoformat(e["at"]) >= took
        ]
        assert not late, f"the paused leader applied transitions after b took over: {late}"
        assert cluster.leader("a") == "b"


# --- every replica enrolls and revokes; an external broker's questions ------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("replicas")
    with replica_cluster(tmp, postgres_url, ["a", "b"], lease_s=LEASE_S) as running:
        yield running


def _device(cluster: Cluster, replica: str, device_id: str) -> MqttEndpoint:
    grant = cluster.replicas[replica].ok("POST", "/enrollment-tokens", json={"profile": "host"})
    body = cluster.replicas[replica].ok(
        "POST", "/enroll", json={"token": grant["token"], "device_id": device_id}
    )
    mqtt = body["mqtt"]
    return MqttEndpoint(mqtt["host"], mqtt["port"], username=device_id, password=mqtt["password"])


def _report(client: PahoClient, device_id: str, record: str) -> int:
    batch = TelemetryBatch(records=[TelemetryRecord(id=record, ts=time.time(), inferences=1)])
    return client.publish(device_topic(device_id, "telemetry"), encode_telemetry(batch))


def test_each_replica_enrolls_a_device_both_work_and_a_revoke_on_either_cuts_it(
    cluster: Cluster,
) -> None:
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    on_a, on_b = _device(cluster, "a", "dev-a"), _device(cluster, "b", "dev-b")
    first, second = PahoClient(on_a, "dev-a"), PahoClient(on_b, "dev-b")
    try:
        assert _report(first, "dev-a", "r-1") in ACCEPTED
        assert _report(second, "dev-b", "r-1") in ACCEPTED
        for replica in (a, b):  # both stored, whichever replica took each
            wait_for(
                lambda replica=replica: all(
                    replica.ok("GET", f"/devices/{d}/telemetry") for d in ("dev-a", "dev-b")
                ),
                what="both devices' telemetry",
            )

        b.ok("POST", "/devices/dev-a/revoke")  # enrolled through a, revoked through b
        assert first.disconnected.wait(5), "the broker did not cut the revoked device"
        code, _, err = mqtt_pub(on_a, device_topic("dev-a", "status"), "{}")
        assert code != 0 and "not authori" in err.lower(), (code, err)
        assert _report(second, "dev-b", "r-2") in ACCEPTED
    finally:
        first.close()
        second.close()


def _ask(replica: ServedFleet, route: str, body: Any, secret: str | None = BROKER_SECRET) -> Any:
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    return httpx.post(
        f"{replica.url}/api/v1/broker/{route}", json=body, headers=headers, timeout=10
    )


def _authn(replica: ServedFleet, username: str, password: str, clientid: str) -> str:
    answer = _ask(
        replica,
        "authenticate",
        {"username": username, "password": password, "clientid": clientid, "peerhost": "::1"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["is_superuser"] is False
    return str(answer.json()["result"])


def _authz(replica: ServedFleet, username: str, action: str, topic: str, clientid: str = "") -> str:
    """As EMQX renders its body template: every placeholder a string."""
    answer = _ask(
        replica,
        "authorize",
        {
            "username": username,
            "clientid": clientid or username,
            "topic": topic,
            "action": action,
            "qos": "1",
            "retain": "false",
            "peerhost": "127.0.0.1",
        },
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["result"])


def test_an_external_broker_is_answered_in_emqx_shapes_from_the_rules_mosquitto_enforces(
    cluster: Cluster,
) -> None:
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    device = _device(cluster, "a", "emqx-dev")
    password = device.password or ""
    fleet_password = BrokerCredential.load(cluster.credential).fleet_password

    # the broker proves itself; requests are bounded
    assert _ask(b, "authenticate", {"username": "emqx-dev"}, secret=None).status_code == 401
    assert _ask(b, "authorize", {"topic": "t", "action": "publish"}, "wrong").status_code == 401
    assert _ask(b, "authenticate", {"username": "x" * 5000}).status_code == 422
    assert _ask(b, "authorize", {"topic": "t", "action": "delete"}).status_code == 422
    huge = httpx.post(
        f"{b.url}/api/v1/broker/authenticate",
        content=b"{" + b" " * (2 << 20) + b"}",
        headers={SECRET_HEADER: BROKER_SECRET, "Content-Type": "application/json"},
        timeout=30,
    )
    assert huge.status_code == 413

    # authentication, asked of either replica
    for replica in (a, b):
        assert _authn(replica, "emqx-dev", password, "emqx-dev") == "allow"
        assert _authn(replica, "emqx-dev", password + "x", "emqx-dev") == "deny"
        assert _authn(replica, "emqx-dev", password, "dev-b") == "deny"  # another client id
        assert _authn(replica, "stranger", "pw", "stranger") == "ignore"
        assert _authn(replica, "edgefleet-fleet-b", fleet_password, "edgefleet-fleet-b") == "allow"
        assert _authn(replica, "edgefleet-fleet-b", "guess", "edgefleet-fleet-b") == "deny"
        assert _authn(replica, "edgefleet-fleet-b-admin", fleet_password, "x") == "deny"
        assert _authn(replica, "edgefleet-anything", fleet_password, "x") == "deny"

    # authorization: the hostile cases, then agreement with the broker itself
    own, other = "edgefleet/v1/devices/emqx-dev", "edgefleet/v1/devices/dev-b"
    subscriptions = {
        f"{own}/cmd": "allow",
        "#": "deny",
        "edgefleet/v1/devices/+/cmd": "deny",
        f"{other}/cmd": "deny",
        "$share/fleet/edgefleet/v1/devices/+/telemetry": "deny",
        "edgefleet/v1/devices/+/telemetry": "deny",  # the same, as EMQX asks about a share
        f"$share/g/{own}/cmd": "deny",
        f"{own}/telemetry": "deny",
        f"{own}/receipt": "allow",
        f"{other}/receipt": "deny",
        "edgefleet/v1/devices/+/receipt": "deny",
        f"{own}/truth": "allow",
        f"{other}/truth": "deny",
        "edgefleet/v1/devices/+/truth": "deny",
    }
    publications = {
        f"{own}/telemetry": "allow",
        f"{own}/ack": "allow",
        f"{own}/status": "allow",
        f"{own}/cmd": "deny",
        f"{own}/receipt": "deny",  # only the fleet says what it stored
        f"{other}/receipt": "deny",
        f"{own}/truth": "deny",  # only the fleet relays labels
        f"{other}/truth": "deny",
        f"{other}/telemetry": "deny",
        "edgefleet/v1/devices/+/telemetry": "deny",
        "elsewhere": "deny",
    }
    for topic, verdict in subscriptions.items():
        assert _authz(b, "emqx-dev", "subscribe", topic) == verdict, topic
    for topic, verdict in publications.items():
        assert _authz(b, "emqx-dev", "publish", topic) == verdict, topic
    assert _authz(b, "emqx-dev", "subscribe", f"{own}/cmd", clientid="dev-b") == "deny"
    assert _authz(b, "stranger", "publish", "elsewhere") == "deny"
    fleet = "edgefleet-fleet-a"
    assert _authz(b, fleet, "subscribe", "$share/fleet/edgefleet/v1/devices/+/ack") == "allow"
    assert _authz(b, fleet, "subscribe", "edgefleet/v1/devices/+/ack") == "allow"
    assert _authz(b, fleet, "subscribe", "#") == "deny"
    assert _authz(b, fleet, "publish", f"{own}/cmd") == "allow"
    assert _authz(b, fleet, "publish", f"{own}/telemetry") == "deny"
    assert _authz(b, fleet, "publish", f"{own}/receipt") == "allow"
    assert _authz(b, fleet, "subscribe", f"{own}/receipt") == "deny"
    assert _authz(b, fleet, "publish", f"{own}/truth") == "allow"
    assert _authz(b, fleet, "subscribe", f"{own}/truth") == "deny"

    client = PahoClient(device, "emqx-dev")  # mosquitto, from the same rules
    try:
        for topic in subscriptions:
            granted = client.subscribe(topic) != REFUSED
            assert granted == (subscriptions[topic] == "allow"), f"mosquitto on {topic}"
        for topic, verdict in publications.items():
            if "+" in topic:
                continue  # no client may publish on a filter; paho refuses it itself
            accepted = client.publish(topic, b"{}") in ACCEPTED
            assert accepted == (verdict == "allow"), f"mosquitto on publishing to {topic}"
    finally:
        client.close()

    b.ok("POST", "/devices/emqx-dev/revoke")
    assert _authn(a, "emqx-dev", password, "emqx-dev") == "deny"
    assert _authz(a, "emqx-dev", "subscribe", f"{own}/cmd") == "deny"
    assert _authz(a, "emqx-dev", "publish", f"{own}/telemetry") == "deny"
