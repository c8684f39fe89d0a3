"""Who may subscribe to and publish what: one table of topic rules per kind of account.

The same rules are enforced two ways, both built from :data:`RULES` so they cannot
disagree:

- mosquitto's dynamic-security plugin gets them as its roles' ACLs
  (:func:`~fleet.broker.security.security_document`: a ``subscribe`` rule becomes
  ``subscribeLiteral``, ``publish`` ``publishClientSend``, ``receive``
  ``publishClientReceive``);
- an external broker's HTTP authorization hook asks :func:`allows`
  (``POST /api/v1/broker/authorize``, :mod:`fleet.api.broker`).

A ``subscribe`` rule is a literal filter: a subscription must equal it, character for
character, so ``#``, ``+`` and another group's ``$share/...`` never pass because they
contain a permitted topic. ``publish`` and ``receive`` rules are MQTT filters a topic
*name* (no wildcards) must match. ``{device}`` stands for the device's own id.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from contracts.ids import check_device_id
from contracts.mqtt import TOPIC_PREFIX, Channel, shared_subscription

__all__ = [
    "CONTROL_TOPIC",
    "DEVICE",
    "RESPONSE_TOPIC",
    "RULES",
    "SHARE_PREFIX",
    "STORE_BYTES_TOPIC",
    "AccountKind",
    "Action",
    "TopicRule",
    "allows",
    "rules_for",
    "topic_matches",
]

STORE_BYTES_TOPIC = "$SYS/broker/store/messages/bytes"
"""Where mosquitto publishes the payload bytes it holds (every ``sys_interval``): the
fleet's queue alarm reads it (:mod:`fleet.bridge`)."""
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
"""Where mosquitto's dynamic-security plugin takes commands; it answers on
:data:`RESPONSE_TOPIC`."""
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
DEVICE = "{device}"
"""In a rule's topic: the device's own id."""
SHARE_PREFIX = "$share/"


class AccountKind(enum.StrEnum):
    DEVICE = "device"
    """An enrolled device: its username and client id are its device id."""
    FLEET = "fleet"
    """A fleet replica's bridge (``edgefleet-fleet-REPLICA``)."""
    BROKER_ADMIN = "broker-admin"
    """mosquitto only: the dynamic-security plugin's admin, which changes accounts."""


class Action(enum.StrEnum):
    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    """The client sends a message on the topic."""
    RECEIVE = "receive"
    """The broker delivers a message on the topic to the client (mosquitto checks it on
    delivery; HTTP authorization hooks are asked about subscribe and publish only)."""


@dataclass(frozen=True)
class TopicRule:
    action: Action
    topic: str
    """A literal filter for ``subscribe``; a filter topic names must match otherwise."""


_UPLINK: tuple[Channel, ...] = ("status", "ack", "telemetry")
"""What devices publish and the fleet reads; the fleet publishes ``cmd``, ``receipt``
(storage receipts for telemetry) and ``truth`` (ground-truth labels relayed to the
device), each device reading only its own."""
_DOWNLINK: tuple[Channel, ...] = ("cmd", "receipt", "truth")
_OWN = f"{TOPIC_PREFIX}/{DEVICE}"

RULES: Final[Mapping[AccountKind, tuple[TopicRule, ...]]] = {
    AccountKind.DEVICE: (
        *(TopicRule(Action.SUBSCRIBE, f"{_OWN}/{channel}") for channel in _DOWNLINK),
        *(TopicRule(Action.RECEIVE, f"{_OWN}/{channel}") for channel in _DOWNLINK),
        *(TopicRule(Action.PUBLISH, f"{_OWN}/{channel}") for channel in _UPLINK),
    ),
    AccountKind.FLEET: (
        *(TopicRule(Action.SUBSCRIBE, shared_subscription(c)) for c in _UPLINK),
        *(TopicRule(Action.RECEIVE, f"{TOPIC_PREFIX}/+/{c}") for c in _UPLINK),
        *(TopicRule(Action.PUBLISH, f"{TOPIC_PREFIX}/+/{c}") for c in _DOWNLINK),
        TopicRule(Action.SUBSCRIBE, STORE_BYTES_TOPIC),
        TopicRule(Action.RECEIVE, STORE_BYTES_TOPIC),
    ),
    AccountKind.BROKER_ADMIN: (
        TopicRule(Action.PUBLISH, CONTROL_TOPIC),
        TopicRule(Action.SUBSCRIBE, RESPONSE_TOPIC),
        TopicRule(Action.RECEIVE, RESPONSE_TOPIC),
    ),
}
"""Everything each kind of account may do; anything else is refused."""


def rules_for(kind: AccountKind, device_id: str | None = None) -> list[TopicRule]:
    """``kind``'s rules, ``{device}`` filled in (``device_id`` is needed for devices)."""
    if kind is AccountKind.DEVICE:
        if device_id is None:
            raise ValueError("a device's rules need its device id")
        check_device_id(device_id)
    return [TopicRule(r.action, r.topic.replace(DEVICE, device_id or "")) for r in RULES[kind]]


def allows(
    kind: AccountKind,
    action: Action,
    topic: str,
    *,
    device_id: str | None = None,
    share_unwrapped: bool = False,
) -> bool:
    """Whether an account of ``kind`` may ``action`` ``topic`` (a topic name to publish,
    a filter to subscribe to).

    ``share_unwrapped``: the broker names a shared subscription by its topic filter alone
    (EMQX authorizes ``$share/GROUP/FILTER`` as ``FILTER``); then ``FILTER`` passes where
    the account may subscribe to ``$share/GROUP/FILTER``. Devices have no shared
    subscriptions, so this opens nothing to them.
    """
    rules = [r for r in rules_for(kind, device_id) if r.action is action]
    if action is Action.SUBSCRIBE:
        literal = {r.topic for r in rules}
        if share_unwrapped:
            literal |= {_unshared(r.topic) for r in rules if r.topic.startswith(SHARE_PREFIX)}
        return topic in literal
    if not _is_topic_name(topic):
        return False
    return any(topic_matches(r.topic, topic) for r in rules)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a topic name against a filter (``+`` one level, ``#`` the rest);
    a ``$`` topic is never matched by a leading wildcard."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    wanted, levels = pattern.split("/"), topic.split("/")
    for i, part in enumerate(wanted):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(levels) == len(wanted)


def _is_topic_name(topic: str) -> bool:
    """A topic a client may publish on: not empty, no wildcard, no NUL."""
    return bool(topic) and not any(c in topic for c in "+#\0")


def _unshared(subscription: str) -> str:
    """``$share/GROUP/FILTER`` → ``FILTER``."""
    return subscription.split("/", 2)[2]
