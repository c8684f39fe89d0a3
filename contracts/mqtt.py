"""The MQTT contract between the fleet and its devices: topics and payloads.

Pydantic only, so the agent (``edgefleet[agent]``) and the simulator import it without the
fleet server's dependencies. Topics live under ``edgefleet/v1/devices/{device_id}/``:

| topic       | direction      | QoS | payload                                       |
|-------------|----------------|-----|-----------------------------------------------|
| ``cmd``       | fleet → device | 1   | :class:`Command`                                |
| ``ack``       | device → fleet | 1   | :class:`Ack`                                    |
| ``status``    | device → fleet | 1, retained; Last Will | :class:`Status`                 |
| ``telemetry`` | device → fleet | 1   | :class:`TelemetryBatch`, JSON, optionally zstd  |
| ``receipt``   | fleet → device | 1   | :class:`Receipt`                                |
| ``truth``     | fleet → device | 1   | :class:`GroundTruthBatch`                       |

Every command has an id; a device that sees an id again acks its current progress instead
of acting twice, so the fleet may resend after a crash. A command past its ``expires_at``
is stale and ignored (:meth:`Command.expired`): the fleet puts a fresh one on every copy it
sends, and never sends a finished rollout's commands. A device's retained status names the
last command it finished and how (:class:`Status`), so the fleet recovers a lost final ack.
Telemetry records carry ids too and the fleet stores each once. Once it has committed
them (or refused them for good) it says so on the device's ``receipt`` topic; a device
keeps a record until a receipt names it, so a broker that loses what it had PUBACKed loses
nothing (agent/telemetry.py).
"""

from __future__ import annotations

import enum
import threading
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .bounded import (
    JSON_DOCUMENT,
    Count,
    Detail,
    Milliseconds,
    Timestamp,
    Url,
    VersionNumber,
)
from .errors import PayloadError
from .ids import BundleLabel, DeviceId, MessageId, Name, Tag, Version, check_device_id

__all__ = [
    "GROUND_TRUTH_MAX_LABELS",
    "MAX_PAYLOAD_BYTES",
    "RECEIPT_MAX_IDS",
    "TOPIC_PREFIX",
    "UPDATER_IDLE",
    "Ack",
    "AckState",
    "BundleRef",
    "Channel",
    "Command",
    "CommandKind",
    "GroundTruth",
    "GroundTruthBatch",
    "PayloadError",
    "Receipt",
    "RequestId",
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
MAX_PAYLOAD_BYTES = 4 << 20
"""Largest payload, compressed or not, that either side accepts."""

M = TypeVar("M", bound=BaseModel)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Channel = Literal["cmd", "ack", "status", "telemetry", "receipt", "truth"]

UPDATER_IDLE = "idle"
""":attr:`Status.state` of a device whose updater has no command in progress."""


def device_topic(device_id: DeviceId, channel: Channel) -> str:
    """The topic of one device's ``channel``; ``ValueError`` for an id that is not one."""
    return f"{TOPIC_PREFIX}/{check_device_id(device_id)}/{channel}"


def shared_subscription(channel: Channel, group: str = "fleet") -> str:
    """The MQTT 5 shared subscription fleet replicas split ``channel`` through."""
    return f"$share/{group}/{TOPIC_PREFIX}/+/{channel}"


def device_id_from_topic(topic: str) -> tuple[str, str]:
    """``(device_id, channel)`` of a device topic; ``PayloadError`` for anything else."""
    parts = topic.split("/")
    prefix = TOPIC_PREFIX.split("/")
    if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix:
        raise PayloadError(f"topic {topic!r} is not under {TOPIC_PREFIX}/DEVICE/CHANNEL")
    try:
        check_device_id(parts[-2])
    except ValueError as e:
        raise PayloadError(f"topic {topic[:200]!r}: {e}") from None
    return parts[-2], parts[-1]


class _Message(BaseModel):
    """Unknown keys are ignored (a newer peer may add some); every known one is bounded
    (``contracts.ids``, ``contracts.bounded``), so a value that passes fits every column
    and every topic it goes to."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
TargetPath = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9._+/-]+$")]


class BundleRef(_Message):
    """Where a device finds a bundle: a TUF target, plus the fields it shows in status."""

    target_path: TargetPath
    name: Name
    version: Version
    version_number: VersionNumber
    sha256: Sha256
    length: Annotated[int, Field(ge=0, le=1 << 40)]


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
    id: MessageId
    kind: CommandKind
    rollout: Name | None = None
    bundle: BundleRef | None = None
    metadata_url: Url | None = None
    """Base URL of the TUF metadata; bundles come from ``targets_url``."""
    targets_url: Url | None = None
    issued_at: Timestamp
    expires_at: Timestamp | None = None
    """After this (the fleet's clock) the command is stale: a device ignores it, sends no
    ack and keeps no record of it, so a fresh copy (same id, later ``expires_at``) is acted
    on. ``None``: it never goes stale."""

    def expired(self, now: float) -> bool:
        """Whether a device receiving this command at ``now`` must ignore it as stale."""
        return self.expires_at is not None and now > self.expires_at


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
    command: MessageId
    state: AckState
    detail: Detail = ""
    bundle_version: BundleLabel | None = None
    ts: Timestamp


class Status(_Message):
    online: bool
    agent_version: Version | None = None
    bundle: BundleLabel | None = None
    """``NAME-VERSION`` of the serving bundle, or ``None`` before the first install."""
    bundle_version_number: VersionNumber | None = None
    state: Tag | None = None
    """The agent's updater state (:data:`UPDATER_IDLE`, ``downloading``...)."""
    ts: Timestamp | None = None
    last_command: MessageId | None = None
    """The last command the device finished (its updater's record of acks), with its final
    ack state in ``last_command_state``: both or neither."""
    last_command_state: AckState | None = None

    @model_validator(mode="after")
    def _finished_command(self) -> Self:
        if (self.last_command is None) != (self.last_command_state is None):
            raise ValueError("last_command and last_command_state come together or not at all")
        if self.last_command_state is not None and not self.last_command_state.final:
            raise ValueError(
                f"last_command_state must be a final ack state, not {self.last_command_state}"
            )
        return self


class TelemetryRecord(_Message):
    """One reporting interval of one device. ``id`` is unique per device."""

    id: MessageId
    ts: Timestamp
    bundle: BundleLabel | None = None
    inferences: Count = 0
    errors: Count = 0
    """Inferences the local runtime failed on: at most ``inferences``."""
    fallbacks: Count = 0
    """Inferences sent to the cloud: at most ``inferences``."""
    latency_p50_ms: Milliseconds | None = None
    latency_p95_ms: Milliseconds | None = None
    shadow_bundle: BundleLabel | None = None
    shadow_compared: Count = 0
    shadow_agreed: Count = 0
    """At most ``shadow_compared``."""
    dropped: Count = 0
    """Records the device's queue dropped (disk bound) since its last report."""
    extra: Annotated[dict[str, Any], JSON_DOCUMENT] = Field(default_factory=dict)
    """Anything else (latency histogram, prediction distribution), stored as given: at most
    256 KiB of JSON, 8 levels deep."""

    @model_validator(mode="after")
    def _parts_of_a_whole(self) -> Self:
        for part, whole in (
            ("errors", "inferences"),
            ("fallbacks", "inferences"),
            ("shadow_agreed", "shadow_compared"),
        ):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(
                    f"{part} ({getattr(self, part)}) is more than {whole} ({getattr(self, whole)})"
                )
        return self


class TelemetryBatch(_Message):
    records: list[TelemetryRecord] = Field(max_length=10_000)


RECEIPT_MAX_IDS = 10_000
"""The most record ids one :class:`Receipt` names, stored and refused together: a full
:class:`TelemetryBatch`. The fleet splits a larger settlement over several receipts."""


class Receipt(_Message):
    """The fleet's word on telemetry records of one device: ``stored`` are committed to its
    database (now, or before: a resent record is named again), ``refused`` never will be
    (the message breaking the contract, or quarantined; ``reason`` says why). Either way
    the device deletes them from its queue; a record no receipt names is sent again."""

    stored: list[MessageId] = Field(default_factory=list, max_length=RECEIPT_MAX_IDS)
    refused: list[MessageId] = Field(default_factory=list, max_length=RECEIPT_MAX_IDS)
    reason: Detail = ""

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        if len(self.stored) + len(self.refused) > RECEIPT_MAX_IDS:
            raise ValueError(f"a receipt names at most {RECEIPT_MAX_IDS} record ids")
        return self


GROUND_TRUTH_MAX_LABELS = 1000
"""The most labels one :class:`GroundTruthBatch` carries (the agent's API and the fleet's
``POST /api/v1/devices/{id}/ground-truth`` take as many)."""
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
"""An inference request's id as the agent's API answered it (the request's own ``id``, or
the one the agent made up): printable ASCII, no spaces, at most 128 characters."""
ClassLabel = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
"""A class index, as the model's top class counts them; bundles name no classes, so a
string, a float or a boolean is refused rather than guessed at."""


class GroundTruth(_Message):
    """The true class of the answer to the inference request ``request_id``."""

    request_id: RequestId
    label: ClassLabel


class GroundTruthBatch(_Message):
    """Labels the fleet relays to a device on its ``truth`` topic; the agent applies them
    as if they came through its local API (agent/ground_truth.py)."""

    labels: list[GroundTruth] = Field(min_length=1, max_length=GROUND_TRUTH_MAX_LABELS)


def encode_telemetry(batch: TelemetryBatch, *, compress: bool = True) -> bytes:
    """JSON, zstd-compressed when ``compress`` (the fleet accepts both)."""
    data = batch.model_dump_json(exclude_defaults=True).encode()
    if not compress:
        return data
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def decode_payload(payload: bytes, model: type[M]) -> M:
    """Parse ``payload`` (JSON, or zstd-compressed JSON) as ``model``, in one pass (pydantic's
    own JSON parser, which refuses ``NaN`` and ``Infinity`` for the contract's numbers);
    ``PayloadError`` if not."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    if payload.startswith(_ZSTD_MAGIC):
        payload = _decompress(payload)
    try:
        return model.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        reason = f"{where}: {first['msg']}" if where else first["msg"]
        raise PayloadError(f"not a valid {model.__name__}: {reason[:200]}") from e
    except (ValueError, RecursionError) as e:
        raise PayloadError(f"not a valid {model.__name__}: {str(e)[:200]}") from e


_decompressors = threading.local()


def _decompress(payload: bytes) -> bytes:
    """The first zstd frame of ``payload``, at most :data:`MAX_PAYLOAD_BYTES` of it. One
    decompression context per thread, reused; a frame that declares its size (as
    ``encode_telemetry``'s do) is decompressed into a buffer of that size, checked first."""
    import zstandard

    context = getattr(_decompressors, "context", None)
    if context is None:
        context = _decompressors.context = zstandard.ZstdDecompressor()
    try:
        size = zstandard.frame_content_size(payload)
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadError(f"payload decompresses to over {MAX_PAYLOAD_BYTES} bytes")
        if size >= 0:
            data: bytes = context.decompress(payload)
        else:
            data = context.stream_reader(payload).read(MAX_PAYLOAD_BYTES + 1)
    except zstandard.ZstdError as e:
        raise PayloadError(f"corrupt zstd payload: {e}") from e
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload decompresses to over {MAX_PAYLOAD_BYTES} bytes")
    return data
