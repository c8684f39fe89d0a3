"""Simulated devices against a real mosquitto, observed from the broker's side.

Each test starts its own mosquitto (anonymous, no persistence) and watches everything the
devices publish with a paho client subscribed to ``edgefleet/v1/devices/+/#``; commands go
out through that client as the fleet would send them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from contracts.mqtt import (
    TOPIC_PREFIX,
    Ack,
    AckState,
    BundleRef,
    Command,
    CommandKind,
    Status,
    TelemetryBatch,
    decode_payload,
    device_id_from_topic,
    device_topic,
)
from fleet.broker import MqttEndpoint
from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec, TelemetryLedger
from fleet.simulator import _protocol as simulator_protocol
from tests.utils.mqtt import free_port, receipting

M = TypeVar("M")

V1, V2 = "digits-host-1.0.0", "digits-host-1.1.0"
INSTALL = [AckState.DOWNLOADING, AckState.VERIFIED, AckState.INSTALLED]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --- a real broker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    port: int


def _open_files_to_hard_limit() -> None:
    """In mosquitto's child process: room for a socket per simulated device."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def mosquitto(
    directory: Path, *, allow_anonymous: bool = True, port: int = 0, tls: Tls | None = None
) -> Iterator[Broker]:
    directory.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), directory / "mosquitto.log"
    config = directory / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "persistence false",
        f"log_dest file {log}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        # started as root, mosquitto would switch to its own user, who cannot read tmp_path
        *(["user root"] if os.getuid() == 0 else []),
    ]
    if tls:
        lines += [
            f"cafile {tls.ca}",
            f"certfile {tls.server_cert}",
            f"keyfile {tls.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        ["mosquitto", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_open_files_to_hard_limit,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start listening"
                time.sleep(0.02)
        yield Broker(port=port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


@dataclass(frozen=True)
class Tls:
    ca: Path
    server_cert: Path
    server_key: Path
    devices: dict[str, tuple[Path, Path]]
    """Certificate and key per device id (the certificate's common name)."""


def _certificates(directory: Path, device_ids: list[str]) -> Tls:
    """A CA, a server certificate for 127.0.0.1 and one client certificate per device."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def issue(
        name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ip: str = ""
    ) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if ip:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
            builder = builder.add_extension(san, False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return subject, key, cert_file, key_file

    ca_name, ca_key, ca_file, _ = issue("test-ca", None)
    _, _, server_cert, server_key = issue("broker", (ca_name, ca_key), ip="127.0.0.1")
    devices = {d: issue(d, (ca_name, ca_key))[2:] for d in device_ids}
    return Tls(ca=ca_file, server_cert=server_cert, server_key=server_key, devices=devices)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


# --- the broker's view -------------------------------------------------------------------------


class Seen(NamedTuple):
    device_id: str
    channel: str
    payload: bytes
    retained: bool


def wait_until(check: Callable[[], M | None], *, timeout_s: float = 10.0, what: str) -> M:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return found


class Observer:
    """A paho client subscribed to every device topic: all the broker delivers, in order."""

    def __init__(self, broker: Broker) -> None:
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"observer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        client.on_connect = lambda c, *_: c.subscribe(f"{TOPIC_PREFIX}/+/#", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10), "the observer did not subscribe"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device_id, channel = device_id_from_topic(message.topic)
        with self._lock:
            self._seen.append(Seen(device_id, channel, bytes(message.payload), message.retain))

    def seen(self, device_id: str | None = None, channel: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self._seen
                if (device_id is None or s.device_id == device_id)
                and (channel is None or s.channel == channel)
            ]

    def acks(self, device_id: str) -> list[Ack]:
        return [decode_payload(s.payload, Ack) for s in self.seen(device_id, "ack")]

    def statuses(self, device_id: str) -> list[Status]:
        return [decode_payload(s.payload, Status) for s in self.seen(device_id, "status")]

    def batches(self, device_id: str | None = None) -> list[TelemetryBatch]:
        return [
            decode_payload(s.payload, TelemetryBatch) for s in self.seen(device_id, "telemetry")
        ]

    def wait_acks(self, device_id: str, command_id: str, count: int) -> list[AckState]:
        """States of the first ``count`` acks for ``command_id``."""
        return wait_until(
            lambda: (
                states[:count]
                if len(states := [a.state for a in self.acks(device_id) if a.command == command_id])
                >= count
                else None
            ),
            what=f"{count} acks for {command_id} from {device_id}",
        )

    def send(self, device_id: str, payload: str | bytes) -> None:
        info = self.client.publish(device_topic(device_id, "cmd"), payload, qos=1)
        info.wait_for_publish(5)

    def command(
        self, device_id: str, kind: CommandKind, bundle: str | None = None, command_id: str = ""
    ) -> Command:
        command = Command(
            id=command_id or f"cmd-{uuid.uuid4().hex[:12]}",
            kind=kind,
            bundle=_ref(bundle) if bundle else None,
            issued_at=time.time(),
        )
        self.send(device_id, command.model_dump_json())
        return command

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(broker: Broker) -> Iterator[Observer]:
    watching = Observer(broker)
    yield watching
    watching.close()


def _ref(bundle: str) -> BundleRef:
    name, _, version = bundle.rpartition("-")
    major, minor, patch = (int(p) for p in version.split("."))
    return BundleRef(
        target_path=f"{name}/{version}/bundle.tar",
        name=name,
        version=version,
        version_number=major * 1_000_000 + minor * 1_000 + patch,
        sha256="0" * 64,
        length=1,
    )


def _specs(count: int, prefix: str = "dev") -> list[SimulatedDeviceSpec]:
    return [
        SimulatedDeviceSpec(
            device_id=f"{prefix}-{i:04d}",
            username=None,
            password=None,
            bundle=V1,
            bundle_version_number=1_000_000,
        )
        for i in range(count)
    ]


@contextmanager
def simulated(
    broker: Broker, count: int, behaviour: Behaviour | None = None, *, seed: int = 0
) -> Iterator[FleetSimulator]:
    with FleetSimulator(
        "127.0.0.1", broker.port, _specs(count), behaviour or Behaviour(), seed=seed
    ) as devices:
        devices.start(connect_timeout_s=30)
        yield devices


# --- connecting --------------------------------------------------------------------------------


def test_devices_connect_and_leave_a_retained_online_status(broker: Broker) -> None:
    with simulated(broker, 20) as devices:
        assert devices.connected == 20
        late = Observer(broker)  # subscribes after the fact: only retained messages reach it
        try:
            statuses = wait_until(
                lambda: s if len(s := late.seen(channel="status")) == 20 else None,
                what="20 retained statuses",
            )
        finally:
            late.close()
    assert all(s.retained for s in statuses)
    assert {s.device_id for s in statuses} == {f"dev-{i:04d}" for i in range(20)}
    for seen in statuses:
        status = decode_payload(seen.payload, Status)
        assert status.online and status.state == "idle" and status.ts
        assert (status.agent_version, status.bundle) == ("sim-0.1.0", V1)
        assert status.bundle_version_number == 1_000_000


def test_a_refused_connection_fails_start_and_leaves_nothing_running(tmp_path: Path) -> None:
    with mosquitto(tmp_path / "closed", allow_anonymous=False) as closed:
        devices = FleetSimulator("127.0.0.1", closed.port, _specs(3), Behaviour())
        began = time.monotonic()
        with pytest.raises(ConnectionError, match=r"could not connect.*CONNACK Not authorized"):
            devices.start(connect_timeout_s=30)
        assert time.monotonic() - began < 5
        assert not any(t.name == "fleet-simulator" for t in threading.enumerate())


def test_too_low_an_open_file_limit_is_refused_with_a_clear_error() -> None:
    # in a child: lowering the hard limit cannot be undone
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))\n"
        "from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec\n"
        "specs = [SimulatedDeviceSpec(f'd{i}', None, None) for i in range(1000)]\n"
        "FleetSimulator('127.0.0.1', 1, specs, Behaviour()).start()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode != 0
    assert "RuntimeError: simulating this many devices needs about 1256 open files" in result.stderr
    assert "the hard RLIMIT_NOFILE is 200" in result.stderr


# --- commands ----------------------------------------------------------------------------------


def test_a_deploy_acks_every_step_in_order_then_reports_the_new_bundle(
    broker: Broker, observer: Observer
) -> None:
    with simulated(broker, 2, Behaviour(install_delay_s=0.3)) as devices:
        began = time.time()
        command = observer.command("dev-0000", CommandKind.DEPLOY, V2)
        assert observer.wait_acks("dev-0000", command.id, 4) == [*INSTALL, AckState.HEALTHY]
        acks = observer.acks("dev-0000")
        assert all(a.bundle_version == V2 for a in acks)
        assert acks[-1].ts - acks[0].ts >= 0.29  # the install delay is spread over the steps
        status = wait_until(
            lambda: [s for s in observer.statuses("dev-0000") if s.bundle == V2],
            what="a status with the new bundle",
        )[-1]
        assert status.online and status.bundle_version_number == 1_001_000
        assert status.ts is not None and status.ts > began
        assert devices.current_bundle("dev-0000") == V2
        assert [c.id for c in devices.received_commands("dev-0000")] == [command.id]
        assert devices.acks_sent("dev-0000") == acks
        # the other device saw nothing and changed nothing
        assert observer.acks("dev-0001") == [] and devices.current_bundle("dev-0001") == V1


def test_a_failing_bundle_acks_failed_and_the_device_keeps_its_bundle(
    broker: Broker, observer: Observer
) -> None:
    with simulated(broker, 1, Behaviour(failing_bundles={V2})) as devices:
        command = observer.command("dev-0000", CommandKind.DEPLOY, V2)
        assert observer.wait_acks("dev-0000", command.id, 4) == [*INSTALL, AckState.FAILED]
        assert "health check failed" in observer.acks("dev-0000")[-1].detail
        assert devices.current_bundle("dev-0000") == V1
        # a working bundle still installs afterwards
        again = observer.command("dev-0000", CommandKind.DEPLOY, "digits-host-1.2.0")
        assert observer.wait_acks("dev-0000", again.id, 4)[-1] == AckState.HEALTHY
        statuses = wait_until(  # one when it connected, and one after each final ack
            lambda: s if len(s := observer.statuses("dev-0000")) == 3 else None,
            what="the status after the second deploy",
        )
        assert [(s.bundle, s.last_command, s.last_command_state) for s in statuses] == [
            (V1, None, None),
            (V1, command.id, AckState.FAILED),
            ("digits-host-1.2.0", again.id, AckState.HEALTHY),
        ]


def test_a_stale_command_is_ignored_and_a_fresh_copy_acted_on(
    broker: Broker, observer: Observer
) -> None:
    with simulated(broker, 1) as devices:
        stale = Command(
            id="cmd-stale",
            kind=CommandKind.DEPLOY,
            bundle=_ref(V2),
            issued_at=time.time() - 60,
            expires_at=time.time() - 30,
        )
        observer.send("dev-0000", stale.model_dump_json())
        wait_until(lambda: devices.ignored_commands("dev-0000"), what="the stale command")
        assert devices.acks_sent("dev-0000") == []
        assert devices.current_bundle("dev-0000") == V1
        fresh = stale.model_copy(update={"expires_at": time.time() + 30})
        observer.send("dev-0000", fresh.model_dump_json())
        assert observer.wait_acks("dev-0000", fresh.id, 4) == [*INSTALL, AckState.HEALTHY]
        assert devices.ignored_commands("dev-0000") == [stale]


def test_a_rollback_returns_to_the_previous_bundle(broker: Broker, observer: Observer) -> None:
    with simulated(broker, 1) as devices:
        deploy = observer.command("dev-0000", CommandKind.DEPLOY, V2)
        assert observer.wait_acks("dev-0000", deploy.id, 4)[-1] == AckState.HEALTHY
        rollback = observer.command("dev-0000", CommandKind.ROLLBACK, V1)
        assert observer.wait_acks("dev-0000", rollback.id, 1) == [AckState.ROLLED_BACK]
        assert observer.acks("dev-0000")[-1].bundle_version == V1
        assert devices.current_bundle("dev-0000") == V1
        statuses = wait_until(
            lambda: s if len(s := observer.statuses("dev-0000")) == 3 else None,
            what="the status after the rollback",
        )
        assert [(s.bundle, s.bundle_version_number) for s in statuses] == [
            (V1, 1_000_000),
            (V2, 1_001_000),
            (V1, 1_000_000),
        ]


def test_a_resent_command_is_acked_again_but_not_run_again(
    broker: Broker, observer: Observer
) -> None:
    with simulated(broker, 1, Behaviour(install_delay_s=0.6)) as devices:
        command = observer.command("dev-0000", CommandKind.DEPLOY, V2)
        observer.wait_acks("dev-0000", command.id, 1)
        observer.send("dev-0000", command.model_dump_json())  # mid-install
        observer.wait_acks("dev-0000", command.id, 5)
        wait_until(lambda: devices.current_bundle("dev-0000") == V2, what="the install")
        observer.send("dev-0000", command.model_dump_json())  # after it finished
        states = observer.wait_acks("dev-0000", command.id, 6)
        time.sleep(0.3)  # time for a wrongly repeated install to ack again
        assert observer.acks("dev-0000") == devices.acks_sent("dev-0000")
        assert len(observer.acks("dev-0000")) == 6
        assert Counter(states) - Counter(INSTALL) == {AckState.HEALTHY: 2, states[1]: 1}
        assert states[-2:] == [AckState.HEALTHY, AckState.HEALTHY]
        assert len(devices.received_commands("dev-0000")) == 3
        assert [s.bundle for s in observer.statuses("dev-0000")] == [V1, V2]  # installed once


def test_malformed_commands_are_counted_and_the_device_keeps_working(
    broker: Broker, observer: Observer
) -> None:
    with simulated(broker, 1) as devices:
        for payload in [b"not json", b'{"id": "x"}', ZSTD_MAGIC + b"garbage", b'{"kind": 1}']:
            observer.send("dev-0000", payload)
        command = observer.command("dev-0000", CommandKind.DEPLOY, V2)
        assert observer.wait_acks("dev-0000", command.id, 4)[-1] == AckState.HEALTHY
        assert devices.malformed_commands == 4
        assert devices.received_commands("dev-0000") == [command]


# --- telemetry ---------------------------------------------------------------------------------


def test_telemetry_batches_decode_with_the_behaviour_per_bundle(
    broker: Broker, observer: Observer
) -> None:
    behaviour = Behaviour(error_rate={V1: 0.1}, latency_ms={V1: 12.5}, inferences_per_report=50)
    with simulated(broker, 3, behaviour) as devices:
        assert devices.publish_telemetry() == 3
        assert devices.publish_telemetry(["dev-0001"]) == 1
        wait_until(lambda: len(observer.seen(channel="telemetry")) == 4, what="4 batches")
        assert all(s.payload.startswith(ZSTD_MAGIC) for s in observer.seen(channel="telemetry"))
        records = [r for b in observer.batches() for r in b.records]
        assert len({r.id for r in records}) == 4
        assert {(r.bundle, r.inferences, r.errors, r.latency_p95_ms) for r in records} == {
            (V1, 50, 5, 12.5)
        }
        assert all(r.shadow_bundle is None and r.fallbacks == 0 for r in records)


def test_a_shadow_reports_agreement_without_changing_the_serving_bundle(
    broker: Broker, observer: Observer
) -> None:
    behaviour = Behaviour(
        shadow_agreement={V2: 0.9}, inferences_per_report=50, compress_telemetry=False
    )
    with simulated(broker, 1, behaviour) as devices:
        shadow = observer.command("dev-0000", CommandKind.SHADOW, V2)
        assert observer.wait_acks("dev-0000", shadow.id, 4)[-1] == AckState.HEALTHY
        devices.publish_telemetry()
        (batch,) = wait_until(lambda: observer.batches(), what="a batch")
        (record,) = batch.records
        assert (record.bundle, record.shadow_bundle) == (V1, V2)
        assert (record.shadow_compared, record.shadow_agreed) == (50, 45)
        assert (devices.current_bundle("dev-0000"), devices.shadow_bundle("dev-0000")) == (V1, V2)
        stop = observer.command("dev-0000", CommandKind.SHADOW_STOP, V1)
        assert observer.wait_acks("dev-0000", stop.id, 1) == [AckState.HEALTHY]
        assert devices.shadow_bundle("dev-0000") is None
        devices.publish_telemetry()
        batches = wait_until(lambda: b if len(b := observer.batches()) == 2 else None, what="2")
        assert batches[1].records[0].shadow_bundle is None


def test_periodic_telemetry_and_record_ids_follow_the_seed(broker: Broker, tmp_path: Path) -> None:
    def ids(seed: int) -> list[str]:
        watching = Observer(broker)
        behaviour = Behaviour(telemetry_interval_s=0.1, compress_telemetry=False)
        try:
            with simulated(broker, 2, behaviour, seed=seed):
                batches = wait_until(
                    lambda: b if len(b := watching.batches("dev-0001")) >= 3 else None,
                    what="3 periodic batches",
                )
        finally:
            watching.close()
        return [r.id for b in batches[:3] for r in b.records]

    first = ids(seed=7)
    assert len(set(first)) == 3
    assert ids(seed=7) == first
    assert set(ids(seed=8)).isdisjoint(first)


NO_FLEET = Behaviour(compress_telemetry=False, receipt_timeout_s=None)
"""No fleet behind the broker sends storage receipts: a PUBACK delivers a record."""


def _refused(devices: FleetSimulator, times: int) -> TelemetryLedger:
    """The ledger once the broker answered ``times`` batches without delivering them."""
    return wait_until(
        lambda: (
            ledger if (ledger := devices.telemetry_ledger("dev-0000")).refusals >= times else None
        ),
        what=f"{times} PUBACKs 'no matching subscribers'",
    )


def _drained(devices: FleetSimulator, timeout_s: float = 10.0) -> TelemetryLedger:
    """The ledger once nothing is pending."""
    return wait_until(
        lambda: ledger if not (ledger := devices.telemetry_ledger("dev-0000")).pending else None,
        timeout_s=timeout_s,
        what="every record acknowledged",
    )


def test_records_nobody_subscribed_to_stay_pending_and_go_with_the_next_report(
    broker: Broker,
) -> None:
    # no observer yet: nothing subscribes to telemetry, mosquitto answers PUBACK 0x10
    with simulated(broker, 1, NO_FLEET) as devices:
        assert devices.publish_telemetry() == 1
        (first,) = devices.telemetry_sent("dev-0000")
        ledger = _refused(devices, 1)
        assert (ledger.acknowledged, ledger.pending, ledger.dropped) == ([], [first], [])
        watching = Observer(broker)
        try:
            assert devices.publish_telemetry() == 1
            sent = devices.telemetry_sent("dev-0000")
            ledger = _drained(devices)
            assert ledger.acknowledged == sent == [first, sent[1]]
            (batch,) = wait_until(lambda: watching.batches("dev-0000"), what="a batch")
            assert [r.id for r in batch.records] == sent
        finally:
            watching.close()


def test_records_stay_pending_until_a_storage_receipt_names_them_and_are_sent_again_meanwhile(
    broker: Broker,
) -> None:
    """A PUBACK alone (an observer takes the batch, nobody stores it) does not let go of a
    record: it is sent again once its receipt is 0.5 s late, and let go of at the receipt
    a stand-in for the fleet's bridge sends."""
    watching = Observer(broker)
    behaviour = Behaviour(compress_telemetry=False, receipt_timeout_s=0.5)
    try:
        with simulated(broker, 1, behaviour) as devices:
            assert devices.publish_telemetry() == 1
            sent = devices.telemetry_sent("dev-0000")
            ledger = wait_until(
                lambda: x if (x := devices.telemetry_ledger("dev-0000")).resent >= 1 else None,
                what="the record sent again for want of a receipt",
            )
            assert (ledger.acknowledged, ledger.pending, ledger.refusals) == ([], sent, 0)
            assert len(wait_until(lambda: watching.batches("dev-0000"), what="a batch")) >= 1
            with receipting(MqttEndpoint("127.0.0.1", broker.port), "dev-0000") as receipted:
                ledger = _drained(devices, timeout_s=30)
            assert ledger.acknowledged == sent
            assert set(receipted) == set(sent)
    finally:
        watching.close()


def test_past_the_bound_the_oldest_pending_records_are_dropped(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulator_protocol, "MAX_UNSENT_RECORDS", 3)
    with simulated(broker, 1, NO_FLEET) as devices:
        for n in range(1, 6):
            assert devices.publish_telemetry() == 1
            ledger = _refused(devices, n)
        sent = devices.telemetry_sent("dev-0000")
        assert (ledger.dropped, ledger.pending, ledger.acknowledged) == (sent[:2], sent[2:], [])
        watching = Observer(broker)
        try:
            assert devices.send_pending_telemetry() == 3
            ledger = _drained(devices)
            assert (ledger.dropped, ledger.acknowledged) == (sent[:2], sent[2:])
            (batch,) = wait_until(lambda: watching.batches("dev-0000"), what="a batch")
            assert [r.id for r in batch.records] == sent[2:]
        finally:
            watching.close()


# --- going away --------------------------------------------------------------------------------


def test_kill_makes_the_broker_publish_the_last_will(broker: Broker, observer: Observer) -> None:
    def retained() -> dict[str, bool]:
        late = Observer(broker)
        try:
            seen = wait_until(
                lambda: s if len(s := late.seen(channel="status")) == 3 else None,
                what="3 retained statuses",
            )
        finally:
            late.close()
        return {s.device_id: decode_payload(s.payload, Status).online for s in seen}

    devices = FleetSimulator("127.0.0.1", broker.port, _specs(3), Behaviour())
    devices.start()
    devices.kill(["dev-0001"])
    will = wait_until(
        lambda: [s for s in observer.statuses("dev-0001") if not s.online], what="the Last Will"
    )
    assert will == [Status(online=False)]
    assert devices.connected == 2
    assert devices.publish_telemetry(["dev-0001"]) == 0
    assert retained() == {"dev-0000": True, "dev-0001": False, "dev-0002": True}
    devices.stop()  # a clean stop leaves every device offline as well
    assert retained() == {"dev-0000": False, "dev-0001": False, "dev-0002": False}
    with pytest.raises(RuntimeError, match="not running"):
        devices.publish_telemetry()


def _latest_by_device(seen: list[Seen]) -> dict[str, Seen]:
    """Each device's latest message (a device may publish its status more than once)."""
    return {s.device_id: s for s in seen}


def test_devices_reconnect_after_the_broker_restarts(tmp_path: Path) -> None:
    port = free_port()
    with mosquitto(tmp_path / "first", port=port) as first:
        devices = FleetSimulator("127.0.0.1", first.port, _specs(20), Behaviour())
        devices.start()
    # the broker is gone; its replacement on the same port starts empty (no persistence)
    with mosquitto(tmp_path / "second", port=port) as second, devices:
        watching = Observer(second)
        try:
            wait_until(lambda: devices.connected == 20, timeout_s=20, what="20 reconnects")
            latest = wait_until(
                lambda: (
                    s
                    if len(s := _latest_by_device(watching.seen(channel="status"))) == 20
                    else None
                ),
                what="an online status from each of the 20 devices",
            )
            assert all(decode_payload(s.payload, Status).online for s in latest.values())
            command = watching.command("dev-0003", CommandKind.DEPLOY, V2)
            assert watching.wait_acks("dev-0003", command.id, 4)[-1] == AckState.HEALTHY
        finally:
            watching.close()


def test_pending_records_go_out_as_soon_as_the_device_has_reconnected(tmp_path: Path) -> None:
    port = free_port()
    with mosquitto(tmp_path / "first", port=port) as first:
        devices = FleetSimulator("127.0.0.1", first.port, _specs(1), NO_FLEET)
        devices.start()
        assert devices.publish_telemetry() == 1
        assert _refused(devices, 1).pending == devices.telemetry_sent("dev-0000")
    # subscribed before the device is back (its first retry is 0.5 s to 1 s away); no report
    with mosquitto(tmp_path / "second", port=port) as second, devices:
        watching = Observer(second)
        try:
            ledger = _drained(devices, timeout_s=30)
            assert ledger.acknowledged == devices.telemetry_sent("dev-0000")
            (batch,) = wait_until(lambda: watching.batches("dev-0000"), what="a batch")
            assert [r.id for r in batch.records] == ledger.acknowledged
        finally:
            watching.close()


def test_devices_connect_with_their_own_certificate_over_mutual_tls(tmp_path: Path) -> None:
    ids = ["tls-0", "tls-1", "tls-2"]
    tls = _certificates(tmp_path / "pki", ids)
    specs = [
        SimulatedDeviceSpec(
            device_id=d,
            username=None,
            password=None,
            cert_file=tls.devices[d][0],
            key_file=tls.devices[d][1],
            bundle=V1,
        )
        for d in ids
    ]
    with mosquitto(tmp_path / "mosquitto", allow_anonymous=False, tls=tls) as broker:
        behaviour = Behaviour(install_delay_s=0.05)
        with FleetSimulator("127.0.0.1", broker.port, specs, behaviour, tls_ca=tls.ca) as devices:
            devices.start(connect_timeout_s=20)
            assert devices.connected == 3
            watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            watcher.tls_set(str(tls.ca), str(tls.devices["tls-0"][0]), str(tls.devices["tls-0"][1]))
            watcher.connect("127.0.0.1", broker.port)
            watcher.loop_start()
            try:
                command = Command(
                    id="tls-deploy", kind=CommandKind.DEPLOY, bundle=_ref(V2), issued_at=0
                )
                for d in ids:
                    watcher.publish(device_topic(d, "cmd"), command.model_dump_json(), qos=1)
                wait_until(
                    lambda: all(devices.current_bundle(d) == V2 for d in ids), what="3 installs"
                )
            finally:
                watcher.disconnect()
                watcher.loop_stop()
    with pytest.raises(ValueError, match="client certificates need tls_ca"):
        FleetSimulator("127.0.0.1", 1, specs, Behaviour())


# --- scale -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_thousand_devices_connect_in_one_process(broker: Broker, observer: Observer) -> None:
    with FleetSimulator("127.0.0.1", broker.port, _specs(2000), Behaviour()) as devices:
        elapsed = devices.start(connect_timeout_s=60)
        print(f"2000 simulated devices connected and subscribed in {elapsed:.1f} s")
        assert elapsed < 30 and devices.connected == 2000
        wait_until(
            lambda: len({s.device_id for s in observer.seen(channel="status")}) == 2000,
            what="2000 online statuses",
        )
        targets = [f"dev-{i:04d}" for i in range(0, 2000, 100)]
        sent = [observer.command(d, CommandKind.DEPLOY, V2) for d in targets]
        for device_id, command in zip(targets, sent, strict=True):
            assert observer.wait_acks(device_id, command.id, 4)[-1] == AckState.HEALTHY
