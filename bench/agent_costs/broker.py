"""The agent benchmark's side of a real mosquitto: device accounts, the fleet's subscriber
(devices' retained status, telemetry messages counted and answered with a storage receipt,
as the fleet's bridge does once it has committed them), and device connections."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from contracts.mqtt import (
    Receipt,
    TelemetryBatch,
    decode_payload,
    device_topic,
    shared_subscription,
)
from fleet.broker import MqttEndpoint

__all__ = ["Account", "FleetSubscriber", "connect_device", "disconnect"]


@dataclass(frozen=True)
class Account:
    device_id: str
    password: str


class FleetSubscriber:
    """The fleet account on the broker: devices' retained status, telemetry messages counted."""

    def __init__(self, endpoint: MqttEndpoint) -> None:
        self.telemetry = 0
        self.online: dict[str, bool] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(endpoint.username, endpoint.password)
        self._client.on_connect = lambda client, *_: client.subscribe(
            [(shared_subscription("status"), 1), (shared_subscription("telemetry"), 1)]
        )
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._message
        self._client.connect(endpoint.host, endpoint.port)
        self._client.loop_start()
        if not subscribed.wait(15):
            raise RuntimeError("the fleet subscriber could not subscribe")

    def _message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        device, channel = message.topic.split("/")[-2:]
        with self._lock:
            if channel == "telemetry":
                self.telemetry += 1
                batch = decode_payload(bytes(message.payload), TelemetryBatch)
                receipt = Receipt(stored=[r.id for r in batch.records])
                self._client.publish(
                    device_topic(device, "receipt"), receipt.model_dump_json(), qos=1
                )
            elif message.payload:
                self.online[device] = bool(json.loads(message.payload).get("online"))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def connect_device(
    endpoint: MqttEndpoint, account: Account, max_inflight: int | None = None
) -> mqtt.Client:
    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=account.device_id, protocol=mqtt.MQTTv5
    )
    if max_inflight is not None:  # paho's default is 20
        client.max_inflight_messages_set(max_inflight)
    client.username_pw_set(account.device_id, account.password)
    client.on_connect = lambda *_: connected.set()
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    if not connected.wait(15) or not client.is_connected():
        raise RuntimeError(f"{account.device_id} could not connect to the broker")
    return client


def disconnect(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
