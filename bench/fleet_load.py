"""The fleet benchmark's load generator: pre-encoded MQTT 3.1.1 QoS 1 publishes on a raw
socket, many in flight, counting the broker's PUBACKs. One process per publisher
(:func:`publish`); ``bench/fleet_bench.py`` runs several and first measures them against
a broker with no subscriber, so the rates it reports are the broker's and the fleet's,
not this generator's.

Every packet is built before the clock starts; the hot loop only writes prepared bytes
and counts acknowledgements (a PUBACK is 4 bytes, and a publish-only client receives
nothing else).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from contracts.mqtt import (
    TOPIC_PREFIX,
    TelemetryBatch,
    TelemetryRecord,
    encode_telemetry,
)

__all__ = ["SHAPES", "PublishResult", "Shape", "publish", "records_of"]

_WINDOW = 30_000
"""Publishes sent and not yet acknowledged, at most (under 65,535 packet ids)."""
_CHUNK = 256
"""Packets joined into one write."""
_PUBACK_BYTES = 4


@dataclass(frozen=True)
class Shape:
    """What one message carries."""

    name: str
    records: int
    compress: bool


SHAPES = {
    "single": Shape("1 record per message", 1, False),
    "batch50": Shape("50 records per message, zstd", 50, True),
}


@dataclass(frozen=True)
class PublishResult:
    index: int
    sent: int
    acked: int
    started: float
    """``time.monotonic()`` (system-wide) of the first write."""
    finished: float
    """Of the last PUBACK (or of giving up)."""


def records_of(publisher: int, message: int, shape: Shape) -> Iterator[TelemetryRecord]:
    """The records of one message: ids unique across publishers and messages."""
    for k in range(shape.records):
        yield TelemetryRecord(
            id=f"p{publisher}-m{message}-r{k}",
            ts=1_790_000_000.0 + message,
            bundle="bench-host-1.0.0",
            inferences=120,
            errors=1,
            fallbacks=2,
            latency_p50_ms=4.25,
            latency_p95_ms=9.5,
            extra={"classes": {"cat": 70, "dog": 50}},
        )


def device_of(publisher: int, message: int, devices: int) -> str:
    return f"bench-{publisher}-{message % devices:05d}"


def publish(
    index: int,
    username: str,
    password: str,
    host: str,
    port: int,
    shape_key: str,
    count: int,
    devices: int,
    ready: Any,
    go: Event,
    timeout_s: float,
) -> None:
    """Publish ``count`` messages of ``SHAPES[shape_key]`` once ``go`` is set; put a
    :class:`PublishResult` on ``ready`` (a queue), after ``("ready", index)``."""
    shape = SHAPES[shape_key]
    packets = [
        _publish_packet(
            f"{TOPIC_PREFIX}/{device_of(index, n, devices)}/telemetry".encode(),
            n % 65535 + 1,
            encode_telemetry(
                TelemetryBatch(records=list(records_of(index, n, shape))),
                compress=shape.compress,
            ),
        )
        for n in range(count)
    ]
    chunks = [b"".join(packets[i : i + _CHUNK]) for i in range(0, count, _CHUNK)]
    sizes = [len(packets[i : i + _CHUNK]) for i in range(0, count, _CHUNK)]
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(_connect_packet(username, password))
    connack = _read_exactly(sock, 4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"{username}: the broker refused the connection ({connack.hex()})")
    sock.settimeout(None)
    acked = _Acks(sock)
    ready.put(("ready", index))
    go.wait()
    started = time.monotonic()
    acked.start()
    sent = 0
    deadline = started + timeout_s
    for chunk, size in zip(chunks, sizes, strict=True):
        while sent - acked.count > _WINDOW - size and time.monotonic() < deadline:
            acked.wait_for(sent - _WINDOW + size)
        sock.sendall(chunk)
        sent += size
    while acked.count < sent and time.monotonic() < deadline:
        acked.wait_for(sent)
    finished = acked.last or time.monotonic()
    try:
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    finally:
        sock.close()
    ready.put(PublishResult(index, sent, acked.count, started, finished))


class _Acks:
    """Counts PUBACKs on a reader thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._bytes = 0
        self.last = 0.0
        self._changed = threading.Condition()

    @property
    def count(self) -> int:
        return self._bytes // _PUBACK_BYTES

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def wait_for(self, count: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.count >= count, timeout=1.0)

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:  # closed after the last PUBACK
                return
            if not data:
                return
            with self._changed:
                self._bytes += len(data)
                self.last = time.monotonic()
                self._changed.notify_all()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise RuntimeError("the broker closed the connection")
        data += more
    return data


def _varint(n: int) -> bytes:
    """MQTT's remaining length."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _connect_packet(username: str, password: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, username and password; client id = username."""
    name = username.encode()
    body = (
        _string(b"MQTT")
        + bytes([4, 0xC2])
        + (60).to_bytes(2, "big")
        + _string(name)
        + _string(name)
        + _string(password.encode())
    )
    return b"\x10" + _varint(len(body)) + body


def _publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH, QoS 1, not retained."""
    body = _string(topic) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body
