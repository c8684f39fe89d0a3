"""One fleet server: the database, the broker, the OTA repository and the loops around them.

``FleetServer.start()`` brings everything up in dependency order (database and its
migrations, signing keys and repository, certificate authority, broker, MQTT bridge,
rollout engine); ``stop()`` takes it down in reverse. The FastAPI app (``fleet.app``)
holds one and calls these from its lifespan.

The embedded broker runs under a :class:`~fleet.broker.BrokerSupervisor`: when mosquitto
dies, readiness answers 503 (:meth:`FleetServer.not_ready`), every device is marked
offline (their Last Wills died with the broker) and mosquitto is restarted on the same
port from the database; devices come back online as they reconnect.

Several servers (replicas, ``replica_id``) may share one database and one external broker
(docs/scale.md): each serves the API and takes its share of the devices' messages; the one
holding the rollout lease drives rollouts (:mod:`fleet.rollouts.lease`) and takes over the
MQTT sessions of replicas that died (:func:`fleet.bridge.drain_session`).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from contracts.durable import write_atomic
from ota.keys import KeyStore
from ota.repository import ExpiryPolicy, OtaRepository

from . import registry
from .bridge import MqttBridge, drain_session
from .broker import (
    BrokerSupervisor,
    DeviceCredential,
    MosquittoBroker,
    MqttEndpoint,
    ServiceAccount,
    hash_password,
)
from .broker.access import AccountKind
from .broker.credential import (
    BrokerCredential,
    ingest_username,
    replica_admin_username,
    replica_username,
)
from .broker.endpoint import advertised_host, is_loopback, is_wildcard, public_endpoint
from .broker.remote import DeviceAccounts, RemoteAccounts
from .ca import FleetCA
from .config import DEFAULT_REPLICA_ID, FleetSettings
from .db import make_engine, session_scope
from .devices import broker_credentials, set_all_offline
from .drift_alerts import DriftWatch
from .errors import StartupError
from .inference import CloudModel, CloudModels
from .ingest_workers import (
    IngestWorkers,
    IngestWorkerSpec,
    drain_ingest_sessions,
    record_ingest_workers,
    recorded_ingest_workers,
)
from .metrics import FleetMetrics
from .migrate import upgrade
from .models import ApiToken, Device, Role, Rollout, RolloutState
from .rollouts import RolloutEngine
from .rollouts.lease import LeaseKeeper, LeaseRole
from .tokens import issue_api_token

__all__ = [
    "ADMIN_TOKEN_FILE",
    "FLEET_MQTT_USER",
    "FleetServer",
    "fleet_mqtt_user",
    "prepare_data_dir",
]

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"


def fleet_mqtt_user(replica_id: str) -> str:
    """Replica ``replica_id``'s MQTT client id, and its account on the embedded broker."""
    return replica_username(replica_id)


FLEET_MQTT_USER = fleet_mqtt_user(DEFAULT_REPLICA_ID)
"""The default replica's."""
_BRIDGE_SETTLE_S = 0.1
"""For paho to read what the dead broker had sent before it died."""
_BRIDGE_DRAIN_S = 2.0
"""The most the fleet waits for the bridge to store that before marking devices offline."""
_ADMIN_CONNECT_S = 15.0
"""How long a replica waits for a standalone broker to take its admin account (the broker
adds it within a second of the replica's row appearing in the database)."""


class FleetServer:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.metrics = FleetMetrics()
        self.cloud_models = CloudModels()
        self.db: Engine
        self.background_db: Engine
        """The rollout engine's, the lease's and the bridge's: on PostgreSQL a transaction of
        theirs idle for the lease time is ended by the server, so a replica stalled in the
        middle of one (paused, frozen) does not hold the rows another replica needs; the
        API's transactions may wait longer (a bundle upload streams between statements)."""
        self.repository: OtaRepository
        self.ca: FleetCA | None = None
        self.broker: MosquittoBroker | None = None
        self.supervisor: BrokerSupervisor | None = None
        self.accounts: DeviceAccounts | None = None
        """Where enrollments and revocations change the broker's accounts: the embedded
        broker, a standalone one's plugin, or ``None`` (the broker asks the fleet, or its
        accounts are its operator's)."""
        self.credential: BrokerCredential | None = None
        self.broker_auth_secret: str | None = None
        self.mqtt: MqttEndpoint
        self._device_mqtt: MqttEndpoint
        self._remote: RemoteAccounts | None = None
        self.lease: LeaseKeeper
        self.bridge: MqttBridge
        self.rollouts: RolloutEngine
        self.drift_watch: DriftWatch
        self.ingest: IngestWorkers | None = None
        """``--ingest-workers``: the processes storing telemetry beside the bridge."""
        self._recorded_workers = 0
        """The ingest worker count this replica's row held at start (a previous start's)."""
        self._draining: dict[str, float] = {}
        """Replicas whose session is being (or was, without success) taken over: when to
        try again."""
        self._draining_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        prepare_data_dir(settings.data_dir)
        for directory in (settings.ota_dir, settings.ota_keys_dir):
            _private_dir(directory)
        if settings.mqtt_credential_file is not None:
            self.credential = BrokerCredential.load(settings.mqtt_credential_file)
        if settings.broker_auth_secret_file is not None:
            self.broker_auth_secret = _read_secret(settings.broker_auth_secret_file)
        if settings.ingest_workers and self.credential and self.credential.admin_password:
            raise StartupError(
                "--ingest-workers is not supported with a standalone mosquitto (`fleet "
                "broker`), which makes accounts for replicas only: run more replicas instead"
            )
        self.db = make_engine(settings.db_url)
        upgrade(self.db)
        self.background_db = make_engine(
            settings.db_url, idle_in_transaction_s=settings.rollout_lease_s
        )
        self._bootstrap_admin_token()
        self.repository = self._open_repository()
        if settings.mqtt_tls and settings.mqtt_url is None:
            self.ca = FleetCA.load_or_create(settings.ca_dir)
        # Workers a previous start ran beyond this one's count stay recorded until their
        # sessions are emptied (_drain_retired_workers), for whoever drains this replica.
        self._recorded_workers = recorded_ingest_workers(self.background_db, settings.replica_id)
        self.lease = LeaseKeeper(
            self.background_db,
            settings.replica_id,
            lease_s=settings.rollout_lease_s,
            ready=self._connected,
            on_change=self._lease_changed,
            on_orphans=self._take_over_sessions,
            ingest_workers=max(settings.ingest_workers, self._recorded_workers),
        )
        self.lease.register()  # first: a standalone broker makes its accounts from its row
        self.mqtt = self._start_broker()
        self.bridge = MqttBridge(
            self.mqtt,
            self.background_db,
            self.metrics,
            on_final_ack=self._wake,
            on_online=self._resend_to,
            client_id=fleet_mqtt_user(settings.replica_id),
            session_expiry_s=settings.mqtt_session_expiry_s,
        )
        self.bridge.start()
        if self._recorded_workers > settings.ingest_workers:  # off the start: it may take long
            threading.Thread(
                target=self._drain_retired_workers, name="drain-retired-workers", daemon=True
            ).start()
        if settings.ingest_workers:
            self.ingest = IngestWorkers(self._ingest_specs(), self.metrics)
            self.ingest.start()
        self.rollouts = RolloutEngine(  # it resends unfinished commands once connected
            self.background_db,
            self.bridge.send_encoded,
            link=self.bridge.link,
            metadata_url=f"{settings.base_url}/ota/metadata/",
            targets_url=f"{settings.base_url}/ota/targets/",
            tick_s=settings.rollout_tick_s,
            health_window_s=settings.health_window_s,
            max_step_failures=settings.rollout_max_step_failures,
            settle_s=settings.mqtt_settle_s,
            command_ttl_s=settings.command_ttl_s,
            lease=self.lease,
            actor=f"fleet:{settings.replica_id}",
        )
        self.rollouts.start()
        self.lease.start()
        self.drift_watch = DriftWatch(
            self.background_db,
            self.metrics,
            thresholds=settings.drift_thresholds,
            window_s=settings.drift_window_s,
            check_s=settings.drift_check_s,
            webhook_url=settings.drift_webhook_url,
            webhook_timeout_s=settings.drift_webhook_timeout_s,
            actor=f"fleet:{settings.replica_id}",
        )
        self.drift_watch.start()

    def stop(self) -> None:
        for stop in (
            getattr(self, "drift_watch", None) and self.drift_watch.stop,
            getattr(self, "rollouts", None) and self.rollouts.stop,
            getattr(self, "lease", None) and self.lease.stop,
            self.ingest and self.ingest.stop,
            getattr(self, "bridge", None) and self.bridge.stop,
            self._remote and self._remote.close,
            self.supervisor and self.supervisor.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception:  # keep stopping the rest
                    log.exception("error while stopping the fleet server")
        for engine in (getattr(self, "background_db", None), getattr(self, "db", None)):
            if engine is not None:
                engine.dispose()

    def _wake(self) -> None:
        self.rollouts.wake()

    def _resend_to(self, device_ids: list[str]) -> None:
        if rollouts := getattr(self, "rollouts", None):  # devices may beat the engine's start
            rollouts.resend_unfinished(device_ids)

    def _connected(self) -> bool:
        """Whether this replica can drive rollouts: its bridge is connected to the broker."""
        bridge = getattr(self, "bridge", None)
        return bridge is not None and bridge.link() is not None

    def _lease_changed(self, role: LeaseRole) -> None:
        self.metrics.rollout_leader.set(1 if role is LeaseRole.LEADER else 0)
        if role is LeaseRole.LEADER and (rollouts := getattr(self, "rollouts", None)):
            rollouts.wake()

    def _take_over_sessions(self, replicas: list[str]) -> None:
        """The lease holder's news: these replicas' heartbeats stopped. Their MQTT sessions
        hold their share of what devices sent since; take each over, store it, leave it
        unsubscribed (one thread each; a failure is tried again a lease later)."""
        now = time.monotonic()
        with self._draining_lock:
            due = [r for r in replicas if self._draining.get(r, 0.0) <= now]
            for replica in due:
                self._draining[replica] = float("inf")
        for replica in due:
            if self.credential is None or getattr(self, "bridge", None) is None:
                log.warning(
                    "replica %s stopped beating; its MQTT session keeps its share of the "
                    "devices' messages until it comes back (this replica cannot take it over "
                    "without the shared --mqtt-credential-file)",
                    replica,
                )
                with self._draining_lock:  # said once an hour at most
                    self._draining[replica] = time.monotonic() + 3600.0
                continue
            threading.Thread(
                target=self._drain, args=(replica,), name=f"drain-{replica}", daemon=True
            ).start()

    def _drain(self, replica: str) -> None:
        """A thread per dead replica: whatever fails is logged and tried a lease later."""
        try:
            done = self._drain_sessions(replica)
        except Exception:
            log.exception("could not take over replica %s's MQTT session", replica)
            done = False
        self._drained(replica, done=done, retry_s=self.settings.rollout_lease_s)

    def _drain_sessions(self, replica: str) -> bool:
        if self.credential is None:
            raise RuntimeError("taking over a session needs the shared broker credential")
        username = replica_username(replica)
        log.warning("replica %s stopped beating: taking over its MQTT session", replica)
        done = drain_session(
            replace(self.mqtt, username=username, password=self.credential.fleet_password),
            self.background_db,
            self.metrics,
            client_id=username,
            session_expiry_s=self.settings.mqtt_session_expiry_s,
            on_final_ack=self._wake,
            on_online=self._resend_to,
        )
        if done and self.credential.admin_password is None:  # a standalone broker has
            done = drain_ingest_sessions(  # no accounts for workers: none ran there
                replace(self.mqtt, password=self.credential.fleet_password),
                self.background_db,
                self.metrics,
                replica_id=replica,
                session_expiry_s=self.settings.mqtt_session_expiry_s,
            )
        return done

    def _drained(self, replica: str, *, done: bool, retry_s: float) -> None:
        if done:
            try:
                self.lease.drained(replica)
            except Exception:
                log.exception("could not record that replica %s's session was emptied", replica)
            self.metrics.sessions_drained.inc()
            log.warning("stored what replica %s's MQTT session held; left it unsubscribed", replica)
        else:
            log.info(
                "did not empty replica %s's MQTT session (it came back and took it, or the "
                "broker refused); trying again in %.0f s if it is still silent",
                replica,
                retry_s,
            )
        with self._draining_lock:
            self._draining[replica] = time.monotonic() + (0.0 if done else retry_s)

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
        settings = self.settings
        public = public_endpoint(settings.mqtt_public_url) if settings.mqtt_public_url else None
        if settings.mqtt_url is not None:
            external = MqttEndpoint.from_url(settings.mqtt_url)
            self._device_mqtt = public or MqttEndpoint(external.host, external.port, external.tls)
            if self.credential is None:
                log.info(
                    "using the external broker %s: its ACLs must follow docs/fleet.md",
                    settings.mqtt_url,
                )
                return external
            return self._attach_to_shared_broker(external, self.credential)
        device_host = public.host if public else self._advertised_host()
        password_file = settings.data_dir / "mqtt-fleet.password"
        if not password_file.exists():
            _write_secret(password_file, secrets.token_urlsafe(24))
        fleet_password = password_file.read_text().strip()
        self.broker = MosquittoBroker(
            settings.broker_dir,
            host=settings.mqtt_listen_host,
            port=settings.mqtt_port,
            ca=self.ca,
            server_names=[device_host],
        )
        self._all_offline("the broker starts afresh")
        self.supervisor = BrokerSupervisor(
            self.broker,
            fleet_username=fleet_mqtt_user(settings.replica_id),
            fleet_password=fleet_password,
            credentials=self._broker_credentials,
            accounts=lambda: [
                ServiceAccount(name, AccountKind.FLEET, hash_password(fleet_password))
                for name in self._ingest_usernames()
            ],
            on_down=self._broker_down,
            on_up=self._broker_up,
            restart_delay_s=settings.mqtt_restart_delay_s,
        )
        endpoint = self.supervisor.start()
        self.accounts = self.broker
        self.metrics.broker_up.set(1)
        self._device_mqtt = public or MqttEndpoint(device_host, endpoint.port, endpoint.tls)
        if not endpoint.tls and not is_loopback(settings.mqtt_listen_host):
            log.warning(
                "the MQTT broker listens on %s without TLS (--mqtt-allow-plaintext): device "
                "passwords and every message cross the network in clear; use --mqtt-tls on "
                "any network you do not control",
                settings.mqtt_listen_host,
            )
        return endpoint

    def _attach_to_shared_broker(
        self, broker: MqttEndpoint, credential: BrokerCredential
    ) -> MqttEndpoint:
        """This replica's account on a broker the replicas share; with a standalone
        mosquitto (an admin password in the credential), also its admin connection."""
        replica = self.settings.replica_id
        if credential.admin_password is None:
            log.info(
                "using the external broker %s, which asks this fleet who may connect and "
                "what they may do (/api/v1/broker/*; docs/scale.md)",
                broker.url,
            )
        else:
            admin = replace(
                broker,
                username=replica_admin_username(replica),
                password=credential.admin_password,
            )
            self._remote = RemoteAccounts(admin)
            self._remote.connect(_ADMIN_CONNECT_S)
            self.accounts = self._remote
            log.info(
                "using the standalone broker %s; devices are added and removed through its "
                "dynamic-security plugin as %s",
                broker.url,
                admin.username,
            )
        return replace(
            broker, username=replica_username(replica), password=credential.fleet_password
        )

    def _ingest_usernames(self) -> list[str]:
        """The workers' accounts: this start's, and those of a previous start's workers
        beyond them until their sessions are emptied."""
        workers = max(self.settings.ingest_workers, self._recorded_workers)
        return [ingest_username(self.settings.replica_id, k) for k in range(1, workers + 1)]

    def _drain_retired_workers(self) -> None:
        """A previous start that ran more workers and did not stop them (it was killed)
        left their sessions subscribed, queueing a share of telemetry: store it and leave
        them unsubscribed, then record this start's count. Not done, it is tried at the
        next start (or by the lease holder, should this replica die). A thread of its own:
        each session may take up to :func:`~fleet.bridge.drain_session`'s timeout."""
        settings = self.settings
        if settings.mqtt_url is None and settings.mqtt_tls:
            return  # its accounts are certificates now: workers cannot log in
        if settings.mqtt_url is not None and (
            self.credential is None or self.credential.admin_password is not None
        ):
            return  # no worker accounts on this broker (as FleetSettings refuses workers)
        retired = f"{settings.ingest_workers + 1} to {self._recorded_workers}"
        log.warning("emptying the MQTT sessions of ingest workers %s of a previous start", retired)
        try:
            drained = drain_ingest_sessions(
                self.mqtt,
                self.background_db,
                self.metrics,
                replica_id=settings.replica_id,
                session_expiry_s=settings.mqtt_session_expiry_s,
                beyond=settings.ingest_workers,
            )
            if drained:
                record_ingest_workers(
                    self.background_db, settings.replica_id, settings.ingest_workers
                )
        except Exception:  # a thread of its own: the log says it, the next start tries again
            log.exception("could not empty the MQTT sessions of ingest workers %s", retired)
            return
        if drained:
            self._recorded_workers = settings.ingest_workers
        else:
            log.error(
                "could not empty the MQTT sessions of ingest workers %s of a previous start: "
                "they keep a share of telemetry until they expire; tried again at the next start",
                retired,
            )

    def _ingest_specs(self) -> list[IngestWorkerSpec]:
        """Each worker logs in with the replica's password as its own account (the
        embedded broker's from ``_start_broker``; one an HTTP-auth broker asks the fleet
        about, ``edgefleet-fleet-...``, with the shared credential)."""
        return [
            IngestWorkerSpec(
                index=k,
                endpoint=replace(self.mqtt, username=ingest_username(self.settings.replica_id, k)),
                db_url=self.settings.db_url,
                session_expiry_s=self.settings.mqtt_session_expiry_s,
                idle_in_transaction_s=self.settings.rollout_lease_s,
            )
            for k in range(1, self.settings.ingest_workers + 1)
        ]

    def _advertised_host(self) -> str:
        settings = self.settings
        host = advertised_host(
            public_url=settings.public_url,
            listen_host=settings.mqtt_listen_host,
            http_host=settings.host,
        )
        if is_wildcard(host):
            log.warning(
                "devices are told to reach the broker at %s, which only works on this "
                "machine: pass --public-url (or --mqtt-public-url) with a name they can reach",
                host,
            )
        return host

    def _broker_credentials(self) -> list[DeviceCredential]:
        with Session(self.db) as session:
            return broker_credentials(session)  # bad rows are logged and left out

    def _all_offline(self, why: str) -> None:
        with session_scope(self.db) as session:
            count = set_all_offline(session)
        if count:
            log.info("%s: %d devices are offline until they reconnect", why, count)

    def _broker_down(self, _problem: str) -> None:
        self.metrics.broker_up.set(0)
        # what the bridge received before the broker died is stored first, so a status
        # stored late cannot mark a device online again
        bridge = getattr(self, "bridge", None)
        time.sleep(_BRIDGE_SETTLE_S)
        deadline = time.monotonic() + _BRIDGE_DRAIN_S
        while bridge is not None and bridge.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._all_offline("the MQTT broker is down")

    def _broker_up(self) -> None:
        self.metrics.broker_up.set(1)
        self.metrics.broker_restarts.inc()

    # --- used by the API ------------------------------------------------------------------

    @property
    def device_mqtt(self) -> MqttEndpoint:
        """The broker as devices reach it: ``mqtt_public_url``, else the fleet's public
        host with the broker's port and scheme (no credentials: each device has its own)."""
        return self._device_mqtt

    def not_ready(self) -> str | None:
        """Why the server cannot do its job now (readiness answers 503), or ``None``."""
        if self.supervisor is not None and not self.supervisor.up:
            return "the embedded MQTT broker is down; it is being restarted"
        return None

    def addresses(self) -> list[str]:
        """Where the server listens and what devices are told, one line each."""
        settings = self.settings
        http = f"http://{settings.host}:{settings.port}"
        if self.broker is not None:
            scheme = "mqtts" if self.mqtt.tls else "mqtt"
            mqtt = f"{scheme}://{settings.mqtt_listen_host}:{self.mqtt.port}"
        else:
            mqtt = f"{self.mqtt.url} (external)"
        return [
            f"HTTP listens on {http}; devices are told {settings.base_url}",
            f"MQTT listens on {mqtt}; devices are told {self.device_mqtt.url}",
        ]

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


def _read_secret(path: Path) -> str:
    """A secret kept alone in a file (0600, or readable by its owner's group at most)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the secret file {path}: {e}") from None
    if mode & 0o007:
        raise ValueError(f"{path} has mode {mode:04o}: others may read the secret; chmod 600")
    if len(secret) < 16:
        raise ValueError(f"{path} must hold a secret of 16 characters or more")
    return secret


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
