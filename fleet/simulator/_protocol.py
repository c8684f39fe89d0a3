"""What a simulated device does with a command, and what it reports.

A command is acted on once per id: a resend is answered with the ack it last got. One
that arrives past its ``expires_at`` is stale: ignored (no ack), only recorded as such.
DEPLOY and SHADOW ack ``downloading``, ``verified``, ``installed`` (spread over
:attr:`Behaviour.install_delay_s`), then ``healthy``, or ``failed`` for a bundle in
:attr:`Behaviour.failing_bundles`; ROLLBACK serves the bundle it names, or the one served
before; SHADOW_STOP ends the shadow. A device publishes its retained ``status`` (serving
bundle, the last command it finished and how) when it is subscribed and after each final
ack, and one telemetry record per report with the error rate, latency and shadow agreement
:class:`Behaviour` sets per bundle.

Telemetry is kept as the agent keeps it (agent/telemetry.py): a record counts as delivered
only once the fleet's storage receipt names it (:attr:`Behaviour.receipt_timeout_s`; with
``None``, once a PUBACK accepts the batch that carried it). Records PUBACKed and not
receipted in time are sent again, the wait doubling up to :data:`MAX_RECEIPT_WAIT_S` while
no receipt comes. A PUBACK that refuses it (reason
``>= 0x80``) or says "no matching subscribers" (``0x10``: the fleet's subscription is not
there, e.g. a broker restarted before the fleet subscribed again) puts its records back
among the unsent ones, which go out with the device's next report and when it has
reconnected; a batch whose PUBACK the lost connection took is re-sent by paho after the
reconnect. At most :data:`MAX_UNSENT_RECORDS` wait per device; past that the oldest are
dropped and counted (:attr:`TelemetryLedger.dropped`).

Everything here runs on the simulator's loop thread, which owns the paho clients; the
fields callers read from other threads are written under the simulator's lock.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from contracts.mqtt import (
    UPDATER_IDLE,
    Ack,
    AckState,
    BundleRef,
    Command,
    CommandKind,
    PayloadError,
    Receipt,
    Status,
    TelemetryBatch,
    TelemetryRecord,
    decode_payload,
    device_topic,
    encode_telemetry,
)

from ._device import GONE, Device, Phase, seeded_digest, seeded_fraction
from .specs import DEFAULT_LATENCY_MS, Behaviour

__all__ = [
    "MAX_RECEIPT_WAIT_S",
    "MAX_UNSENT_RECORDS",
    "DeviceProtocol",
    "TelemetryLedger",
    "record_id",
]

log = logging.getLogger(__name__)

MAX_UNSENT_RECORDS = 1000
"""Records a device keeps waiting for a retry; the oldest beyond are dropped."""
MAX_RECEIPT_WAIT_S = 600.0
"""The longest wait for a storage receipt before records are sent again."""
_NO_MATCHING_SUBSCRIBERS = 0x10
"""MQTT 5 PUBACK reason code: the broker accepted the message and delivered it to nobody."""


@dataclass(frozen=True)
class TelemetryLedger:
    """Where one device's telemetry records stand, by record id, each in order."""

    acknowledged: list[str]
    """Named by a storage receipt (or, without receipts, accepted by a PUBACK that
    delivered them): the fleet owes these, the device has let go of them."""
    pending: list[str]
    """Not yet: waiting for a retry, in a batch whose PUBACK has not come, or PUBACKed and
    awaiting a receipt."""
    dropped: list[str]
    """Given up unacknowledged, beyond :data:`MAX_UNSENT_RECORDS`."""
    refusals: int
    """PUBACKs that refused a batch or reached no subscriber: its records were re-sent."""
    resent: int = 0
    """Records sent again because no receipt named them in time."""


class DeviceProtocol:
    """The device side of ``contracts.mqtt`` for every simulated device.

    ``call_later(delay_s, fn)`` runs ``fn`` on the loop thread after ``delay_s``; ``lock``
    guards what callers read: each device's commands, acks, bundle and shadow, and
    :attr:`malformed`.
    """

    def __init__(
        self,
        behaviour: Behaviour,
        *,
        agent_version: str,
        seed: int,
        lock: threading.Lock,
        call_later: Callable[[float, Callable[[], None]], None],
    ) -> None:
        self.behaviour = behaviour
        self.agent_version = agent_version
        self.seed = seed
        self.malformed = 0
        """Payloads on the devices' ``cmd`` topics that were not a valid ``Command``."""
        self._lock = lock
        self._call_later = call_later

    def on_message(self, client: mqtt.Client, device: Device, message: mqtt.MQTTMessage) -> None:
        try:
            command = decode_payload(bytes(message.payload), Command)
        except PayloadError as e:
            log.info(
                "simulated device %s: ignoring a malformed command: %s", device.spec.device_id, e
            )
            with self._lock:
                self.malformed += 1
            return
        stale = command.expired(time.time())
        with self._lock:
            device.commands.append(command)
            if stale:
                device.ignored.append(command)
            seen = device.last_ack.get(command.id)
        if stale:
            log.info(
                "simulated device %s: ignoring stale command %s", device.spec.device_id, command.id
            )
            return
        if seen is not None:  # a resend: say where it stands, do nothing again
            self._send_ack(device, seen.model_copy(update={"ts": time.time()}))
            return
        if command.kind is CommandKind.ROLLBACK:
            self._rollback(device, command)
        elif command.kind is CommandKind.SHADOW_STOP:
            with self._lock:
                stopped, device.shadow = device.shadow, None
            self._ack(device, command, AckState.HEALTHY, stopped, "shadow stopped")
        else:
            self._install(device, command)

    def _install(self, device: Device, command: Command) -> None:
        """DEPLOY or SHADOW: downloading, verified, installed, then healthy or failed."""
        ref = command.bundle
        if ref is None:
            self._ack(device, command, AckState.FAILED, None, f"a {command.kind} needs a bundle")
            return
        name = _bundle_name(ref)
        self._ack(device, command, AckState.DOWNLOADING, name)
        steps: list[Callable[[], None]] = [
            functools.partial(self._ack, device, command, AckState.VERIFIED, name),
            functools.partial(self._ack, device, command, AckState.INSTALLED, name),
            functools.partial(self._finish_install, device, command, ref),
        ]
        step_s = self.behaviour.install_delay_s / len(steps)
        for i, step in enumerate(steps, 1):
            if step_s:
                self._call_later(step_s * i, functools.partial(self._if_alive, device, step))
            else:
                step()

    def _if_alive(self, device: Device, step: Callable[[], None]) -> None:
        if device.phase not in GONE:
            step()

    def _finish_install(self, device: Device, command: Command, ref: BundleRef) -> None:
        name = _bundle_name(ref)
        if name in self.behaviour.failing_bundles:
            detail = f"health check failed for {name}; still serving {device.bundle}"
            self._ack(device, command, AckState.FAILED, name, detail)
            return
        if command.kind is CommandKind.SHADOW:
            with self._lock:
                device.shadow = name
            self._ack(device, command, AckState.HEALTHY, name, "running in shadow")
            return
        with self._lock:
            device.previous = (device.bundle, device.version_number)
            device.bundle, device.version_number = name, ref.version_number
        self._ack(device, command, AckState.HEALTHY, name)

    def _rollback(self, device: Device, command: Command) -> None:
        """Serve ``command.bundle`` (or, without one, the bundle served before) again."""
        ref = command.bundle
        target = (_bundle_name(ref), ref.version_number) if ref else device.previous
        if target is None or target[0] is None:
            self._ack(device, command, AckState.FAILED, None, "no earlier bundle to go back to")
            return
        with self._lock:
            if target != (device.bundle, device.version_number):
                device.previous = (device.bundle, device.version_number)
                device.bundle, device.version_number = target
        self._ack(device, command, AckState.ROLLED_BACK, target[0])

    def _ack(
        self,
        device: Device,
        command: Command,
        state: AckState,
        bundle: str | None,
        detail: str = "",
    ) -> None:
        """Record and send an ack; a final one is followed by the status that names it."""
        ack = Ack(
            command=command.id, state=state, detail=detail, bundle_version=bundle, ts=time.time()
        )
        with self._lock:
            device.last_ack[command.id] = ack
            if state.final:
                device.finished = ack
        self._send_ack(device, ack)
        if state.final:
            self.publish_status(device)

    def _send_ack(self, device: Device, ack: Ack) -> None:
        assert device.client is not None
        with self._lock:
            device.acks.append(ack)
        topic = device_topic(device.spec.device_id, "ack")
        device.client.publish(topic, ack.model_dump_json(exclude_none=True), qos=1)

    def publish_status(self, device: Device) -> None:
        assert device.client is not None
        finished = device.finished
        status = Status(
            online=True,
            agent_version=self.agent_version,
            bundle=device.bundle,
            bundle_version_number=device.version_number,
            state=UPDATER_IDLE,
            ts=time.time(),
            last_command=finished.command if finished else None,
            last_command_state=finished.state if finished else None,
        )
        topic = device_topic(device.spec.device_id, "status")
        device.client.publish(topic, status.model_dump_json(exclude_none=True), qos=1, retain=True)

    def start_reporting(self, devices: Iterable[Device]) -> None:
        """Begin each device's periodic telemetry, if :class:`Behaviour` asks for it, at a
        phase spread by the seed."""
        interval = self.behaviour.telemetry_interval_s
        if interval is None:
            return
        for device in devices:
            phase = seeded_fraction(self.seed, device.spec.device_id, "telemetry-phase")
            self._call_later(interval * phase, functools.partial(self._periodic_report, device))

    def _periodic_report(self, device: Device) -> None:
        if device.phase in GONE or self.behaviour.telemetry_interval_s is None:
            return
        self.report(device)
        self._call_later(
            self.behaviour.telemetry_interval_s, functools.partial(self._periodic_report, device)
        )

    def report(self, device: Device) -> bool:
        """Make one record and publish it, with any waiting for a retry, if the device is
        connected."""
        if device.phase is not Phase.READY or device.client is None:
            return False
        b = self.behaviour
        device.reports += 1
        inferences, bundle, shadow = b.inferences_per_report, device.bundle, device.shadow
        record = TelemetryRecord(
            id=record_id(self.seed, device.spec.device_id, device.reports),
            ts=time.time(),
            bundle=bundle,
            inferences=inferences,
            errors=round(inferences * b.error_rate.get(bundle, 0.0)) if bundle else 0,
            latency_p95_ms=b.latency_ms.get(bundle, DEFAULT_LATENCY_MS) if bundle else None,
            shadow_bundle=shadow,
            shadow_compared=inferences if shadow else 0,
            shadow_agreed=round(inferences * b.shadow_agreement.get(shadow, 1.0)) if shadow else 0,
        )
        device.unsent[device.reports] = record
        _bound_unsent(device)
        self.send_unsent(device)
        return True

    def send_unsent(self, device: Device) -> int:
        """Publish the records waiting for a retry as one batch; how many went."""
        batch = device.unsent
        if not batch or device.phase is not Phase.READY or device.client is None:
            return 0
        records = TelemetryBatch(records=list(batch.values()))
        payload = encode_telemetry(records, compress=self.behaviour.compress_telemetry)
        topic = device_topic(device.spec.device_id, "telemetry")
        mid = device.client.publish(topic, payload, qos=1).mid
        device.unsent = {}
        device.in_flight[mid] = batch
        return len(batch)

    def on_publish(
        self, client: mqtt.Client, device: Device, mid: int, reason: ReasonCode, props: object
    ) -> None:
        """A PUBACK: its records are delivered, or wait for a retry (see the module doc)."""
        batch = device.in_flight.pop(mid, None)
        if batch is None:  # an ack or a status, not telemetry
            return
        if reason.is_failure or reason.value == _NO_MATCHING_SUBSCRIBERS:
            device.refusals += 1
            device.unsent = dict(sorted({**batch, **device.unsent}.items()))
            _bound_unsent(device)
            return
        timeout = self.behaviour.receipt_timeout_s
        if timeout is None:
            return
        device.receipt_wait_s = device.receipt_wait_s or timeout
        now = time.monotonic()
        device.awaiting.update(batch)
        device.acked_at.update(dict.fromkeys(batch, now))
        if not device.receipt_check:
            device.receipt_check = True
            self._call_later(device.receipt_wait_s, functools.partial(self._check, device))

    def on_receipt(self, client: mqtt.Client, device: Device, message: mqtt.MQTTMessage) -> None:
        """A storage receipt: the records it names, stored or refused, are let go of."""
        try:
            receipt = decode_payload(bytes(message.payload), Receipt)
        except PayloadError as e:
            log.info(
                "simulated device %s: ignoring a malformed receipt: %s", device.spec.device_id, e
            )
            return
        named = {*receipt.stored, *receipt.refused}
        ids = functools.partial(record_id, self.seed, device.spec.device_id)
        gone = [n for n in device.acked_at if ids(n) in named]
        for n in gone:
            del device.awaiting[n], device.acked_at[n]
        for held in (device.unsent, *device.in_flight.values()):
            for n in [n for n in held if ids(n) in named]:
                del held[n]
        device.receipt_wait_s = self.behaviour.receipt_timeout_s or 0.0

    def _check(self, device: Device) -> None:
        """The oldest record awaiting a receipt has waited its time out: send every record
        awaiting one again; else wait on until it has (receipts for newer records do not put
        it off)."""
        device.receipt_check = False
        if not device.awaiting or device.phase in GONE:
            return
        left = min(device.acked_at.values()) + device.receipt_wait_s - time.monotonic()
        if left <= 0:
            device.resent += len(device.awaiting)
            device.unsent = dict(sorted({**device.awaiting, **device.unsent}.items()))
            device.awaiting, device.acked_at = {}, {}
            _bound_unsent(device)
            device.receipt_wait_s = min(device.receipt_wait_s * 2, MAX_RECEIPT_WAIT_S)
            self.send_unsent(device)
            return
        device.receipt_check = True
        self._call_later(left, functools.partial(self._check, device))

    def ledger(self, device: Device) -> TelemetryLedger:
        """Every record the device made so far: acknowledged, pending or dropped."""
        pending = set(device.unsent).union(device.awaiting, *device.in_flight.values())
        dropped = set(device.dropped)
        ids = functools.partial(record_id, self.seed, device.spec.device_id)
        return TelemetryLedger(
            acknowledged=[
                ids(n)
                for n in range(1, device.reports + 1)
                if n not in pending and n not in dropped
            ],
            pending=[ids(n) for n in sorted(pending)],
            dropped=[ids(n) for n in device.dropped],
            refusals=device.refusals,
            resent=device.resent,
        )


def _bound_unsent(device: Device) -> None:
    while len(device.unsent) > MAX_UNSENT_RECORDS:
        oldest = next(iter(device.unsent))
        del device.unsent[oldest]
        device.dropped.append(oldest)


def _bundle_name(ref: BundleRef) -> str:
    return f"{ref.name}-{ref.version}"


def record_id(seed: int, device_id: str, n: int) -> str:
    """The ``n``-th report's id: a version-4 UUID, the same on every run with this seed."""
    return str(uuid.UUID(bytes=seeded_digest(seed, device_id, f"record/{n}", 16), version=4))
