"""The fleet's admin connection to mosquitto: commands to the dynamic-security plugin on
``$CONTROL``, each answer matched to its request by ``correlationData``."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..errors import BrokerError
from .endpoint import MqttEndpoint
from .security import CONTROL_TOPIC, RESPONSE_TOPIC

__all__ = ["ControlClient", "NoAnswer", "run_commands"]

log = logging.getLogger(__name__)

_ABSENT = {"deleteClient": "Client not found", "deleteRole": "Role not found"}
"""The errors that mean "already gone": removing what is not there is not a failure."""


class NoAnswer(BrokerError, TimeoutError):
    """The plugin did not answer in time: the change may still happen later."""


class ControlClient:
    """One MQTT connection as the broker's admin.

    Commands are published at QoS 0 and only while connected and subscribed to the
    answers: a command is carried out once or not at all, never resent later by paho.
    paho pings the broker after ``keepalive_s`` of silence and drops the connection when
    no answer comes within as long again: how a hung broker shows.
    """

    def __init__(self, endpoint: MqttEndpoint, *, client_id: str, keepalive_s: int = 30) -> None:
        self._ready = threading.Event()
        self._answers: dict[str, list[dict[str, Any]]] = {}
        self._abandoned: set[str] = set()
        self._arrived = threading.Condition()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if endpoint.username:
            client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set(
                ca_certs=str(endpoint.ca_file) if endpoint.ca_file else None,
                certfile=str(endpoint.cert_file) if endpoint.cert_file else None,
                keyfile=str(endpoint.key_file) if endpoint.key_file else None,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._client_id = client_id
        self._endpoint = endpoint
        self._keepalive_s = keepalive_s

    def connect(self, timeout_s: float) -> None:
        try:
            self._client.connect(
                self._endpoint.host, self._endpoint.port, keepalive=self._keepalive_s
            )
        except OSError as e:
            raise BrokerError(f"cannot connect to mosquitto as its admin: {e}") from e
        self._client.loop_start()
        if not self._ready.wait(timeout_s):
            raise BrokerError(
                f"mosquitto did not accept the admin account {self._client_id!r} and "
                f"its subscription to {RESPONSE_TOPIC} within {timeout_s:.0f} s: the "
                "dynamic-security plugin did not load its configuration"
            )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def ready(self) -> bool:
        """Connected, and subscribed to the plugin's answers."""
        return self._ready.is_set()

    def send(self, commands: list[dict[str, Any]]) -> str:
        """Publish ``commands``; the request id their answers will carry."""
        request = secrets.token_hex(8)
        tagged = [{**c, "correlationData": f"{request}:{i}"} for i, c in enumerate(commands)]
        if not self._ready.is_set():
            raise BrokerError("the admin connection to mosquitto is down; it reconnects")
        info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(
                f"cannot send to mosquitto's dynamic-security plugin: {mqtt.error_string(info.rc)}"
            )
        return request

    def answers(self, request: str, timeout_s: float) -> list[dict[str, Any]] | None:
        """The answers to ``request``, or ``None`` if none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while request not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(request)
                    return None
                self._arrived.wait(left)
            return self._answers.pop(request)

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error(
                "mosquitto refused the fleet's admin connection as %s: %s; retrying (a "
                "standalone broker takes a new replica's accounts within a second of its "
                "start; else check the credential)",
                self._client_id,
                reason,
            )
            return
        client.subscribe(RESPONSE_TOPIC, qos=0)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if all(not r.is_failure for r in reasons):
            self._ready.set()
        else:
            log.error("mosquitto refused the admin's subscription to %s", RESPONSE_TOPIC)

    def _on_disconnect(self, *_: Any) -> None:
        self._ready.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            request = str(responses[0]["correlationData"]).split(":", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning(
                "an answer from the dynamic-security plugin names no request: %r",
                message.payload[:200],
            )
            return
        with self._arrived:
            if request in self._abandoned:  # the caller gave up waiting for it
                self._abandoned.discard(request)
                return
            self._answers[request] = list(responses)
            self._arrived.notify_all()


def run_commands(
    control: ControlClient,
    commands: list[dict[str, Any]],
    *,
    what: str,
    timeout_s: float,
    on_timeout: Callable[[], None] = lambda: None,
    details: Callable[[], str] = lambda: "",
) -> list[dict[str, Any]]:
    """Send ``commands`` and wait for their answers, in order.

    ``NoAnswer`` when none came within ``timeout_s`` (``on_timeout`` runs first and may
    raise a better error: the broker exited); ``BrokerError`` when one failed, removing
    what is already gone aside. ``details`` is added to the refusal's message.
    """
    request = control.send(commands)
    answers = control.answers(request, timeout_s)
    if answers is None:
        on_timeout()
        raise NoAnswer(
            f"cannot {what}: mosquitto's dynamic-security plugin did not answer within "
            f"{timeout_s:.1f} s (is mosquitto stopped or overloaded?); it may still carry "
            "the command out when it resumes"
        )
    failed = [
        f"{a.get('command')}: {a['error']}"
        for a in answers
        if "error" in a and _ABSENT.get(str(a.get("command"))) != a["error"]
    ]
    if failed or len(answers) != len(commands):
        found = "; ".join(failed) or f"{len(answers)} answers to {len(commands)} commands"
        raise BrokerError(
            f"cannot {what}: mosquitto's dynamic-security plugin refused ({found}){details()}"
        )
    return answers
