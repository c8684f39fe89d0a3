"""paho's MQTT 5 ``Properties`` without rebuilding its lookup tables for every packet.

paho-mqtt 2.x decodes every MQTT 5 packet it receives (``paho.mqtt._packet``) into a new
``Properties``, whose ``__init__`` builds three lookup tables (property names, their types
and the packets each may appear in: about 30 entries, with a list search for every
type), and whose ``unpack`` first clears every property by name, 27 ``hasattr`` calls. For
the fleet, which receives a PUBLISH per device message and a PUBACK per command or
receipt it sends, that is most of the cost of reading a message: decoding a one-record
telemetry PUBLISH takes ~15 µs of which ~11 µs is the tables, against ~2 µs for the same
packet in MQTT 3.1.1 (``bench/mqtt_client_bench.py`` prints the decode times), and in a
rollout it was a quarter of the fleet process's CPU (py-spy).

:func:`share_property_tables` swaps, in paho's packet decoder and client only, a subclass
that takes the tables from one instance built by paho itself (so they are paho's, for
whatever version is installed; paho only reads them) and clears only the properties an
instance holds. Every decoded value, error and method is paho's own. If paho's
``Properties`` is not what this was written against, nothing is changed and a warning is
logged: slower, never wrong. An upstream change to build the tables once would make this
module unnecessary.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from paho.mqtt import _packet, client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["SharedTableProperties", "share_property_tables"]

log = logging.getLogger(__name__)

_TABLES = ("types", "names", "properties")
"""The attributes paho's ``__init__`` builds, the same for every instance and packet type."""

_OWN = frozenset(("packetType", *_TABLES))
"""What an instance holds besides its properties (paho's ``__setattr__`` keeps these too)."""

_TEMPLATE = Properties(PacketTypes.PUBLISH)

_install_lock = threading.Lock()


class SharedTableProperties(Properties):
    """paho's ``Properties``, its lookup tables shared with every other instance."""

    def __init__(self, packetType: int) -> None:  # paho's parameter name
        object.__setattr__(self, "packetType", packetType)
        for table in _TABLES:
            object.__setattr__(self, table, getattr(_TEMPLATE, table))

    def clear(self) -> None:
        """Remove every property set on this instance (paho's tries each known name)."""
        for name in [name for name in vars(self) if name not in _OWN]:
            delattr(self, name)


def _as_paho_builds_it() -> bool:
    """Whether paho's ``Properties`` holds what this module assumes: the three tables, and
    nothing else, besides the packet type."""
    built: dict[str, Any] = vars(Properties(PacketTypes.PUBLISH))
    return set(built) == _OWN and all(built[t] == getattr(_TEMPLATE, t) for t in _TABLES)


def share_property_tables() -> bool:
    """Make paho's decoder and client use :class:`SharedTableProperties` (idempotent,
    process-wide); False, and a warning, where paho is not as expected."""
    with _install_lock:
        if _packet.Properties is SharedTableProperties:
            return True
        if _packet.Properties is not Properties or not _as_paho_builds_it():
            log.warning(
                "paho-mqtt's Properties is not as fleet/paho_property_tables.py expects: "
                "decoding MQTT 5 packets at paho's own (slower) speed"
            )
            return False
        _packet.Properties = SharedTableProperties  # type: ignore[misc]
        client.Properties = SharedTableProperties  # type: ignore[misc]  # PUBACKs' on_publish
        return True
