"""``edgefleet fleet broker``: one supervised mosquitto that several fleet replicas share.

The embedded broker belongs to one ``fleet serve``; with several replicas the broker runs
on its own, as the same :class:`~fleet.broker.MosquittoBroker` under the same
:class:`~fleet.broker.BrokerSupervisor` (its port chosen once and kept, persistence,
restarts), with its accounts written from the database the replicas share:

- every active device (as the embedded broker does);
- for every replica that ever registered (``fleetreplica``), its bridge account
  ``edgefleet-fleet-REPLICA`` and its admin account ``edgefleet-fleet-REPLICA-admin``,
  with the passwords of the credential file this command writes on its first start
  (``DATA_DIR/broker-credential.json``, 0600; :mod:`fleet.broker.credential`), which every
  replica is given (``fleet serve --mqtt-url ... --mqtt-credential-file FILE``);
- its own admin account, whose password is new at every start and lives only here.

A replica that starts registers in the database first; within ``poll_s`` this process
adds its two accounts through the plugin, so its bridge and admin connection get in
(``fleet serve`` waits for that). Devices are added and removed by the replicas
themselves, each through its own admin connection (:mod:`fleet.broker.remote`). When
mosquitto dies every device is marked offline, as the embedded broker does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from .broker import BrokerSupervisor, MosquittoBroker, MqttEndpoint, ServiceAccount
from .broker.access import AccountKind
from .broker.credential import BrokerCredential, replica_admin_username, replica_username
from .broker.security import DeviceCredential, hash_password, service_account_commands
from .db import make_engine, session_scope
from .devices import broker_credentials, set_all_offline
from .errors import BrokerError
from .migrate import upgrade
from .models import FleetReplica

__all__ = ["ADMIN_USERNAME", "CREDENTIAL_FILE", "StandaloneBroker"]

log = logging.getLogger(__name__)

CREDENTIAL_FILE = "broker-credential.json"
ADMIN_USERNAME = "edgefleet-broker-admin"
"""This process's own account for the plugin."""


class StandaloneBroker:
    """The broker process of ``edgefleet fleet broker`` (see the module's docstring)."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        restart_delay_s: float = 0.5,
        poll_s: float = 1.0,
    ) -> None:
        self.data_dir = data_dir
        self._database_url = database_url
        self._host = host
        self._port = port
        self._restart_delay_s = restart_delay_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.db: Engine
        self.credential: BrokerCredential
        self.broker: MosquittoBroker
        self.supervisor: BrokerSupervisor

    @property
    def credential_path(self) -> Path:
        return self.data_dir / CREDENTIAL_FILE

    def start(self) -> MqttEndpoint:
        """Start mosquitto under supervision; its address (no credentials)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.credential_path
        self.credential = (
            BrokerCredential.load(path) if path.exists() else BrokerCredential.create(path)
        )
        if self.credential.admin_password is None:
            raise ValueError(
                f"{path} has no admin_password: a standalone broker's replicas need one to "
                "add and remove devices; delete the file to make a new one (and hand it out "
                "again)"
            )
        self.db = make_engine(self._database_url)
        upgrade(self.db)
        self.broker = MosquittoBroker(
            self.data_dir / "mosquitto",
            host=self._host,
            port=self._port,
            admin_username=ADMIN_USERNAME,
        )
        self.supervisor = BrokerSupervisor(
            self.broker,
            fleet_username=None,
            fleet_password=self.credential.fleet_password,
            credentials=self._devices,
            accounts=self._accounts,
            on_down=self._down,
            restart_delay_s=self._restart_delay_s,
        )
        endpoint = self.supervisor.start()
        self._thread = threading.Thread(target=self._watch, name="broker-accounts", daemon=True)
        self._thread.start()
        return endpoint

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.supervisor.stop()
        self.db.dispose()

    # --- accounts ---------------------------------------------------------------------------

    def _devices(self) -> list[DeviceCredential]:
        with Session(self.db) as session:
            return broker_credentials(session)  # bad rows are logged and left out

    def _replicas(self) -> list[str]:
        with Session(self.db) as session:
            return list(session.exec(select(FleetReplica.id).order_by(col(FleetReplica.id))))

    def _accounts(self) -> list[ServiceAccount]:
        """Every registered replica's two accounts, for a (re)start of mosquitto."""
        fleet_hash = hash_password(self.credential.fleet_password)
        admin_hash = hash_password(self.credential.admin_password or "")
        accounts = []
        for replica in self._replicas():
            accounts += [
                ServiceAccount(replica_username(replica), AccountKind.FLEET, fleet_hash),
                ServiceAccount(
                    replica_admin_username(replica), AccountKind.BROKER_ADMIN, admin_hash
                ),
            ]
        return accounts

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            if not self.supervisor.up:
                continue
            try:
                self.add_new_replicas()
            except Exception as e:  # the database or the broker: next time
                log.warning("could not add new replicas' broker accounts: %s", e)

    def add_new_replicas(self) -> list[str]:
        """Add the accounts of replicas registered since mosquitto started; their ids."""
        (listed,) = self.broker.control([{"command": "listClients"}])
        present = set(listed.get("data", {}).get("clients", []))
        added = []
        for replica in self._replicas():
            commands = [
                command
                for username, kind, password in (
                    (replica_username(replica), AccountKind.FLEET, self.credential.fleet_password),
                    (
                        replica_admin_username(replica),
                        AccountKind.BROKER_ADMIN,
                        self.credential.admin_password or "",
                    ),
                )
                if username not in present
                for command in service_account_commands(username, kind, password)
            ]
            if not commands:
                continue
            try:
                self.broker.control(commands)
            except BrokerError as e:
                log.error("could not add the broker accounts of replica %s: %s", replica, e)
                continue
            log.info("added the broker accounts of replica %s", replica)
            added.append(replica)
        return added

    def _down(self, _problem: str) -> None:
        with session_scope(self.db) as session:
            count = set_all_offline(session)
        if count:
            log.info("the MQTT broker is down: %d devices are offline until they reconnect", count)
