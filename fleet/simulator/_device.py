"""One simulated device as the simulator keeps it: its connection's :class:`Phase`, the
bundles it serves, what it saw, its telemetry not yet acknowledged, and its seeded
randomness."""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import paho.mqtt.client as mqtt

from contracts.mqtt import Ack, Command, TelemetryRecord, device_topic

from .specs import SimulatedDeviceSpec

__all__ = ["GONE", "Device", "Phase", "seeded_digest", "seeded_fraction"]


class Phase(enum.Enum):
    WAITING = "waiting"
    """Queued for its (re)connect."""
    CONNECTING = "connecting"
    """TCP up and CONNECT sent; waiting for CONNACK and SUBACK."""
    READY = "ready"
    """Subscribed to its ``cmd`` and ``receipt`` topics."""
    LOST = "lost"
    """The connection dropped; a reconnect is scheduled."""
    REFUSED = "refused"
    """Could not connect during ``start()``: no retry, ``start()`` raises."""
    KILLED = "killed"
    STOPPED = "stopped"


GONE = (Phase.REFUSED, Phase.KILLED, Phase.STOPPED)
"""Phases after which a device is not reconnected and its scheduled steps and reports are
dropped."""


class Device:
    """One simulated device's connection and what it saw; touched by the loop thread only,
    except the observed fields, which are guarded by the simulator's lock."""

    __slots__ = (
        "acked_at",
        "acks",
        "awaiting",
        "bundle",
        "client",
        "cmd_topic",
        "commands",
        "dropped",
        "error",
        "finished",
        "ignored",
        "in_flight",
        "last_ack",
        "phase",
        "previous",
        "receipt_check",
        "receipt_wait_s",
        "reconnects",
        "refusals",
        "reports",
        "resent",
        "shadow",
        "sock",
        "spec",
        "sub_mid",
        "unsent",
        "version_number",
        "watch_write",
    )

    def __init__(self, spec: SimulatedDeviceSpec) -> None:
        self.spec = spec
        self.cmd_topic = device_topic(spec.device_id, "cmd")
        self.client: mqtt.Client | None = None
        self.sock: Any = None
        """The socket registered with the selector, or ``None``."""
        self.watch_write = False
        """Whether the selector also waits for ``sock`` to be writable."""
        self.phase = Phase.WAITING
        self.sub_mid: int | None = None
        self.error: str | None = None
        self.reconnects = 0
        self.reports = 0
        self.bundle = spec.bundle
        self.version_number = spec.bundle_version_number
        self.previous: tuple[str | None, int | None] | None = None
        self.shadow: str | None = None
        self.commands: list[Command] = []
        self.acks: list[Ack] = []
        self.last_ack: dict[str, Ack] = {}
        self.finished: Ack | None = None
        """The final ack of the command finished last: its status names it."""
        self.ignored: list[Command] = []
        """Commands that arrived past their ``expires_at``."""
        self.unsent: dict[int, TelemetryRecord] = {}
        """Records (by report number, oldest first) waiting to go out with the next batch."""
        self.in_flight: dict[int, dict[int, TelemetryRecord]] = {}
        """Batches published and not yet answered, by MQTT message id."""
        self.dropped: list[int] = []
        """Report numbers of records dropped, unacknowledged, to keep ``unsent`` bounded."""
        self.refusals = 0
        """PUBACKs that did not deliver a batch: a refusal or "no matching subscribers"."""
        self.awaiting: dict[int, TelemetryRecord] = {}
        """Records the broker PUBACKed, by report number, until a storage receipt names them."""
        self.acked_at: dict[int, float] = {}
        """When the PUBACK of each record in :attr:`awaiting` came (monotonic)."""
        self.receipt_wait_s = 0.0
        """The current wait for a receipt before the records awaiting one are sent again."""
        self.receipt_check = False
        """Whether a check of the records awaiting a receipt is scheduled."""
        self.resent = 0
        """Records sent again because no receipt named them in time."""


def seeded_digest(seed: int, device_id: str, purpose: str, size: int) -> bytes:
    """Seeded, per-device bytes: deterministic without a ``random.Random`` (2.5 KiB) each."""
    text = f"{seed}/{device_id}/{purpose}".encode()
    return hashlib.blake2b(text, digest_size=size).digest()


def seeded_fraction(seed: int, device_id: str, purpose: str) -> float:
    """A deterministic fraction in [0, 1)."""
    return int.from_bytes(seeded_digest(seed, device_id, purpose, 8)) / 2**64
