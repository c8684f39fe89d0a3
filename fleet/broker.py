"""Run mosquitto (2.0) for the fleet: generated config, password file and ACL, live reloads.

Two modes. Without a CA, devices and the fleet log in with a username and password (the
password file holds mosquitto's ``$7$`` PBKDF2 hashes). With a :class:`~fleet.ca.FleetCA`,
the listener is mTLS only: every client shows a certificate from the CA, its CN is its
username (``use_identity_as_username``) and the CA's CRL is checked on each connection.

The ACL gives the fleet account ``edgefleet/v1/#`` and each enrolled device its own four
topics (read ``cmd``; write ``ack``, ``status``, ``telemetry``), as explicit ``user`` blocks
rather than ``pattern ... %u`` lines: on a reload mosquitto drops every client's ACL and
looks its username up again, so a device left out of the file has no access at all even
while still connected; a ``pattern`` would keep matching any username it still holds.

What mosquitto 2.0.11 does on SIGHUP (read from its source, checked by
``tests/test_fleet_broker.py``):

* password mode: clients whose username is no longer in the password file (or whose
  password changed) are disconnected; their reconnection is refused.
* mTLS mode: the CRL is reread and a revoked certificate is refused at the next handshake,
  but an *existing* TLS connection is not re-verified and stays open. It can do nothing:
  its username is absent from the ACL, so every publish is refused and nothing is delivered
  to it. Once it disconnects, the CRL keeps it out.
* Subscriptions are not checked against ``acl_file`` at SUBSCRIBE time (the SUBACK grants
  them; ``security_default.c`` has a FIXME); each message is checked against the
  subscriber's read rules when it is delivered, by its real topic. That is also why the
  fleet's ``$share/fleet/edgefleet/v1/...`` subscriptions need no ACL line of their own:
  ``topic readwrite edgefleet/v1/#`` covers every message they deliver.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from contracts.durable import write_atomic
from contracts.ids import check_device_id
from contracts.mqtt import MAX_PAYLOAD_BYTES, device_topic

from .ca import FleetCA
from .errors import BrokerError

__all__ = ["DeviceCredential", "MosquittoBroker", "MqttEndpoint", "hash_password"]

_SALT_BYTES = 12
_HASH_BYTES = 64
_PASSWORD_HASH = re.compile(r"^\$(6|7\$[1-9][0-9]*)\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}$")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_RUNNING = re.compile(r"mosquitto version \S+ running")
_LOG_TAIL_LINES = 15


def hash_password(password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.0 password-file hash: ``$7$ITERATIONS$SALT$HASH`` (PBKDF2-HMAC-SHA512).

    101 iterations is ``mosquitto_passwd``'s default; mosquitto hashes each CONNECT's
    password again, so more iterations cost broker CPU per connection.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass(frozen=True)
class DeviceCredential:
    device_id: str
    password_hash: str | None
    """``None``: this device connects with a client certificate only."""

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if self.password_hash is not None and not _PASSWORD_HASH.fullmatch(self.password_hash):
            raise ValueError(
                f"the password hash of {self.device_id} is not a mosquitto $6$/$7$ hash: "
                "make it with hash_password()"
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


class MosquittoBroker:
    """A mosquitto child process with its files in ``directory`` (made 0700).

    ``ca`` given: an mTLS listener (server certificate and the fleet's own client
    certificate from the CA, CRL checked); ``None``: plain TCP with passwords. Use it as
    a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ca: FleetCA | None = None,
        executable: str = "mosquitto",
        start_timeout_s: float = 10.0,
        reload_timeout_s: float = 10.0,
    ) -> None:
        self._dir = Path(directory)
        self._host = host
        self._port = port
        self._ca = ca
        self._executable = executable
        self._start_timeout_s = start_timeout_s
        self._reload_timeout_s = reload_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: MqttEndpoint | None = None
        self._fleet_username = ""
        self._fleet_password_hash: str | None = None
        self._lock = threading.Lock()

    # --- paths and state ------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self._dir / "mosquitto.conf"

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
        """Write the config, start mosquitto, wait until it listens; the fleet's endpoint.

        With a CA the fleet's account is a client certificate with CN ``fleet_username``
        and ``fleet_password`` is not used.
        """
        if self._process is not None:
            raise RuntimeError("the broker is already started; stop() it first")
        check_device_id(fleet_username)
        self._fleet_username = fleet_username
        devices = self._checked(devices)
        port = self._port or _free_port(self._host)
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)
        except OSError as e:
            raise BrokerError(f"cannot create the broker directory {self._dir}: {e}") from e
        tls_lines: list[str] = []
        if self._ca is None:
            self._fleet_password_hash = hash_password(fleet_password)
            endpoint = MqttEndpoint(
                self._host, port, username=fleet_username, password=fleet_password
            )
        else:
            names = [self._host, *(["localhost"] if _is_loopback(self._host) else [])]
            server_cert, server_key = self._ca.issue_server_certificate(names)
            cert, key = self._ca.issue_service_certificate(fleet_username)
            endpoint = MqttEndpoint(
                self._host,
                port,
                tls=True,
                ca_file=self._ca.cert_path,
                cert_file=cert,
                key_file=key,
            )
            tls_lines = [
                f"cafile {self._ca.cert_path}",
                f"certfile {server_cert}",
                f"keyfile {server_key}",
                f"crlfile {self._ca.crl_path}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        self._write_security_files(devices)
        _write_atomic(self.config_path, self._config(port, tls_lines).encode())
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
        except BrokerError:
            self.stop()
            raise
        self._endpoint = endpoint
        return endpoint

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate mosquitto (it saves its persistence file) and wait; kill if it hangs."""
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

    def set_devices(self, devices: Iterable[DeviceCredential]) -> None:
        """Make ``devices`` the enrolled set; returns once mosquitto has reloaded.

        A device left out loses all access at once and cannot reconnect (see the module
        docstring for what happens to its open connection).
        """
        checked = self._checked(devices)
        with self._lock:
            process = self._process
            if process is None or self._endpoint is None:
                raise RuntimeError("the broker has not been started: call start() first")
            if process.poll() is not None:
                raise BrokerError(
                    f"mosquitto has exited (status {process.returncode}); "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            self._write_security_files(checked)
            deadline = time.monotonic() + self._reload_timeout_s
            offset = self._log_size()
            process.send_signal(signal.SIGHUP)
            found = self._wait_for_log(
                offset,
                re.compile(r"Reloading config\.").search,
                deadline,
                "reload its password and ACL files",
            )
            # mosquitto logs that line, then reloads within the same turn of its one event
            # loop; a connection it logs after that line was accepted after the reload.
            offset += found.end()
            port = self._endpoint.port
            try:
                with socket.create_connection((self._host, port), self._reload_timeout_s) as probe:
                    accepted = re.compile(re.escape(f":{probe.getsockname()[1]} on port {port}."))
                    self._wait_for_log(
                        offset, accepted.search, deadline, "accept a connection after reloading"
                    )
            except OSError as e:
                raise BrokerError(
                    f"mosquitto reloaded but refused a connection on {self._host}:{port}: {e}"
                ) from e

    def _checked(self, devices: Iterable[DeviceCredential]) -> list[DeviceCredential]:
        result = list(devices)
        seen: set[str] = set()
        for device in result:
            if device.device_id in seen:
                raise ValueError(f"device {device.device_id} is listed twice")
            if device.device_id == self._fleet_username:
                raise ValueError(
                    f"device id {device.device_id!r} is the fleet's own broker account; "
                    "a device cannot use it"
                )
            seen.add(device.device_id)
        return result

    def _write_security_files(self, devices: list[DeviceCredential]) -> None:
        if self._ca is None:
            lines = [f"{self._fleet_username}:{self._fleet_password_hash}"]
            lines += [f"{d.device_id}:{d.password_hash}" for d in devices if d.password_hash]
            _write_atomic(self._dir / "passwd", ("\n".join(lines) + "\n").encode(), 0o600)
        acl = [
            "# Generated by edgefleet; rewritten whenever the enrolled devices change.",
            f"user {self._fleet_username}",
            "topic readwrite edgefleet/v1/#",
        ]
        for d in devices:
            acl += [
                "",
                f"user {d.device_id}",
                f"topic read {device_topic(d.device_id, 'cmd')}",
                f"topic write {device_topic(d.device_id, 'ack')}",
                f"topic write {device_topic(d.device_id, 'status')}",
                f"topic write {device_topic(d.device_id, 'telemetry')}",
            ]
        _write_atomic(self._dir / "acl", ("\n".join(acl) + "\n").encode(), 0o600)

    def _config(self, port: int, tls_lines: list[str]) -> str:
        lines = [
            "# Generated by edgefleet on every start; edits are overwritten.",
            # Started as root, mosquitto switches to the user named here (by default
            # "mosquitto", who could not read this 0700 directory); as anyone else it
            # ignores the option.
            *(["user root"] if os.getuid() == 0 else []),
            "per_listener_settings false",
            "allow_anonymous false",
            *([f"password_file {self._dir / 'passwd'}"] if self._ca is None else []),
            f"acl_file {self._dir / 'acl'}",
            "persistence true",
            f"persistence_location {self._dir}/",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
            "connection_messages true",
            # Commands queue for offline devices, and telemetry bursts for the fleet.
            "max_queued_messages 100000",
            f"max_packet_size {MAX_PAYLOAD_BYTES + 65536}",
            f"listener {port} {self._host}",
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
