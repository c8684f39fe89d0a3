"""A test hook: kill the updater with SIGKILL at a chosen point, to test crash recovery.

``EDGEFLEET_AGENT_CRASH_AT`` is read once, when an ``Updater`` is made; unset (as in
production) nothing happens. Its values:

- ``STATE`` or ``STATE:N``: right after the Nth save of STATE in this process (default 1),
  before the state sends its ack or acts;
- ``downloading:partial``: once half the bundle's bytes are written to the partial download;
- ``switching:switched``: right after the slot pointer moved, before the next state is saved.

SIGKILL, because it is what a power cut or the OOM killer leaves: no ``finally``, no
``atexit``, no flushed Python buffers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import httpx

__all__ = ["CRASH_AT_ENV", "CrashPoints"]

CRASH_AT_ENV = "EDGEFLEET_AGENT_CRASH_AT"
_PHASES = {("downloading", "partial"), ("switching", "switched")}
_PIECE = 16384


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints:
    """The kill point ``spec`` names (``""``: none), among the updater's ``states``."""

    def __init__(self, spec: str, states: Collection[str]) -> None:
        self.state: str | None = None
        self.nth = 1
        self.phase: str | None = None
        self._saves = 0
        self._download_length: int | None = None
        if not spec:
            return
        state, _, suffix = spec.partition(":")
        try:
            if state not in states:
                raise ValueError
            if (state, suffix) in _PHASES:
                self.phase = suffix
            elif suffix:
                self.nth = int(suffix)
                if self.nth < 1:
                    raise ValueError
        except ValueError:
            raise ValueError(
                f"{CRASH_AT_ENV}={spec!r}: expected STATE, STATE:N (N from 1), "
                f"downloading:partial or switching:switched, with STATE one of "
                f"{', '.join(states)}"
            ) from None
        self.state = state

    def saved(self, state: str) -> None:
        """The updater saved ``state``."""
        if self.phase is None and state == self.state:
            self._saves += 1
            if self._saves == self.nth:
                _kill_self()

    def switched(self) -> None:
        """The updater moved the slot pointer."""
        if self.phase == "switched":
            _kill_self()

    def install(self, http: httpx.Client) -> None:
        """Watch ``http``'s responses, to kill in the middle of a bundle download."""
        if self.phase == "partial":
            http.event_hooks["response"].append(self._on_response)

    @contextmanager
    def downloading(self, length: int) -> Iterator[None]:
        """Responses within this block are the download of a bundle of ``length`` bytes."""
        self._download_length = length
        try:
            yield
        finally:
            self._download_length = None

    def _on_response(self, response: httpx.Response) -> None:
        if self._download_length is not None and isinstance(response.stream, httpx.SyncByteStream):
            response.stream = _KillAfter(response.stream, self._download_length // 2)


class _KillAfter(httpx.SyncByteStream):
    """A response body that kills the process once ``limit`` bytes were consumed.

    It hands out pieces of 16 KiB, above the file buffer, so each one goes straight to the
    file, and the consumer asks for the next piece only after writing the last one: at the
    kill, the partial download holds every byte counted.
    """

    def __init__(self, inner: httpx.SyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    def __iter__(self) -> Iterator[bytes]:
        consumed = 0
        for chunk in self._inner:
            for start in range(0, len(chunk), _PIECE):
                piece = chunk[start : start + _PIECE]
                yield piece
                consumed += len(piece)
                if consumed >= self._limit:
                    _kill_self()

    def close(self) -> None:
        self._inner.close()
