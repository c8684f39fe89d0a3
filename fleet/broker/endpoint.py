"""Where a broker is and as whom to connect (:class:`MqttEndpoint`), and the address
devices are told (:func:`advertised_host`, :func:`public_endpoint`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "MqttEndpoint",
    "advertised_host",
    "is_loopback",
    "is_wildcard",
    "local_host",
    "public_endpoint",
]

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


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


def public_endpoint(url: str) -> MqttEndpoint:
    """``mqtt[s]://HOST[:PORT]``, the broker's address as devices are told it: no
    credentials and no files, which are each device's own."""
    endpoint = MqttEndpoint.from_url(url)
    parts = urlsplit(url)
    if parts.username is not None or parts.query or parts.path not in ("", "/"):
        raise ValueError(
            f"the devices' MQTT address {url!r} must be just mqtt(s)://HOST:PORT: each device "
            "gets its own credentials and the fleet's CA at enrollment"
        )
    return endpoint


def advertised_host(*, public_url: str | None, listen_host: str, http_host: str) -> str:
    """The host devices are told to reach the broker at, when no ``mqtt_public_url`` says:
    the host of the fleet's public URL; else the broker's listen address; else, when that
    is a wildcard (``0.0.0.0``, ``::``), the HTTP listen address."""
    if public_url:
        host = urlsplit(public_url).hostname
        if not host:
            raise ValueError(f"the fleet's public URL {public_url!r} has no host")
        return host
    return http_host if is_wildcard(listen_host) else listen_host


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; any other name counts as the network."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_wildcard(host: str) -> bool:
    """Every interface: ``0.0.0.0``, ``::`` (or the empty host)."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def local_host(listen_host: str) -> str:
    """Where a client on this machine reaches a listener on ``listen_host``."""
    if not is_wildcard(listen_host):
        return listen_host
    return "::1" if ":" in listen_host else "127.0.0.1"
