"""Real MQTT clients for broker tests: mosquitto_sub and mosquitto_pub as subprocesses, and
a paho client that reports every reason code.

Each takes an ``MqttEndpoint`` for whom to connect as (username/password, or CA,
certificate and key). All speak MQTT 5, so a refusal comes back with its reason.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker import MqttEndpoint

Result = tuple[int, str, str]
"""``(returncode, stdout, stderr)``."""
REFUSED = 135
"""The SUBACK / PUBACK / CONNACK reason code "Not authorized"."""
ACCEPTED = (0, 16)
"""PUBACK reason codes of an accepted publish: delivered, or "No matching subscribers"."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def plain_mosquitto(directory: Path) -> Iterator[int]:
    """A plain mosquitto on a loopback port, its port: anonymous clients, no ACL, sessions
    in memory; used as an external broker that outlives the fleet processes of a test."""
    directory.mkdir(parents=True)
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 100000",
        f"log_dest file {directory / 'mosquitto.log'}",
        *(["user root"] if os.getuid() == 0 else []),  # else it drops to a user who cannot log
    ]
    config = directory / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or broker.poll() is not None:
                raise RuntimeError(f"mosquitto did not listen on {port}; see {directory}")
            time.sleep(0.02)
        yield port
    finally:
        broker.terminate()
        broker.wait(10)


def client_args(endpoint: MqttEndpoint) -> list[str]:
    args = ["-h", endpoint.host, "-p", str(endpoint.port), "-V", "mqttv5"]
    if endpoint.username:
        args += ["-u", endpoint.username]
    if endpoint.password is not None:
        args += ["-P", endpoint.password]
    if endpoint.tls:
        args += ["--cafile", str(endpoint.ca_file)]
    if endpoint.cert_file and endpoint.key_file:
        args += ["--cert", str(endpoint.cert_file), "--key", str(endpoint.key_file)]
    return args


def mqtt_pub(endpoint: MqttEndpoint, topic: str, message: str, *, qos: int = 1) -> Result:
    """One publish on a new connection. A refused QoS 1 publish exits 0 but says
    ``Publish 1 failed: Not authorized`` on stderr."""
    cmd = ["mosquitto_pub", *client_args(endpoint), "-q", str(qos), "-t", topic, "-m", message]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    return done.returncode, done.stdout, done.stderr


def mqtt_sub(endpoint: MqttEndpoint, *topics: str, count: int = 1, wait_s: int = 3) -> Result:
    """Subscribe, print ``topic payload`` lines; exit after ``count`` messages or
    ``wait_s`` seconds without one (returncode 27)."""
    cmd = ["mosquitto_sub", *client_args(endpoint), "-v", "-C", str(count), "-W", str(wait_s)]
    for topic in topics:
        cmd += ["-t", topic]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=wait_s + 10, check=False)
    return done.returncode, done.stdout, done.stderr


class Subscriber:
    """A ``mosquitto_sub -d -v`` left running; its output is collected as it comes.

    Debug lines start with ``Client ``; ``Subscribed (mid: 1): 0`` means granted (a
    refused subscription shows 135); message lines are ``topic payload``.
    """

    def __init__(self, endpoint: MqttEndpoint, *topics: str) -> None:
        # stdbuf: mosquitto_sub's debug lines are block-buffered when piped.
        cmd = ["stdbuf", "-oL", "mosquitto_sub", *client_args(endpoint), "-d", "-v", "-q", "1"]
        for topic in topics:
            cmd += ["-t", topic]
        self._process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self._lines)

    def messages(self) -> list[str]:
        return [
            line
            for line in list(self._lines)
            if not line.startswith(("Client ", "Subscribed ", "Connection error", "Error"))
        ]

    def wait_for(self, text: str, timeout_s: float = 5.0) -> bool:
        """Whether ``text`` appears in the output within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while text not in self.output:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        assert self.wait_for("Subscribed (mid:", timeout_s), self.output

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status, or ``None`` if it still runs after ``timeout_s``."""
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._reader.join(5)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PahoClient:
    """A paho MQTT 5 client: messages into a queue, SUBACK and PUBACK reason codes.

    ``will``: ``(topic, payload)`` of a retained QoS 1 Last Will. It connects at once and
    asserts that the broker accepted it; paho reconnects by itself after a disconnection,
    which ``disconnects`` counts.
    """

    def __init__(
        self, endpoint: MqttEndpoint, client_id: str, *, will: tuple[str, str] | None = None
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnects = 0
        self._subscribed = threading.Event()
        self._granted: list[int] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if endpoint.username:
            c.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            c.tls_set(
                ca_certs=str(endpoint.ca_file),
                certfile=str(endpoint.cert_file) if endpoint.cert_file else None,
                keyfile=str(endpoint.key_file) if endpoint.key_file else None,
            )
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        c.connect(endpoint.host, endpoint.port)
        c.loop_start()
        self.client = c
        assert self.connected.wait(5), f"{client_id} was not accepted"

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self.connected.set()

    def _on_disconnect(self, *_: Any) -> None:
        self.disconnects += 1
        self.disconnected.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        self._granted = [c.value for c in codes]
        self._subscribed.set()

    def subscribe(self, topic: str) -> int:
        """The SUBACK's reason code: the QoS granted, or :data:`REFUSED`."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(5), f"no SUBACK for {topic}"
        (code,) = self._granted
        return code

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> int:
        """The PUBACK's reason code (:data:`ACCEPTED`, or :data:`REFUSED`)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + 5
        while info.mid not in self.pubacks:
            assert time.monotonic() < deadline, "no PUBACK"
            time.sleep(0.01)
        return self.pubacks[info.mid]

    def next_message(self, timeout_s: float = 5.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def receipting(endpoint: MqttEndpoint, device_id: str) -> Iterator[list[str]]:
    """A stand-in for the fleet's bridge where no fleet runs (it stores nothing): answers
    each telemetry batch of ``device_id`` with a storage receipt naming its records, as the
    bridge does after its commit. Yields the record ids receipted, in order."""
    from contracts.mqtt import Receipt, TelemetryBatch, decode_payload, device_topic

    receipted: list[str] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if endpoint.username:
        client.username_pw_set(endpoint.username, endpoint.password)

    def on_message(client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        ids = [r.id for r in decode_payload(bytes(message.payload), TelemetryBatch).records]
        receipted.extend(ids)
        receipt = Receipt(stored=ids).model_dump_json()
        client.publish(device_topic(device_id, "receipt"), receipt, qos=1)

    client.on_connect = lambda c, *_: c.subscribe(device_topic(device_id, "telemetry"), qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        assert subscribed.wait(10), "the receipting stand-in could not subscribe"
        yield receipted
    finally:
        client.disconnect()
        client.loop_stop()
