"""The fleet server's settings: one typed object, built at start and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from contracts.drift import DISTANCE_ALERT, MIN_COUNT, PSI_ALERT, DriftThresholds
from ota.keys import PASSPHRASE_ENV

from .broker.credential import is_ingest_username
from .broker.endpoint import MqttEndpoint, is_loopback, public_endpoint

__all__ = ["DEFAULT_REPLICA_ID", "MAX_INGEST_WORKERS", "FleetSettings", "is_in_memory_sqlite"]

DEFAULT_REPLICA_ID = "main"
MAX_INGEST_WORKERS = 32
"""The most ``--ingest-workers`` a replica runs (and so the most worker sessions it has)."""


def is_in_memory_sqlite(database_url: str) -> bool:
    """Whether ``database_url`` names an SQLite database that lives in one process's memory
    (no file: ``sqlite://``, ``:memory:``, ``mode=memory``), which other processes cannot
    share. ``False`` for a URL SQLAlchemy cannot parse (opening it says why)."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return False
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )


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
    mqtt_credential_file: Path | None = None
    """With ``mqtt_url`` (no user in it): the broker passwords every replica shares
    (``edgefleet fleet broker`` writes the file): this replica logs in as
    ``edgefleet-fleet-REPLICA``, and with a standalone mosquitto adds and removes devices
    through its dynamic-security plugin."""
    mqtt_tls: bool = False
    """Embedded broker only: mTLS with device certificates instead of passwords."""
    mqtt_port: int | None = Field(default=None, ge=1, le=65535)
    """Embedded broker's port; default: the one the first start chose (a free one), kept in
    ``DATA_DIR/mosquitto/port``."""
    mqtt_host: str | None = None
    """Embedded broker's listen address; default: ``host``. Not loopback: TLS
    (``mqtt_tls``) unless ``mqtt_allow_plaintext``."""
    mqtt_allow_plaintext: bool = False
    """Let the embedded broker listen beyond loopback without TLS (passwords in clear)."""
    mqtt_public_url: str | None = None
    """``mqtt(s)://HOST:PORT`` devices are told; default: ``public_url``'s host with the
    broker's port and scheme."""
    mqtt_restart_delay_s: float = Field(default=0.5, gt=0, le=30)
    """Before the first restart of an embedded broker that died; doubled while it keeps
    dying, up to 30 s."""
    replica_id: str = Field(
        default=DEFAULT_REPLICA_ID, pattern=r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
    )
    """This replica's name, unique among the servers sharing a database: its MQTT client
    id (and, with the embedded broker or ``mqtt_credential_file``, its broker account) is
    ``edgefleet-fleet-REPLICA``, so the session the broker keeps for it is its own; its
    rollout engine signs the audit log ``fleet:REPLICA``."""
    rollout_lease_s: float = Field(default=10.0, ge=1, le=600)
    """How long the rollout lease lasts unrenewed: another replica takes over rollouts
    this long after the one driving them died (it renews every quarter of it)."""
    broker_auth_secret_file: Path | None = None
    """A file holding the secret an external broker sends (header
    ``X-Edgefleet-Broker-Secret``) to ask ``/api/v1/broker/authenticate`` and
    ``/authorize``; unset, those routes let no one in."""
    mqtt_session_expiry_s: int = Field(default=24 * 3600, ge=1, le=2**32 - 2)
    """How long the broker keeps the fleet's MQTT session, queueing what devices send,
    while the fleet is away."""
    mqtt_settle_s: float = Field(default=2.0, ge=0, le=600)
    """After each connection to the broker, how long the rollout engine lets what the broker
    kept come in before it resends unfinished commands and judges waves."""
    command_ttl_s: float = Field(default=3600.0, gt=0, le=30 * 24 * 3600)
    """A command's ``expires_at`` is this far ahead of each copy sent; a device ignores one
    that reaches it later (it sat in a queue)."""
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
    drift_window_s: float = Field(default=24 * 3600.0, ge=3600, le=31 * 24 * 3600)
    """The window drift alerts judge (whole hours; ``/drift?window_s=`` for another)."""
    drift_psi_threshold: float = Field(default=PSI_ALERT, gt=0, le=100)
    """A cohort drifts when a feature's (or the classes') PSI passes this."""
    drift_distance_threshold: float = Field(default=DISTANCE_ALERT, gt=0, le=1)
    """... or a continuous feature's binned Wasserstein distance passes this."""
    drift_min_samples: int = Field(default=MIN_COUNT, ge=1)
    """Inferences a cohort's summaries must cover in the window before it can drift."""
    drift_check_s: float = Field(default=60.0, gt=0, le=24 * 3600)
    """How often the fleet judges drift for alerts (docs/model-health.md)."""
    drift_webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    """Operator's endpoint POSTed a JSON document when a cohort starts or stops drifting."""
    drift_webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_json_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body of every route but bundle uploads and inference (413 past it)."""
    max_bundle_bytes: int = Field(default=8 << 30, ge=1024)
    """Largest bundle upload; it is streamed to disk, never held in memory."""
    max_inference_bytes: int = Field(default=16 << 20, ge=1024)
    """Largest cloud inference request (``/v2/.../infer``), which is read whole."""
    metrics_public: bool = False
    """Serve ``/metrics`` without a token (by default it needs an API token, any role)."""
    ingest_workers: int = Field(default=0, ge=0, le=MAX_INGEST_WORKERS)
    """Processes storing telemetry beside the replica's own bridge (fleet/ingest_workers.py);
    0: the bridge alone. On SQLite they take turns at its one write lock."""

    @field_validator("replica_id")
    @classmethod
    def _not_an_admin_account(cls, replica_id: str) -> str:
        if replica_id.endswith("-admin"):
            raise ValueError(
                f"replica id {replica_id!r} ends in -admin, which names broker admin accounts: "
                "choose another"
            )
        return replica_id

    @field_validator("replica_id")
    @classmethod
    def _not_an_ingest_worker(cls, replica_id: str) -> str:
        if is_ingest_username(replica_id):
            raise ValueError(
                f"replica id {replica_id!r} ends like an ingest worker's account "
                "(REPLICA-ingest-K, fleet/ingest_workers.py): choose another"
            )
        return replica_id

    @field_validator("mqtt_public_url")
    @classmethod
    def _device_address(cls, url: str | None) -> str | None:
        if url is not None:
            public_endpoint(url)
        return url

    @model_validator(mode="after")
    def _ingest_workers_can_connect(self) -> FleetSettings:
        """Each ingest worker needs a broker account of its own and the same database."""
        if not self.ingest_workers:
            return self
        if self.mqtt_url is None and self.mqtt_tls:
            raise ValueError(
                "--ingest-workers needs password accounts on the embedded broker, and "
                "--mqtt-tls makes every account a certificate: drop one of the two"
            )
        if self.mqtt_url is not None and self.mqtt_credential_file is None:
            raise ValueError(
                "--ingest-workers with an external broker needs --mqtt-credential-file: each "
                "worker logs in as edgefleet-fleet-REPLICA-ingest-K with the replicas' password"
            )
        if is_in_memory_sqlite(self.db_url):
            raise ValueError(
                "--ingest-workers cannot share an in-memory SQLite database with the server: "
                "give --database-url a file or postgresql://"
            )
        return self

    @model_validator(mode="after")
    def _no_plaintext_on_the_network(self) -> FleetSettings:
        if self.mqtt_credential_file is not None:
            if self.mqtt_url is None:
                raise ValueError(
                    "--mqtt-credential-file is for an external broker: give its address "
                    "with --mqtt-url mqtt(s)://HOST:PORT"
                )
            if MqttEndpoint.from_url(self.mqtt_url).username:
                raise ValueError(
                    "with --mqtt-credential-file the replica logs in as edgefleet-fleet-"
                    f"{self.replica_id}: give --mqtt-url without a user"
                )
        if self.mqtt_url is not None:  # an external broker: its operator's
            return self
        host = self.mqtt_listen_host
        if not is_loopback(host) and not self.mqtt_tls and not self.mqtt_allow_plaintext:
            raise ValueError(
                f"the embedded MQTT broker would listen on {host}, beyond loopback, without "
                "TLS: device passwords and every message would cross the network in clear. "
                "Pass --mqtt-tls (devices get certificates), or --mqtt-host 127.0.0.1 to keep "
                "the broker on this machine, or --mqtt-allow-plaintext on a network you trust"
            )
        if self.mqtt_public_url is not None:
            tls = public_endpoint(self.mqtt_public_url).tls
            if tls != self.mqtt_tls:
                wanted = "mqtts:// (the broker takes TLS)" if self.mqtt_tls else "mqtt://"
                raise ValueError(
                    f"--mqtt-public-url {self.mqtt_public_url} must be {wanted}: devices "
                    "connect the way the embedded broker listens"
                    + ("" if self.mqtt_tls else ", or pass --mqtt-tls")
                )
        return self

    @property
    def drift_thresholds(self) -> DriftThresholds:
        return DriftThresholds(
            psi=self.drift_psi_threshold,
            distance=self.drift_distance_threshold,
            min_count=self.drift_min_samples,
        )

    @property
    def mqtt_listen_host(self) -> str:
        """Where the embedded broker listens."""
        return self.mqtt_host or self.host

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
