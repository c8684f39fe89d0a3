"""The fleet's tables and API shapes (SQLModel).

Each resource follows one chain: ``XBase`` (fields a client may set) → ``XCreate`` →
``X(table=True)`` (what is stored) → ``XPublic`` (what the API returns; never a secret).
Times are UTC; JSON columns hold what has no fixed shape (metrics, tags, waves).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, computed_field, field_validator
from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from hw_profiles import list_profiles

from .bounds import (
    MAX_TTL_S,
    Count,
    Document,
    LongText,
    Metrics,
    Name,
    RowId,
    ShortText,
    Tag,
    Text,
    TokenName,
    Version,
    Wave,
)

__all__ = [
    "ApiToken",
    "ApiTokenCreate",
    "ApiTokenPublic",
    "AuditEntry",
    "Bundle",
    "BundlePublic",
    "CommandRecord",
    "Device",
    "DevicePublic",
    "DeviceState",
    "DriftAlert",
    "EnrollmentToken",
    "EnrollmentTokenCreate",
    "FleetReplica",
    "Gate",
    "GateCheck",
    "GateMetric",
    "GateOutcome",
    "GateVerdict",
    "HealthStats",
    "ModelHealthRow",
    "ModelVersion",
    "ModelVersionCreate",
    "ModelVersionPublic",
    "Quarantine",
    "Role",
    "Rollout",
    "RolloutCreate",
    "RolloutDevice",
    "RolloutDeviceState",
    "RolloutLease",
    "RolloutMode",
    "RolloutPublic",
    "RolloutState",
    "Stage",
    "TelemetryRecordRow",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _json(default_factory: Callable[[], Any] = dict) -> Any:
    return Field(default_factory=default_factory, sa_column=Column(JSON))


# ---------------------------------------------------------------------------- registry


class Stage(enum.StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


class ModelVersionBase(SQLModel):
    name: Name = Field(index=True, min_length=1, max_length=128)
    version: Version = Field(min_length=1, max_length=64)
    description: Text = ""
    owner: ShortText = ""
    source_sha256: str | None = Field(default=None, max_length=64, regex=r"^[0-9a-fA-F]{64}$")
    training_data: Text | None = None
    """Where the training data lives (a URI, a dataset name and version)."""
    model_card: LongText | None = None
    metrics: Metrics = _json()
    hyperparameters: Document = _json()


class ModelVersionCreate(ModelVersionBase):
    pass


class ModelVersion(ModelVersionBase, table=True):
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    stage: Stage = Field(default=Stage.DEVELOPMENT, index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)
    created_by: str = ""


class ModelVersionPublic(ModelVersionBase):
    id: int
    stage: Stage
    created_at: dt.datetime
    created_by: str
    bundles: list[BundlePublic] = []


class BundleBase(SQLModel):
    profile: str
    runtime: str
    precision: str
    version: str
    version_number: int
    target_path: str
    """The bundle's TUF target path (``PROFILE/NAME-VERSION.efb``)."""
    sha256: str
    length: int


class Bundle(BundleBase, table=True):
    __table_args__ = (UniqueConstraint("target_path"),)

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="modelversion.id", index=True)
    bundle_name: str
    """``NAME-VERSION`` as devices report it in status and telemetry."""
    created_at: dt.datetime = Field(default_factory=utcnow)
    drift_reference: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    """The bundle's ``drift-reference.json`` as parsed at upload (``fleet.drift``), if any."""


class BundlePublic(BundleBase):
    id: int
    model_version_id: int
    bundle_name: str
    created_at: dt.datetime


# ---------------------------------------------------------------------------- devices


class DeviceState(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Device(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    profile: str = Field(index=True)
    tags: list[str] = _json(list)
    state: DeviceState = Field(default=DeviceState.ACTIVE, index=True)
    password_hash: str | None = None
    """The broker's hash of the device's MQTT password (TLS off), never the password."""
    certificate_serial: str | None = None
    api_token_hash: str | None = Field(default=None, index=True)
    online: bool = False
    agent_version: str | None = None
    bundle: str | None = None
    """``NAME-VERSION`` the device reported serving."""
    bundle_version_number: int | None = Field(default=None, sa_type=BigInteger)
    """As the device reported it: up to the contract's ``MAX_VERSION_NUMBER`` (2^53 - 1)."""
    agent_state: str | None = None
    last_seen: dt.datetime | None = None
    enrolled_at: dt.datetime = Field(default_factory=utcnow)
    revoked_at: dt.datetime | None = None


class DevicePublic(SQLModel):
    id: str
    profile: str
    tags: list[str]
    state: DeviceState
    online: bool
    agent_version: str | None
    bundle: str | None
    bundle_version_number: int | None
    agent_state: str | None
    last_seen: dt.datetime | None
    enrolled_at: dt.datetime
    revoked_at: dt.datetime | None


class EnrollmentTokenCreate(SQLModel):
    profile: Name
    """A hardware profile the fleet knows (``edgefleet profiles``)."""
    tags: list[Tag] = Field(default=[], max_length=64)
    uses: int = Field(default=1, ge=1, le=100_000)
    """How many devices may enroll with it (1: a one-time token)."""
    ttl_s: int = Field(default=24 * 3600, ge=1, le=MAX_TTL_S)
    reenroll_revoked: bool = False
    """May enroll an id that was revoked (a device reinstalled after a revocation)."""

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        known = list_profiles()
        if value not in known:
            raise ValueError(
                f"no hardware profile {value!r}: the fleet knows {', '.join(known)} "
                "(add one with a TOML file on EDGEFLEET_PROFILES_PATH)"
            )
        return value


class EnrollmentToken(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(index=True, unique=True)
    profile: str
    tags: list[str] = _json(list)
    uses_left: int
    expires_at: dt.datetime
    reenroll_revoked: bool = False
    created_by: str
    created_at: dt.datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------------------- auth


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = [Role.VIEWER, Role.OPERATOR, Role.ADMIN]
        return order.index(self) >= order.index(needed)


class ApiTokenCreate(SQLModel):
    name: TokenName = Field(min_length=1, max_length=64)
    role: Role


class ApiToken(ApiTokenCreate, table=True):
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(index=True, unique=True)
    created_at: dt.datetime = Field(default_factory=utcnow)
    revoked_at: dt.datetime | None = None


class ApiTokenPublic(ApiTokenCreate):
    id: int
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class AuditEntry(SQLModel, table=True):
    __table_args__ = (Index("ix_auditentry_target_id", "target", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    actor: str
    """Token name, ``device:ID`` or ``fleet`` for what the server decided itself."""
    action: str
    target: str
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


# ---------------------------------------------------------------------------- rollouts


class RolloutState(enum.StrEnum):
    DEPLOYING = "deploying"
    """Commands for the current wave are out; waiting for the devices' final acks."""
    SOAKING = "soaking"
    """The wave has installed; health is watched until the soak time has passed."""
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (RolloutState.COMPLETED, RolloutState.ROLLED_BACK, RolloutState.ABORTED)


class RolloutMode(enum.StrEnum):
    DEPLOY = "deploy"
    SHADOW = "shadow"


_MAX_WAIT_S = 30 * 24 * 3600.0
"""The longest a wave may soak, or a device take to answer: 30 days."""


class Gate(SQLModel):
    """What a wave must show before the next one starts. Unknown fields are refused: a
    misspelt threshold would otherwise leave its default silently in force."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")  # type: ignore[assignment]

    min_healthy_ratio: float = Field(default=0.9, ge=0, le=1)
    """Share of the wave's devices that must report ``healthy``."""
    max_failure_ratio: float = Field(default=0.1, ge=0, le=1)
    """Share of failed devices that stops the rollout at once, soak or not."""
    soak_s: float = Field(default=300, ge=0, le=_MAX_WAIT_S)
    deploy_timeout_s: float = Field(default=1800, gt=0, le=_MAX_WAIT_S)
    """Devices silent this long after their command count as failed."""
    max_error_rate_increase: float = Field(default=0.02, ge=0, le=1)
    """Error rate may exceed the previous version's by this much (absolute)."""
    max_latency_ratio: float = Field(default=1.5, gt=0, le=1000)
    """p95 latency may be this multiple of the previous version's."""
    max_fallback_rate_increase: float = Field(default=0.05, ge=0, le=1)
    min_inferences: Count = 0
    """Telemetry needed from the wave before health is judged (0: judge acks only)."""
    min_agreement: float = Field(default=0.0, ge=0, le=1)
    """Shadow rollouts: share of agreeing predictions the challenger must reach."""
    compare: Literal["threshold", "baseline"] = "threshold"
    """How error and fallback rates are judged: ``threshold``, against the previous
    version's plus ``max_*_rate_increase``; ``baseline``, by a sequential test against the
    previous version's devices over the same window (``fleet/rollouts/sequential.py``)."""
    alpha: float = Field(default=0.05, gt=0, le=0.2)
    """``compare: baseline``: the most often a wave no worse than its baseline may be
    halted, however often the gate looks; split evenly over the rates compared."""
    power: float = Field(default=0.8, ge=0.5, le=0.99)
    """``compare: baseline``: how often a ``min_effect`` regression must halt before the
    wave can pass; it sets the minimum sample."""
    min_effect: float = Field(default=2.0, gt=1, le=1000)
    """``compare: baseline``: the smallest regression worth detecting, as the ratio of the
    new version's rate to the previous version's."""
    max_drift_psi: float | None = Field(default=None, ge=0, le=100)
    """The new version's input drift (population stability index against its reference)
    may be at most this; ``None``: not judged."""
    min_live_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Share of labelled predictions (ground truth) the new version must get right, once
    ``min_labelled`` have come; ``None``: not judged."""
    min_labelled: Count = 100
    """Labels (ground truth) needed before ``min_live_accuracy`` is judged."""


class HealthStats(BaseModel):
    """Totals over a set of telemetry records. Rates are ``None`` without inferences."""

    model_config = ConfigDict(frozen=True)

    records: int = 0
    inferences: int = 0
    errors: int = 0
    fallbacks: int = 0
    latency_p95_ms: float | None = None
    """Inference-weighted mean of the records' p95 (devices report per-interval p95s)."""
    shadow_compared: int = 0
    shadow_agreed: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.inferences if self.inferences else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_compared if self.shadow_compared else None


class GateMetric(enum.StrEnum):
    FAILURE_RATIO = "failure_ratio"
    HEALTHY_RATIO = "healthy_ratio"
    INFERENCES = "inferences"
    """Inferences (shadow rollouts: compared ones) the wave reported since its soak began."""
    ERROR_RATE = "error_rate"
    FALLBACK_RATE = "fallback_rate"
    LATENCY_P95_MS = "latency_p95_ms"
    AGREEMENT = "agreement"
    ERROR_RATE_VS_BASELINE = "error_rate_vs_baseline"
    """``compare: baseline``: the sequential test's always-valid p-value, at least alpha."""
    FALLBACK_RATE_VS_BASELINE = "fallback_rate_vs_baseline"
    DRIFT_PSI = "drift_psi"
    LIVE_ACCURACY = "live_accuracy"


class GateCheck(BaseModel):
    """One figure of a wave held to its threshold."""

    model_config = ConfigDict(frozen=True)

    metric: GateMetric
    value: float
    threshold: float
    """The limit in the value's unit; for error and fallback rates and latency, derived
    from the previous version's figure. Reaching it exactly passes."""
    bound: Literal["max", "min"]
    """Whether ``threshold`` is the most or the least the value may be."""
    passed: bool
    reason: str
    """The metric, its value and its threshold in words, e.g. ``error rate 12.0% > max
    3.0% (previous version's 1.0% + 2.0% allowed)``."""


class GateOutcome(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    WAITING = "waiting"
    """Too few inferences reported yet; nothing else failed."""


class GateVerdict(BaseModel):
    """A wave's gate, judged: every check made, and what they add up to.

    ``fleet.rollouts.gate`` makes them; ``Rollout.last_gate`` stores the latest.
    """

    model_config = ConfigDict(frozen=True)

    wave: int
    checks: list[GateCheck]
    waiting: str = ""
    """Why the outcome is ``waiting``: how many inferences came of how many needed."""
    new: HealthStats | None = None
    """The new version's telemetry from the wave's devices since the soak began."""
    baseline: HealthStats | None = None
    """The previous version's telemetry from this rollout's devices (any wave)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> GateOutcome:
        """Failed if a check failed; else waiting while ``waiting`` says why; else passed."""
        if self.failures:
            return GateOutcome.FAILED
        return GateOutcome.WAITING if self.waiting else GateOutcome.PASSED

    @property
    def failures(self) -> list[GateCheck]:
        """The checks that failed the gate (a check still waiting for inferences is not)."""
        return [
            c
            for c in self.checks
            if not c.passed and not (self.waiting and c.metric is GateMetric.INFERENCES)
        ]

    @property
    def summary(self) -> str:
        """The failures' reasons, else what the gate waits for (empty: it passed)."""
        return "; ".join(c.reason for c in self.failures) or self.waiting


class RolloutCreate(SQLModel):
    bundle_id: RowId
    profile: Name | None = None
    """Devices of this profile; default: the bundle's profile."""
    tags: list[Tag] = Field(default=[], max_length=64)
    """Devices carrying all these tags."""
    waves: list[Wave] = Field(default=["1", "10", "50", "100"], min_length=1, max_length=100)
    """Cumulative percentages of the selected devices, or cohort tags (``canary``)."""
    gate: Gate = Gate()
    auto_advance: bool = True
    on_failure: Literal["pause", "rollback"] = "pause"
    mode: RolloutMode = RolloutMode.DEPLOY
    id: str | None = Field(default=None, regex=r"^r-[0-9a-f]{12}$")
    """The id a preview (``POST /rollouts/preview``) chose, so the rollout takes the very
    waves it showed; default: a new one."""


class Rollout(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=32)
    bundle_id: int = Field(foreign_key="bundle.id")
    profile: str
    tags: list[str] = _json(list)
    waves: list[str] = _json(list)
    gate: dict[str, Any] = _json()
    auto_advance: bool = True
    on_failure: str = "pause"
    mode: RolloutMode = RolloutMode.DEPLOY
    state: RolloutState = Field(default=RolloutState.DEPLOYING, index=True)
    wave: int = 0
    wave_started_at: dt.datetime = Field(default_factory=utcnow)
    soak_started_at: dt.datetime | None = None
    reason: str = ""
    """Why the rollout is where it is (the gate's verdict, who paused it)."""
    last_gate: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    """The latest :class:`GateVerdict` (``model_dump(mode="json")``)."""
    step_failures: int = 0
    """The engine's failed steps in a row on this rollout; at the limit it is paused."""
    created_by: str = ""
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class RolloutDeviceState(enum.StrEnum):
    PENDING = "pending"
    """Assigned to a wave that has not started."""
    COMMANDED = "commanded"
    IN_PROGRESS = "in_progress"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class RolloutDevice(SQLModel, table=True):
    """One device's place in one rollout; created for every selected device at the start."""

    __table_args__ = (
        Index("ix_rolloutdevice_rollout_wave", "rollout_id", "wave"),
        Index("ix_rolloutdevice_device_id", "device_id"),
    )

    rollout_id: str = Field(foreign_key="rollout.id", primary_key=True)
    device_id: str = Field(foreign_key="device.id", primary_key=True)
    wave: int
    rank: str
    """The hash that orders devices into waves: sticky for a rollout, different across."""
    state: RolloutDeviceState = RolloutDeviceState.PENDING
    previous_bundle_id: int | None = None
    command_id: str | None = Field(default=None, index=True)
    last_ack: str | None = None
    detail: str = ""
    commanded_at: dt.datetime | None = None
    updated_at: dt.datetime = Field(default_factory=utcnow)


class RolloutPublic(SQLModel):
    id: str
    bundle_id: int
    profile: str
    tags: list[str]
    waves: list[str]
    gate: Gate
    auto_advance: bool
    on_failure: str
    mode: RolloutMode
    state: RolloutState
    wave: int
    reason: str
    last_gate: GateVerdict | None
    step_failures: int
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    devices: dict[str, dict[str, int]] = {}
    """Per wave (as a string index): device count by RolloutDeviceState."""
    actions: list[str] = []
    """What an operator may do now (``pause``, ``resume``, ``advance``, ``abort``,
    ``rollback``): the events ``fleet.rollouts.transitions.TRANSITIONS`` allows from its state."""


class CommandRecord(SQLModel, table=True):
    """Every command the fleet sent, for the audit trail and idempotent resends."""

    id: str = Field(primary_key=True, max_length=128)
    device_id: str = Field(index=True)
    kind: str
    rollout_id: str | None = Field(default=None, index=True)
    payload: dict[str, Any] = _json()
    last_ack: str | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------------------- telemetry


class TelemetryRecordRow(SQLModel, table=True):
    """One device report; ``(device_id, record_id)`` makes ingest idempotent."""

    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_bundle_received_at", "bundle", "received_at"),)

    device_id: str = Field(primary_key=True, max_length=64)
    record_id: str = Field(primary_key=True, max_length=128)
    ts: dt.datetime
    """The device's clock: data, never a window's bound (it may be unset or lie)."""
    received_at: dt.datetime = Field(default_factory=utcnow)
    """The fleet's clock: health windows are cut on it."""
    bundle: str | None = None
    inferences: int = 0
    errors: int = 0
    fallbacks: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    shadow_bundle: str | None = None
    shadow_compared: int = 0
    shadow_agreed: int = 0
    dropped: int = 0
    extra: dict[str, Any] = _json()


ModelVersionPublic.model_rebuild()


# ---------------------------------------------------------------------------- model health


class ModelHealthRow(SQLModel, table=True):
    """What the devices serving one model version in one cohort reported in one hour (fleet
    clock): their drift summaries merged, and their ground-truth counts. ``cohort`` is a
    device tag, or ``""`` for every device. Kept up to date at ingest (``fleet.drift``)."""

    __tablename__ = "modelhealth"
    __table_args__ = (UniqueConstraint("model_version_id", "cohort", "hour"),)

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="modelversion.id")
    cohort: str = Field(max_length=64)
    hour: dt.datetime
    summaries: int = Field(default=0, sa_type=BigInteger)
    """Drift summaries merged into ``drift``."""
    skipped: int = Field(default=0, sa_type=BigInteger)
    """Drift summaries refused: malformed, or not of the version's reference's shape."""
    drift: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    labelled: int = Field(default=0, sa_type=BigInteger)
    correct: int = Field(default=0, sa_type=BigInteger)


class DriftAlert(SQLModel, table=True):
    """Whether a version's cohort is in drift, as the fleet last judged it: an alert is
    raised (audited, counted, sent to the webhook) when this flips, not on every look."""

    model_version_id: int = Field(foreign_key="modelversion.id", primary_key=True)
    cohort: str = Field(primary_key=True, max_length=64)
    drifting: bool = False
    score: float | None = None
    changed_at: dt.datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------------------- quarantine


class Quarantine(SQLModel, table=True):
    """A device's message that decoded but that the database refused: kept for an operator
    instead of the batch it came in (``fleet.bridge``)."""

    id: int | None = Field(default=None, primary_key=True)
    received_at: dt.datetime = Field(index=True)
    device_id: str = Field(index=True, max_length=64)
    channel: str = Field(max_length=16)
    topic: str = Field(max_length=256)
    error: str = Field(max_length=2000)
    """The database's error, in one line of printable text."""
    payload_size: int
    payload_sha256: str = Field(max_length=64)
    payload: bytes
    """The payload's first ``fleet.bridge.QUARANTINE_PAYLOAD_BYTES`` (64 KiB)."""


# ---------------------------------------------------------------------------- replicas


class RolloutLease(SQLModel, table=True):
    """Which replica drives rollouts (one row, id 1): ``fleet.rollouts.lease``.

    Every term has an ``epoch`` one higher than the last; every transaction the engine
    commits checks, under a lock of this row, that its term still holds (fencing).
    """

    id: int = Field(default=1, primary_key=True)
    holder: str | None = Field(default=None, max_length=32)
    """The replica id that holds it; ``None`` once released."""
    epoch: int = Field(default=0, sa_type=BigInteger)
    expires_at: dt.datetime
    """On the database's clock; renewed by the holder, taken by another once passed."""
    acquired_at: dt.datetime


class FleetReplica(SQLModel, table=True):
    """One ``fleet serve`` process as the others see it: alive while ``seen_at`` is fresh."""

    id: str = Field(primary_key=True, max_length=32)
    started_at: dt.datetime
    seen_at: dt.datetime
    """Its last heartbeat, on the database's clock."""
    drained_at: dt.datetime | None = None
    """When another replica last took over its MQTT session and stored what it held."""
    ingest_workers: int = 0
    """Its ``--ingest-workers`` at its last start: the worker sessions (1 to this) another
    replica empties once it dies (:func:`fleet.ingest_workers.drain_ingest_sessions`);
    0 for none, and for a replica that last started before migration 0008."""
