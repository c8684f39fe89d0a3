"""The MQTT contract between the fleet and its devices: topics and payloads.

Pydantic only, so the agent (``edgefleet[agent]``) and the simulator import it without the
fleet server's dependencies. Topics live under ``edgefleet/v1/devices/{device_id}/``:

| topic       | direction      | QoS | payload                                       |
|-------------|----------------|-----|-----------------------------------------------|
| ``cmd``       | fleet → device | 1   | :class:`Command`                                |
| ``ack``       | device → fleet | 1   | :class:`Ack`                                    |
| ``status``    | device → fleet | 1, retained; Last Will | :class:`Status`                 |
| ``telemetry`` | device → fleet | 1   | :class:`TelemetryBatch`, JSON, optionally zstd  |

Every command has an id; a device that sees an id again acks its current progress instead
of acting twice, so the fleet may resend after a crash. Telemetry records carry ids too and
the fleet stores each once.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PayloadError

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "TOPIC_PREFIX",
    "Ack",
    "AckState",
    "BundleRef",
    "Channel",
    "Command",
    "CommandKind",
    "PayloadError",
    "Status",
    "TelemetryBatch",
    "TelemetryRecord",
    "decode_payload",
    "device_id_from_topic",
    "device_topic",
    "encode_telemetry",
    "shared_subscription",
]

TOPIC_PREFIX = "edgefleet/v1/devices"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PAYLOAD_BYTES = 4 << 20
"""Largest payload, compressed or not, that either side accepts."""

M = TypeVar("M", bound=BaseModel)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Channel = Literal["cmd", "ack", "status", "telemetry"]


def device_topic(device_id: str, channel: Channel) -> str:
    return f"{TOPIC_PREFIX}/{device_id}/{channel}"


def shared_subscription(channel: Channel, group: str = "fleet") -> str:
    """The MQTT 5 shared subscription fleet replicas split ``channel`` through."""
    return f"$share/{group}/{TOPIC_PREFIX}/+/{channel}"


def device_id_from_topic(topic: str) -> tuple[str, str]:
    """``(device_id, channel)`` of a device topic; ``PayloadError`` for anything else."""
    parts = topic.split("/")
    prefix = TOPIC_PREFIX.split("/")
    if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix:
        raise PayloadError(f"topic {topic!r} is not under {TOPIC_PREFIX}/DEVICE/CHANNEL")
    if not DEVICE_ID_PATTERN.match(parts[-2]):
        raise PayloadError(f"topic {topic!r} has an invalid device id")
    return parts[-2], parts[-1]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BundleRef(_Message):
    """Where a device finds a bundle: a TUF target, plus the fields it shows in status."""

    target_path: str
    name: str
    version: str
    version_number: int
    sha256: str
    length: int


class CommandKind(enum.StrEnum):
    DEPLOY = "deploy"
    """Install ``bundle`` as the serving model (A/B, health check, commit or roll back)."""
    ROLLBACK = "rollback"
    """Serve ``bundle`` again: the one the device ran before the rollout."""
    SHADOW = "shadow"
    """Run ``bundle`` beside the serving model on the same inputs; report agreement."""
    SHADOW_STOP = "shadow_stop"
    """Stop and remove the shadow model."""


class Command(_Message):
    id: str = Field(min_length=1, max_length=128)
    kind: CommandKind
    rollout: str | None = None
    bundle: BundleRef | None = None
    metadata_url: str | None = None
    """Base URL of the TUF metadata; bundles come from ``targets_url``."""
    targets_url: str | None = None
    issued_at: float


class AckState(enum.StrEnum):
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    INSTALLED = "installed"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def final(self) -> bool:
        return self in (AckState.HEALTHY, AckState.FAILED, AckState.ROLLED_BACK)


class Ack(_Message):
    command: str = Field(min_length=1, max_length=128)
    state: AckState
    detail: str = Field(default="", max_length=2000)
    bundle_version: str | None = None
    ts: float


class Status(_Message):
    online: bool
    agent_version: str | None = None
    bundle: str | None = None
    """``NAME-VERSION`` of the serving bundle, or ``None`` before the first install."""
    bundle_version_number: int | None = None
    state: str | None = None
    ts: float | None = None


class TelemetryRecord(_Message):
    """One reporting interval of one device. ``id`` is unique per device."""

    id: str = Field(min_length=1, max_length=128)
    ts: float
    bundle: str | None = None
    inferences: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    fallbacks: int = Field(default=0, ge=0)
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p95_ms: float | None = Field(default=None, ge=0)
    shadow_bundle: str | None = None
    shadow_compared: int = Field(default=0, ge=0)
    shadow_agreed: int = Field(default=0, ge=0)
    dropped: int = Field(default=0, ge=0)
    """Records the device's queue dropped (disk bound) since its last report."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Anything else (latency histogram, prediction distribution), stored as given."""


class TelemetryBatch(_Message):
    records: list[TelemetryRecord] = Field(max_length=10_000)


def encode_telemetry(batch: TelemetryBatch, *, compress: bool = True) -> bytes:
    """JSON, zstd-compressed when ``compress`` (the fleet accepts both)."""
    data = batch.model_dump_json(exclude_defaults=True).encode()
    if not compress:
        return data
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def decode_payload(payload: bytes, model: type[M]) -> M:
    """Parse ``payload`` (JSON, or zstd-compressed JSON) as ``model``; ``PayloadError`` if not."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    if payload.startswith(_ZSTD_MAGIC):
        payload = _decompress(payload)
    try:
        return model.model_validate(json.loads(payload))
    except (ValueError, RecursionError) as e:  # json and pydantic errors are ValueErrors
        reason = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)[:200]
        raise PayloadError(f"not a valid {model.__name__}: {reason}") from e


def _decompress(payload: bytes) -> bytes:
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload)
        data = reader.read(MAX_PAYLOAD_BYTES + 1)
    except zstandard.ZstdError as e:
        raise PayloadError(f"corrupt zstd payload: {e}") from e
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload decompresses to over {MAX_PAYLOAD_BYTES} bytes")
    return data
