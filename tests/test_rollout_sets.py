"""Set-based rollouts (issue 17), in process on a real SQLite file: a wave commanded with
one statement and one template (``fleet/rollouts/engine.py``, ``commands.py``), acks and
statuses folded in memory and written with one ``executemany`` per table
(``fleet/rollouts/acks.py``), devices' presence (``fleet/devices.py: apply_statuses``).
The engine's sink here is a list: what it would have published, one message per device."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import Engine, insert, update
from sqlmodel import SQLModel, select

from contracts.mqtt import (
    UPDATER_IDLE,
    Ack,
    AckState,
    Command,
    CommandKind,
    Status,
    decode_payload,
    device_topic,
)
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import make_engine, session_scope
from fleet.devices import apply_statuses, set_all_offline
from fleet.metrics import FleetMetrics
from fleet.models import (
    Bundle,
    CommandRecord,
    Device,
    DeviceState,
    Gate,
    ModelVersion,
    Rollout,
    RolloutCreate,
    RolloutDevice,
    RolloutDeviceState,
    RolloutState,
    utcnow,
)
from fleet.rollouts import Link, RolloutEngine, handle_acks, reconcile_statuses
from fleet.rollouts.transitions import Event, apply_event
from fleet.rollouts.waves import create_rollout

D = RolloutDeviceState
DEVICES = [f"dev-{i:02d}" for i in range(8)]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    SQLModel.metadata.create_all(engine)
    with session_scope(engine) as session:
        model = ModelVersion(name="m", version="1.0.0")
        session.add(model)
        session.flush()
        for number, version in enumerate(("1.0.0", "1.1.0"), 1):
            session.add(
                Bundle(
                    id=number,
                    profile="host",
                    runtime="onnxruntime",
                    precision="fp32",
                    version=version,
                    version_number=number,
                    target_path=f"host/m-{version}.efb",
                    sha256=f"{number}" * 64,
                    length=100 + number,
                    model_version_id=model.id or 0,
                    bundle_name=f"m-{version}",
                )
            )
        session.execute(
            insert(Device),
            [
                {"id": d, "profile": "host", "tags": [], "online": True, "bundle": "m-1.0.0"}
                for d in DEVICES
            ],
        )
    yield engine
    engine.dispose()


class Sink:
    """The engine's publisher, kept: ``(kind, device id, payload)`` per message."""

    def __init__(self) -> None:
        self.sent: list[tuple[CommandKind, str, bytes]] = []

    def __call__(self, kind: CommandKind, messages: Sequence[tuple[str, bytes]]) -> None:
        self.sent += [(kind, device_id, payload) for device_id, payload in messages]

    def take(self) -> dict[str, Command]:
        """What was sent since the last take, decoded as a device decodes it."""
        sent, self.sent = self.sent, []
        commands = {d: decode_payload(p, Command) for _, d, p in sent}
        assert len(commands) == len(sent), "a device was sent a command twice"
        assert all(commands[d].kind is kind for kind, d, _ in sent)
        return commands


def rollout_engine(db: Engine, sink: Sink, tick_s: float = 1.0) -> RolloutEngine:
    connected = Link(number=1, since=utcnow() - dt.timedelta(minutes=1))
    return RolloutEngine(
        db,
        sink,
        link=lambda: connected,
        metadata_url="http://f/m/",
        targets_url="http://f/t/",
        settle_s=0,
        tick_s=tick_s,
    )


def start(db: Engine, waves: list[str], **gate: float) -> str:
    with session_scope(db) as session:
        data = RolloutCreate(bundle_id=2, waves=waves, gate=Gate(soak_s=0, **gate))
        return create_rollout(session, data=data, actor="test").id


def members(db: Engine, rollout_id: str) -> dict[str, RolloutDevice]:
    with session_scope(db) as session:
        rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        found = {m.device_id: m for m in rows}
        session.expunge_all()  # kept as read
        return found


def records(db: Engine) -> dict[str, CommandRecord]:
    with session_scope(db) as session:
        found = {r.id: r for r in session.exec(select(CommandRecord))}
        session.expunge_all()
        return found


def ack(command: str, state: AckState, detail: str = "") -> Ack:
    return Ack(command=command, state=state, detail=detail, ts=time.time())


def test_a_wave_is_commanded_once_each_from_one_template_and_stored_as_sent(
    db: Engine,
) -> None:
    rollout_id = start(db, ["50", "100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    sent = sink.take()
    placed = members(db, rollout_id)
    first = {d for d, m in placed.items() if m.wave == 0}
    assert set(sent) == first and len(first) == len(DEVICES) // 2
    stored = records(db)
    assert set(stored) == {f"{rollout_id}:deploy:{d}" for d in first}
    for device_id, command in sent.items():
        assert command.id == f"{rollout_id}:deploy:{device_id}"
        assert (command.rollout, command.bundle and command.bundle.version) == (rollout_id, "1.1.0")
        assert command.bundle and command.bundle.sha256 == "2" * 64
        record = stored[command.id]
        assert record.device_id == device_id and record.rollout_id == rollout_id
        assert Command.model_validate(record.payload) == command  # what a resend starts from
        member = placed[device_id]
        assert (member.state, member.command_id) == (D.COMMANDED, command.id)
    for device_id in set(DEVICES) - first:  # the next wave: untouched
        assert (placed[device_id].state, placed[device_id].command_id) == (D.PENDING, None)
    engine.tick()
    assert sink.take() == {}, "a commanded member was commanded again"


def test_a_batch_of_acks_is_folded_per_command_in_arrival_order(db: Engine) -> None:
    older = start(db, ["100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    sink.take()
    with session_scope(db) as session:  # the older rollout is over; a newer one commands
        session.get_one(Rollout, older).state = RolloutState.COMPLETED
        session.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == older)  # type: ignore[arg-type]
            .values(state=D.HEALTHY)
        )
    newer = start(db, ["100"])
    engine.tick()
    sink.take()
    a, b, c, d, e, f, *_ = DEVICES
    new = {device: f"{newer}:deploy:{device}" for device in DEVICES}
    acks = [
        (a, ack(new[a], AckState.DOWNLOADING)),
        (a, ack(new[a], AckState.HEALTHY)),
        (b, ack(new[b], AckState.HEALTHY)),
        (b, ack(new[b], AckState.HEALTHY)),  # the same final ack twice
        (c, ack(new[c], AckState.HEALTHY)),
        (c, ack(new[c], AckState.INSTALLED)),  # late progress: healthy stays
        (d, ack(new[d], AckState.FAILED, "health check failed")),
        (e, ack(new[f], AckState.FAILED, "not mine")),  # another device's command
        (e, ack(f"{older}:deploy:{e}", AckState.FAILED, "late, for the older rollout")),
        (f, ack(new[f], AckState.VERIFIED)),
        (f, ack("r-000000000000:deploy:dev-05", AckState.HEALTHY)),  # unknown
    ]
    with session_scope(db) as session:
        final = handle_acks(session, acks)
    assert final == 6  # a, b twice, c, d, e's for its older command
    now, then = members(db, newer), members(db, older)
    assert {device: m.state for device, m in now.items()} == {
        a: D.HEALTHY,
        b: D.HEALTHY,
        c: D.HEALTHY,
        d: D.FAILED,
        e: D.COMMANDED,
        f: D.IN_PROGRESS,
        DEVICES[6]: D.COMMANDED,
        DEVICES[7]: D.COMMANDED,
    }
    assert now[c].last_ack == "installed" and now[d].detail == "health check failed"
    assert then[e].state == D.FAILED and then[e].detail == "late, for the older rollout"
    assert {device: m.state for device, m in then.items() if device != e} == {
        device: D.HEALTHY for device in DEVICES if device != e
    }
    stored = records(db)
    assert [stored[new[x]].last_ack for x in (a, b, c, d, e, f)] == [
        "healthy",
        "healthy",
        "installed",
        "failed",
        None,
        "verified",
    ]
    assert stored[f"{older}:deploy:{e}"].last_ack == "failed"


def status(bundle: str, **fields: object) -> Status:
    values: dict[str, object] = {
        "online": True,
        "agent_version": "0.1.0",
        "bundle": bundle,
        "bundle_version_number": 2,
        "state": UPDATER_IDLE,
        "ts": time.time(),
    }
    return Status.model_validate(values | fields)


def test_statuses_finish_unfinished_members_and_only_those(db: Engine) -> None:
    rollout_id = start(db, ["100"])
    engine = rollout_engine(db, Sink())
    engine.tick()
    a, b, c, d, e, *_ = DEVICES
    cid = {device: f"{rollout_id}:deploy:{device}" for device in DEVICES}
    with session_scope(db) as session:
        handle_acks(session, [(d, ack(cid[d], AckState.FAILED, "broken"))])
        session.execute(  # a member pointing at another device's command: never finished
            update(RolloutDevice)
            .where(RolloutDevice.device_id == e)  # type: ignore[arg-type]
            .values(command_id=cid[a])
        )
    reports = [
        (e, status("m-1.0.0", last_command=cid[a], last_command_state="healthy")),
        (a, status("m-1.1.0")),  # idle on the new bundle: healthy
        (b, status("m-1.0.0", last_command=cid[b], last_command_state="failed")),
        (c, status("m-1.1.0", state="downloading")),  # still at it
        (d, status("m-1.1.0")),  # failed already: a status does not undo a final ack
    ]
    with session_scope(db) as session:
        finished = reconcile_statuses(session, reports)
    assert finished == 2
    placed = members(db, rollout_id)
    states = [placed[x].state for x in (a, b, c, d, e)]
    assert states == [D.HEALTHY, D.FAILED, D.COMMANDED, D.FAILED, D.COMMANDED]
    assert "it serves m-1.1.0" in placed[a].detail
    assert [records(db)[cid[x]].last_ack for x in (a, b, c)] == ["healthy", "failed", None]


def test_in_a_batch_a_status_finishes_only_what_the_acks_before_it_left_unfinished(
    db: Engine,
) -> None:
    """The bridge's batch (``fleet/bridge.py: MqttBridge._commit``): acks first, then the
    statuses stand in for final acks that never came. A status right after its final ack
    leaves the ack's word; one after progress acks alone finishes the member, and its
    last ack is the final one the status vouches for, not the progress ack before it."""
    rollout_id = start(db, ["100"])
    rollout_engine(db, Sink()).tick()
    acked, lost, *_ = DEVICES
    cid = {device: f"{rollout_id}:deploy:{device}" for device in DEVICES}

    def message(device: str, body: Ack | Status) -> mqtt.MQTTMessage:
        channel = "ack" if isinstance(body, Ack) else "status"
        delivered = mqtt.MQTTMessage(topic=device_topic(device, channel).encode())
        delivered.payload = body.model_dump_json(exclude_none=True).encode()
        return delivered

    def finished(device: str) -> Status:
        return status("m-1.1.0", last_command=cid[device], last_command_state="healthy")

    bridge = MqttBridge(MqttEndpoint(host="127.0.0.1", port=1), db, FleetMetrics())
    bridge._write(
        [
            message(acked, ack(cid[acked], AckState.DOWNLOADING)),
            message(lost, ack(cid[lost], AckState.INSTALLED)),  # its final ack: lost
            message(acked, ack(cid[acked], AckState.HEALTHY, "serving")),
            message(acked, finished(acked)),
            message(lost, finished(lost)),
        ]
    )
    placed, stored = members(db, rollout_id), records(db)
    assert (placed[acked].state, placed[acked].last_ack) == (D.HEALTHY, "healthy")
    assert placed[acked].detail == "serving"
    assert (placed[lost].state, placed[lost].last_ack) == (D.HEALTHY, "healthy")
    assert "it finished this command healthy" in placed[lost].detail
    assert stored[cid[acked]].last_ack == stored[cid[lost]].last_ack == "healthy"


def test_only_a_device_going_from_offline_to_online_counts_as_come_online(db: Engine) -> None:
    a, b, c, d, *_ = DEVICES
    with session_scope(db) as session:
        session.execute(update(Device).where(Device.id == c).values(online=False))  # type: ignore[arg-type]
        session.execute(
            update(Device).where(Device.id == d).values(state=DeviceState.REVOKED)  # type: ignore[arg-type]
        )
    offline = Status(online=False)
    batch = [
        (a, status("m-1.0.0", state="downloading")),  # online already: progress
        (a, status("m-1.0.0")),
        (b, offline),  # its Last Will, then back
        (b, status("m-1.0.0")),
        (c, status("m-1.1.0")),  # was offline
        (c, status("m-1.1.0")),
        (d, status("m-1.1.0")),  # revoked: ignored
        ("dev-unknown", status("m-1.1.0")),
    ]
    with session_scope(db) as session:
        applied = apply_statuses(session, batch)
    assert applied.came_online == [b, c]
    assert applied.online == [batch[i] for i in (0, 1, 3, 4, 5)]
    with session_scope(db) as session:
        stored = {x.id: x for x in session.exec(select(Device))}
        session.expunge_all()
    assert (stored[c].online, stored[c].bundle, stored[c].agent_state) == (True, "m-1.1.0", "idle")
    assert stored[a].agent_state == UPDATER_IDLE and stored[b].online
    assert stored[d].bundle == "m-1.0.0"
    with session_scope(db) as session:  # gone offline, its fields as last reported
        apply_statuses(session, [(c, offline)])
    with session_scope(db) as session:
        device = session.get_one(Device, c)
        assert (device.online, device.bundle) == (False, "m-1.1.0")
    with session_scope(db) as session:  # the fleet restarted: every device reconnects
        set_all_offline(session)
    with session_scope(db) as session:
        applied = apply_statuses(session, [(a, status("m-1.0.0")), (b, status("m-1.0.0"))])
    assert applied.came_online == [a, b]


def test_resends_refresh_expiry_and_reach_only_unfinished_members(db: Engine) -> None:
    start(db, ["100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    first = sink.take()
    a, b, *_ = DEVICES
    with session_scope(db) as session:
        handle_acks(session, [(a, ack(first[a].id, AckState.HEALTHY))])
    engine.command_ttl_s = 7200
    assert engine.resend_unfinished([a, b]) == 1
    again = sink.take()
    assert set(again) == {b}
    assert again[b].model_copy(update={"expires_at": None}) == first[b].model_copy(
        update={"expires_at": None}
    )
    assert again[b].expires_at and first[b].expires_at
    assert again[b].expires_at > first[b].expires_at + 3000
    assert engine.resend_unfinished() == len(DEVICES) - 1


def test_a_rollback_commands_by_previous_bundle_in_one_statement_each(db: Engine) -> None:
    rollout_id = start(db, ["100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    sink.take()
    a, b, c, d, *rest = DEVICES
    with session_scope(db) as session:
        handle_acks(
            session, [(x, ack(f"{rollout_id}:deploy:{x}", AckState.HEALTHY)) for x in (a, b)]
        )
        handle_acks(session, [(c, ack(f"{rollout_id}:deploy:{c}", AckState.FAILED, "broken"))])
        session.execute(  # d came from a bundle the fleet never knew
            update(RolloutDevice)
            .where(RolloutDevice.device_id == d)  # type: ignore[arg-type]
            .values(previous_bundle_id=None)
        )
        session.get_one(Rollout, rollout_id).state = RolloutState.ROLLING_BACK
    engine.tick()
    sent = sink.take()
    assert set(sent) == {a, b, *rest}
    assert all(cmd.kind is CommandKind.ROLLBACK for cmd in sent.values())
    assert all(cmd.bundle and cmd.bundle.version == "1.0.0" for cmd in sent.values())
    placed = members(db, rollout_id)
    assert {x: placed[x].state for x in (a, b, c, d)} == {
        a: D.ROLLING_BACK,
        b: D.ROLLING_BACK,
        c: D.FAILED,
        d: D.FAILED,
    }
    assert placed[a].command_id == f"{rollout_id}:rollback:{a}"
    assert placed[c].detail == "broken" and "no earlier bundle" in placed[d].detail
    assert set(records(db)) >= {f"{rollout_id}:rollback:{x}" for x in (a, b, *rest)}


def test_a_member_commanded_again_replaces_its_stored_command(db: Engine) -> None:
    start(db, ["100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    first = sink.take()
    a = DEVICES[0]
    with session_scope(db) as session:
        handle_acks(session, [(a, ack(first[a].id, AckState.HEALTHY))])
        session.execute(  # an operator's undo: the member is to be commanded again
            update(RolloutDevice)
            .where(RolloutDevice.device_id == a)  # type: ignore[arg-type]
            .values(state=D.PENDING)
        )
    engine.tick()
    again = sink.take()
    assert set(again) == {a}
    record = records(db)[first[a].id]
    assert record.last_ack is None
    assert Command.model_validate(record.payload) == again[a]


def test_a_resumed_wave_resends_its_unfinished_commands_once(db: Engine) -> None:
    rollout_id = start(db, ["100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    engine.tick()
    first = sink.take()
    a = DEVICES[0]
    with session_scope(db) as session:
        handle_acks(session, [(a, ack(first[a].id, AckState.HEALTHY))])
    engine.tick()
    assert sink.take() == {}
    with session_scope(db) as session:
        rollout = session.get_one(Rollout, rollout_id)
        apply_event(session, rollout, Event.PAUSE, actor="test")
        apply_event(session, rollout, Event.RESUME, actor="test")
    engine.tick()
    again = sink.take()
    assert set(again) == set(DEVICES) - {a}
    assert all(again[d].id == first[d].id for d in again)
    engine.tick()
    assert sink.take() == {}


def test_a_step_that_moves_a_rollout_is_followed_at_once_not_at_the_next_tick(
    db: Engine,
) -> None:
    rollout_id = start(db, ["50", "100"])
    sink = Sink()
    engine = rollout_engine(db, sink)
    assert engine.tick() is False  # the first wave commanded: no state changed
    first = sink.take()
    with session_scope(db) as session:
        handle_acks(session, [(d, ack(c.id, AckState.HEALTHY)) for d, c in first.items()])
    # a tick a minute apart: only following at once reaches wave 2
    slow = rollout_engine(db, sink, tick_s=60.0)
    slow.start()
    try:
        deadline = time.monotonic() + 20
        while not sink.sent and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        slow.stop()
    second = sink.take()
    assert set(second) == set(DEVICES) - set(first), "the second wave was not commanded"
    placed = members(db, rollout_id)
    assert {placed[d].wave for d in second} == {1}
    assert slow.ticks >= 3  # completed wave 0 → soaked (soak 0) → wave 1 → commanded
