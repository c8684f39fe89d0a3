"""The fleet server's settings: one typed object, built at start and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ota.keys import PASSPHRASE_ENV

__all__ = ["FleetSettings"]


class FleetSettings(BaseModel):
    """Defaults are the embedded setup: everything under ``data_dir`` on this machine.

    Unknown keys are errors, as in ``agent.toml``: a misspelt setting must not be ignored.
    """

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("fleet-data")
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///DATA_DIR/fleet.db``. PostgreSQL: ``postgresql://``."""
    mqtt_url: str | None = None
    """An external broker (``mqtt://`` or ``mqtts://``); default: launch mosquitto here."""
    mqtt_tls: bool = False
    """Embedded broker only: mTLS with device certificates instead of passwords."""
    mqtt_port: int | None = None
    """Embedded broker's port; default: a free loopback port."""
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    """The URL devices reach this server at; default ``http://HOST:PORT``."""
    key_passphrase_env: str = PASSPHRASE_ENV
    timestamp_refresh_interval_s: float = Field(default=60.0, gt=0)
    timestamp_expiry_s: int = Field(default=24 * 3600, gt=0)
    """Lifetime of each timestamp signature for a repository this server creates."""
    rollout_tick_s: float = Field(default=1.0, gt=0)
    """How often the rollout engine re-evaluates active rollouts."""
    rollout_max_step_failures: int = Field(default=5, ge=1)
    """Failed engine steps in a row after which a rollout is paused with the error."""
    health_window_s: float = Field(default=3600.0, gt=0)
    """Telemetry age used for the previous version's baseline in health gates."""
    max_json_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body of every route but bundle uploads and inference (413 past it)."""
    max_bundle_bytes: int = Field(default=8 << 30, ge=1024)
    """Largest bundle upload; it is streamed to disk, never held in memory."""
    max_inference_bytes: int = Field(default=16 << 20, ge=1024)
    """Largest cloud inference request (``/v2/.../infer``), which is read whole."""
    metrics_public: bool = False
    """Serve ``/metrics`` without a token (by default it needs an API token, any role)."""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def ota_dir(self) -> Path:
        return self.data_dir / "ota-repo"

    @property
    def ota_keys_dir(self) -> Path:
        return self.data_dir / "ota-keys"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "mosquitto"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def cloud_models_dir(self) -> Path:
        return self.data_dir / "cloud-models"
