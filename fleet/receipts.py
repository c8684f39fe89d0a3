"""Storage receipts: what the fleet tells a device about the telemetry records it settled.

A device keeps each record until a :class:`~contracts.mqtt.Receipt` names it (the broker's
PUBACK only means the broker has it, and a broker killed with a backlog loses it). The
bridge (``fleet/bridge.py``) sends one receipt per device per committed chunk, listing
every record of the chunk as ``stored`` (a duplicate is named again, so a device that
resent it can let go), and one listing a batch's records as ``refused`` when the batch
breaks the contract or the database refuses it (quarantined): those will never be
stored, so the device must not keep sending them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from contracts.bounded import DETAIL_MAX_CHARS
from contracts.ids import MessageId
from contracts.mqtt import (
    RECEIPT_MAX_IDS,
    PayloadError,
    Receipt,
    TelemetryBatch,
    decode_payload,
)

__all__ = ["receipts", "refused_receipts"]

_MAX_RECORDS = TelemetryBatch.model_fields["records"].metadata[0].max_length


def receipts(stored: Iterable[tuple[str, str]]) -> list[tuple[str, Receipt]]:
    """``(device_id, record_id)`` pairs committed, as ``(device_id, receipt)``: one per
    device (more when it has over :data:`~contracts.mqtt.RECEIPT_MAX_IDS` records), each
    id once, in the order given."""
    by_device: dict[str, dict[str, None]] = {}
    for device_id, record_id in stored:
        by_device.setdefault(device_id, {})[record_id] = None
    return [
        (device_id, Receipt(stored=chunk))
        for device_id, ids in by_device.items()
        for chunk in _chunks(list(ids))
    ]


def refused_receipts(device_id: str, payload: bytes, reason: str) -> list[tuple[str, Receipt]]:
    """Receipts refusing the records of a telemetry ``payload`` the fleet will not store,
    if their ids can be read from it (else none: the device sends it again and it is
    refused again, until its queue's bound drops it)."""
    try:
        ids = [r.id for r in decode_payload(payload, _RecordIds).records]
    except PayloadError:
        return []
    shown = "".join(c if c.isprintable() else " " for c in reason)[:DETAIL_MAX_CHARS]
    return [
        (device_id, Receipt(refused=chunk, reason=shown))
        for chunk in _chunks(list(dict.fromkeys(ids)))
    ]


class _RecordId(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: MessageId


class _RecordIds(BaseModel):
    """A telemetry batch read for its record ids alone: what else is wrong with it does not
    keep its records from being refused by name."""

    model_config = ConfigDict(extra="ignore")
    records: Annotated[list[_RecordId], Field(max_length=_MAX_RECORDS)]


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + RECEIPT_MAX_IDS] for i in range(0, len(ids), RECEIPT_MAX_IDS)]
