"""The MQTT bridge: commands down to devices; status, acks and telemetry up into the database.

The fleet subscribes through MQTT 5 shared subscriptions (``$share/fleet/...``), so
several replicas split the devices' messages. paho's network thread only queues what
arrives; one worker drains the queue and writes in batches (one transaction for up to
``batch_size`` messages), which is what lets ingest keep up with thousands of devices.

What the bridge holds unstored is bounded in bytes (``max_held_bytes``): at the bound
paho's thread waits for the worker to store a batch, so the bridge stops reading and what
devices send meanwhile waits in the broker's queue for the session, bounded in bytes and
watched by the queue alarm (docs/fleet.md, "Bursts"). The fleet's Receive Maximum cannot be
relied on for that: mosquitto before 2.0.13 (Debian's 2.0.11 among them) moves up to the
Receive Maximum of queued messages into flight at every PUBACK, so a subscriber acking as
it goes is sent the whole backlog.

The session outlives the fleet: the bridge connects with a stable client id (the
replica's broker account), clean start off and a session expiry (``session_expiry_s``),
so while it is away (killed, restarting, cut off) the broker queues what devices send for
it, and delivers it when it is back. A message is acknowledged (PUBACK, paho's manual
acks) only once it is committed to the database, quarantined, or counted malformed or
shed: after the batch it came in is done, in the order messages arrived, and only on the
connection it came on (a message id means nothing on the next one; the broker sends
again there whatever was not acknowledged). So a fleet killed between a message's
arrival and its commit loses nothing: the broker delivers it again. Messages may so
arrive twice; storing one twice changes nothing (telemetry has ids, acks and statuses
are states).

Devices keep telemetry until the fleet has it, not until the broker has it: after each
committed chunk the bridge publishes a storage receipt per device on its ``receipt``
topic, QoS 1, naming every record of the chunk (duplicates included, so a resend is let
go of); a telemetry message that breaks the contract or is quarantined gets a receipt
refusing its records by id, with the reason (``fleet/receipts.py``). A device resends what
no receipt named, so a broker killed with a backlog it had PUBACKed loses nothing.

Replicas split the devices' messages (each has its own session in the shared group), and
a broker queues a dead replica's share in its session until it comes back (mosquitto and
EMQX both keep serving a shared subscription's sessions while their clients are away). So
a living replica takes a dead one's session over (:func:`drain_session`): it connects with
the dead one's client id and clean start off, unsubscribes its shared subscriptions (no
new message is queued there), stores and acknowledges what the session held, and
disconnects, leaving the session to its owner, which subscribes again when it returns.

Nothing a device sends can cost another device's data, nor stop the bridge:

- a payload that breaks the contract is counted (``edgefleet_mqtt_malformed_total``),
  logged and dropped before anything is written;
- a batch the database refuses because of what it holds (a value out of a column's range,
  a constraint, a trigger) is split in halves, each in a transaction of its own, down to
  the message at fault, which goes to the ``quarantine`` table (its payload, cut at
  :data:`QUARANTINE_PAYLOAD_BYTES`, its hash and the error) and is counted
  (``edgefleet_mqtt_quarantined_total``); every other message is stored;
- when the *database* fails (connection lost, locked, disk full: see
  :func:`_blames_the_database`) nothing is quarantined: the bridge keeps the messages,
  retries with exponential backoff (``edgefleet_ingest_database_unavailable`` is 1
  meanwhile, one log line per outage) and halves the transaction at each retry, so a
  batch too big for the database's limits goes through too. Messages go on arriving
  meanwhile; past ``max_held_bytes`` unstored the newest are dropped on arrival and counted
  (``edgefleet_mqtt_shed_total``) and acknowledged in turn, so memory stays bounded
  however long the outage, and the connection stays alive (paho's thread does not wait
  for a database that is down: keepalives and commands go on).
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from contracts.mqtt import (
    Ack,
    Channel,
    Command,
    CommandKind,
    GroundTruthBatch,
    PayloadError,
    Receipt,
    Status,
    TelemetryBatch,
    decode_payload,
    device_id_from_topic,
    device_topic,
    shared_subscription,
)

from .broker import MqttEndpoint
from .broker.access import STORE_BYTES_TOPIC
from .broker.process import MAX_QUEUED_BYTES
from .db import session_scope
from .devices import RESERVED_PREFIX, apply_statuses
from .drift import fold
from .errors import BrokerError
from .metrics import FleetMetrics
from .models import Quarantine, utcnow
from .paho_property_tables import share_property_tables
from .receipts import receipts, refused_receipts
from .rollouts import Link, handle_acks, lock_answered, reconcile_statuses
from .telemetry import ingest

__all__ = ["QUARANTINE_ERROR_CHARS", "QUARANTINE_PAYLOAD_BYTES", "MqttBridge", "drain_session"]

log = logging.getLogger(__name__)

QUARANTINE_PAYLOAD_BYTES = 64 << 10
"""The most of a quarantined payload kept; its size and SHA-256 are kept whole."""
QUARANTINE_ERROR_CHARS = 2000
"""The most of the database's error kept with a quarantined message."""

_CHANNELS: tuple[Channel, ...] = ("status", "ack", "telemetry")
_MODELS: dict[str, type[Status | Ack | TelemetryBatch]] = {
    "status": Status,
    "ack": Ack,
    "telemetry": TelemetryBatch,
}
PUBACK_PREFIX = bytes([PUBACK, 2])
"""A PUBACK's fixed header for a bare acknowledgement (length 2: the packet id alone)."""
BATCH_SIZE = 2000
"""Messages stored in one transaction, by default."""
BATCH_WAIT_S = 0.05
"""How long a batch waits for more after its first message."""
SESSION_EXPIRY_S = 24 * 3600
"""How long the broker keeps the fleet's session while it is away, by default."""
RECEIVE_MAXIMUM = 65535
"""Messages the broker may send before the fleet acknowledges one (MQTT 5's most)."""
RECEIPT_PACKET_IDS = 49_152
"""Storage receipts are queued only while fewer QoS 1 publishes than this await the
broker's PUBACK: of paho's 65,535 packet ids, the rest stay for commands, so a rollout
goes on through a backlog that holds up PUBACKs (see the module's docstring)."""
_MESSAGE_OVERHEAD_BYTES = 1024
"""What a held message costs beyond its payload (paho's object, its topic, the queue)."""
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54", "P0"})
"""PostgreSQL error classes a statement's values cause: data exception, integrity
constraint violation, program limit exceeded, and a trigger's ``RAISE``."""
_DEFAULT_CLIENT_ID = f"{RESERVED_PREFIX}fleet"
_RECONNECT_MAX_S = 2
"""The longest wait between the fleet's attempts to reach its broker: one client per
replica, so it may retry often, and it must be back before the devices (which back off up
to 30 s), however long the broker was away (the supervisor's crash-loop backoff keeps it
down up to 30 s; paho's wait would by then have grown as long)."""


@dataclass(frozen=True)
class _Delivery:
    """One message as the broker delivered it: what to acknowledge once it is settled."""

    mid: int
    qos: int
    connection: int
    """The :attr:`Link.number` it came on: it is acknowledged on that connection only."""
    message: mqtt.MQTTMessage | None
    """``None``: shed on arrival (the database was down and the bridge held
    ``max_held_bytes``)."""


@dataclass(frozen=True)
class _Received:
    """A message that decoded: what one transaction stores for it."""

    message: mqtt.MQTTMessage
    device_id: str
    channel: str
    received_at: dt.datetime
    body: Status | Ack | TelemetryBatch


class _Stopping(Exception):
    """The bridge was stopped while it waited for the database."""


class MqttBridge:
    """Publishes commands and stores what devices publish (see the module's docstring).

    ``client_id``: stable across restarts, one per replica (default: the endpoint's
    username, else ``edgefleet-fleet``); ``session_expiry_s``: how long the broker keeps
    the session (and queues for it) while the bridge is away. ``receive_maximum``: messages
    the broker may send before the bridge acknowledges one (not all brokers hold to it: see
    the module's docstring). ``max_held_bytes``: payloads
    received and not yet stored that the bridge keeps in memory (each message counted with
    1 KiB of overhead); at it, the bridge stops reading until the worker stores a batch, or
    while the database is down drops arrivals and counts them. ``retry_min_s`` /
    ``retry_max_s``: the backoff while the database fails. ``queue_alarm_bytes``: what the
    broker may hold before the queue alarm (``edgefleet_broker_queue_alarm``, an error
    logged; see docs/fleet.md, "Bursts"). ``on_online`` is called with the
    devices that came online, offline before (after their rollout members were
    reconciled from their statuses), ``on_final_ack`` when an ack or a status finished
    a rollout member.
    ``drain``: take over another replica's session to empty it (:func:`drain_session`):
    unsubscribe rather than subscribe, and never reconnect. ``channels``: what it
    subscribes to; an ingest worker's bridge takes ``("telemetry",)`` alone
    (:mod:`fleet.ingest_workers`), and only a bridge taking all three watches the broker's
    queue for the alarm.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        db: Engine,
        metrics: FleetMetrics,
        *,
        on_final_ack: Callable[[], None] = lambda: None,
        on_online: Callable[[list[str]], None] = lambda _devices: None,
        batch_size: int = BATCH_SIZE,
        client_id: str | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
        receive_maximum: int = RECEIVE_MAXIMUM,
        max_held_bytes: int = 256 << 20,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        queue_alarm_bytes: int = MAX_QUEUED_BYTES // 4,
        drain: bool = False,
        channels: Sequence[Channel] = _CHANNELS,
    ) -> None:
        chosen = frozenset(channels)
        if not chosen or not chosen <= set(_CHANNELS) or len(chosen) < len(channels):
            raise ValueError(
                f"channels must be some of {_CHANNELS}, each once, not {tuple(channels)}"
            )
        self._endpoint = endpoint
        self._channels = chosen
        self._all_channels = chosen == set(_CHANNELS)
        """It stores everything (a replica's bridge), not telemetry alone (a worker's)."""
        self._takeover = drain
        self._last_arrival = time.monotonic()
        self._db = db
        self._metrics = metrics
        self._on_final_ack = on_final_ack
        self._on_online = on_online
        self._batch_size = batch_size
        self._max_held_bytes = max_held_bytes
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._queue_alarm_bytes = queue_alarm_bytes
        self._queue_alarm = False
        self._store_mid: int | None = None
        self._inbox: queue.Queue[_Delivery | None] = queue.Queue()
        self._held_lock = threading.Lock()
        self._room = threading.Condition(self._held_lock)
        """Notified when held messages are released, the database goes down, or the bridge
        stops: what paho's thread waits on while the bridge holds ``max_held_bytes``."""
        self._held_bytes = 0
        self._held = 0
        self._waiting = False
        """paho's thread has a message and waits for room to hold it."""
        self._shedding = False
        self._receipts_unqueued = False
        """The last storage receipts could not be queued (``_send_receipts``)."""
        self._down_since: float | None = None
        self._retry_delay_s = retry_min_s
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._link_lock = threading.Lock()
        self._link: Link | None = None
        self._connections = 0
        self._session_present = False
        self._refusal: str | None = None
        """Why the broker last refused a connection (a CONNACK's reason), if it did."""
        self._worker: threading.Thread | None = None
        share_property_tables()  # paho's MQTT 5 decoding, without its per-packet tables
        self._client_id = client_id or endpoint.username or _DEFAULT_CLIENT_ID
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=not drain,
        )
        if endpoint.username:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            self._client.tls_set(
                ca_certs=str(endpoint.ca_file) if endpoint.ca_file else None,
                certfile=str(endpoint.cert_file) if endpoint.cert_file else None,
                keyfile=str(endpoint.key_file) if endpoint.key_file else None,
            )
        self._client.max_queued_messages_set(0)
        # No window of paho's own: with one, every PUBACK walks the messages in flight for
        # the next queued one, quadratic in a wave's commands. The broker acknowledges QoS 1
        # as it reads it, so what is in flight is only what the socket has not sent yet.
        self._client.max_inflight_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=_RECONNECT_MAX_S)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_message = self._on_message

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        self._worker = threading.Thread(target=self._drain, name="mqtt-ingest", daemon=True)
        self._worker.start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._session_expiry_s
        properties.ReceiveMaximum = self._receive_maximum
        try:
            self._client.connect(
                self._endpoint.host,
                self._endpoint.port,
                keepalive=30,
                clean_start=False,
                properties=properties,
            )
        except OSError as e:
            raise BrokerError(f"cannot reach the MQTT broker at {self._endpoint.url}: {e}") from e
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(0.05):
            if self._refusal is not None:  # said at once: a probe refused costs no timeout
                self.stop()
                raise BrokerError(
                    f"the MQTT broker at {self._endpoint.url} refused the fleet's connection "
                    f"as {self._client_id}: {self._refusal}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise BrokerError(
                    f"the MQTT broker at {self._endpoint.url} did not accept the fleet's "
                    f"connection and subscriptions within {timeout_s:.0f} s (credentials or ACL?)"
                )

    def stop(self, *, discard_session: bool = False) -> None:
        """Disconnect (the session stays), store what was received, and end the worker;
        while the database is down it does not wait for it. Nothing is acknowledged after
        the disconnect: the broker delivers it all again to the next start.
        ``discard_session``: have the broker drop the session instead (MQTT 5: a Session
        Expiry Interval of 0 in the DISCONNECT)."""
        self._stopping.set()
        with self._room:  # paho's thread may wait for room: it must send the DISCONNECT
            self._room.notify_all()
        properties = None
        if discard_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self._client.disconnect(properties=properties)
        self._client.loop_stop()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def session_present(self) -> bool:
        """Whether the broker still held this client id's session at the last connection
        (``False`` before the first)."""
        with self._link_lock:
            return self._session_present

    def link(self) -> Link | None:
        """The connection to the broker, or ``None`` while there is none."""
        with self._link_lock:
            return self._link

    def pending(self) -> int:
        """Messages received and not yet stored, quarantined or dropped as malformed, the
        one waiting for room included (for :func:`drain_session`, tests and benchmarks to
        wait on)."""
        return self._held + self._waiting

    def quiet_s(self) -> float:
        """Seconds since the last message was taken in (or since the bridge was made)."""
        return time.monotonic() - self._last_arrival

    # --- sending --------------------------------------------------------------------------

    def send(self, device_id: str, command: Command) -> None:
        """Publish ``command`` on the device's ``cmd`` topic, QoS 1.

        paho keeps it queued while the broker is away and sends it on reconnect.
        """
        info = self._client.publish(
            device_topic(device_id, "cmd"), command.model_dump_json(), qos=1
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(
                f"could not queue a command for {device_id}: {mqtt.error_string(info.rc)}"
            )
        self._metrics.commands.labels(command.kind.value).inc()

    def send_encoded(self, kind: CommandKind, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish commands of ``kind``, already encoded, each ``(device id, payload)`` on
        its device's ``cmd`` topic, QoS 1: the rollout engine's wave, one message per device
        (:mod:`fleet.rollouts.commands`). ``BrokerError`` at the first one paho's queue did
        not take (the broker away does not count: paho sends them on reconnect)."""
        publish = self._client.publish
        for done, (device_id, payload) in enumerate(messages):
            info = publish(device_topic(device_id, "cmd"), payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._metrics.commands.labels(kind.value).inc(done)
                raise BrokerError(
                    f"could not queue a command for {device_id}: {mqtt.error_string(info.rc)}"
                )
        self._metrics.commands.labels(kind.value).inc(len(messages))

    def relay_truth(self, device_id: str, batch: GroundTruthBatch) -> None:
        """Publish true labels on the device's ``truth`` topic, QoS 1; ``BrokerError`` when
        not even paho's queue took them (the broker away does not count: paho sends
        them on reconnect)."""
        info = self._client.publish(
            device_topic(device_id, "truth"), batch.model_dump_json(), qos=1
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(
                f"could not queue ground truth for {device_id}: {mqtt.error_string(info.rc)}"
            )

    def _send_receipts(self, settled: Sequence[tuple[str, Receipt]]) -> None:
        """Publish storage receipts (``fleet/receipts.py``), QoS 1, queued by paho while
        the broker is away. One that never arrives costs a resend: the device sends the
        records again and, the fleet holding them, gets a receipt for them then.

        With a backlog, a mosquitto before 2.0.13 writes the PUBACKs for them behind the
        whole of it (see the module's docstring), so packet ids run short: a receipt is
        not queued while :data:`RECEIPT_PACKET_IDS` publishes await their PUBACK (the rest
        are the commands'), nor when paho refuses it. Such a stretch is counted, and logged
        as it starts and as it ends."""
        unqueued = 0
        awaiting = self._client._out_messages  # paho's QoS 1 publishes awaiting a PUBACK
        for device_id, receipt in settled:
            if len(awaiting) >= RECEIPT_PACKET_IDS:
                unqueued += 1
                continue
            info = self._client.publish(
                device_topic(device_id, "receipt"),
                receipt.model_dump_json(exclude_defaults=True),
                qos=1,
            )
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                unqueued += 1
        if unqueued:
            self._metrics.receipts_unqueued.inc(unqueued)
            if not self._receipts_unqueued:
                log.warning(
                    "could not queue storage receipts (%d publishes await the broker's "
                    "PUBACK; the rest of the packet ids are kept for commands): their devices "
                    "resend the records and get receipts then "
                    "(edgefleet_mqtt_receipts_unqueued_total)",
                    len(awaiting),
                )
        elif settled and self._receipts_unqueued:
            log.warning("storage receipts are queued again")
        if settled:
            self._receipts_unqueued = unqueued > 0

    # --- receiving ------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            log.error("MQTT broker refused the fleet's connection: %s", reason)
            return
        with self._link_lock:
            self._connections += 1
            self._link = Link(self._connections, utcnow())
            self._session_present = flags.session_present
        if self._takeover:
            client.unsubscribe([shared_subscription(c) for c in _CHANNELS])
            return
        if not flags.session_present:
            log.log(
                logging.INFO if self._connections == 1 else logging.WARNING,
                "the MQTT broker kept no session for the fleet (a first start, or it expired "
                "or was lost with the broker): what devices sent meanwhile is gone; %s",
                "the rollout engine reconciles from their statuses and resends unfinished commands"
                if self._all_channels
                else "devices resend the telemetry no storage receipt named",
            )
        client.subscribe([(shared_subscription(c), 1) for c in sorted(self._channels)])
        if self._all_channels:
            _, self._store_mid = client.subscribe(STORE_BYTES_TOPIC, 0)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if mid == self._store_mid:
            if reasons[0].is_failure:
                log.warning(
                    "the MQTT broker does not tell the fleet how much it holds (%s refused: "
                    "%s): no queue alarm; watch the broker's queue yourself",
                    STORE_BYTES_TOPIC,
                    reasons[0],
                )
            return
        if refused := [str(r) for r in reasons if r.is_failure]:
            log.error("the MQTT broker refused the fleet's subscriptions: %s", ", ".join(refused))
            return
        self._connected.set()

    def _on_unsubscribe(self, *_: Any) -> None:
        """Draining: nothing more is queued for the session taken over."""
        self._connected.set()

    def _on_disconnect(self, *_: Any) -> None:
        """paho's thread, before any reconnection: no acknowledgement may go out now."""
        with self._link_lock:
            self._link = None

    def _on_store_bytes(self, message: mqtt.MQTTMessage) -> None:
        """paho's thread: the broker's ``$SYS`` figure of the payload bytes it holds; the
        queue alarm is raised past ``queue_alarm_bytes`` and cleared below half of it."""
        try:
            held = int(message.payload)
        except ValueError:
            return
        self._metrics.broker_stored_bytes.set(held)
        if not self._queue_alarm and held > self._queue_alarm_bytes:
            self._queue_alarm = True
            self._metrics.broker_queue_alarm.set(1)
            log.error(
                "the MQTT broker holds %d bytes of messages (the alarm is at %d, a quarter of "
                "each client's queue bound): the fleet stores less than devices send; past "
                "the bound the broker drops telemetry devices count delivered. Add ingest "
                "workers or replicas, or find what slows the database",
                held,
                self._queue_alarm_bytes,
            )
        elif self._queue_alarm and held < self._queue_alarm_bytes // 2:
            self._queue_alarm = False
            self._metrics.broker_queue_alarm.set(0)
            log.warning("the MQTT broker's queue is back to %d bytes: alarm cleared", held)

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho's thread: hold the message for the worker. While the bridge holds
        ``max_held_bytes`` it waits for room, and so stops reading: the rest stays in the
        broker's queue for the session (TCP's flow control stops the broker's writes).
        While the database is down it sheds the message instead (it is still acknowledged
        in turn). The broker's ``$SYS`` figure goes to the queue alarm (compared here:
        paho's per-topic callbacks match every message against a tree)."""
        if _channel_label(message) == "other" and _is_store_bytes(message):
            self._on_store_bytes(message)
            return
        size = len(message.payload) + _MESSAGE_OVERHEAD_BYTES
        with self._room:
            self._waiting = True  # pending() counts it: a drain is not done meanwhile
            while not (
                self._has_room(size) or self._down_since is not None or self._stopping.is_set()
            ):
                self._room.wait()
            self._waiting = False
            self._last_arrival = time.monotonic()
            # stopping: taken past the bound (the DISCONNECT is on its way; few come after)
            accepted = self._down_since is None or self._has_room(size)
            if accepted:
                self._held_bytes += size
                self._held += 1
            starts_shedding = not accepted and not self._shedding
            self._shedding = not accepted
        with self._link_lock:  # paho calls on_connect on this thread first
            connection = self._connections
        self._inbox.put(
            _Delivery(message.mid, message.qos, connection, message if accepted else None)
        )
        if accepted:
            return
        self._metrics.shed.labels(_channel_label(message)).inc()
        if starts_shedding:
            log.error(
                "the database is down and the MQTT bridge holds %d unstored messages (%d "
                "bytes, its limit): dropping new ones until it is back (edgefleet_mqtt_shed_total)",
                self._held,
                self._held_bytes,
            )

    def _has_room(self, size: int) -> bool:
        """Whether a message of ``size`` fits in ``max_held_bytes`` (one always fits when
        nothing is held); called holding ``_held_lock``."""
        return self._held == 0 or self._held_bytes + size <= self._max_held_bytes

    def _drain(self) -> None:
        while (batch := self._next_batch()) is not None:
            messages = [d.message for d in batch if d.message is not None]
            try:
                self._write(messages)
            except _Stopping:
                log.error(
                    "stopped with %d MQTT messages not stored (the database is down); the "
                    "broker keeps them for the fleet's session",
                    self._held,
                )
                return
            except Exception:  # a bug, not a device's doing: log, keep the bridge alive
                log.exception("could not store %d MQTT messages; dropped", len(messages))
            finally:
                self._release(messages)
            self._acknowledge(batch)

    def _acknowledge(self, batch: Sequence[_Delivery]) -> None:
        """PUBACK each message of a settled batch, in arrival order, if the connection it
        came on is still the one up; else the broker sends it again on the new one.

        The batch's PUBACKs go out as one write: paho's ``ack`` makes a packet, a log call
        and a wake-up of its network thread per message. They are paho's own bytes
        (``PUBACK``, length 2, the packet id: success, no properties, the same in MQTT
        3.1.1 and 5), queued where paho queues every outgoing packet, so they keep their
        order with the rest and are dropped with the connection as ``ack``'s would be."""
        with self._link_lock:  # held across: on_disconnect cannot slip in between
            link = self._link
            if link is None:
                return
            pubacks = b"".join(
                PUBACK_PREFIX + delivery.mid.to_bytes(2, "big")
                for delivery in batch
                if delivery.qos == 1 and delivery.connection == link.number
            )
            if pubacks:
                self._client._packet_queue(PUBACK, pubacks, 0, 0)

    def _next_batch(self) -> list[_Delivery] | None:
        """Up to ``batch_size`` deliveries, waiting :data:`BATCH_WAIT_S` at most after the
        first; ``None`` once stopped."""
        first = self._inbox.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(batch) < self._batch_size:
            try:
                item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)
                break
            batch.append(item)
        return batch

    def _release(self, batch: Sequence[mqtt.MQTTMessage]) -> None:
        size = sum(len(m.payload) + _MESSAGE_OVERHEAD_BYTES for m in batch)
        with self._room:
            self._held_bytes -= size
            self._held -= len(batch)
            self._room.notify_all()

    # --- storing --------------------------------------------------------------------------

    def _write(self, batch: Sequence[mqtt.MQTTMessage]) -> None:
        """Decode ``batch`` and store every message that decodes; ``_Stopping`` if the
        bridge stops while the database is down."""
        labels = [_channel_label(m) for m in batch]
        for label, count in collections.Counter(labels).items():
            self._metrics.messages.labels(label).inc(count)
        now = (utcnow(), time.monotonic())
        received = [
            r
            for m, label in zip(batch, labels, strict=True)
            if (r := self._decode(m, label, now)) is not None
        ]
        pending: list[Sequence[_Received]] = [received] if received else []  # the next last
        while pending:
            chunk = pending.pop()
            try:
                online, final_acks = self._commit(chunk)
            except Exception as error:  # sorted out below: nothing escapes the bridge
                if _blames_the_database(error):
                    pending.extend(_halves(chunk))
                    self._wait_for_database(error)
                elif len(chunk) > 1:
                    pending.extend(_halves(chunk))
                elif (failure := self._quarantine(chunk[0], error)) is not None:
                    pending.append(chunk)
                    self._wait_for_database(failure)
                else:
                    self._database_back()
                continue
            self._database_back()
            self._send_receipts(
                receipts(
                    (r.device_id, record.id)
                    for r in chunk
                    if isinstance(r.body, TelemetryBatch)
                    for record in r.body.records
                )
            )
            self._notify(online, final_acks)

    def _decode(
        self, message: mqtt.MQTTMessage, label: str, now: tuple[dt.datetime, float]
    ) -> _Received | None:
        """The message decoded, or ``None`` when it breaks the contract (counted).
        ``label``: its :func:`_channel_label`; ``now``: the fleet's clock and the monotonic
        one, read once per batch."""
        device_id = channel = ""
        try:
            device_id, channel = _device_topic(message.topic)
            model = _MODELS.get(channel)
            if model is None:
                raise PayloadError(f"devices do not publish on {channel[:32]!r}")
            body = decode_payload(bytes(message.payload), model)
        except (PayloadError, UnicodeDecodeError) as e:  # the latter: a topic not UTF-8
            self._metrics.malformed.labels(label).inc()
            log.warning("dropped a malformed message on %s: %s", _topic_shown(message), e)
            if channel == "telemetry":
                payload = bytes(message.payload)
                self._send_receipts(refused_receipts(device_id, payload, f"malformed: {e}"))
            return None
        except Exception:  # the contract should have said PayloadError: still the device's
            self._metrics.malformed.labels(label).inc()
            log.exception("dropped a message on %s that failed to decode", _topic_shown(message))
            return None
        return _Received(message, device_id, channel, _received_at(message, now), body)

    def _commit(self, chunk: Sequence[_Received]) -> tuple[list[str], int]:
        """Store ``chunk`` in one transaction; returns the devices that came online and
        how many acks (or statuses, reconciled) finished something."""
        statuses = [(r.device_id, r.body) for r in chunk if isinstance(r.body, Status)]
        acks = [(r.device_id, r.body) for r in chunk if isinstance(r.body, Ack)]
        telemetry = [
            (r.device_id, record, r.received_at)
            for r in chunk
            if isinstance(r.body, TelemetryBatch)
            for record in r.body.records
        ]
        with session_scope(self._db) as session:
            if statuses or acks:
                lock_answered(
                    session,
                    device_ids={d for d, s in statuses if s.online},
                    command_ids={a.command for _, a in acks},
                )
            # Acks first: a status stands in for a lost final ack, so it finishes only what
            # the acks left unfinished; the final ack it names is most often in this batch,
            # just before it, and then the status finds nothing left to do.
            final_acks = handle_acks(session, acks) if acks else 0
            applied = apply_statuses(session, statuses) if statuses else None
            reports = applied.online if applied else []
            final_acks += reconcile_statuses(session, reports) if reports else 0
            health_refused = fold(session, telemetry) if telemetry else 0  # first: skips resends
            stored = ingest(session, telemetry) if telemetry else 0
        self._metrics.telemetry_records.inc(stored)
        self._metrics.model_health_skipped.inc(health_refused)
        self._metrics.telemetry_duplicates.inc(len(telemetry) - stored)
        return (applied.came_online if applied else []), final_acks

    def _notify(self, online: list[str], final_acks: int) -> None:
        """Tell the server what a committed chunk changed; its failure stores nothing less."""
        try:
            if final_acks:
                self._on_final_ack()
            if online:
                self._on_online(online)
        except Exception:
            log.exception("the fleet failed to act on %d devices' news", len(online))

    def _quarantine(self, item: _Received, error: Exception) -> Exception | None:
        """Keep ``item`` in the ``quarantine`` table. Returns what kept it from there, if
        anything: then the database itself fails, and the message is held for a retry."""
        payload = bytes(item.message.payload)
        digest = hashlib.sha256(payload).hexdigest()
        reason = _describe(error)
        try:
            with session_scope(self._db) as session:
                session.add(
                    Quarantine(
                        received_at=item.received_at,
                        device_id=item.device_id,
                        channel=item.channel,
                        topic=item.message.topic,
                        error=reason,
                        payload_size=len(payload),
                        payload_sha256=digest,
                        payload=payload[:QUARANTINE_PAYLOAD_BYTES],
                    )
                )
        except Exception as failure:
            return failure
        self._metrics.quarantined.labels(item.channel).inc()
        if isinstance(item.body, TelemetryBatch):
            self._send_receipts(
                refused_receipts(item.device_id, payload, f"quarantined: {reason[:500]}")
            )
        log.error(
            "quarantined a %s message from %s (%d bytes, sha256 %s): the database refused it: %s",
            item.channel,
            item.device_id,
            len(payload),
            digest,
            reason[:500],
        )
        return None

    def _wait_for_database(self, error: Exception) -> None:
        """Back off before the next try; the first failure of an outage is logged, the
        rest counted. ``_Stopping`` when the bridge stops meanwhile."""
        if self._down_since is None:
            with self._room:  # paho's thread, waiting for room, sheds from now on
                self._down_since = time.monotonic()
                self._room.notify_all()
            self._retry_delay_s = self._retry_min_s
            self._metrics.database_unavailable.set(1)
            log.error(
                "the database failed (%s): holding %d MQTT messages and retrying until it is back",
                _describe(error)[:500],
                self._held,
            )
        self._metrics.store_retries.inc()
        delay, self._retry_delay_s = (
            self._retry_delay_s,
            min(self._retry_delay_s * 2, self._retry_max_s),
        )
        if self._stopping.wait(delay):
            raise _Stopping

    def _database_back(self) -> None:
        if self._down_since is not None:
            log.warning(
                "the database is back after %.0f s; storing the MQTT messages held",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._metrics.database_unavailable.set(0)


def drain_session(
    endpoint: MqttEndpoint,
    db: Engine,
    metrics: FleetMetrics,
    *,
    client_id: str,
    session_expiry_s: int,
    quiet_s: float = 1.0,
    timeout_s: float = 300.0,
    on_final_ack: Callable[[], None] = lambda: None,
    on_online: Callable[[list[str]], None] = lambda _devices: None,
    if_present: bool = False,
) -> bool:
    """Take over ``client_id``'s session (``endpoint`` holds its credentials), store what
    it held, and leave it without subscriptions (see the module's docstring).

    Done once the session has been quiet for ``quiet_s`` with everything stored; ``False``
    when it did not finish (the connection was refused or taken back by its owner, or
    ``timeout_s`` passed): what is left stays in the session. ``if_present``: done at once
    when the broker held no session for ``client_id`` (a probe for sessions that may not
    exist: the one the connection made is discarded as it disconnects).
    """
    bridge = MqttBridge(
        endpoint,
        db,
        metrics,
        client_id=client_id,
        session_expiry_s=session_expiry_s,
        on_final_ack=on_final_ack,
        on_online=on_online,
        drain=True,
    )
    try:
        bridge.start()
    except BrokerError as e:
        log.error("could not take over the MQTT session %s to empty it: %s", client_id, e)
        return False
    deadline = time.monotonic() + timeout_s
    made_by_the_probe = if_present and not bridge.session_present
    try:
        if made_by_the_probe:
            return True
        while bridge.quiet_s() < quiet_s or bridge.pending():
            if bridge.link() is None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return bridge.link() is not None
    finally:
        bridge.stop(discard_session=made_by_the_probe)


def _blames_the_database(error: Exception) -> bool:
    """Whether ``error`` says the database failed (retry later) rather than the values
    written (split, and quarantine the message at fault).

    The database: a lost connection, a pool timeout; an ``OperationalError``,
    ``InterfaceError``, ``InternalError`` or a bare ``DatabaseError`` (SQLite: locked,
    busy, disk full, I/O error; PostgreSQL: connection, resources, shutdown, deadlock),
    unless PostgreSQL's SQLSTATE puts it in a data class (:data:`_DATA_SQLSTATE_CLASSES`).
    Everything else blames the values: ``DataError``, ``IntegrityError``, a
    ``ProgrammingError`` without a SQLSTATE (SQLite could not bind a value), a
    ``StatementError`` from a type's bind processor, and any other exception (a driver's
    ``OverflowError`` or ``UnicodeEncodeError``, a handler failing on one message). A
    database that is really down fails the quarantine's own write too, which
    :meth:`MqttBridge._write` then treats as the database's failure, so a failure taken
    for the data's does not cost good data; one taken for the database's is retried in
    ever smaller transactions, so a batch too big for the database's limits gets through.
    """
    if isinstance(error, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] not in _DATA_SQLSTATE_CLASSES
    return not isinstance(
        error,
        sa_exc.DataError
        | sa_exc.IntegrityError
        | sa_exc.ProgrammingError
        | sa_exc.NotSupportedError,
    )


def _halves(chunk: Sequence[_Received]) -> list[Sequence[_Received]]:
    """The chunk's two halves, the first last (the order ``MqttBridge._write`` pops in)."""
    middle = (len(chunk) + 1) // 2
    return [chunk[middle:], chunk[:middle]] if len(chunk) > 1 else [chunk]


def _received_at(message: mqtt.MQTTMessage, now: tuple[dt.datetime, float]) -> dt.datetime:
    """When paho read ``message`` (its monotonic ``timestamp``) on the fleet's clock, from
    ``now`` (that clock, the monotonic one); now for a message paho did not receive
    (``timestamp`` 0)."""
    wall, monotonic = now
    age_s = monotonic - message.timestamp if message.timestamp else 0.0
    return wall - dt.timedelta(seconds=max(0.0, age_s))


_device_topic = functools.lru_cache(maxsize=1 << 16)(device_id_from_topic)
""":func:`device_id_from_topic`, remembered: each device publishes on its few topics again
and again, and only a topic that passed is kept (a refused one raises)."""


def _channel_label(message: mqtt.MQTTMessage) -> str:
    """The message's channel as a metric label: one of the three, else ``other``."""
    try:
        channel = message.topic.rsplit("/", 1)[-1]
    except UnicodeDecodeError:
        return "other"
    return channel if channel in _CHANNELS else "other"


def _is_store_bytes(message: mqtt.MQTTMessage) -> bool:
    try:
        return message.topic == STORE_BYTES_TOPIC
    except UnicodeDecodeError:
        return False


def _topic_shown(message: mqtt.MQTTMessage) -> str:
    """The topic for a log line: quoted and escaped, at most 200 characters of it."""
    try:
        return repr(message.topic[:200])
    except UnicodeDecodeError:
        return "a topic that is not UTF-8"


def _describe(error: BaseException) -> str:
    """The error in one line of printable text, at most ``QUARANTINE_ERROR_CHARS``: the
    driver's own message rather than SQLAlchemy's (which repeats the statement and its
    values)."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) and error.orig else error
    text = repr(f"{type(cause).__name__}: {cause}")[1:-1]
    return text[:QUARANTINE_ERROR_CHARS]
