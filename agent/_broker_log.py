"""What the agent says about its link to the broker: an outage once when it begins, each
failed attempt at most once a minute while it lasts, and once when it ends. paho retries
silently; without this a device whose broker moved or died logs nothing for good."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["ConnectionLog"]

log = logging.getLogger(__name__)


class ConnectionLog:
    """Log lines about the connection to ``where`` (``host:port``), rate-limited to one
    per ``every_s`` while the broker stays out of reach."""

    def __init__(
        self, where: str, *, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._where = where
        self._every_s = every_s
        self._clock = clock
        self._down_since: float | None = None
        self._failures = 0
        self._last_line = 0.0

    def lost(self, reason: str) -> None:
        """The connection dropped."""
        if self._down_since is not None:
            return
        self._down_since = self._clock()
        log.warning(
            "lost the connection to the broker at %s (%s); reconnecting with backoff",
            self._where,
            reason,
        )

    def failed(self, error: str, *, level: int = logging.WARNING) -> None:
        """A connection attempt failed: logged if it is the outage's first, or the last line
        is ``every_s`` old."""
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        self._failures += 1
        if self._failures > 1 and now - self._last_line < self._every_s:
            return
        self._last_line = now
        log.log(
            level,
            "cannot reach the broker at %s: %s (failed attempt %d, out of reach for %.0f s); "
            "retrying with backoff, reported again at most every %.0f s",
            self._where,
            error,
            self._failures,
            now - self._down_since,
            self._every_s,
        )

    def connected(self) -> None:
        """The broker accepted the connection."""
        if self._down_since is None:
            log.info("connected to the broker at %s", self._where)
            return
        log.warning(
            "connected to the broker at %s again after %.1f s out of reach and %d failed "
            "attempt(s)",
            self._where,
            self._clock() - self._down_since,
            self._failures,
        )
        self._down_since = None
        self._failures = 0
