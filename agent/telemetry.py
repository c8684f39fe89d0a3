"""Telemetry on the device: per-inference outcomes summed into records, records sent in batches.

:class:`InferenceStats` takes an :class:`InferenceOutcome` from every inference (from any
thread) and, once per reporting interval, turns what it saw into
:class:`~contracts.mqtt.TelemetryRecord` s for the :class:`~agent.telemetry_queue.TelemetryQueue`.
:class:`TelemetrySender` drains that queue over MQTT: one batch at a time, QoS 1. The
broker's PUBACK only means "sent" (a PUBACK that refuses a batch, reason code 0x80 or
above, has it sent again); records are removed when the fleet's storage receipt names
them, and sent again when none comes in time (``agent/telemetry_resend.py``). So a broker
killed with a backlog it PUBACKed but had not yet delivered, a fleet lagging behind, or a
crash anywhere resends records and never loses one; the fleet stores each record id once,
so every record is stored exactly once.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from contracts.bounded import MAX_MILLISECONDS
from contracts.drift import DriftSample, ReferenceProfile, SummaryBuilder
from contracts.mqtt import (
    MAX_PAYLOAD_BYTES,
    PayloadError,
    Receipt,
    TelemetryBatch,
    TelemetryRecord,
    decode_payload,
    device_topic,
    encode_telemetry,
)

from .config import TelemetryConfig
from .errors import TelemetryQueueError
from .telemetry_queue import QueuedRecord, TelemetryQueue
from .telemetry_resend import ResendSchedule

__all__ = [
    "FALLBACK_REASONS",
    "LATENCY_BUCKETS_MS",
    "DriftObservation",
    "InferenceOutcome",
    "InferenceStats",
    "TelemetrySender",
]

log = logging.getLogger(__name__)

FALLBACK_REASONS = frozenset({"no_model", "error", "latency", "confidence"})
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Upper edges of the latency histogram in ``extra``; a last bucket holds the slower ones."""

_NO_MATCHING_SUBSCRIBERS = 0x10
"""MQTT 5 PUBACK reason code: the broker accepted the message and delivered it to nobody."""
_MAX_LATENCY_SAMPLES = 10_000
"""Latencies kept per interval for p50/p95; past this a uniform sample (reservoir) is kept."""
_ERROR_RETRY_S = 30.0
"""Pause after the queue failed (disk full...), unless woken: one log line, not one a second."""
_REFUSED_RETRY_MAX_S = 60.0
"""Longest pause before a batch the broker keeps refusing is tried again."""
_IN_FLIGHT_BATCHES = 4
"""Full batches sent and not yet receipted before the sender waits for receipts: what a
crash or a lost broker backlog costs in resends, and how far ahead of a lagging fleet a
device runs."""
_RECEIPT_TIMEOUT_MAX_S = 600.0
"""Longest wait for a storage receipt before records are sent again (the wait doubles
from ``receipt_timeout_s`` while none comes)."""
_SERVED_BY = ("local", "cloud", "none")
_BATCH_OVERHEAD = len('{"records":[]}')
_MAX_BATCH_RECORDS = TelemetryBatch.model_fields["records"].metadata[0].max_length


@dataclass(frozen=True)
class InferenceOutcome:
    """What one inference request came to, as the inference service reports it."""

    bundle: str | None
    """``NAME-VERSION`` of the local bundle that served or was tried; ``None`` without one."""
    served_by: Literal["local", "cloud", "none"]
    """Who answered: the local model, the cloud fallback, or nobody (the request failed)."""
    latency_ms: float
    """The whole request as the caller saw it, fallback included."""
    local_error: bool
    """The local runtime raised."""
    fallback_reason: str | None
    """Why the cloud was asked (one of :data:`FALLBACK_REASONS`), ``None`` if it was not."""
    predicted_class: int | None
    shadow_bundle: str | None = None
    shadow_agreed: bool | None = None
    """Whether the shadow model's class matched; ``None`` when no comparison was made."""
    drift: DriftObservation | None = field(default=None, compare=False, repr=False)
    """What the call adds to its bundle's drift summary; ``None`` when the bundle carries no
    drift reference or the call was not served. Left out of equality and ``repr`` (arrays)."""

    def __post_init__(self) -> None:
        if self.served_by not in _SERVED_BY:
            raise ValueError(f"served_by must be one of {_SERVED_BY}, got {self.served_by!r}")
        if self.fallback_reason is not None and self.fallback_reason not in FALLBACK_REASONS:
            raise ValueError(
                f"fallback_reason must be one of {sorted(FALLBACK_REASONS)} or None, "
                f"got {self.fallback_reason!r}"
            )
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency_ms must be a finite number >= 0, got {self.latency_ms}")


@dataclass(frozen=True)
class DriftObservation:
    """One served call's values for the drift summary (``contracts.drift.drift_sample``,
    copied out of its inputs and, when the local model answered, its first output), and
    the reference of the bundle they are binned against."""

    reference: ReferenceProfile
    sample: DriftSample


@dataclass
class _Tally:
    """One (bundle, shadow bundle) pair's outcomes in the current interval."""

    inferences: int = 0
    errors: int = 0
    fallbacks: int = 0
    shadow_compared: int = 0
    shadow_agreed: int = 0
    latencies: list[float] = field(default_factory=list)
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    served_by: collections.Counter[str] = field(default_factory=collections.Counter)
    fallback_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    predictions: collections.Counter[int] = field(default_factory=collections.Counter)
    drift: SummaryBuilder | None = None
    labelled: int = 0
    """Predictions given their true label this interval (agent/ground_truth.py)..."""
    correct: int = 0
    """...and how many of them were right."""


class InferenceStats:
    """Outcomes since the last :meth:`report`, per bundle. Safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str | None, str | None], _Tally] = {}
        self._random = random.Random()

    def observe(self, outcome: InferenceOutcome) -> None:
        with self._lock:
            key = (outcome.bundle, outcome.shadow_bundle)
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally()
            tally.inferences += 1
            tally.errors += outcome.local_error
            tally.served_by[outcome.served_by] += 1
            if outcome.fallback_reason is not None:
                tally.fallbacks += 1
                tally.fallback_reasons[outcome.fallback_reason] += 1
            if outcome.predicted_class is not None:
                tally.predictions[outcome.predicted_class] += 1
            if outcome.shadow_agreed is not None:
                tally.shadow_compared += 1
                tally.shadow_agreed += outcome.shadow_agreed
            if outcome.drift is not None:
                if tally.drift is None:
                    tally.drift = SummaryBuilder(outcome.drift.reference)
                local_class = outcome.predicted_class if outcome.served_by == "local" else None
                tally.drift.add_sample(outcome.drift.sample, local_class)
            # A call that hung past a day counts as a day: the record's bound, which would
            # otherwise refuse the whole interval's record.
            latency = min(outcome.latency_ms, MAX_MILLISECONDS)
            tally.histogram[bisect.bisect_left(LATENCY_BUCKETS_MS, latency)] += 1
            if len(tally.latencies) < _MAX_LATENCY_SAMPLES:
                tally.latencies.append(latency)
            else:  # reservoir sampling: each latency seen is kept with equal probability
                slot = self._random.randrange(tally.inferences)
                if slot < _MAX_LATENCY_SAMPLES:
                    tally.latencies[slot] = latency

    def observe_truth(self, bundle: str | None, correct: bool) -> None:
        """A prediction of ``bundle`` was given its true label: counted in the interval the
        label arrives in (with the bundle's inferences, shadowed or not, if it has some)."""
        with self._lock:
            key = next((k for k in self._tallies if k[0] == bundle), (bundle, None))
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally()
            tally.labelled += 1
            tally.correct += correct

    def report(self) -> list[TelemetryRecord]:
        """One record per bundle served since the last call (none if idle); then start over.

        Outcomes of different bundles (an update landed mid-interval) are never mixed into
        one record, so the fleet's health figures per bundle stay right.

        ``errors`` counts local runtime failures; ``fallbacks`` counts requests sent to the
        cloud (answered or not). ``extra`` holds ``latency_histogram_ms`` (``edges``, and
        ``counts`` with one more entry than edges: latency <= edge, the last > every edge),
        ``predictions`` (class → count), ``served_by`` and ``fallback_reasons`` (→ count),
        and, once a label arrived, ``truth``: ``{"labelled": N, "correct": M}``; for a
        bundle with a drift reference, ``drift``: its :class:`~contracts.drift.DriftSummary`
        for the interval (counts only: no input leaves the device).
        """
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        now = time.time()
        return [
            _record(bundle, shadow_bundle, tally, now)
            for (bundle, shadow_bundle), tally in tallies.items()
        ]


def _record(
    bundle: str | None, shadow_bundle: str | None, tally: _Tally, ts: float
) -> TelemetryRecord:
    latencies = sorted(tally.latencies)
    extra: dict[str, Any] = {
        "latency_histogram_ms": {"edges": list(LATENCY_BUCKETS_MS), "counts": tally.histogram},
        "predictions": {str(k): v for k, v in sorted(tally.predictions.items())},
        "served_by": dict(tally.served_by),
        "fallback_reasons": dict(tally.fallback_reasons),
    }
    if tally.labelled:
        extra["truth"] = {"labelled": tally.labelled, "correct": tally.correct}
    if tally.drift is not None:
        extra["drift"] = tally.drift.summary().to_extra()
    return TelemetryRecord(
        id=uuid.uuid4().hex,
        ts=ts,
        bundle=bundle,
        inferences=tally.inferences,
        errors=tally.errors,
        fallbacks=tally.fallbacks,
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p95_ms=_percentile(latencies, 0.95),
        shadow_bundle=shadow_bundle,
        shadow_compared=tally.shadow_compared,
        shadow_agreed=tally.shadow_agreed,
        extra=extra,
    )


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class TelemetrySender:
    """A thread that sends the queue's records to the fleet and removes what it receipted.

    ``client`` belongs to the caller, who connects it (``loop_start`` or an external
    loop) and keeps it connected, and subscribes it to :attr:`receipt_topic` (QoS 1) on
    every connect; the sender only calls ``publish`` and ``is_connected``, and adds a
    callback for that topic (``message_callback_add``) that hands each storage receipt to
    :meth:`receipt`. Records wait in the queue until a receipt names them; those sent and
    not receipted within ``receipt_timeout_s`` (doubling while none comes, up to ten
    minutes) are sent again. At most four full batches wait for receipts at once; then the
    sender waits for them. While the client is disconnected nothing is published: the sender
    waits, checking every ``retry_s`` or when :meth:`wake` is called (call it when a record
    is put and from ``on_connect``). A batch published before a disconnect stays in paho's
    session and is resent by paho on reconnect; the sender keeps waiting for its PUBACK,
    and sends the batch again only after ``ack_timeout_s`` connected without one.

    The client's ``on_publish`` must pass each PUBACK's reason code to :meth:`published`:
    a batch the broker refuses (MQTT 5 reason code 0x80 or above, such as 0x87 Not
    authorized once an ACL no longer lets the device publish) stays queued, is logged with
    the reason, and is tried again after a pause that doubles from ``retry_s`` up to a
    minute (a wake does not shorten it).
    """

    def __init__(
        self,
        queue: TelemetryQueue,
        device_id: str,
        client: mqtt.Client,
        config: TelemetryConfig,
        *,
        retry_s: float = 1.0,
        ack_timeout_s: float = 30.0,
        receipt_timeout_s: float = 30.0,
    ) -> None:
        if retry_s <= 0 or ack_timeout_s <= 0:
            raise ValueError("retry_s and ack_timeout_s must be > 0")
        self._queue = queue
        self._client = client
        self._config = config
        self._topic = device_topic(device_id, "telemetry")
        self.receipt_topic = device_topic(device_id, "receipt")
        """Where the fleet's storage receipts for this device come: subscribe to it."""
        self._resends = ResendSchedule(
            receipt_timeout_s, max(receipt_timeout_s, _RECEIPT_TIMEOUT_MAX_S)
        )
        self._batch_records = min(config.batch_records, _MAX_BATCH_RECORDS)
        self._max_in_flight = _IN_FLIGHT_BATCHES * self._batch_records
        self._retry_s = retry_s
        self._ack_timeout_s = ack_timeout_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._refusals: dict[int, ReasonCode] | None = None
        """Refusing PUBACKs by message id, while a batch waits for its own (else ``None``)."""
        self._refused_pause = 0.0
        self._held_until = 0.0
        client.message_callback_add(self.receipt_topic, self._on_receipt)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the telemetry sender is already started")
        self._thread = threading.Thread(target=self._run, name="telemetry-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the queue and the connection now rather than after ``retry_s``."""
        self._wake.set()

    def published(self, mid: int, reason_code: ReasonCode) -> None:
        """The broker answered the publish ``mid``: call from the client's ``on_publish``
        (paho's ``CallbackAPIVersion.VERSION2`` passes ``mid`` and ``reason_code``).

        A refusal (``>= 0x80``) and "no matching subscribers" (``0x10``: the fleet's
        subscription is not there, e.g. a broker restarted from its save before the fleet
        subscribed again, so nobody took the records) both keep the batch queued."""
        if reason_code.is_failure or reason_code.value == _NO_MATCHING_SUBSCRIBERS:
            with self._lock:
                if self._refusals is not None:
                    self._refusals[mid] = reason_code

    def receipt(self, payload: bytes) -> None:
        """The fleet's storage receipt: remove the records it names, stored or refused
        (those logged with its reason: the fleet will never store them)."""
        try:
            receipt = decode_payload(payload, Receipt)
        except PayloadError as e:
            log.warning("ignored a malformed storage receipt on %s: %s", self.receipt_topic, e)
            return
        removed = self._queue.remove([*receipt.stored, *receipt.refused])
        if receipt.refused:
            log.warning(
                "the fleet refused %d telemetry record(s) for good (%s); removed from the queue",
                len(receipt.refused),
                receipt.reason or "no reason given",
            )
        with self._lock:
            self._resends.receipted()
        if removed:
            self._wake.set()

    def _on_receipt(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.receipt(bytes(message.payload))
        except Exception:  # a queue failure: the records stay, a later receipt or resend settles
            log.exception("could not apply a storage receipt")

    def in_flight(self) -> int:
        """Records the broker has (its PUBACK came) that no receipt has named yet."""
        with self._lock:
            cursor = self._resends.cursor
        return self._queue.count_through(cursor)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is receipted; whether the queue is empty."""
        deadline = time.monotonic() + timeout_s
        self.wake()
        while len(self._queue):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; records not yet receipted stay queued for next time."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                pause = self._send_batch()
            except TelemetryQueueError as e:
                pause = max(self._retry_s, _ERROR_RETRY_S)
                log.error("telemetry not sent: %s; retrying in %.0f s", e, pause)
            except Exception:  # keep sending whatever a single batch did
                pause = max(self._retry_s, _ERROR_RETRY_S)
                log.exception("telemetry sender failed; retrying in %.0f s", pause)
            if pause:
                self._wake.wait(pause)

    def _next_rows(self) -> list[QueuedRecord]:
        """The oldest records not in flight, none while the window is full; all those not
        receipted once their wait is up."""
        with self._lock:
            if self._resends.due(time.monotonic(), self._queue.oldest_seq()):
                log.warning(
                    "no storage receipt for %d telemetry record(s) in %.0f s; sending them again",
                    self._queue.count_through(self._resends.cursor),
                    self._resends.timeout_s,
                )
                self._resends.resend()
            cursor = self._resends.cursor
            waiting = self._queue.count_through(cursor)
        room = self._max_in_flight - waiting
        return self._queue.peek_after(cursor, min(room, self._batch_records)) if room > 0 else []

    def _send_batch(self) -> float:
        """Send the oldest batch not in flight; seconds to wait (0: go on)."""
        held = self._held_until - time.monotonic()
        if held > 0:
            return held
        if not self._client.is_connected():
            return self._retry_s
        rows = self._next_rows()
        if not rows:
            return self._retry_s
        rows = rows[: len(_fit([row.record for row in rows]))]
        batch = [row.record for row in rows]
        refusals: dict[int, ReasonCode] = {}
        with self._lock:
            self._refusals = refusals
        try:
            info = self._client.publish(
                self._topic,
                encode_telemetry(TelemetryBatch(records=batch), compress=self._config.compress),
                qos=1,
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.info("telemetry batch not published (%s); retrying", mqtt.error_string(info.rc))
                return self._retry_s
            if not self._await_puback(info):
                return self._retry_s
        finally:
            with self._lock:
                self._refusals = None
        refused = refusals.get(info.mid)  # on_publish runs before paho marks it published
        if refused is not None:
            return self._hold(len(batch), refused)
        self._refused_pause = 0.0
        with self._lock:
            self._resends.sent(rows[-1].seq, time.monotonic())
        return 0.0

    def _hold(self, records: int, reason: ReasonCode) -> float:
        """Back off after the broker refused a batch: ``retry_s``, doubling, up to a minute."""
        pause = min(max(self._refused_pause * 2, self._retry_s), _REFUSED_RETRY_MAX_S)
        self._refused_pause = pause
        self._held_until = time.monotonic() + pause
        log.warning(
            "the broker refused a batch of %d telemetry record(s) on %s: %s (reason code "
            "0x%02X); they stay queued, next try in %.1f s. Does the broker's ACL let this "
            "device publish there?",
            records,
            self._topic,
            reason,
            reason.value,
            pause,
        )
        return pause

    def _await_puback(self, info: mqtt.MQTTMessageInfo) -> bool:
        """Whether the broker acknowledged ``info`` before ``ack_timeout_s`` connected."""
        step = min(self._retry_s, self._ack_timeout_s)
        connected_for = 0.0
        while not self._stopping.is_set():
            try:
                info.wait_for_publish(step)
                if info.is_published():
                    return True
            except (RuntimeError, ValueError) as e:
                log.info("telemetry batch not published (%s); retrying", e)
                return False
            if self._client.is_connected():
                connected_for += step
                if connected_for >= self._ack_timeout_s:
                    log.warning(
                        "no PUBACK for a telemetry batch in %.0f s; sending it again",
                        self._ack_timeout_s,
                    )
                    return False
        return False


def _fit(records: list[TelemetryRecord]) -> list[TelemetryRecord]:
    """The longest prefix of ``records`` whose JSON fits one payload.

    The fleet caps the decompressed JSON at ``MAX_PAYLOAD_BYTES`` too, so the cap is applied
    before compression. The prefix is never empty: a valid record, its ``extra`` at most
    256 KiB of JSON (``contracts.mqtt.TelemetryRecord``), is far smaller than a payload.
    A queued record that is no longer valid never gets here (the queue's ``peek`` drops it).
    """
    size = _BATCH_OVERHEAD - 1  # no comma before the first record
    for count, record in enumerate(records):
        size += len(record.model_dump_json(exclude_defaults=True).encode()) + 1
        if size > MAX_PAYLOAD_BYTES:
            return records[:count]
    return records
