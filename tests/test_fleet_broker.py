"""The fleet's broker and CA against a real mosquitto and real clients.

Devices connect with mosquitto_sub / mosquitto_pub (MQTT 5); the fleet side uses them or
paho. A subscription the broker refuses shows in its SUBACK (reason 135, "Not
authorized"). "Nothing arrives" is checked with a sentinel: the same publisher sends the
forbidden message first and an allowed one after it, so the allowed one arriving alone
proves the forbidden one was dropped (MQTT keeps one publisher's order per subscriber).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import queue
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contracts.mqtt import device_topic, shared_subscription
from fleet.broker import DeviceCredential, MosquittoBroker, MqttEndpoint, hash_password
from fleet.broker import process as broker_module
from fleet.ca import FleetCA
from fleet.errors import BrokerError, CertificateError
from tests.utils.mqtt import (
    ACCEPTED,
    REFUSED,
    PahoClient,
    Subscriber,
    free_port,
    mqtt_pub,
    mqtt_sub,
)

PASSWORDS = {"dev-a": "secret-a", "dev-b": "secret-b"}
NOT_AUTHORIZED = "Not authorized"


def credentials(*device_ids: str) -> list[DeviceCredential]:
    return [DeviceCredential(d, hash_password(PASSWORDS[d])) for d in device_ids]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "mosquitto") as b:
        b.start(fleet_username="fleet", fleet_password="fleet-pw", devices=credentials(*PASSWORDS))
        yield b


def as_device(broker: MosquittoBroker, device_id: str, password: str | None = None) -> MqttEndpoint:
    return dataclasses.replace(
        broker.endpoint, username=device_id, password=password or PASSWORDS[device_id]
    )


@pytest.fixture
def fleet_client(broker: MosquittoBroker) -> Iterator[PahoClient]:
    client = PahoClient(broker.endpoint, "fleet-test")
    yield client
    client.close()


# --- password mode --------------------------------------------------------------------------


def test_device_receives_fleet_commands_on_its_own_cmd_topic(broker: MosquittoBroker) -> None:
    with Subscriber(as_device(broker, "dev-a"), device_topic("dev-a", "cmd")) as device:
        device.wait_subscribed()
        rc, _, err = mqtt_pub(broker.endpoint, device_topic("dev-a", "cmd"), "deploy-1")
        assert rc == 0 and NOT_AUTHORIZED not in err
        assert device.wait_for("deploy-1"), device.output
    assert device.messages() == [f"{device_topic('dev-a', 'cmd')} deploy-1"]


def test_device_cannot_subscribe_to_another_devices_commands(broker: MosquittoBroker) -> None:
    spy = PahoClient(as_device(broker, "dev-a"), "dev-a")
    try:
        for topic in (device_topic("dev-b", "cmd"), "edgefleet/v1/devices/+/cmd", "#"):
            assert spy.subscribe(topic) == REFUSED, topic
        assert spy.subscribe(device_topic("dev-a", "cmd")) == 1
        with Subscriber(as_device(broker, "dev-b"), device_topic("dev-b", "cmd")) as owner:
            owner.wait_subscribed()
            mqtt_pub(broker.endpoint, device_topic("dev-b", "cmd"), "for-b-only")
            mqtt_pub(broker.endpoint, device_topic("dev-a", "cmd"), "sentinel")
            assert owner.wait_for("for-b-only"), owner.output
        assert spy.next_message() == (device_topic("dev-a", "cmd"), b"sentinel")
        assert spy.messages.empty()
    finally:
        spy.close()


def test_device_cannot_publish_on_another_devices_topics(
    broker: MosquittoBroker, fleet_client: PahoClient
) -> None:
    for channel in ("telemetry", "status", "ack"):
        assert fleet_client.subscribe(shared_subscription(channel)) == 1
    dev_a = as_device(broker, "dev-a")
    for channel in ("telemetry", "status", "ack"):
        rc, _, err = mqtt_pub(dev_a, device_topic("dev-b", channel), "forged")
        assert rc == 0 and NOT_AUTHORIZED in err, (channel, err)
    rc, _, err = mqtt_pub(dev_a, device_topic("dev-a", "telemetry"), "sentinel")
    assert NOT_AUTHORIZED not in err
    assert fleet_client.next_message() == (device_topic("dev-a", "telemetry"), b"sentinel")
    assert fleet_client.messages.empty()


def test_device_cannot_publish_its_own_cmd_nor_read_its_telemetry(
    broker: MosquittoBroker,
) -> None:
    # one connection: a second one with the same username would take this one's place
    device = PahoClient(as_device(broker, "dev-a"), "dev-a")
    try:
        assert device.subscribe(device_topic("dev-a", "telemetry")) == REFUSED
        assert device.subscribe(device_topic("dev-a", "cmd")) == 1
        assert device.publish(device_topic("dev-a", "cmd"), "self-command") == REFUSED
        assert device.publish(device_topic("dev-a", "telemetry"), "own-telemetry") in ACCEPTED
        mqtt_pub(broker.endpoint, device_topic("dev-a", "cmd"), "sentinel")
        assert device.next_message() == (device_topic("dev-a", "cmd"), b"sentinel")
        assert device.messages.empty()
    finally:
        device.close()


def test_wrong_password_and_unknown_device_are_refused(broker: MosquittoBroker) -> None:
    for endpoint in (
        as_device(broker, "dev-a", password="secret-b"),
        dataclasses.replace(broker.endpoint, username="dev-z", password="anything"),
        dataclasses.replace(broker.endpoint, username=None, password=None),
    ):
        rc, _, err = mqtt_pub(endpoint, device_topic("dev-a", "telemetry"), "x")
        assert rc != 0 and "Not authorized" in err, (endpoint.username, rc, err)


def test_fleet_receives_telemetry_through_its_shared_subscription(
    broker: MosquittoBroker, fleet_client: PahoClient
) -> None:
    assert fleet_client.subscribe(shared_subscription("telemetry")) == 1
    # the fleet's account reads through its three shared subscriptions, nothing else
    for topic in ("#", "edgefleet/v1/devices/+/telemetry", "$share/other/edgefleet/v1/#"):
        assert fleet_client.subscribe(topic) == REFUSED, topic
    for device_id in PASSWORDS:
        _, _, err = mqtt_pub(
            as_device(broker, device_id), device_topic(device_id, "telemetry"), "t"
        )
        assert NOT_AUTHORIZED not in err
    received = {fleet_client.next_message()[0] for _ in PASSWORDS}
    assert received == {device_topic(d, "telemetry") for d in PASSWORDS}


def test_remove_device_cuts_it_off_and_refuses_it(broker: MosquittoBroker) -> None:
    with (
        Subscriber(as_device(broker, "dev-a"), device_topic("dev-a", "cmd")) as dev_a,
        Subscriber(as_device(broker, "dev-b"), device_topic("dev-b", "cmd")) as dev_b,
    ):
        dev_a.wait_subscribed()
        dev_b.wait_subscribed()
        broker.remove_device("dev-a")
        # mosquitto disconnects it ("administrative action"); mosquitto_sub then exits
        assert dev_a.wait_exit(5) is not None, dev_a.output
        mqtt_pub(broker.endpoint, device_topic("dev-b", "cmd"), "still-here")
        assert dev_b.wait_for("still-here"), dev_b.output
    rc, _, err = mqtt_pub(as_device(broker, "dev-a"), device_topic("dev-a", "telemetry"), "x")
    assert rc != 0 and "Not authorized" in err
    broker.remove_device("dev-a")  # removing what is gone is no error
    # added again (with a new password): back in, and only with the new one
    broker.add_device("dev-a", password="new-secret")
    rc, _, err = mqtt_pub(as_device(broker, "dev-a"), device_topic("dev-a", "telemetry"), "x")
    assert rc != 0 and "Not authorized" in err
    new = as_device(broker, "dev-a", password="new-secret")
    assert mqtt_pub(new, device_topic("dev-a", "telemetry"), "x")[:3:2] == (0, "")
    assert NOT_AUTHORIZED in mqtt_pub(new, device_topic("dev-b", "telemetry"), "x")[2]


def test_the_plugins_file_holds_hashes_from_the_database_and_no_plaintext(
    broker: MosquittoBroker,
) -> None:
    stored = json.loads(broker.security_path.read_text())
    assert broker.security_path.stat().st_mode & 0o777 == 0o600
    assert stored["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    clients = {c["username"]: c for c in stored["clients"]}
    assert set(clients) == {"fleet", "fleet-admin", "dev-a", "dev-b"}
    assert clients["dev-a"]["roles"] == [{"rolename": "device-dev-a"}]
    assert set(clients["dev-a"]) >= {"password", "salt", "iterations"}
    text = broker.security_path.read_text()
    assert not any(secret in text for secret in (*PASSWORDS.values(), "fleet-pw"))
    config = broker.config_path.read_text()
    for line in ("allow_anonymous false", "use_username_as_clientid true"):
        assert line in config.splitlines()
    assert "password_file" not in config and "acl_file" not in config


def test_hash_password_is_accepted_by_mosquitto(tmp_path: Path) -> None:
    # mosquitto_passwd's own output has the same shape...
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "u", "pw"], check=True, timeout=10)
    theirs = passwd.read_text().strip().split(":", 1)[1].split("$")
    ours = hash_password("pw").split("$")
    assert [len(p) for p in ours] == [len(p) for p in theirs] and ours[:3] == theirs[:3]
    # ...and mosquitto accepts ours, at a non-default iteration count too
    port = free_port()
    device = DeviceCredential("dev-a", hash_password("pw-a", iterations=1000))
    with MosquittoBroker(tmp_path / "b", port=port) as b:
        endpoint = b.start(fleet_username="fleet", fleet_password="f", devices=[device])
        assert endpoint.port == port
        rc, _, err = mqtt_pub(
            as_device(b, "dev-a", "pw-a"), device_topic("dev-a", "telemetry"), "x"
        )
        assert (rc, err) == (0, "")


def test_ten_thousand_devices_start_and_change_fast(tmp_path: Path) -> None:
    one_hash = hash_password("shared")
    devices = [DeviceCredential(f"d{i:05d}", one_hash) for i in range(10_000)]
    with MosquittoBroker(tmp_path / "b") as b:
        started = time.monotonic()
        b.start(fleet_username="fleet", fleet_password="f", devices=devices)
        assert time.monotonic() - started < 10
        started = time.monotonic()
        b.add_device("d10000", password="new")
        b.remove_device("d00001")
        assert time.monotonic() - started < 5
        last = dataclasses.replace(b.endpoint, username="d09999", password="shared")
        assert mqtt_pub(last, device_topic("d09999", "status"), "up")[2] == ""
        assert NOT_AUTHORIZED in mqtt_pub(last, device_topic("d00000", "status"), "up")[2]
        added = dataclasses.replace(b.endpoint, username="d10000", password="new")
        assert mqtt_pub(added, device_topic("d10000", "status"), "up")[2] == ""
        removed = dataclasses.replace(b.endpoint, username="d00001", password="shared")
        assert mqtt_pub(removed, device_topic("d00001", "status"), "up")[0] != 0


def test_mosquitto_may_open_as_many_files_as_the_hard_limit_allows(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with MosquittoBroker(tmp_path / "b") as b:
            b.start(fleet_username="fleet", fleet_password="f", devices=[])
            limits = Path(f"/proc/{b.pid}/limits").read_text().splitlines()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    open_files = next(line for line in limits if line.startswith("Max open files")).split()
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert open_files[3:5] == [expected, expected]


def test_broker_rejects_misuse_and_reports_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for devices, error in (
        ([DeviceCredential("fleet", hash_password("x"))], "fleet's own broker accounts"),
        ([DeviceCredential("fleet-admin", hash_password("x"))], "fleet's own broker accounts"),
        (credentials("dev-a", "dev-a"), "listed twice"),
        ([DeviceCredential("dev-a", None)], "takes a password hash"),
    ):
        with MosquittoBroker(tmp_path / "x") as b, pytest.raises(ValueError, match=error):
            b.start(fleet_username="fleet", fleet_password="f", devices=devices)
    with MosquittoBroker(tmp_path / "a") as b:
        b.start(fleet_username="fleet", fleet_password="f", devices=[])
        with pytest.raises(ValueError, match="fleet's own broker accounts"):
            b.add_device("fleet-admin", password="x")
        with pytest.raises(ValueError, match="takes one"):
            b.add_device("dev-a", password=None)
        with pytest.raises(ValueError, match="device id"):
            b.add_device("zz\n", password="x")
        # the same port again: the second mosquitto cannot listen, and says so
        taken = b.endpoint.port
        with (
            MosquittoBroker(tmp_path / "b", port=taken) as clash,
            pytest.raises(BrokerError, match="Address already in use"),
        ):
            clash.start(fleet_username="fleet", fleet_password="f", devices=[])
    # a plugin that is not one: mosquitto refuses to start, and the log says why
    not_a_plugin = tmp_path / "nothing.so"
    not_a_plugin.write_bytes(b"")
    with (
        MosquittoBroker(tmp_path / "c", plugin=not_a_plugin) as b,
        pytest.raises(BrokerError, match=r"(?i)plugin"),
    ):
        b.start(fleet_username="fleet", fleet_password="f", devices=[])
    monkeypatch.setattr(broker_module, "_PLUGIN_GLOBS", (str(tmp_path / "none" / "*.so"),))
    with pytest.raises(BrokerError, match="apt install mosquitto"):
        broker_module.find_dynsec_plugin()
    with pytest.raises(ValueError, match="device id"):
        DeviceCredential("a/b", None)
    for not_loadable in ("plaintext", "$6$c2FsdA==$aGFzaA==", hash_password("x")[:-8]):
        with pytest.raises(ValueError, match="hash_password"):
            DeviceCredential("ok", not_loadable)


def test_endpoint_urls() -> None:
    e = MqttEndpoint.from_url("mqtts://fleet:p%40ss@broker.example:9999?ca=/etc/ca.pem")
    assert (e.host, e.port, e.tls, e.username, e.password) == (
        "broker.example",
        9999,
        True,
        "fleet",
        "p@ss",
    )
    assert e.ca_file == Path("/etc/ca.pem")
    assert e.url == "mqtts://fleet@broker.example:9999?ca=/etc/ca.pem"
    assert "p@ss" not in repr(e)
    assert MqttEndpoint.from_url("mqtt://h").port == 1883
    assert MqttEndpoint.from_url("mqtts://h").port == 8883
    for bad in ("http://h", "mqtt://h?ca=/x", "mqtts://h?cafile=/x", "mqtt://"):
        with pytest.raises(ValueError):
            MqttEndpoint.from_url(bad)


# --- mTLS mode ------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.load_or_create(tmp_path / "ca")


@pytest.fixture
def tls_broker(tmp_path: Path, ca: FleetCA) -> Iterator[MosquittoBroker]:
    devices = [DeviceCredential(d, None) for d in PASSWORDS]
    with MosquittoBroker(tmp_path / "mosquitto-tls", ca=ca) as b:
        b.start(fleet_username="fleet", fleet_password="unused", devices=devices)
        yield b


def device_tls_endpoint(
    broker: MosquittoBroker, ca: FleetCA, device_id: str, directory: Path
) -> tuple[MqttEndpoint, int]:
    """A CA-issued certificate for ``device_id`` in files: its endpoint and serial."""
    issued = ca.issue_device_certificate(device_id)
    assert issued.private_key_pem is not None
    cert, key = directory / f"{device_id}.pem", directory / f"{device_id}.key"
    cert.write_bytes(issued.certificate_pem)
    key.write_bytes(issued.private_key_pem)
    return dataclasses.replace(broker.endpoint, cert_file=cert, key_file=key), issued.serial


def test_tls_device_with_ca_certificate_connects_and_stays_in_its_topics(
    tls_broker: MosquittoBroker, ca: FleetCA, tmp_path: Path
) -> None:
    assert tls_broker.endpoint.tls and tls_broker.endpoint.cert_file
    dev_a, _ = device_tls_endpoint(tls_broker, ca, "dev-a", tmp_path)
    fleet = PahoClient(tls_broker.endpoint, "fleet-tls")
    try:
        assert fleet.subscribe(shared_subscription("telemetry")) == 1
        with Subscriber(dev_a, device_topic("dev-a", "cmd"), device_topic("dev-b", "cmd")) as s:
            s.wait_subscribed()
            assert f"Subscribed (mid: 1): 1, {REFUSED}" in s.output, s.output
            assert fleet.publish(device_topic("dev-b", "cmd"), "for-b-only") in ACCEPTED
            assert fleet.publish(device_topic("dev-a", "cmd"), "deploy") in ACCEPTED
            assert s.wait_for("deploy"), s.output
        assert "for-b-only" not in s.output
        _, _, err = mqtt_pub(dev_a, device_topic("dev-b", "telemetry"), "forged")
        assert NOT_AUTHORIZED in err
        _, _, err = mqtt_pub(dev_a, device_topic("dev-a", "telemetry"), "real")
        assert err == ""
        assert fleet.next_message() == (device_topic("dev-a", "telemetry"), b"real")
        assert fleet.messages.empty()
    finally:
        fleet.close()


def test_tls_refuses_clients_without_a_ca_certificate(
    tls_broker: MosquittoBroker, tmp_path: Path
) -> None:
    no_cert = dataclasses.replace(tls_broker.endpoint, cert_file=None, key_file=None)
    rc, out, err = mqtt_sub(no_cert, device_topic("dev-a", "cmd"), wait_s=2)
    assert rc not in (0, 27) and out == "", err
    assert "peer did not return a certificate" in tls_broker.log_path.read_text()

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-a")])
    now = dt.datetime.now(dt.UTC)
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert, key_file = tmp_path / "self.pem", tmp_path / "self.key"
    cert.write_bytes(self_signed.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    forged = dataclasses.replace(tls_broker.endpoint, cert_file=cert, key_file=key_file)
    rc, out, err = mqtt_sub(forged, device_topic("dev-a", "cmd"), wait_s=2)
    assert rc not in (0, 27) and out == "", err
    assert "certificate verify failed" in tls_broker.log_path.read_text()


def test_tls_revoked_certificate_is_cut_off_and_refused(
    tls_broker: MosquittoBroker, ca: FleetCA, tmp_path: Path
) -> None:
    dev_a, serial = device_tls_endpoint(tls_broker, ca, "dev-a", tmp_path)
    dev_b, _ = device_tls_endpoint(tls_broker, ca, "dev-b", tmp_path)
    fleet = PahoClient(tls_broker.endpoint, "fleet-tls")
    live = PahoClient(dev_a, "dev-a")
    try:
        assert live.subscribe(device_topic("dev-a", "cmd")) == 1
        assert fleet.subscribe(shared_subscription("telemetry")) == 1
        ca.revoke(serial)
        tls_broker.remove_device("dev-a")

        # its open connection is kicked, and the CRL (reread first) keeps it out
        assert live.disconnected.wait(5)
        rc, _, err = mqtt_pub(dev_a, device_topic("dev-a", "telemetry"), "after-revoke")
        assert rc != 0, err
        assert fleet.publish(device_topic("dev-a", "cmd"), "to-revoked") in ACCEPTED
        with pytest.raises(queue.Empty):
            live.next_message(timeout_s=1)
        assert mqtt_pub(dev_b, device_topic("dev-b", "telemetry"), "sentinel")[2] == ""
        assert fleet.next_message() == (device_topic("dev-b", "telemetry"), b"sentinel")
        assert fleet.messages.empty()
    finally:
        live.close()
        fleet.close()


# --- the CA ---------------------------------------------------------------------------------


def test_ca_issues_device_certificates_from_a_csr_or_a_new_key(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600

    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-a")]))
        .sign(device_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    from_csr = ca.issue_device_certificate("dev-a", csr)
    generated = ca.issue_device_certificate("dev-b", validity=dt.timedelta(days=30))
    assert from_csr.private_key_pem is None and generated.private_key_pem is not None
    generated_key = serialization.load_pem_private_key(generated.private_key_pem, None)
    for issued, device_id, public_key in (
        (from_csr, "dev-a", device_key.public_key()),
        (generated, "dev-b", generated_key.public_key()),
    ):
        cert = x509.load_pem_x509_certificate(issued.certificate_pem)
        cert.verify_directly_issued_by(ca_cert)
        assert cert.public_key() == public_key
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (cert.serial_number, cert.not_valid_after_utc) == (issued.serial, issued.not_after)
    assert generated.not_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=31)
    assert from_csr.not_after - dt.datetime.now(dt.UTC) > dt.timedelta(days=360)


def test_ca_refuses_a_csr_for_another_name_or_with_a_broken_signature(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-b")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="must be the device id 'dev-a'; found 'dev-b'"):
        ca.issue_device_certificate("dev-a", csr.public_bytes(serialization.Encoding.PEM))

    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateError, match="signature"):
        ca.issue_device_certificate("dev-b", tampered)
    with pytest.raises(CertificateError, match="not a PEM certificate signing request"):
        ca.issue_device_certificate("dev-b", b"garbage")

    ca.issue_service_certificate("fleet")
    with pytest.raises(CertificateError, match="fleet's own broker account"):
        FleetCA.load_or_create(tmp_path / "ca").issue_device_certificate("fleet")


def test_revocations_survive_reloading_the_ca(tmp_path: Path) -> None:
    first = FleetCA.load_or_create(tmp_path / "ca")
    crl = x509.load_pem_x509_crl(first.crl_path.read_bytes())
    assert list(crl) == []
    a = first.issue_device_certificate("dev-a").serial
    b = first.issue_device_certificate("dev-b").serial
    first.revoke(a)

    again = FleetCA.load_or_create(tmp_path / "ca")
    assert again.cert_pem == first.cert_pem
    again.revoke(b)
    crl = x509.load_pem_x509_crl(again.crl_path.read_bytes())
    assert {r.serial_number for r in crl} == {a, b}
    ca_key = x509.load_pem_x509_certificate(again.cert_pem).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
