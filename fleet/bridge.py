"""The MQTT bridge: commands down to devices; status, acks and telemetry up into the database.

The fleet subscribes through MQTT 5 shared subscriptions (``$share/fleet/...``), so
several replicas split the devices' messages. paho's network thread only queues what
arrives; one worker drains the queue and writes in batches (one transaction for up to
``batch_size`` messages), which is what lets ingest keep up with thousands of devices.
A payload that breaks the contract is counted, logged and dropped; nothing a device sends
can stop the bridge.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.engine import Engine

from contracts.mqtt import (
    Ack,
    Channel,
    Command,
    PayloadError,
    Status,
    TelemetryBatch,
    decode_payload,
    device_id_from_topic,
    device_topic,
    shared_subscription,
)

from .broker import MqttEndpoint
from .db import session_scope
from .devices import apply_statuses
from .errors import BrokerError
from .metrics import FleetMetrics
from .rollouts import handle_acks
from .telemetry import ingest

__all__ = ["MqttBridge"]

log = logging.getLogger(__name__)

_CHANNELS: tuple[Channel, ...] = ("status", "ack", "telemetry")


class MqttBridge:
    def __init__(
        self,
        endpoint: MqttEndpoint,
        db: Engine,
        metrics: FleetMetrics,
        *,
        on_final_ack: Callable[[], None] = lambda: None,
        on_online: Callable[[list[str]], None] = lambda _devices: None,
        batch_size: int = 2000,
        client_id: str | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._db = db
        self._metrics = metrics
        self._on_final_ack = on_final_ack
        self._on_online = on_online
        self._batch_size = batch_size
        self._inbox: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._connected = threading.Event()
        self._worker: threading.Thread | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefleet-fleet-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
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
        self._client.max_inflight_messages_set(1000)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        self._worker = threading.Thread(target=self._drain, name="mqtt-ingest", daemon=True)
        self._worker.start()
        try:
            self._client.connect(self._endpoint.host, self._endpoint.port, keepalive=30)
        except OSError as e:
            raise BrokerError(f"cannot reach the MQTT broker at {self._endpoint.url}: {e}") from e
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.stop()
            raise BrokerError(
                f"the MQTT broker at {self._endpoint.url} did not accept the fleet's "
                f"connection within {timeout_s:.0f} s (credentials or ACL?)"
            )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def pending(self) -> int:
        """Messages received and not yet written (for tests and benchmarks to wait on)."""
        return self._inbox.qsize()

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

    # --- receiving ------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the fleet's connection: %s", reason)
            return
        client.subscribe([(shared_subscription(c), 1) for c in _CHANNELS])
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(message)

    def _drain(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + 0.05
            while len(batch) < self._batch_size:
                try:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._inbox.put(None)
                    break
                batch.append(item)
            try:
                self._write(batch)
            except Exception:  # the database failed: log, keep the bridge alive
                log.exception("could not store %d MQTT messages; dropped", len(batch))

    def _write(self, batch: list[mqtt.MQTTMessage]) -> None:
        telemetry: list[tuple[str, Any]] = []
        acks: list[tuple[str, Ack]] = []
        statuses: list[tuple[str, Status]] = []
        for message in batch:
            try:
                device_id, channel = device_id_from_topic(message.topic)
                payload = bytes(message.payload)
                self._metrics.messages.labels(channel).inc()
                if channel == "telemetry":
                    records = decode_payload(payload, TelemetryBatch).records
                    telemetry.extend((device_id, r) for r in records)
                elif channel == "status":
                    statuses.append((device_id, decode_payload(payload, Status)))
                elif channel == "ack":
                    acks.append((device_id, decode_payload(payload, Ack)))
                else:
                    raise PayloadError(f"devices do not publish on {channel!r}")
            except PayloadError as e:
                channel = message.topic.rsplit("/", 1)[-1][:32]
                self._metrics.malformed.labels(channel).inc()
                log.warning("dropped a malformed message on %s: %s", message.topic[:200], e)
        with session_scope(self._db) as session:  # one transaction for the whole batch
            online = apply_statuses(session, statuses) if statuses else []
            final_acks = handle_acks(session, acks) if acks else 0
            if telemetry:
                stored = ingest(session, telemetry)
                self._metrics.telemetry_records.inc(stored)
                self._metrics.telemetry_duplicates.inc(len(telemetry) - stored)
        if final_acks:
            self._on_final_ack()
        if online:
            self._on_online(online)
