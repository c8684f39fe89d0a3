"""Identifiers: one policy for every name that crosses a seam.

Device ids, model and bundle names, profile names, versions, tags and cohort names, rollout
ids, command and record ids end up in MQTT topics, in the broker's configuration, in file
names, in SQL and in logs. Each kind is a pydantic type with one rule: the *whole* value
(``re.fullmatch``: no trailing newline slips past a ``$``) is ASCII letters and digits plus
a few punctuation marks, starts with a letter or digit, and has a bounded length. Nothing
else — no control character, no space, no ``/``, ``+``, ``#`` or ``$`` — can reach a topic
or a configuration line.

Each type comes with a ``check_*`` function for code that is not a pydantic model (a topic
being parsed, a row read back from the database); both raise ``ValueError`` with a message
that names the kind of identifier and what it may hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

__all__ = [
    "BUNDLE_LABEL",
    "DEVICE_ID",
    "MESSAGE_ID",
    "NAME",
    "TAG",
    "VERSION",
    "BundleLabel",
    "DeviceId",
    "IdentifierKind",
    "MessageId",
    "Name",
    "Tag",
    "Version",
    "check_bundle_label",
    "check_device_id",
    "check_message_id",
    "check_name",
    "check_tag",
    "check_version",
]


@dataclass(frozen=True)
class IdentifierKind:
    """One kind of identifier: what it is called, its characters, its longest length."""

    what: str
    max_length: int
    pattern: re.Pattern[str]
    allowed: str
    """The characters it may hold, in words, for error messages."""

    def check(self, value: str) -> str:
        """``value`` if it is one of these; ``ValueError`` naming the rule if not."""
        if (
            not isinstance(value, str)
            or len(value) > self.max_length
            or not self.pattern.fullmatch(value)
        ):
            raise ValueError(
                f"{self.what} {_shown(value)} is not valid: 1 to {self.max_length} "
                f"{self.allowed}, starting with a letter or digit"
            )
        return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_WORD = "letters, digits, '.', '_' or '-'"

DEVICE_ID = IdentifierKind("device id", 64, re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"), _WORD)
NAME = IdentifierKind("name", 128, re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"), _WORD)
"""Model, bundle, profile and API token names, rollout ids."""
TAG = IdentifierKind("tag", 64, re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"), _WORD)
"""Device tags, and the cohort names waves are made of."""
VERSION = IdentifierKind(
    "version",
    64,
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*"),
    "letters, digits, '.', '_', '+' or '-'",
)
"""Model and agent versions (semantic versions and their build metadata fit)."""
BUNDLE_LABEL = IdentifierKind(
    "bundle",
    193,
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*"),
    "letters, digits, '.', '_', '+' or '-'",
)
"""``NAME-VERSION``, as devices report the bundle they serve."""
MESSAGE_ID = IdentifierKind(
    "message id",
    128,
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*"),
    "letters, digits, '.', '_', ':' or '-'",
)
"""Command ids (``ROLLOUT:KIND:DEVICE``) and telemetry record ids."""


DeviceId = Annotated[str, AfterValidator(DEVICE_ID.check)]
Name = Annotated[str, AfterValidator(NAME.check)]
Tag = Annotated[str, AfterValidator(TAG.check)]
Version = Annotated[str, AfterValidator(VERSION.check)]
BundleLabel = Annotated[str, AfterValidator(BUNDLE_LABEL.check)]
MessageId = Annotated[str, AfterValidator(MESSAGE_ID.check)]

check_device_id = DEVICE_ID.check
check_name = NAME.check
check_tag = TAG.check
check_version = VERSION.check
check_bundle_label = BUNDLE_LABEL.check
check_message_id = MESSAGE_ID.check
