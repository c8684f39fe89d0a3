"""One command for a whole wave: built and validated once, then filled in per device.

Every device of a wave gets the same command but for its id (``ROLLOUT:KIND:DEVICE``), so
the fleet builds one :class:`~contracts.mqtt.Command` per wave and keeps it as a
template: the JSON of everything but the id, encoded once. A device's payload is that
JSON with the device's command id put in front (:meth:`CommandTemplate.encoded`), and
its stored copy (:class:`~fleet.models.CommandRecord`'s ``payload``) the same fields as a
dict. A resend refreshes a stored copy's ``expires_at`` the same way (:func:`refreshed`),
without building a model per device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contracts.ids import MESSAGE_ID
from contracts.mqtt import Command, CommandKind

__all__ = ["CommandTemplate", "command_id", "refreshed"]


def command_id(rollout_id: str, kind: CommandKind, device_id: str) -> str:
    """The id of ``kind`` for one device in one rollout: a device that sees it again (a
    resend) answers where it stands rather than acting twice."""
    return f"{rollout_id}:{kind.value}:{device_id}"


@dataclass(frozen=True)
class CommandTemplate:
    """``command`` for every device of a wave, its id aside."""

    rollout_id: str
    kind: CommandKind
    fields: Mapping[str, Any]
    """The command's JSON fields but ``id``, as stored."""
    _tail: bytes
    """The command's JSON but ``id``, from just after its opening brace."""

    @classmethod
    def of(cls, command: Command) -> CommandTemplate:
        """The template of ``command`` (its id is left out: each device gets its own)."""
        if command.rollout is None:
            raise ValueError(f"command {command.id} names no rollout: it is no wave's template")
        rest = command.model_dump_json(exclude={"id"}).encode()
        return cls(
            rollout_id=command.rollout,
            kind=command.kind,
            fields=command.model_dump(mode="json", exclude={"id"}),
            _tail=rest[1:],
        )

    def command_id(self, device_id: str) -> str:
        """The device's command id; ``ValueError`` where it could not be one (a device row
        from before the identifier policy)."""
        return MESSAGE_ID.check(command_id(self.rollout_id, self.kind, device_id))

    def payload(self, device_id: str) -> dict[str, Any]:
        """The device's command as stored."""
        return {"id": self.command_id(device_id), **self.fields}

    def encoded(self, device_id: str) -> bytes:
        """The device's command as published: the template's JSON with its id in front."""
        return b'{"id":' + json.dumps(self.command_id(device_id)).encode() + b"," + self._tail


def refreshed(payload: Mapping[str, Any], expires_at: float) -> bytes:
    """A stored command encoded again with a new ``expires_at``, for a resend."""
    return json.dumps({**payload, "expires_at": expires_at}, separators=(",", ":")).encode()
