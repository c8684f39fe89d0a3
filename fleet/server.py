"""One fleet server: the database, the broker, the OTA repository and the loops around them.

``FleetServer.start()`` brings everything up in dependency order (database and its
migrations, signing keys and repository, certificate authority, broker, MQTT bridge,
rollout engine); ``stop()`` takes it down in reverse. The FastAPI app (``fleet.app``)
holds one and calls these from its lifespan.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from contracts.durable import write_atomic
from ota.keys import KeyStore
from ota.repository import ExpiryPolicy, OtaRepository

from . import registry
from .bridge import MqttBridge
from .broker import MosquittoBroker, MqttEndpoint
from .ca import FleetCA
from .config import FleetSettings
from .db import make_engine, session_scope
from .devices import RESERVED_PREFIX, broker_credentials
from .inference import CloudModel, CloudModels
from .metrics import FleetMetrics
from .migrate import upgrade
from .models import ApiToken, Device, Role, Rollout, RolloutState
from .rollouts import RolloutEngine
from .tokens import issue_api_token

__all__ = ["ADMIN_TOKEN_FILE", "FLEET_MQTT_USER", "FleetServer", "prepare_data_dir"]

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
FLEET_MQTT_USER = f"{RESERVED_PREFIX}fleet"


class FleetServer:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.metrics = FleetMetrics()
        self.cloud_models = CloudModels()
        self.db: Engine
        self.repository: OtaRepository
        self.ca: FleetCA | None = None
        self.broker: MosquittoBroker | None = None
        self.mqtt: MqttEndpoint
        self.bridge: MqttBridge
        self.rollouts: RolloutEngine

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        prepare_data_dir(settings.data_dir)
        for directory in (settings.ota_dir, settings.ota_keys_dir):
            _private_dir(directory)
        self.db = make_engine(settings.db_url)
        upgrade(self.db)
        self._bootstrap_admin_token()
        self.repository = self._open_repository()
        if settings.mqtt_tls and settings.mqtt_url is None:
            self.ca = FleetCA.load_or_create(settings.ca_dir)
        self.mqtt = self._start_broker()
        self.bridge = MqttBridge(
            self.mqtt,
            self.db,
            self.metrics,
            on_final_ack=self._wake,
            on_online=self._resend_to,
        )
        self.bridge.start()
        self.rollouts = RolloutEngine(
            self.db,
            self.bridge.send,
            metadata_url=f"{settings.base_url}/ota/metadata/",
            targets_url=f"{settings.base_url}/ota/targets/",
            tick_s=settings.rollout_tick_s,
            health_window_s=settings.health_window_s,
            max_step_failures=settings.rollout_max_step_failures,
        )
        resent = self.rollouts.resend_unacknowledged()
        if resent:
            log.info("resent %d commands no device had acknowledged before the restart", resent)
        self.rollouts.start()

    def stop(self) -> None:
        for stop in (
            getattr(self, "rollouts", None) and self.rollouts.stop,
            getattr(self, "bridge", None) and self.bridge.stop,
            self.broker and self.broker.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception:  # keep stopping the rest
                    log.exception("error while stopping the fleet server")
        if hasattr(self, "db"):
            self.db.dispose()

    def _wake(self) -> None:
        self.rollouts.wake()

    def _resend_to(self, device_ids: list[str]) -> None:
        if rollouts := getattr(self, "rollouts", None):  # devices may beat the engine's start
            rollouts.resend_unacknowledged(device_ids)

    # --- parts ----------------------------------------------------------------------------

    def _bootstrap_admin_token(self) -> None:
        """The first start creates an admin token and leaves it in DATA_DIR/admin.token
        (0600). Later admin tokens: ``POST /api/v1/tokens`` or ``fleet admin-token``."""
        with session_scope(self.db) as session:
            if session.exec(select(ApiToken)).first() is not None:
                return
            _, token = issue_api_token(session, name="admin", role=Role.ADMIN, actor="fleet")
        path = self.settings.data_dir / ADMIN_TOKEN_FILE
        _write_secret(path, token)
        log.warning("created the first admin API token in %s", path)

    def _open_repository(self) -> OtaRepository:
        """The OTA repository in DATA_DIR, created with new keys on the first start.

        The keys are encrypted with the passphrase in ``key_passphrase_env``; when that is
        unset (the embedded defaults) a random passphrase is kept in a 0600 file beside them.
        """
        settings = self.settings
        passphrase = os.environ.get(settings.key_passphrase_env)
        if not passphrase:
            secret_file = settings.data_dir / "ota-keys.passphrase"
            if not secret_file.exists():
                _write_secret(secret_file, secrets.token_urlsafe(32))
                log.warning(
                    "%s is unset: the OTA signing keys are encrypted with a passphrase kept in "
                    "%s; set the variable in production",
                    settings.key_passphrase_env,
                    secret_file,
                )
            passphrase = secret_file.read_text().strip()
        keys = KeyStore(settings.ota_keys_dir, passphrase.encode())
        if (settings.ota_dir / "metadata" / "root.json").exists():
            return OtaRepository(settings.ota_dir, keys)
        return OtaRepository.create(
            settings.ota_dir, keys, expiry=ExpiryPolicy(timestamp_s=settings.timestamp_expiry_s)
        )

    def _start_broker(self) -> MqttEndpoint:
        if self.settings.mqtt_url is not None:
            log.info(
                "using the external broker %s: its ACLs must follow docs/fleet.md",
                self.settings.mqtt_url,
            )
            return MqttEndpoint.from_url(self.settings.mqtt_url)
        password_file = self.settings.data_dir / "mqtt-fleet.password"
        if not password_file.exists():
            _write_secret(password_file, secrets.token_urlsafe(24))
        self.broker = MosquittoBroker(
            self.settings.broker_dir, port=self.settings.mqtt_port, ca=self.ca
        )
        with Session(self.db) as session:
            devices = broker_credentials(session)  # bad rows are logged and left out
        return self.broker.start(
            fleet_username=FLEET_MQTT_USER,
            fleet_password=password_file.read_text().strip(),
            devices=devices,
        )

    # --- used by the API ------------------------------------------------------------------

    @property
    def device_mqtt(self) -> MqttEndpoint:
        """The broker as devices reach it (same host and port as the fleet's connection)."""
        return self.mqtt

    def render_metrics(self, timestamp_refresh_failures: int) -> bytes:
        """The Prometheus exposition, with the fleet-wide gauges read fresh from the database."""
        with Session(self.db) as session:
            online = session.exec(
                select(func.count()).select_from(Device).where(col(Device.online).is_(True))
            ).one()
            active = session.exec(
                select(func.count())
                .select_from(Rollout)
                .where(col(Rollout.state).not_in([s for s in RolloutState if s.terminal]))
            ).one()
        self.metrics.devices_online.set(online)
        self.metrics.rollouts_active.set(active)
        self.metrics.timestamp_refresh_failures.set(timestamp_refresh_failures)
        return self.metrics.render()

    def cloud_model(self, name: str) -> CloudModel | None:
        with Session(self.db) as session:
            return registry.cloud_model(
                session,
                name=name,
                repository=self.repository,
                cache_dir=_private_dir(self.settings.cloud_models_dir),
            )


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (value + "\n").encode(), mode=0o600)


def prepare_data_dir(path: Path) -> None:
    """Create DATA_DIR with mode 0700 if it does not exist. An existing directory is the
    operator's and keeps its mode (``--data-dir /tmp`` must not lock others out of /tmp);
    a warning says when group or others may enter it. The secrets inside are 0600 and the
    directories the server creates 0700 either way."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "the data directory %s has mode %04o: group or others may enter it; its "
                "secrets are 0600 and its subdirectories 0700, but `chmod 700 %s` is safer",
                path,
                mode,
                path,
            )
    else:
        os.chmod(path, 0o700)  # whatever the umask


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
