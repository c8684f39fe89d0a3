"""The agent's configuration: one ``agent.toml``, validated once at start.

``edgefleet agent enroll`` writes it from what the fleet hands a new device; every section
but ``device_id`` and ``data_dir`` has defaults, and relative paths are read against the
file's own folder. A wrong key or value stops the agent at start with the field named.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .origin import Origin

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "FallbackConfig",
    "GroundTruthConfig",
    "HealthConfig",
    "MqttConfig",
    "OtaConfig",
    "TelemetryConfig",
    "load_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttConfig(_Section):
    """How the agent reaches the fleet's broker: credentials, or a client certificate (mTLS)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)


class OtaConfig(_Section):
    """Where TUF metadata and bundles come from, and the root of trust the device starts with."""

    metadata_url: str | None = None
    targets_url: str | None = None
    trusted_root: Path | None = None
    """The fleet's ``root.json`` at enrollment; later roots arrive through TUF itself."""


class ApiConfig(_Section):
    """The local Open Inference Protocol server; loopback unless you mean otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=0, le=65535)


class FallbackConfig(_Section):
    """When a request goes to a cloud Open Inference Protocol endpoint instead.

    Without ``url`` there is no fallback and a local failure is the caller's error.
    """

    url: str | None = None
    """Base URL of the endpoint (``http://fleet:8000``); ``/v2/models/{model}/infer`` is added."""
    model: str | None = None
    """Model name at the endpoint; the local model's name when unset."""
    token: str | None = None
    """Bearer token sent with each request (the device's fleet API token)."""
    on_no_model: bool = True
    on_error: bool = True
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """Local answers slower than this are replaced by the cloud's (and counted)."""
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    """Local answers whose top score is below this go to the cloud."""
    timeout_s: float = Field(default=2.0, gt=0)
    retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=0.1, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive cloud failures that open the circuit breaker."""
    breaker_reset_s: float = Field(default=30.0, gt=0)
    """How long an open breaker refuses calls before letting one through to probe."""


class TelemetryConfig(_Section):
    interval_s: float = Field(default=10.0, gt=0)
    """A record summarising the inferences since the last one is queued this often."""
    batch_records: int = Field(default=500, ge=1)
    max_queue_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    """Past this size on disk the oldest records are dropped (and the drop is reported)."""
    compress: bool = True


class HealthConfig(_Section):
    """The post-install health check, beyond the bundle's golden vectors."""

    watch_inferences: int = Field(default=50, ge=0)
    """Inferences watched on the new model before the update is committed (0: commit at once)."""
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    watch_timeout_s: float = Field(default=600.0, gt=0)
    """Commit anyway when this little traffic arrives in this long (golden vectors passed)."""


class GroundTruthConfig(_Section):
    """The prediction log true labels are matched against (agent/ground_truth.py), held in
    memory and bounded by count and age."""

    max_predictions: int = Field(default=10_000, ge=1, le=1_000_000)
    """Past this many the oldest predictions are forgotten."""
    max_age_s: float = Field(default=3600.0, gt=0)
    """Predictions older than this are forgotten: a label for them answers 404."""


class AgentConfig(_Section):
    device_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    data_dir: Path
    """Slots, the telemetry queue and the updater's state live here."""
    model_name: str | None = None
    """The name the local API serves the model under; the bundle's model name when unset."""
    api_token: str | None = None
    """The device's fleet API token, sent with TUF metadata and bundle downloads to the
    fleet's origin only (:attr:`fleet_origin`)."""
    fleet_url: str | None = None
    """The fleet the device enrolled with (``http://fleet:8000``). Its origin is the only one
    that gets the token, and the only one commands may send the device to; unset (a config
    written before this key), the origin of ``ota.metadata_url``."""
    mqtt: MqttConfig = MqttConfig()
    ota: OtaConfig = OtaConfig()
    api: ApiConfig = ApiConfig()
    fallback: FallbackConfig = FallbackConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    health: HealthConfig = HealthConfig()
    ground_truth: GroundTruthConfig = GroundTruthConfig()

    @field_validator("fleet_url")
    @classmethod
    def _an_origin(cls, url: str | None) -> str | None:
        if url is not None:
            Origin.of(url)
        return url

    @model_validator(mode="after")
    def _token_has_an_origin(self) -> AgentConfig:
        origin = self.fleet_origin  # raises for an ota.metadata_url that is no http(s) URL
        if self.api_token and origin is None:
            raise ValueError(
                "api_token is set but neither fleet_url nor ota.metadata_url says which fleet it "
                'belongs to: add fleet_url = "http://FLEET:PORT" (what the device enrolled with)'
            )
        return self

    @property
    def fleet_origin(self) -> Origin | None:
        """Where the token may go and commands may point: ``fleet_url``'s origin, else
        ``ota.metadata_url``'s; ``None`` when neither is set."""
        url = self.fleet_url or self.ota.metadata_url
        return Origin.of(url) if url else None

    def resolved(self, base: Path) -> AgentConfig:
        """The same config with relative paths read against ``base``."""
        data: dict[str, Any] = self.model_dump()
        data["data_dir"] = base / self.data_dir
        for section, keys in (
            ("mqtt", ("ca_file", "cert_file", "key_file")),
            ("ota", ("trusted_root",)),
        ):
            for key in keys:
                if data[section][key] is not None:
                    data[section][key] = base / data[section][key]
        return AgentConfig.model_validate(data)


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``agent.toml``; a :class:`ConfigError` names what is wrong."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the agent config {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path}: {problems}") from e
    return config.resolved(path.parent.resolve())
