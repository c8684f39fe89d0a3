"""Run mosquitto (2.0) for the fleet, with its dynamic-security plugin as the only authority.

Who may connect and what each client may do lives in mosquitto's **dynamic-security
plugin** (``mosquitto_dynamic_security.so``, shipped with mosquitto 2.0; this module is
written against 2.0.11, read from its ``plugins/dynamic-security/`` sources and checked by
``tests/test_fleet_broker.py`` and ``tests/test_hostile_broker.py``). There is no password
file and no ``acl_file``: mosquitto 2.0's ``acl_file`` never checks a SUBSCRIBE
(``security_default.c`` grants it, with a FIXME), so any device could subscribe to the
fleet's ``$share/fleet/...`` and take a share of every device's messages.

What the broker enforces:

* ``allow_anonymous false``; the default for every ACL type is *deny* (``publishClientSend``,
  ``publishClientReceive``, ``subscribe``), but ``unsubscribe``.
* ``use_username_as_clientid true`` on the listener: a client's id *is* its username, so a
  device that connects with another device's client id becomes itself and kicks nobody off
  (this holds for certificates too, where the plugin's own ``clientid`` binding is never
  checked). One account therefore holds one connection at a time.
* Each device is a client ``ID`` with one role ``device-ID``: it may subscribe to exactly
  ``edgefleet/v1/devices/ID/cmd`` (a literal filter; ``#``, ``+`` and ``$share/...`` are
  refused in the SUBACK, reason ``0x87 Not authorized``), receive that topic, and publish
  its own ``ack``, ``status`` and ``telemetry``; nothing else.
* The fleet's account may subscribe to exactly its three shared subscriptions
  ``$share/fleet/edgefleet/v1/devices/+/{status,ack,telemetry}`` (the plugin checks the full
  ``$share/...`` filter), receive those topics, and publish any device's ``cmd``.
* A separate admin account (``FLEET-admin``; separate so it does not take the bridge's
  connection) may only publish dynamic-security commands to ``$CONTROL/dynamic-security/v1``
  and read their answers; :class:`MosquittoBroker` holds its one connection, in this
  process. Its password is new at every start and lives only in memory.

Two modes. Without a CA, clients log in with a username and password: the plugin stores
mosquitto's PBKDF2-SHA512 hash, salt and iteration count, which are exactly the fields of
the ``$7$`` hashes the fleet keeps (:func:`hash_password`), so the file is written from
the database without any plaintext. With a :class:`~fleet.ca.FleetCA` the listener is mTLS
only: every client shows a certificate from the CA, its CN is its username
(``use_identity_as_username``; mosquitto then skips the password check) and the CA's CRL
is checked at each handshake.

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
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import ipaddress
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from contracts.durable import write_atomic
from contracts.ids import check_device_id
from contracts.mqtt import (
    MAX_PAYLOAD_BYTES,
    TOPIC_PREFIX,
    Channel,
    device_topic,
    shared_subscription,
)

from .ca import FleetCA
from .errors import BrokerError

__all__ = [
    "CONTROL_TOPIC",
    "DeviceCredential",
    "MosquittoBroker",
    "MqttEndpoint",
    "find_dynsec_plugin",
    "hash_password",
]

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
"""Where the plugin takes commands; it answers on ``CONTROL_TOPIC + "/response"``."""
_RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
_PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_GLOBS = (
    f"/usr/lib/*/{_PLUGIN_NAME}",  # Debian, Ubuntu: /usr/lib/x86_64-linux-gnu/
    f"/usr/lib/{_PLUGIN_NAME}",
    f"/usr/lib64/{_PLUGIN_NAME}",
    f"/usr/local/lib/{_PLUGIN_NAME}",
    f"/usr/local/lib/*/{_PLUGIN_NAME}",
    f"/opt/homebrew/lib/{_PLUGIN_NAME}",
)
_SALT_BYTES = 12
_HASH_BYTES = 64
_PBKDF2_HASH = re.compile(r"\$7\$([1-9][0-9]{0,8})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_RUNNING = re.compile(r"mosquitto version \S+ running")
_LOG_ERROR = re.compile(r"^\d+: Error: .*$", re.MULTILINE)
_LOG_TAIL_LINES = 15
_UPLINK: tuple[Channel, ...] = ("status", "ack", "telemetry")
"""What devices publish and the fleet reads; the fleet publishes ``cmd``."""
_FLEET_ROLE = "fleet"
_ADMIN_ROLE = "broker-admin"
_ABSENT = {"deleteClient": "Client not found", "deleteRole": "Role not found"}
"""The errors that mean "already gone": removing what is not there is not a failure."""


def hash_password(password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.0 password hash: ``$7$ITERATIONS$SALT$HASH`` (PBKDF2-HMAC-SHA512).

    101 iterations is ``mosquitto_passwd``'s default; mosquitto hashes each CONNECT's
    password again, so more iterations cost broker CPU per connection.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _dynsec_password(password_hash: str) -> dict[str, Any] | None:
    """The plugin's ``password``, ``salt`` and ``iterations`` fields of a ``$7$`` hash;
    ``None`` when it is not one the plugin can load (12-byte salt, 64-byte digest)."""
    found = _PBKDF2_HASH.fullmatch(password_hash)
    if found is None:
        return None
    iterations, salt, digest = found.groups()
    try:
        salt_ok = len(base64.b64decode(salt, validate=True)) == _SALT_BYTES
        digest_ok = len(base64.b64decode(digest, validate=True)) == _HASH_BYTES
    except ValueError:
        return None
    if not (salt_ok and digest_ok):
        return None
    return {"password": digest, "salt": salt, "iterations": int(iterations)}


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


@dataclass(frozen=True)
class DeviceCredential:
    """A device's broker identity as the database holds it: its id, and a password hash."""

    device_id: str
    password_hash: str | None
    """``None``: this device connects with a client certificate only."""

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if self.password_hash is not None and _dynsec_password(self.password_hash) is None:
            raise ValueError(
                f"the password hash of {self.device_id} is not a mosquitto $7$ PBKDF2-SHA512 "
                f"hash with a {_SALT_BYTES}-byte salt and a {_HASH_BYTES}-byte digest: make "
                "it with hash_password()"
            )


@dataclass(frozen=True)
class MqttEndpoint:
    """Where and as whom to connect: ``mqtt://user:pass@host:1883`` or ``mqtts://...``."""

    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None
    """TLS: the CA to trust; ``None``: the system's trust store."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_url(cls, url: str) -> MqttEndpoint:
        """Parse ``mqtt[s]://[user[:password]@]host[:port][?ca=PATH&cert=PATH&key=PATH]``."""
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"MQTT URL {url!r}: the scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"MQTT URL {url!r} has no host")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as e:
            raise ValueError(f"MQTT URL {url!r}: {e}") from e
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - {"ca", "cert", "key"}
        if unknown:
            raise ValueError(
                f"MQTT URL {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                "known: ca, cert, key"
            )
        tls = parts.scheme == "mqtts"
        if query and not tls:
            raise ValueError(f"MQTT URL {url!r}: ca, cert and key need mqtts://")
        if ("cert" in query) != ("key" in query):
            raise ValueError(f"MQTT URL {url!r}: give both cert= and key=, or neither")

        def path(name: str) -> Path | None:
            return Path(query[name]) if query.get(name) else None

        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            ca_file=path("ca"),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            cert_file=path("cert"),
            key_file=path("key"),
        )

    @property
    def url(self) -> str:
        """The URL without the password, for logs and messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        query = {
            k: str(v)
            for k, v in (("ca", self.ca_file), ("cert", self.cert_file), ("key", self.key_file))
            if v is not None
        }
        tail = f"?{urlencode(query, safe='/')}" if query else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{tail}"


class _ControlClient:
    """One MQTT connection as the broker's admin: commands to the dynamic-security plugin,
    each answer matched to its request by ``correlationData``.

    Commands are published at QoS 0 and only while connected and subscribed to the
    answers: a command is carried out once or not at all, never resent later by paho.
    """

    def __init__(self, endpoint: MqttEndpoint, *, client_id: str) -> None:
        self._ready = threading.Event()
        self._answers: dict[str, list[dict[str, Any]]] = {}
        self._abandoned: set[str] = set()
        self._arrived = threading.Condition()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if endpoint.username:
            client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set(
                ca_certs=str(endpoint.ca_file) if endpoint.ca_file else None,
                certfile=str(endpoint.cert_file) if endpoint.cert_file else None,
                keyfile=str(endpoint.key_file) if endpoint.key_file else None,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._client_id = client_id
        self._endpoint = endpoint

    def connect(self, timeout_s: float) -> None:
        try:
            self._client.connect(self._endpoint.host, self._endpoint.port, keepalive=30)
        except OSError as e:
            raise BrokerError(f"cannot connect to mosquitto as its admin: {e}") from e
        self._client.loop_start()
        if not self._ready.wait(timeout_s):
            raise BrokerError(
                f"mosquitto did not accept the admin account {self._client_id!r} and "
                f"its subscription to {_RESPONSE_TOPIC} within {timeout_s:.0f} s: the "
                "dynamic-security plugin did not load its configuration"
            )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def send(self, commands: list[dict[str, Any]]) -> str:
        """Publish ``commands``; the request id their answers will carry."""
        request = secrets.token_hex(8)
        tagged = [{**c, "correlationData": f"{request}:{i}"} for i, c in enumerate(commands)]
        if not self._ready.is_set():
            raise BrokerError("the admin connection to mosquitto is down; it reconnects")
        info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(
                f"cannot send to mosquitto's dynamic-security plugin: {mqtt.error_string(info.rc)}"
            )
        return request

    def answers(self, request: str, timeout_s: float) -> list[dict[str, Any]] | None:
        """The answers to ``request``, or ``None`` if none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while request not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(request)
                    return None
                self._arrived.wait(left)
            return self._answers.pop(request)

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("mosquitto refused the fleet's admin connection: %s", reason)
            return
        client.subscribe(_RESPONSE_TOPIC, qos=0)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if all(not r.is_failure for r in reasons):
            self._ready.set()
        else:
            log.error("mosquitto refused the admin's subscription to %s", _RESPONSE_TOPIC)

    def _on_disconnect(self, *_: Any) -> None:
        self._ready.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            request = str(responses[0]["correlationData"]).split(":", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning(
                "an answer from the dynamic-security plugin names no request: %r",
                message.payload[:200],
            )
            return
        with self._arrived:
            if request in self._abandoned:  # the caller gave up waiting for it
                self._abandoned.discard(request)
                return
            self._answers[request] = list(responses)
            self._arrived.notify_all()


class MosquittoBroker:
    """A mosquitto child process with its files in ``directory`` (made 0700).

    ``ca`` given: an mTLS listener (server certificate, and the fleet's and the admin's
    client certificates from the CA, CRL checked); ``None``: plain TCP with passwords.
    ``plugin``: the dynamic-security plugin (default: :func:`find_dynsec_plugin`). Use it
    as a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ca: FleetCA | None = None,
        executable: str = "mosquitto",
        plugin: Path | None = None,
        start_timeout_s: float = 10.0,
        control_timeout_s: float = 5.0,
        reload_timeout_s: float = 10.0,
    ) -> None:
        self._dir = Path(directory)
        self._host = host
        self._port = port
        self._ca = ca
        self._executable = executable
        self._plugin = plugin
        self._start_timeout_s = start_timeout_s
        self._control_timeout_s = control_timeout_s
        self._reload_timeout_s = reload_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: MqttEndpoint | None = None
        self._control: _ControlClient | None = None
        self._accounts: set[str] = set()
        self._reload_lock = threading.Lock()

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

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def _pid_path(self) -> Path:
        return self._dir / "mosquitto.pid"

    def _stop_orphan(self) -> None:
        """Stop a mosquitto left running on this directory by a server that was killed.

        Only a process whose command line names this directory's config is touched.
        """
        try:
            pid = int(self._pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() not in cmdline:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)

    def start(
        self, *, fleet_username: str, fleet_password: str, devices: Iterable[DeviceCredential]
    ) -> MqttEndpoint:
        """Write the config and the plugin's file, start mosquitto, check that the plugin
        holds every account; the fleet's endpoint.

        With a CA the fleet's account is a client certificate with CN ``fleet_username``
        and ``fleet_password`` is not used. ``ValueError`` for a device listed twice or
        named like one of the fleet's own accounts.
        """
        if self._process is not None:
            raise RuntimeError("the broker is already started; stop() it first")
        check_device_id(fleet_username)
        admin_username = check_device_id(f"{fleet_username}-admin")
        self._accounts = {fleet_username, admin_username}
        devices = self._checked(devices)
        plugin = self._plugin or find_dynsec_plugin()
        port = self._port or _free_port(self._host)
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)
        except OSError as e:
            raise BrokerError(f"cannot create the broker directory {self._dir}: {e}") from e
        tls_lines: list[str] = []
        if self._ca is None:
            admin_password = secrets.token_urlsafe(24)
            endpoint = MqttEndpoint(
                self._host, port, username=fleet_username, password=fleet_password
            )
            admin = MqttEndpoint(self._host, port, username=admin_username, password=admin_password)
            hashes: dict[str, str | None] = {
                fleet_username: hash_password(fleet_password),
                admin_username: hash_password(admin_password),
            }
        else:
            names = [self._host, *(["localhost"] if _is_loopback(self._host) else [])]
            server_cert, server_key = self._ca.issue_server_certificate(names)
            endpoint, admin = (
                MqttEndpoint(
                    self._host,
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
            hashes = {fleet_username: None, admin_username: None}
            tls_lines = [
                f"cafile {self._ca.cert_path}",
                f"certfile {server_cert}",
                f"keyfile {server_key}",
                f"crlfile {self._ca.crl_path}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        document = _security_document(fleet_username, admin_username, hashes, devices)
        _write_atomic(self.security_path, json.dumps(document, indent=1).encode(), 0o600)
        _write_atomic(self.config_path, self._config(port, plugin, tls_lines).encode())
        self._stop_orphan()

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
        _raise_nofile_limit(self._process.pid)
        _write_atomic(self._pid_path, str(self._process.pid).encode())
        try:
            self._wait_for_log(
                offset,
                _RUNNING.search,
                time.monotonic() + self._start_timeout_s,
                f"start listening on {self._host}:{port}",
            )
            self._control = _ControlClient(admin, client_id=admin_username)
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
        client: dict[str, Any] = {"command": "createClient", "username": device_id}
        if password is not None:
            client["password"] = password
        client["roles"] = [{"rolename": _device_role_name(device_id)}]
        commands = [
            *_removal(device_id),
            {"command": "createRole", **_device_role(device_id)},
            client,
        ]
        try:
            self._apply(commands, f"add device {device_id}")
        except _NoAnswer:
            with contextlib.suppress(BrokerError):
                self._require_control().send(_removal(device_id))
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
            self._apply(_removal(device_id), what)
            return
        try:
            self._reload_crl()
        finally:
            self._apply(_removal(device_id), what)

    def control(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run dynamic-security commands (the plugin's README lists them) as the broker's
        admin; their answers, in order. ``BrokerError`` if one failed or none came in time.
        """
        return self._apply(commands, "run dynamic-security commands")

    def _apply(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        control = self._require_control()
        request = control.send(commands)
        answers = control.answers(request, self._control_timeout_s)
        if answers is None:
            self._check_running(what)
            raise _NoAnswer(
                f"cannot {what}: mosquitto's dynamic-security plugin did not answer within "
                f"{self._control_timeout_s:.1f} s (is mosquitto stopped or overloaded?); it "
                "may still carry the command out when it resumes"
            )
        failed = [
            f"{a.get('command')}: {a['error']}"
            for a in answers
            if "error" in a and _ABSENT.get(str(a.get("command"))) != a["error"]
        ]
        if failed or len(answers) != len(commands):
            found = "; ".join(failed) or f"{len(answers)} answers to {len(commands)} commands"
            raise BrokerError(
                f"cannot {what}: mosquitto's dynamic-security plugin refused ({found}); "
                f"last lines of {self.log_path}:\n{self._log_tail()}"
            )
        return answers

    def _require_control(self) -> _ControlClient:
        control = self._control
        if control is None:
            raise RuntimeError("the broker has not been started: call start() first")
        self._check_running("accept a change")
        return control

    def _check_running(self, what: str) -> None:
        process = self._process
        if process is not None and process.poll() is not None:
            raise BrokerError(
                f"cannot {what}: mosquitto has exited (status {process.returncode}); "
                f"last lines of {self.log_path}:\n{self._log_tail()}"
            )

    def _check_loaded(self, expected: int) -> None:
        """That the plugin holds every account written: it skips what it cannot load."""
        (answer,) = self._apply([{"command": "listClients", "count": 1}], "list its clients")
        found = answer.get("data", {}).get("totalCount")
        if found != expected:
            raise BrokerError(
                f"mosquitto's dynamic-security plugin loaded {found} accounts from "
                f"{self.security_path}, expected {expected}; last lines of "
                f"{self.log_path}:\n{self._log_tail()}"
            )

    def _reload_crl(self) -> None:
        """SIGHUP: mosquitto rereads the CRL (and leaves the plugin's state alone); returns
        once it logged the reload, reported no error and accepts connections again."""
        with self._reload_lock:
            process = self._process
            if process is None or self._endpoint is None:
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
                with socket.create_connection((self._host, port), self._reload_timeout_s) as probe:
                    accepted = re.compile(re.escape(f":{probe.getsockname()[1]} on port {port}."))
                    after = self._wait_for_log(
                        offset, accepted.search, deadline, "accept a connection after reloading"
                    )
            except OSError as e:
                raise BrokerError(
                    f"mosquitto reloaded but refused a connection on {self._host}:{port}: {e}"
                ) from e
            with self.log_path.open("rb") as f:
                f.seek(offset)
                reloaded = f.read(after.end()).decode(errors="replace")
            if errors := _LOG_ERROR.findall(reloaded):
                raise BrokerError(
                    f"mosquitto could not reload its configuration and CRL: {errors[0]}; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
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
            "persistence true",
            f"persistence_location {self._dir}/",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
            "connection_messages true",
            # Commands queue for offline devices, and telemetry bursts for the fleet.
            "max_queued_messages 100000",
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

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read the log: {e})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

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
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not {what} in time; last lines of {self.log_path}:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.01)


class _NoAnswer(BrokerError, TimeoutError):
    """The plugin did not answer in time: the change may still happen later."""


def _device_role_name(device_id: str) -> str:
    return f"device-{device_id}"


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def _device_role(device_id: str) -> dict[str, Any]:
    """Subscribe to and receive its own ``cmd``; publish its own ``ack``, ``status`` and
    ``telemetry``."""
    cmd = device_topic(device_id, "cmd")
    return {
        "rolename": _device_role_name(device_id),
        "acls": [
            _acl("subscribeLiteral", cmd),
            _acl("publishClientReceive", cmd),
            *(_acl("publishClientSend", device_topic(device_id, c)) for c in _UPLINK),
        ],
    }


def _removal(device_id: str) -> list[dict[str, Any]]:
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": _device_role_name(device_id)},
    ]


def _client(username: str, role: str, password_hash: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"username": username, "roles": [{"rolename": role}]}
    if password_hash is not None:
        fields = _dynsec_password(password_hash)
        if fields is None:  # DeviceCredential and hash_password make only loadable ones
            raise ValueError(f"the password hash of {username} cannot be loaded by mosquitto")
        entry.update(fields)
    return entry


def _security_document(
    fleet_username: str,
    admin_username: str,
    account_hashes: Mapping[str, str | None],
    devices: list[DeviceCredential],
) -> dict[str, Any]:
    """``dynamic-security.json``: deny by default; the fleet's, the admin's and each
    device's role and client."""
    fleet_role = {
        "rolename": _FLEET_ROLE,
        "acls": [
            *(_acl("subscribeLiteral", shared_subscription(c)) for c in _UPLINK),
            *(_acl("publishClientReceive", f"{TOPIC_PREFIX}/+/{c}") for c in _UPLINK),
            _acl("publishClientSend", f"{TOPIC_PREFIX}/+/cmd"),
        ],
    }
    admin_role = {
        "rolename": _ADMIN_ROLE,
        "acls": [
            _acl("publishClientSend", CONTROL_TOPIC),
            _acl("subscribeLiteral", _RESPONSE_TOPIC),
            _acl("publishClientReceive", _RESPONSE_TOPIC),
        ],
    }
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            _client(fleet_username, _FLEET_ROLE, account_hashes[fleet_username]),
            _client(admin_username, _ADMIN_ROLE, account_hashes[admin_username]),
            *(
                _client(d.device_id, _device_role_name(d.device_id), d.password_hash)
                for d in devices
            ),
        ],
        "groups": [],
        "roles": [fleet_role, admin_role, *(_device_role(d.device_id) for d in devices)],
    }


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
