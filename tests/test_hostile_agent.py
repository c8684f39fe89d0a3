"""The agent against bad input: commands that point elsewhere, a broker that refuses it.

- The device's API token goes to the origin it enrolled with, and nowhere else: a command
  naming another origin is refused before anything is fetched, and a redirect from the
  fleet to another origin does not take the token along. Two real HTTP servers on two
  loopback ports serve the same fleet app; the second one records every request it sees.
- A telemetry batch the broker refuses (MQTT 5 PUBACK 0x87 Not authorized, after an ACL
  change) is not an acknowledged one: a real mosquitto whose ACL the test rewrites under
  the connected agent; the records stay queued and arrive exactly once when it allows them.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    AgentConfig,
    ApiConfig,
    HealthConfig,
    MqttConfig,
    TelemetryConfig,
    load_config,
)
from agent.daemon import AgentDaemon
from agent.enroll import enroll_device
from agent.errors import ConfigError
from agent.origin import Origin
from agent.slots import Slots
from contracts.durable import write_atomic
from contracts.mqtt import (
    Ack,
    AckState,
    BundleRef,
    Command,
    CommandKind,
    TelemetryBatch,
    TelemetryRecord,
    device_topic,
)
from fleet.broker import MqttEndpoint, hash_password
from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.http import serve_app
from tests.utils.mqtt import Subscriber, free_port, mqtt_pub, receipting

DEVICE = "board-1"
V1, V2 = "1.0.0", "1.1.0"


# --- a broker whose ACL the test rewrites ------------------------------------------------------


class AclBroker:
    """mosquitto with a password file and an ACL the test rewrites while clients stay
    connected (SIGHUP): ``DEVICE`` may read its commands and write its status and acks,
    and its telemetry while :meth:`allow_telemetry` says so; the ``fleet`` account (the
    test, as the fleet) reads and writes every device topic."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True)
        self.port = free_port()
        password = uuid.uuid4().hex
        self.device = MqttConfig(port=self.port, username=DEVICE, password=password)
        self.fleet = MqttEndpoint(
            "127.0.0.1", self.port, username="fleet", password=uuid.uuid4().hex
        )
        lines = [f"{DEVICE}:{hash_password(password)}"]
        lines.append(f"fleet:{hash_password(self.fleet.password or '')}")
        write_atomic(self.dir / "passwd", ("\n".join(lines) + "\n").encode(), mode=0o600)
        self._write_acl(telemetry=True)
        config = [
            *(["user root"] if os.getuid() == 0 else []),
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self.dir / 'passwd'}",
            f"acl_file {self.dir / 'acl'}",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type all",
            f"listener {self.port} 127.0.0.1",
        ]
        (self.dir / "mosquitto.conf").write_text("\n".join(config) + "\n")
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._listening, timeout_s=10, what="mosquitto to listen")

    @property
    def log(self) -> Path:
        return self.dir / "mosquitto.log"

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _write_acl(self, *, telemetry: bool) -> None:
        acl = [
            "user fleet",
            "topic readwrite edgefleet/v1/#",
            f"user {DEVICE}",
            f"topic read {device_topic(DEVICE, 'cmd')}",
            f"topic read {device_topic(DEVICE, 'receipt')}",
            f"topic write {device_topic(DEVICE, 'ack')}",
            f"topic write {device_topic(DEVICE, 'status')}",
            *([f"topic write {device_topic(DEVICE, 'telemetry')}"] if telemetry else []),
        ]
        write_atomic(self.dir / "acl", ("\n".join(acl) + "\n").encode(), mode=0o600)

    def denied(self) -> bool:
        """Whether mosquitto has refused a publish (its debug log says so)."""
        return "Denied PUBLISH" in self.log.read_text()

    def allow_telemetry(self, allowed: bool) -> None:
        """Rewrite the ACL and make mosquitto reload it; returns once it has."""
        self._write_acl(telemetry=allowed)
        reloads = self.log.read_text().count("Reloading config.")
        self.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: self.log.read_text().count("Reloading config.") > reloads,
            timeout_s=10,
            what="mosquitto to reload its ACL",
        )

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[AclBroker]:
    broker = AclBroker(tmp_path / "broker")
    try:
        yield broker
    finally:
        broker.close()


# --- two origins ------------------------------------------------------------------------------


@dataclass
class Witness:
    """What one HTTP server saw: each request's path and ``Authorization`` header."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def carrying(self, token: str) -> list[str]:
        return [path for path, auth in self.requests if auth == f"Bearer {token}"]


def witnessed(app: Any, witness: Witness, *, moved_to: str | None = None) -> Any:
    """``app``, recording each request in ``witness``; ``/moved/PATH`` answers 307 to
    ``moved_to/PATH`` (a fleet behind a proxy that redirects)."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization")
            witness.requests.append((scope["path"], auth.decode() if auth else None))
            if moved_to and scope["path"].startswith("/moved/"):
                location = moved_to + scope["path"].removeprefix("/moved")
                headers = [(b"location", location.encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 307, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await app(scope, receive, send)

    return asgi


@dataclass
class TwoOrigins:
    fleet: RunningFleet
    url: str
    """The fleet devices enroll with."""
    other: str
    """Another origin serving the same app: a mirror, a forger's copy."""
    at_fleet: Witness
    at_other: Witness
    refs: dict[str, BundleRef]

    def command(self, kind: CommandKind, version: str, base: str) -> Command:
        return Command(
            id=f"cmd-{uuid.uuid4().hex[:12]}",
            kind=kind,
            bundle=self.refs[version],
            metadata_url=f"{base}/ota/metadata/",
            targets_url=f"{base}/ota/targets/",
            issued_at=time.time(),
        )


def _ref(attached: dict[str, Any]) -> BundleRef:
    return BundleRef(
        target_path=attached["target_path"],
        name=attached["bundle_name"].rsplit("-", 1)[0],
        version=attached["version"],
        version_number=attached["version_number"],
        sha256=attached["sha256"],
        length=attached["length"],
    )


@pytest.fixture
def origins(tmp_path: Path, bundles: tuple[Path, Path]) -> Iterator[TwoOrigins]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    at_fleet, at_other = Witness(), Witness()
    with running_fleet(tmp_path / "fleet", public_url=url) as running:
        app = running.client.app
        with (
            serve_app(witnessed(app, at_other)) as other,
            serve_app(witnessed(app, at_fleet, moved_to=other.url), port=port),
        ):
            refs = {V1: _ref(running.publish(bundles[0])), V2: _ref(running.publish(bundles[1]))}
            yield TwoOrigins(running, url, other.url, at_fleet, at_other, refs)


def _enroll(origins: TwoOrigins, out: Path) -> Path:
    grant = origins.fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    enrolled = enroll_device(origins.url, grant, out, device_id=DEVICE, data_dir=out / "data")
    return enrolled.config_path


def test_origins_are_scheme_host_and_port() -> None:
    assert Origin.of("HTTP://Fleet.example:80/ota/metadata/") == Origin.of("http://fleet.example")
    assert Origin.of("https://fleet.example") != Origin.of("http://fleet.example:443")
    assert Origin.of("http://fleet.example:8000") != Origin.of("http://fleet.example:8001")
    assert str(Origin.of("http://user@[::1]:8000/x")) == "http://[::1]:8000"
    for bad in ("fleet:8000", "ftp://fleet.example", "http://", "/ota/metadata/"):
        with pytest.raises(ValueError):
            Origin.of(bad)


def test_enrollment_records_the_fleet_origin_and_older_configs_use_the_metadata_url(
    origins: TwoOrigins, tmp_path: Path
) -> None:
    config_path = _enroll(origins, tmp_path / "device")
    config = load_config(config_path)
    assert config.fleet_url == origins.url
    assert config.fleet_origin == Origin.of(origins.url)

    # An agent.toml written before fleet_url: the origin of its TUF metadata URL.
    older = config_path.with_name("older.toml")
    text = config_path.read_text()
    older.write_text("\n".join(x for x in text.splitlines() if not x.startswith("fleet_url")))
    assert load_config(older).fleet_url is None
    assert load_config(older).fleet_origin == Origin.of(origins.url)

    # A token with no fleet to belong to is a config error, not a token sent anywhere.
    orphan = config_path.with_name("orphan.toml")
    orphan.write_text(f'device_id = "{DEVICE}"\ndata_dir = "data"\napi_token = "efd_x"\n')
    with pytest.raises(ConfigError, match="fleet_url"):
        load_config(orphan)


@contextmanager
def running_daemon(config: AgentConfig) -> Iterator[AgentDaemon]:
    daemon = AgentDaemon(config)
    daemon.start()
    try:
        wait_for(daemon.client.is_connected, timeout_s=15, what="the agent's MQTT connection")
        yield daemon
    finally:
        daemon.stop()


def _acks(subscriber: Subscriber, command: Command) -> list[Ack]:
    acks = (Ack.model_validate_json(line.split(" ", 1)[1]) for line in subscriber.messages())
    return [ack for ack in acks if ack.command == command.id]


def _send(broker: AclBroker, subscriber: Subscriber, command: Command) -> list[Ack]:
    """Publish ``command`` as the fleet does; the device's acks once one is final."""
    mqtt_pub(broker.fleet, device_topic(DEVICE, "cmd"), command.model_dump_json())
    wait_for(
        lambda: any(a.state.final for a in _acks(subscriber, command)),
        timeout_s=60,
        what=f"the device's final ack of {command.kind} {command.id}",
    )
    return _acks(subscriber, command)


def test_commands_naming_another_origin_are_refused_and_the_token_only_goes_to_the_fleet(
    origins: TwoOrigins, acl_broker: AclBroker, tmp_path: Path
) -> None:
    """Commands come through a broker of the test's own, as the fleet would send them;
    metadata and bundles from the fleet's HTTP app, on two origins."""
    config = load_config(_enroll(origins, tmp_path / "device"))
    token = config.api_token
    assert token
    config = config.model_copy(
        update={
            "mqtt": acl_broker.device,
            "api": ApiConfig(enabled=False),
            "health": HealthConfig(watch_inferences=0),
        }
    )
    fleet, other = Origin.of(origins.url), Origin.of(origins.other)
    with (
        Subscriber(acl_broker.fleet, device_topic(DEVICE, "ack")) as acks,
        running_daemon(config) as daemon,
    ):
        acks.wait_subscribed()
        # From the fleet's own origin, a deploy installs v1 with the token shown there.
        deploy = origins.command(CommandKind.DEPLOY, V1, origins.url)
        assert [a.state for a in _send(acl_broker, acks, deploy)][-1] is AckState.HEALTHY
        assert any(p.startswith("/ota/targets/") for p in origins.at_fleet.carrying(token))
        pointer = (config.data_dir / "slots" / "pointer.json").read_bytes()

        # Naming the other origin: refused before any request; v1 serves on.
        for kind in (CommandKind.DEPLOY, CommandKind.SHADOW, CommandKind.ROLLBACK):
            forged = origins.command(kind, V2, origins.other)
            answers = _send(acl_broker, acks, forged)
            assert [a.state for a in answers] == [AckState.FAILED], (kind, answers)
            ack = answers[0]
            assert str(other) in ack.detail and str(fleet) in ack.detail, ack.detail
            assert "nothing was downloaded" in ack.detail
        assert origins.at_other.requests == []
        assert not (config.data_dir / "ota" / "downloads").exists()
        assert not (config.data_dir / "shadow").exists()

        # The fleet's origin redirecting elsewhere: the token stays behind. (The other
        # server hands out the signed metadata, but no bundle without a token.)
        since = len(origins.at_fleet.requests)
        moved = origins.command(CommandKind.DEPLOY, V2, f"{origins.url}/moved")
        assert [a.state for a in _send(acl_broker, acks, moved)][-1] is AckState.FAILED
        assert any(p.startswith("/ota/targets/") for p, _ in origins.at_other.requests)
        assert all(auth is None for _, auth in origins.at_other.requests), origins.at_other
        at_fleet = origins.at_fleet.requests[since:]
        assert at_fleet and all(auth == f"Bearer {token}" for _, auth in at_fleet), at_fleet

        assert daemon.updater.serving is not None and daemon.updater.serving.version == V1
        assert (config.data_dir / "slots" / "pointer.json").read_bytes() == pointer
    active = Slots(config.data_dir).active()
    assert active is not None and active.manifest().version == V1


# --- a broker that refuses the device's telemetry -------------------------------------------


def _records(count: int) -> list[TelemetryRecord]:
    return [
        TelemetryRecord(id=uuid.uuid4().hex, ts=time.time(), inferences=i) for i in range(count)
    ]


def _received(subscriber: Subscriber) -> collections.Counter[str]:
    """How many times each record id reached the subscriber."""
    seen: collections.Counter[str] = collections.Counter()
    for line in subscriber.messages():
        topic, _, payload = line.partition(" ")
        if topic.endswith("/telemetry"):
            seen.update(r.id for r in TelemetryBatch.model_validate_json(payload).records)
    return seen


def test_a_refused_telemetry_batch_stays_queued_and_arrives_once_it_is_allowed(
    acl_broker: AclBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = AgentConfig(
        device_id=DEVICE,
        data_dir=tmp_path / "data",
        mqtt=acl_broker.device,
        api=ApiConfig(enabled=False),
        telemetry=TelemetryConfig(compress=False),
    )
    topic = device_topic(DEVICE, "telemetry")

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused a batch" in r.getMessage()]

    with (
        caplog.at_level(logging.WARNING, logger="agent.telemetry"),
        Subscriber(acl_broker.fleet, topic) as subscriber,
        receipting(acl_broker.fleet, DEVICE),
        running_daemon(config) as daemon,
    ):
        subscriber.wait_subscribed()
        before = daemon.queue.put_many(_records(5))
        daemon.sender.wake()
        assert daemon.sender.flush(timeout_s=30)
        wait_for(lambda: len(_received(subscriber)) == 5, what="the first records")

        # The ACL changes under the connected device: its telemetry is refused (0x87).
        acl_broker.allow_telemetry(False)
        refused = daemon.queue.put_many(_records(5))
        daemon.sender.wake()
        wait_for(acl_broker.denied, timeout_s=10, what="the broker to refuse a batch")
        time.sleep(3.5)
        assert len(daemon.queue) == 5, "records the broker refused left the queue"
        assert [r.id for r in daemon.queue.peek(10)] == [r.id for r in refused]
        # Retried with backoff (1, 2, 4 s...), not in a loop: 3 tries in these 3.5 s.
        assert 2 <= len(refusals()) <= 4, [r.getMessage() for r in refusals()]
        assert "Not authorized" in refusals()[0].getMessage()

        acl_broker.allow_telemetry(True)
        assert daemon.sender.flush(timeout_s=30)
        wanted = {r.id for r in before + refused}
        wait_for(lambda: set(_received(subscriber)) == wanted, what="the refused records")
        time.sleep(0.5)  # a duplicate would arrive right behind
        assert _received(subscriber) == dict.fromkeys(wanted, 1)


def test_a_batch_nobody_subscribed_to_stays_queued_until_the_fleet_is_back(
    acl_broker: AclBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker restarted from its save holds the fleet's session but not its shared
    subscription until the fleet subscribes again; what devices send meanwhile is PUBACKed
    with 0x10 "No matching subscribers": nobody has it, so the agent must keep it."""
    config = AgentConfig(
        device_id=DEVICE,
        data_dir=tmp_path / "data",
        mqtt=acl_broker.device,
        api=ApiConfig(enabled=False),
        telemetry=TelemetryConfig(compress=False),
    )
    topic = device_topic(DEVICE, "telemetry")
    with (
        caplog.at_level(logging.WARNING, logger="agent.telemetry"),
        running_daemon(config) as daemon,
    ):
        unheard = daemon.queue.put_many(_records(5))
        daemon.sender.wake()
        wait_for(
            lambda: "No matching subscribers" in caplog.text,
            timeout_s=10,
            what="a PUBACK saying nobody took the batch",
        )
        assert [r.id for r in daemon.queue.peek(10)] == [r.id for r in unheard]
        with (
            Subscriber(acl_broker.fleet, topic) as subscriber,
            receipting(acl_broker.fleet, DEVICE),
        ):
            subscriber.wait_subscribed()
            daemon.sender.wake()
            assert daemon.sender.flush(timeout_s=30)
            wanted = {r.id for r in unheard}
            wait_for(lambda: set(_received(subscriber)) == wanted, what="the kept records")
