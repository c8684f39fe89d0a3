"""fleet/paho_property_tables.py: paho decodes MQTT 5 packets to exactly what it did before,
with its lookup tables built once."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from paho.mqtt import _packet, client
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet import paho_property_tables
from fleet.bridge import MqttBridge
from fleet.broker import MqttEndpoint
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.paho_property_tables import SharedTableProperties, share_property_tables
from fleet.simulator import Behaviour, FleetSimulator

V5 = MQTTProtocolVersion.MQTTv5
_TABLES = ("types", "names", "properties")


@pytest.fixture
def paho_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho's own ``Properties`` in its decoder and client for the test, put back after."""
    monkeypatch.setattr(_packet, "Properties", Properties)
    monkeypatch.setattr(client, "Properties", Properties)


def _publish_properties() -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.PayloadFormatIndicator = 1
    properties.MessageExpiryInterval = 3600
    properties.ContentType = "application/json"
    properties.ResponseTopic = "edgefleet/v1/devices/d1/reply"
    properties.CorrelationData = b"\x00\x01correlation"
    properties.SubscriptionIdentifier = [7, 300]
    properties.UserProperty = [("a", "1"), ("b", "2"), ("a", "3")]
    return properties


def _publish_body(properties: Properties | None, payload: bytes) -> bytes:
    topic = b"edgefleet/v1/devices/d1/telemetry"
    packed = properties.pack() if properties is not None else b"\x00"
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", 42) + packed + payload


def _held(properties: Properties) -> dict[str, Any]:
    """What a decoded instance holds beyond the tables."""
    return {k: v for k, v in vars(properties).items() if k not in _TABLES}


@pytest.mark.parametrize("with_properties", [True, False], ids=["properties", "none"])
def test_a_publish_decodes_to_the_same_as_with_paho_s_own_properties(
    paho_as_shipped: None, with_properties: bool
) -> None:
    body = _publish_body(_publish_properties() if with_properties else None, b'{"x": 1}')
    header = 0x32  # PUBLISH, QoS 1
    theirs = _packet.decode_publish(header, body, V5)
    assert share_property_tables()
    ours = _packet.decode_publish(header, body, V5)

    assert type(theirs.properties) is Properties
    assert type(ours.properties) is SharedTableProperties
    assert _held(ours.properties) == _held(theirs.properties)
    assert ours.properties.json() == theirs.properties.json()
    assert ours.properties.pack() == theirs.properties.pack()
    assert ours.properties.isEmpty() is (not with_properties)
    assert (ours.topic, ours.mid, ours.payload) == (theirs.topic, theirs.mid, theirs.payload)
    if with_properties:
        assert ours.properties.UserProperty == [("a", "1"), ("b", "2"), ("a", "3")]
        assert ours.properties.SubscriptionIdentifier == [7, 300]


def test_a_puback_with_a_reason_string_decodes_as_before(paho_as_shipped: None) -> None:
    properties = Properties(PacketTypes.PUBACK)
    properties.ReasonString = "quota exceeded"
    body = struct.pack("!HB", 9, 0x97) + properties.pack()
    theirs = _packet.decode_puback(0x40, body, V5)
    share_property_tables()
    ours = _packet.decode_puback(0x40, body, V5)
    assert ours.properties.ReasonString == theirs.properties.ReasonString == "quota exceeded"
    assert (ours.mid, ours.reason) == (theirs.mid, theirs.reason)


def test_malformed_properties_are_refused_as_paho_refuses_them(paho_as_shipped: None) -> None:
    body = _publish_body(None, b"")[:-1] + b"\x03\x63\x00\x01"  # property id 99: unknown
    with pytest.raises(Exception) as theirs:
        _packet.decode_publish(0x32, body, V5)
    share_property_tables()
    with pytest.raises(type(theirs.value)) as ours:
        _packet.decode_publish(0x32, body, V5)
    assert str(ours.value) == str(theirs.value)


def test_an_instance_is_cleared_of_what_it_held_and_keeps_the_tables() -> None:
    properties = SharedTableProperties(PacketTypes.PUBLISH)
    properties.ContentType = "text/plain"
    properties.UserProperty = [("k", "v")]
    assert not properties.isEmpty()
    properties.clear()
    assert properties.isEmpty()
    assert _held(properties) == {"packetType": PacketTypes.PUBLISH}
    properties.TopicAlias = 5  # paho's checks still apply: the tables are there
    with pytest.raises(Exception, match="does not apply to packet type"):
        properties.ServerKeepAlive = 5


def test_instances_share_paho_s_tables_and_paho_s_instances_do_not() -> None:
    first, second = SharedTableProperties(1), SharedTableProperties(3)
    assert all(getattr(first, t) is getattr(second, t) for t in _TABLES)
    assert all(getattr(first, t) == getattr(Properties(3), t) for t in _TABLES)
    assert Properties(3).names is not Properties(3).names


def test_installed_in_paho_s_decoder_and_client_once(paho_as_shipped: None) -> None:
    assert share_property_tables()
    assert _packet.Properties is SharedTableProperties
    assert client.Properties is SharedTableProperties
    assert share_property_tables()  # again: nothing to do
    assert _packet.Properties is SharedTableProperties


def test_a_paho_not_as_expected_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, paho_as_shipped: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Replaced(Properties):  # another change to paho's decoder, e.g. a newer paho's
        pass

    monkeypatch.setattr(_packet, "Properties", Replaced)
    assert not share_property_tables()
    assert _packet.Properties is Replaced
    assert client.Properties is Properties
    assert "slower" in caplog.text


def test_a_paho_whose_properties_hold_more_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, paho_as_shipped: None
) -> None:
    built_by_paho = Properties.__init__

    def builds_one_more(self: Properties, packetType: int) -> None:
        built_by_paho(self, packetType)
        object.__setattr__(self, "cache", {})

    monkeypatch.setattr(Properties, "__init__", builds_one_more)
    assert not paho_property_tables._as_paho_builds_it()
    assert not share_property_tables()
    assert _packet.Properties is Properties


def test_the_bridge_and_the_simulator_install_it(
    monkeypatch: pytest.MonkeyPatch, paho_as_shipped: None
) -> None:
    engine = make_engine("sqlite://")
    MqttBridge(MqttEndpoint("127.0.0.1", 1), engine, FleetMetrics())
    engine.dispose()
    assert _packet.Properties is SharedTableProperties
    monkeypatch.setattr(_packet, "Properties", Properties)
    FleetSimulator("127.0.0.1", 1, [], Behaviour())
    assert _packet.Properties is SharedTableProperties
