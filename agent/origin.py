"""The fleet's origin: where the device's API token may go, and which URLs a command may name.

A device enrolls with one fleet (``edgefleet agent enroll --fleet URL``); its origin (scheme,
host, port) is recorded in ``agent.toml`` as ``fleet_url``. The token is attached by
:class:`FleetAuth` to requests to that origin only, and the updater refuses a command whose
``metadata_url`` or ``targets_url`` names another (:func:`foreign_urls`): a forged or buggy
command can neither send the device elsewhere for its software nor make it hand its token
to someone else.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import httpx

from contracts.mqtt import Command

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
        """The origin of an ``http(s)://`` URL; ``ValueError`` for anything else."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise ValueError(f"{str(url)[:200]!r} is not a URL: {e}") from None
        default = _DEFAULT_PORTS.get(parsed.scheme)
        if default is None or not parsed.host:
            raise ValueError(f"{str(url)[:200]!r} is not an http:// or https:// URL with a host")
        return cls(parsed.scheme, parsed.host, parsed.port or default)

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


class FleetAuth(httpx.Auth):
    """``Authorization: Bearer TOKEN`` on requests to ``origin``, and on no other.

    httpx runs an ``Auth`` for the first request only; on a redirect it drops the header
    itself when the target is another origin (keeping it only for ``http://host`` →
    ``https://host``, the same host on TLS).
    """

    def __init__(self, token: str, origin: Origin) -> None:
        self._header = f"Bearer {token}"
        self.origin = origin

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin_or_none(request.url) == self.origin:
            request.headers["Authorization"] = self._header
        yield request
