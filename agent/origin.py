"""The fleet's origin: where the device's API token may go, and which URLs a command may name.

A device enrolls with one fleet (``edgefleet agent enroll --fleet URL``); its origin (scheme,
host, port) is recorded in ``agent.toml`` as ``fleet_url``. The token is attached by
:class:`FleetAuth` to requests to that origin only, and the updater refuses a command whose
``metadata_url`` or ``targets_url`` names another (:func:`foreign_urls`): a forged or buggy
command can neither send the device elsewhere for its software nor make it hand its token
to someone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from contracts.mqtt import Command

if TYPE_CHECKING:
    import httpx

__all__ = ["FleetAuth", "Origin", "foreign_urls"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port, as browsers compare them (``http://fleet`` is port 80)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str | httpx.URL) -> Origin:
        """The origin of an ``http(s)://`` URL; ``ValueError`` for anything else.

        Parsed with the standard library, not httpx: ``agent.config`` reads origins, and
        ``edgefleet agent install`` loads configs from a venv without the agent extra.
        """
        text = str(url)
        try:
            parsed = urlsplit(text)
            host, port = parsed.hostname, parsed.port
            host = host.encode("idna").decode("ascii") if host else None
        except (ValueError, UnicodeError) as e:
            raise ValueError(f"{text[:200]!r} is not a URL: {e}") from None
        default = _DEFAULT_PORTS.get(parsed.scheme)
        if default is None or not host:
            raise ValueError(f"{text[:200]!r} is not an http:// or https:// URL with a host")
        return cls(parsed.scheme, host, port or default)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _origin_or_none(url: str | httpx.URL) -> Origin | None:
    try:
        return Origin.of(url)
    except ValueError:
        return None


def foreign_urls(command: Command, fleet: Origin) -> str | None:
    """Why ``command`` is refused if its URLs name another origin than ``fleet``; else ``None``."""
    for field, url in (
        ("metadata_url", command.metadata_url),
        ("targets_url", command.targets_url),
    ):
        if url is None:
            continue
        named = _origin_or_none(url)
        if named != fleet:
            return (
                f"refused: the command's {field} names {named or repr(url[:200])}, but this "
                f"device enrolled with the fleet at {fleet}; nothing was downloaded. Commands "
                "must point at the fleet's own origin (check the fleet's public_url)"
            )
    return None


class FleetAuth:
    """``Authorization: Bearer TOKEN`` on requests to ``origin``, and on no other.

    An httpx function auth (``httpx.Client(auth=FleetAuth(...))``). httpx runs it for the
    first request only; on a redirect it drops the header itself when the target is another
    origin (keeping it only for ``http://host`` → ``https://host``, the same host on TLS).
    """

    def __init__(self, token: str, origin: Origin) -> None:
        self._header = f"Bearer {token}"
        self.origin = origin

    def __call__(self, request: httpx.Request) -> httpx.Request:
        if _origin_or_none(request.url) == self.origin:
            request.headers["Authorization"] = self._header
        return request
