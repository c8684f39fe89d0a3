"""The mosquitto child process: its configuration, its files, its start and stop, and the
changes made to it while it runs (through :class:`~fleet.broker.control.ControlClient`).

``dynamic-security.json`` is written by :meth:`MosquittoBroker.start` from the devices it
is given (each id checked by :mod:`contracts.ids` first) and then belongs to the plugin,
which rewrites it after every change. While mosquitto runs, devices are added and removed
through the plugin's MQTT API (:meth:`MosquittoBroker.add_device`,
:meth:`~MosquittoBroker.remove_device`): every command's answer is read back and an error
or a missing answer raises :class:`~fleet.errors.BrokerError`. (2.0.11's ``createClient``
takes a plaintext password and hashes it itself, so a device added at run time has its
password sent over the admin connection, once.) Removing a client kicks its
connection and refuses it from then on. In mTLS mode, removal first makes mosquitto reread
the CRL (SIGHUP; in 2.0.11 a reload leaves plugins alone, so the dynamic-security state
is untouched) so the revoked certificate cannot come back; an open TLS connection is not
re-verified by a reload, which is why the kick comes after it.

The port is chosen once: the first start takes the one given or a free one and keeps it in
``DIRECTORY/port``; every later start, in this process or the next, listens there again, so
devices never have to learn a new address. Persistence is on (``mosquitto.db`` in the
directory, saved on a clean stop and every :data:`AUTOSAVE_INTERVAL_S`); the package's
docstring says what survives which kill.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from contracts.durable import write_atomic
from contracts.ids import check_device_id
from contracts.mqtt import MAX_PAYLOAD_BYTES

from ..ca import FleetCA
from ..errors import BrokerError
from .access import AccountKind
from .control import ControlClient, NoAnswer, run_commands
from .endpoint import MqttEndpoint, is_loopback, local_host
from .security import (
    DeviceCredential,
    ServiceAccount,
    device_addition,
    hash_password,
    removal,
    security_document,
)

__all__ = [
    "AUTOSAVE_INTERVAL_S",
    "MAX_QUEUED_BYTES",
    "SYS_INTERVAL_S",
    "MosquittoBroker",
    "find_dynsec_plugin",
]

log = logging.getLogger(__name__)

AUTOSAVE_INTERVAL_S = 30
"""mosquitto saves ``mosquitto.db`` this often (and on a clean stop): what a killed
mosquitto loses is at most what changed since."""
MAX_QUEUED_BYTES = 1 << 30
"""Payload bytes of QoS 1 messages one client's session may hold beyond those in flight
while it is away or slow: devices' messages for the fleet's session while the fleet is
down or behind. The only bound: the count of messages is set past reach
(:data:`_NO_COUNT_BOUND`), so a burst of small messages is held whole. Past it mosquitto
drops what comes for that client, after the device had its PUBACK: the fleet's queue
alarm (:mod:`fleet.bridge`) fires at a quarter of it. mosquitto's own memory per message
comes on top of the payload."""
_NO_COUNT_BOUND = 2_000_000_000
"""``max_queued_messages``: no burst reaches it. Not 0 ("no maximum" in mosquitto's
manual): mosquitto 2.0.11 with 0 stops delivering QoS 1 messages to a device online
(``tests/test_fleet_broker.py`` catches it)."""
SYS_INTERVAL_S = 2
"""How often mosquitto publishes its ``$SYS`` figures, the payload bytes it holds among
them (:data:`fleet.broker.access.STORE_BYTES_TOPIC`)."""

_PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_GLOBS = (
    f"/usr/lib/*/{_PLUGIN_NAME}",  # Debian, Ubuntu: /usr/lib/x86_64-linux-gnu/
    f"/usr/lib/{_PLUGIN_NAME}",
    f"/usr/lib64/{_PLUGIN_NAME}",
    f"/usr/local/lib/{_PLUGIN_NAME}",
    f"/usr/local/lib/*/{_PLUGIN_NAME}",
    f"/opt/homebrew/lib/{_PLUGIN_NAME}",
)
_RUNNING = re.compile(r"mosquitto version \S+ running")
_LOG_ERROR = re.compile(r"^\d+: Error: .*$", re.MULTILINE)
_LOG_TAIL_LINES = 15


def find_dynsec_plugin() -> Path:
    """Where mosquitto's dynamic-security plugin is installed; ``BrokerError`` if nowhere."""
    for pattern in _PLUGIN_GLOBS:
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    raise BrokerError(
        f"mosquitto's dynamic-security plugin ({_PLUGIN_NAME}) was not found in "
        f"{', '.join(_PLUGIN_GLOBS)}: install mosquitto 2.0 with its plugin (Debian and "
        "Ubuntu: apt install mosquitto, which ships it) or pass plugin= to MosquittoBroker"
    )


class MosquittoBroker:
    """A mosquitto child process with its files in ``directory`` (made 0700).

    ``host``: the listen address (``0.0.0.0`` or ``::``: every interface; this process then
    connects over loopback). ``port``: the listen port; ``None``: the one kept in
    ``DIRECTORY/port`` by an earlier start, else a free one. Either way the port used is
    kept there and every later :meth:`start` listens on it again. ``ca`` given: an mTLS
    listener (server certificate, and the fleet's and the admin's client certificates from
    the CA, CRL checked); ``None``: plain TCP with passwords. ``server_names``: further
    names (hosts or addresses devices connect to) for the server certificate. ``plugin``:
    the dynamic-security plugin (default: :func:`find_dynsec_plugin`).
    ``control_keepalive_s``: the admin connection's keepalive; a hung mosquitto loses that
    connection within twice as long (:meth:`problem`). ``admin_username``: the account
    this process administers the plugin as (default: the fleet account's name and
    ``-admin``). ``max_queued_bytes``: each client's queue bound (:data:`MAX_QUEUED_BYTES`).
    Use it as a context manager, or call :meth:`stop`; it may be started again after a stop.
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ca: FleetCA | None = None,
        server_names: Sequence[str] = (),
        executable: str = "mosquitto",
        plugin: Path | None = None,
        start_timeout_s: float = 10.0,
        control_timeout_s: float = 5.0,
        reload_timeout_s: float = 10.0,
        control_keepalive_s: int = 30,
        admin_username: str | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._dir = Path(directory)
        self._max_queued_bytes = max_queued_bytes
        self._admin_username = admin_username
        self._host = host
        self._local = local_host(host)
        self._port = port
        self._ca = ca
        self._server_names = tuple(server_names)
        self._executable = executable
        self._plugin = plugin
        self._start_timeout_s = start_timeout_s
        self._control_timeout_s = control_timeout_s
        self._reload_timeout_s = reload_timeout_s
        self._control_keepalive_s = control_keepalive_s
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: MqttEndpoint | None = None
        self._control: ControlClient | None = None
        self._accounts: set[str] = set()
        self._reload_lock = threading.Lock()
        self._started_once = False

    # --- paths and state ------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self._dir / "mosquitto.conf"

    @property
    def security_path(self) -> Path:
        """The dynamic-security plugin's file: written at start, then the plugin's own."""
        return self._dir / "dynamic-security.json"

    @property
    def port_path(self) -> Path:
        """The port the first start chose, kept for every later one."""
        return self._dir / "port"

    @property
    def host(self) -> str:
        """The listen address."""
        return self._host

    @property
    def port(self) -> int | None:
        """The listen port; ``None`` until the first start chose it."""
        return self._port

    @property
    def endpoint(self) -> MqttEndpoint:
        """The fleet account's endpoint; ``RuntimeError`` before :meth:`start`."""
        if self._endpoint is None:
            raise RuntimeError("the broker has not been started: call start() first")
        return self._endpoint

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def problem(self) -> str | None:
        """What is wrong with the started broker, ``None`` if nothing: it has exited, or
        the admin connection (which paho keeps alive with pings) is down."""
        process, control = self._process, self._control
        if process is None or control is None:
            return "it is not running"
        if process.poll() is not None:
            return f"mosquitto (pid {process.pid}) exited with status {process.returncode}"
        if not control.ready:
            return f"mosquitto (pid {process.pid}) does not keep the fleet's admin connection"
        return None

    def log_tail(self) -> str:
        """The last lines of mosquitto's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read the log: {e})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def _pid_path(self) -> Path:
        return self._dir / "mosquitto.pid"

    def orphan_pid(self) -> int | None:
        """A mosquitto left running on this directory by a server that was killed (its
        command line names this directory's config), which :meth:`start` stops."""
        try:
            pid = int(self._pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if str(self.config_path).encode() not in cmdline or not _running(pid):
            return None
        return pid

    def planned_port(self) -> int | None:
        """The port :meth:`start` will listen on: the one given, else the one kept from an
        earlier start; ``None`` when it will choose a free one."""
        return self._port or self._kept_port()

    def _stop_orphan(self) -> None:
        """Stop a mosquitto left running on this directory by a server that was killed.

        SIGTERM: it saves its persistence file (what it queued for the fleet's session
        meanwhile included), which the new mosquitto loads.
        """
        pid = self.orphan_pid()
        if pid is None:
            return
        log.warning(
            "stopping mosquitto (pid %d) left running on %s by a fleet server that was killed; "
            "it saves what it holds, and the new one starts from that",
            pid,
            self._dir,
        )
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            log.error("mosquitto (pid %d) did not stop within 10 s of SIGTERM: killed", pid)
            os.kill(pid, signal.SIGKILL)

    def _choose_port(self) -> int:
        """The port given, else the one kept from an earlier start, else a free one; kept."""
        kept = self._kept_port()
        port = self._port or kept or _free_port(self._host)
        if kept is not None and kept != port:
            log.warning(
                "the MQTT broker moves from port %d to %d: devices told %d before cannot "
                "connect until they are told the new port (keep --mqtt-port %d, or give "
                "--mqtt-public-url the port they know)",
                kept,
                port,
                kept,
                kept,
            )
        if kept != port:
            _write_atomic(self.port_path, f"{port}\n".encode())
        self._port = port
        return port

    def _kept_port(self) -> int | None:
        try:
            text = self.port_path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BrokerError(f"cannot read the broker's port from {self.port_path}: {e}") from e
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise BrokerError(
                f"{self.port_path} holds {text[:20]!r}, not a port: write the port devices "
                "were told into it, or delete it to choose a new one"
            )
        return int(text)

    def start(
        self,
        *,
        fleet_username: str | None,
        fleet_password: str,
        devices: Iterable[DeviceCredential],
        accounts: Iterable[ServiceAccount] = (),
    ) -> MqttEndpoint:
        """Write the config and the plugin's file, start mosquitto, check that the plugin
        holds every account; the fleet's endpoint.

        ``fleet_username``: the account of this process's own bridge, whose endpoint is
        returned; ``None`` for a broker that serves only other processes' accounts (then
        the endpoint has no credentials, and the admin account is the constructor's
        ``admin_username``). ``accounts``: more service accounts, with their password
        hashes (a standalone broker's replicas). With a CA the fleet's account is a client
        certificate with CN ``fleet_username`` and ``fleet_password`` is not used.
        ``ValueError`` for a device listed twice or named like one of the fleet's own
        accounts.
        """
        if self._process is not None:
            raise RuntimeError("the broker is already started; stop() it first")
        admin_username = self._admin_username or f"{fleet_username}-admin"
        if fleet_username is not None:
            check_device_id(fleet_username)
        elif self._admin_username is None:
            raise ValueError("a broker without a fleet account needs admin_username=")
        check_device_id(admin_username)
        extra = list(accounts)
        if extra and self._ca is not None:
            raise ValueError("service accounts beyond the fleet's own need passwords, not a CA")
        own = [name for name in (fleet_username, admin_username) if name is not None]
        self._accounts = {*own, *(a.username for a in extra)}
        if len(self._accounts) != len(own) + len(extra):
            raise ValueError("a service account is listed twice")
        devices = self._checked(devices)
        plugin = self._plugin or find_dynsec_plugin()
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)
        except OSError as e:
            raise BrokerError(f"cannot create the broker directory {self._dir}: {e}") from e
        self._stop_orphan()
        port = self._choose_port()
        tls_lines: list[str] = []
        if self._ca is None:
            admin_password = secrets.token_urlsafe(24)
            endpoint = MqttEndpoint(
                self._local,
                port,
                username=fleet_username,
                password=fleet_password if fleet_username else None,
            )
            admin = MqttEndpoint(
                self._local, port, username=admin_username, password=admin_password
            )
            service = [
                ServiceAccount(
                    admin_username, AccountKind.BROKER_ADMIN, hash_password(admin_password)
                ),
                *extra,
            ]
            if fleet_username is not None:
                fleet_hash = hash_password(fleet_password)
                service.insert(0, ServiceAccount(fleet_username, AccountKind.FLEET, fleet_hash))
        else:
            if fleet_username is None:
                raise ValueError("a broker with a CA needs the fleet's own account")
            names = [self._local, *(["localhost"] if is_loopback(self._local) else [])]
            names += [n for n in self._server_names if n not in names]
            server_cert, server_key = self._ca.issue_server_certificate(names)
            endpoint, admin = (
                MqttEndpoint(
                    self._local,
                    port,
                    tls=True,
                    ca_file=self._ca.cert_path,
                    cert_file=cert,
                    key_file=key,
                )
                for cert, key in (
                    self._ca.issue_service_certificate(fleet_username),
                    self._ca.issue_service_certificate(admin_username),
                )
            )
            service = [
                ServiceAccount(fleet_username, AccountKind.FLEET, None),
                ServiceAccount(admin_username, AccountKind.BROKER_ADMIN, None),
            ]
            tls_lines = [
                f"cafile {self._ca.cert_path}",
                f"certfile {server_cert}",
                f"keyfile {server_key}",
                f"crlfile {self._ca.crl_path}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        document = security_document(service, devices)
        _write_atomic(self.security_path, json.dumps(document, indent=1).encode(), 0o600)
        _write_atomic(self.config_path, self._config(port, plugin, tls_lines).encode())

        offset = self._log_size()
        try:
            # What mosquitto says before it opens its own log (a bad config) goes there too.
            with self.log_path.open("ab") as early_log:
                self._process = subprocess.Popen(
                    [self._executable, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=early_log,
                    stderr=early_log,
                )
        except OSError as e:
            raise BrokerError(
                f"cannot run {self._executable!r}: {e}; install mosquitto 2.0 "
                "(apt install mosquitto) or pass executable="
            ) from e
        self._started_once = True
        _raise_nofile_limit(self._process.pid)
        _write_atomic(self._pid_path, str(self._process.pid).encode())
        try:
            self._wait_for_log(
                offset,
                _RUNNING.search,
                time.monotonic() + self._start_timeout_s,
                f"start listening on {self._host}:{port}",
            )
            self._control = ControlClient(
                admin, client_id=admin_username, keepalive_s=self._control_keepalive_s
            )
            self._control.connect(self._start_timeout_s)
            self._check_loaded(len(document["clients"]))
        except BrokerError:
            self.stop()
            raise
        self._endpoint = endpoint
        return endpoint

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate mosquitto (it saves its persistence file) and wait; kill if it hangs."""
        control, self._control = self._control, None
        if control is not None:
            control.close()
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._endpoint = None

    def __enter__(self) -> MosquittoBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- devices ----------------------------------------------------------------------------

    def add_device(self, device_id: str, *, password: str | None) -> None:
        """Let ``device_id`` in, with its own topics only; returns once the plugin confirmed.

        ``password``: its MQTT password (password mode); ``None`` with a CA, where its
        certificate is its identity. A stale entry of that id (one whose removal was not
        confirmed) is replaced. ``BrokerError`` if the plugin refused or did not answer in
        time; after a timeout the removal is sent behind it, so a broker that answers late
        does not keep the device.
        """
        check_device_id(device_id)
        if device_id in self._accounts:
            raise ValueError(
                f"device id {device_id!r} is one of the fleet's own broker accounts; a device "
                "cannot use it"
            )
        if (password is None) != (self._ca is not None):
            expected = "no password (its certificate is its identity)" if self._ca else "one"
            raise ValueError(f"device {device_id}: this broker takes {expected}")
        commands = device_addition(device_id, password)
        try:
            self._apply(commands, f"add device {device_id}")
        except NoAnswer:
            with contextlib.suppress(BrokerError):
                self._require_control().send(removal(device_id))
            raise

    def remove_device(self, device_id: str) -> None:
        """Cut ``device_id`` off and refuse it from now on; returns once mosquitto confirmed.

        Removing a device the broker does not hold is not an error. With a CA, mosquitto
        first rereads the CRL, so the certificate (revoked by the caller beforehand) cannot
        connect again once its connection is kicked; the client is removed even when that
        reload fails (``BrokerError`` then follows).
        """
        check_device_id(device_id)
        what = f"remove device {device_id}"
        if self._ca is None:
            self._apply(removal(device_id), what)
            return
        try:
            self._reload_crl()
        finally:
            self._apply(removal(device_id), what)

    def control(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run dynamic-security commands (the plugin's README lists them) as the broker's
        admin; their answers, in order. ``BrokerError`` if one failed or none came in time.
        """
        return self._apply(commands, "run dynamic-security commands")

    def _apply(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        return run_commands(
            self._require_control(),
            commands,
            what=what,
            timeout_s=self._control_timeout_s,
            on_timeout=lambda: self._check_running(what),
            details=lambda: f"; last lines of {self.log_path}:\n{self.log_tail()}",
        )

    def _require_control(self) -> ControlClient:
        control = self._control
        if control is None:
            if self._started_once:  # stopped, or being restarted by its supervisor
                raise BrokerError(
                    "mosquitto is not running (stopped, or being restarted): the change was "
                    "not made; try again once it is back"
                )
            raise RuntimeError("the broker has not been started: call start() first")
        self._check_running("accept a change")
        return control

    def _check_running(self, what: str) -> None:
        process = self._process
        if process is not None and process.poll() is not None:
            raise BrokerError(
                f"cannot {what}: mosquitto has exited (status {process.returncode}); "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def _check_loaded(self, expected: int) -> None:
        """That the plugin holds every account written: it skips what it cannot load."""
        (answer,) = self._apply([{"command": "listClients", "count": 1}], "list its clients")
        found = answer.get("data", {}).get("totalCount")
        if found != expected:
            raise BrokerError(
                f"mosquitto's dynamic-security plugin loaded {found} accounts from "
                f"{self.security_path}, expected {expected}; last lines of "
                f"{self.log_path}:\n{self.log_tail()}"
            )

    def _reload_crl(self) -> None:
        """SIGHUP: mosquitto rereads the CRL (and leaves the plugin's state alone); returns
        once it logged the reload, reported no error and accepts connections again."""
        with self._reload_lock:
            process = self._process
            if process is None or self._endpoint is None:
                if self._started_once:
                    raise BrokerError(
                        "mosquitto is not running (stopped, or being restarted): the CRL was "
                        "not reread; try again once it is back"
                    )
                raise RuntimeError("the broker has not been started: call start() first")
            self._check_running("reread the CRL")
            deadline = time.monotonic() + self._reload_timeout_s
            offset = self._log_size()
            process.send_signal(signal.SIGHUP)
            found = self._wait_for_log(
                offset, re.compile(r"Reloading config\.").search, deadline, "reread the CRL"
            )
            # mosquitto logs that line, then reloads within the same turn of its one event
            # loop; a connection it logs after that line was accepted after the reload.
            offset += found.end()
            port = self._endpoint.port
            try:
                with socket.create_connection((self._local, port), self._reload_timeout_s) as probe:
                    accepted = re.compile(re.escape(f":{probe.getsockname()[1]} on port {port}."))
                    after = self._wait_for_log(
                        offset, accepted.search, deadline, "accept a connection after reloading"
                    )
            except OSError as e:
                raise BrokerError(
                    f"mosquitto reloaded but refused a connection on {self._local}:{port}: {e}"
                ) from e
            with self.log_path.open("rb") as f:
                f.seek(offset)
                reloaded = f.read(after.end()).decode(errors="replace")
            if errors := _LOG_ERROR.findall(reloaded):
                raise BrokerError(
                    f"mosquitto could not reload its configuration and CRL: {errors[0]}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )

    def _checked(self, devices: Iterable[DeviceCredential]) -> list[DeviceCredential]:
        result = list(devices)
        seen: set[str] = set()
        for device in result:
            if device.device_id in seen:
                raise ValueError(f"device {device.device_id} is listed twice")
            if device.device_id in self._accounts:
                raise ValueError(
                    f"device id {device.device_id!r} is one of the fleet's own broker "
                    "accounts; a device cannot use it"
                )
            if (device.password_hash is None) != (self._ca is not None):
                expected = "no password hash" if self._ca else "a password hash"
                raise ValueError(f"device {device.device_id}: this broker takes {expected}")
            seen.add(device.device_id)
        return result

    def _config(self, port: int, plugin: Path, tls_lines: list[str]) -> str:
        lines = [
            "# Generated by edgefleet on every start; edits are overwritten.",
            # Started as root, mosquitto switches to the user named here (by default
            # "mosquitto", who could not read this 0700 directory); as anyone else it
            # ignores the option.
            *(["user root"] if os.getuid() == 0 else []),
            "per_listener_settings false",
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {self.security_path}",
            # Saved on a clean stop and every autosave_interval; loaded at start.
            "persistence true",
            f"persistence_location {self._dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            "autosave_on_changes false",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
            "connection_messages true",
            # Per client: commands queue for offline devices, and devices' messages for the
            # fleet's session while the fleet is away or slow.
            f"max_queued_messages {_NO_COUNT_BOUND}",
            f"max_queued_bytes {self._max_queued_bytes}",
            f"sys_interval {SYS_INTERVAL_S}",
            f"max_packet_size {MAX_PAYLOAD_BYTES + 65536}",
            f"listener {port} {self._host}",
            "use_username_as_clientid true",
            *tls_lines,
        ]
        return "\n".join(lines) + "\n"

    # --- the log ----------------------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_for_log(
        self,
        offset: int,
        find: Callable[[str], re.Match[str] | None],
        deadline: float,
        what: str,
    ) -> re.Match[str]:
        """Poll the log after ``offset`` until ``find`` matches; ``BrokerError`` if mosquitto
        exits or ``deadline`` passes first."""
        while True:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                found = find(f.read().decode(errors="replace"))
            if found:
                return found
            process = self._process
            if process is None or process.poll() is not None:
                status = "was stopped" if process is None else f"exited ({process.returncode})"
                raise BrokerError(
                    f"mosquitto {status} instead of being able to {what}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not {what} in time; last lines of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _raise_nofile_limit(pid: int) -> None:
    """Lift the child's open-file limit to the hard limit: one descriptor per device."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ProcessLookupError):  # it died at once: start() reports why
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    try:
        write_atomic(path, data, mode=mode)
    except OSError as e:
        raise BrokerError(f"cannot write {path}: {e}") from e
