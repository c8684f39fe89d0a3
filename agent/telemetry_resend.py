"""When the telemetry sender sends queued records again: no I/O, the clock passed in.

A record leaves the device's queue only when the fleet's storage receipt names it
(``contracts.mqtt.Receipt``); the broker's PUBACK only means "sent". The queue hands out
records oldest first by sequence number (``agent/telemetry_queue.py``), so what is in
flight is one number: every queued record at or below :attr:`ResendSchedule.cursor` was
sent and awaits its receipt. When the oldest of them has waited ``timeout_s`` (counted from
its PUBACK, so receipts for newer records never put off the resend of one lost on the
way), the cursor goes back to the start and everything still queued is sent again, oldest
first; each such round doubles the timeout, up to ``max_timeout_s``, and any receipt
brings it back to ``timeout_s``. The fleet stores each record id once and names a
duplicate in its receipt again, so a resend costs bandwidth, never a record twice.

The schedule lives in memory on purpose: after a restart the cursor is 0, and every record
not yet receipted is sent again at once (a crash at any point resends, never loses).
"""

from __future__ import annotations

import collections

__all__ = ["ResendSchedule"]


class ResendSchedule:
    """The in-flight cursor and the batches awaiting receipts of one sender (not
    thread-safe: the sender holds its lock around every call)."""

    def __init__(self, timeout_s: float, max_timeout_s: float) -> None:
        if not 0 < timeout_s <= max_timeout_s:
            raise ValueError(
                f"need 0 < timeout_s <= max_timeout_s, got {timeout_s} and {max_timeout_s}"
            )
        self.base_timeout_s = timeout_s
        self.max_timeout_s = max_timeout_s
        self.timeout_s = timeout_s
        """The wait for a receipt in this round."""
        self.cursor = 0
        """The highest sequence number sent since the last round began; 0: none."""
        self._batches: collections.deque[tuple[int, float]] = collections.deque()
        """``(last sequence number, when its PUBACK came)`` of each batch sent this round."""

    def sent(self, last_seq: int, now: float) -> None:
        """A batch up to ``last_seq`` reached the broker (its PUBACK accepted it)."""
        self.cursor = max(self.cursor, last_seq)
        self._batches.append((last_seq, now))

    def receipted(self) -> None:
        """A receipt came: the fleet is storing; the next round waits ``timeout_s`` again."""
        self.timeout_s = self.base_timeout_s

    def due(self, now: float, oldest_seq: int | None) -> bool:
        """Whether the oldest record still queued (``oldest_seq``; ``None``: the queue is
        empty) was sent ``timeout_s`` ago or more without a receipt naming it. Receipts for
        later records do not put it off: a record lost on the way is sent again however
        busy the device is."""
        while self._batches and (oldest_seq is None or self._batches[0][0] < oldest_seq):
            self._batches.popleft()
        return bool(self._batches) and now >= self._batches[0][1] + self.timeout_s

    def resend(self) -> None:
        """Start a round: everything queued goes again, with a doubled (bounded) timeout."""
        self.cursor = 0
        self._batches.clear()
        self.timeout_s = min(self.timeout_s * 2, self.max_timeout_s)
