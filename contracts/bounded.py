"""Values from outside, bounded: every number finite and in range, every text free of
control characters, every free-form JSON document shallow and small.

A value that passes here fits every column it is stored in (SQLite and PostgreSQL
integers are 64-bit; PostgreSQL text takes no NUL byte and its JSON no NaN), sums of a
few billion of them cannot overflow, and it cannot make a parser recurse. The MQTT
contract and the fleet's HTTP models build on these types, so one bad value is refused
with its field named, before it reaches a batch it could spoil.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field, TypeAdapter

__all__ = [
    "JSON_DOCUMENT",
    "MAX_COUNT",
    "MAX_DOCUMENT_BYTES",
    "MAX_MILLISECONDS",
    "MAX_VERSION_NUMBER",
    "NO_CONTROL",
    "TS_MAX",
    "TS_MIN",
    "Count",
    "Detail",
    "Milliseconds",
    "ShortText",
    "Timestamp",
    "Url",
    "VersionNumber",
    "check_json_document",
    "check_text",
]

TS_MIN = 0.0
"""1970-01-01T00:00:00Z: a board whose clock is not set yet (no RTC, no NTP so far) still
reports; the fleet keeps its own receive time beside it."""
TS_MAX = 4_102_444_800.0
"""2100-01-01T00:00:00Z."""
MAX_COUNT = 2**31 - 1
"""The largest count one message may report (inferences in one interval, say): two billion
such rows still sum within a 64-bit integer."""
MAX_VERSION_NUMBER = 2**53 - 1
"""Anti-rollback numbers stay exact in a JSON double."""

Timestamp = Annotated[float, Field(ge=TS_MIN, le=TS_MAX, allow_inf_nan=False)]
"""Seconds since the epoch, before 2100."""
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
MAX_MILLISECONDS = 86_400_000.0
"""A day: the longest duration a message may report."""
Milliseconds = Annotated[float, Field(ge=0, le=MAX_MILLISECONDS, allow_inf_nan=False)]
VersionNumber = Annotated[int, Field(ge=1, le=MAX_VERSION_NUMBER)]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""C0 controls and DEL, but tab, newline and carriage return."""


def check_text(value: str, *, max_length: int, what: str = "text") -> str:
    """``value`` if it has at most ``max_length`` characters and no control character but
    tab and newline; ``ValueError`` if not."""
    if len(value) > max_length:
        raise ValueError(f"{what} is {len(value)} characters long, over the {max_length} allowed")
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"{what} holds the control character {found.group()!r} at {found.start()}")
    return value


MAX_DOCUMENT_BYTES = 256 << 10
_JSON: TypeAdapter[Any] = TypeAdapter(Any)
"""pydantic's serialiser for any JSON value (``json.dumps`` took five times as long)."""


def check_json_document(
    value: Any, *, max_depth: int = 8, max_bytes: int = MAX_DOCUMENT_BYTES, what: str = "document"
) -> Any:
    """``value`` if it is JSON as a database stores it: finite numbers, integers within 64
    bits, text without control characters, string keys, nested at most ``max_depth`` deep,
    at most ``max_bytes`` once serialised (compact UTF-8 JSON, as the fleet stores it).
    ``ValueError`` names the first problem."""

    def walk(node: Any, depth: int, path: str) -> None:
        if depth > max_depth:
            raise ValueError(f"{what}: {path or 'the top'} is nested over {max_depth} levels deep")
        if isinstance(node, dict):
            for key, item in node.items():
                if not isinstance(key, str):
                    raise ValueError(f"{what}: key {key!r} at {path or 'the top'} is not text")
                check_text(key, max_length=128, what=f"{what}: key at {path or 'the top'}")
                walk(item, depth + 1, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, depth + 1, f"{path}[{index}]")
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if not -(2**63) <= node < 2**63:
                raise ValueError(f"{what}: {path} is an integer outside 64 bits")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"{what}: {path} is {node}, not a finite number")
        elif isinstance(node, str):
            check_text(node, max_length=max_bytes, what=f"{what}: {path}")
        else:
            raise ValueError(f"{what}: {path} is a {type(node).__name__}, not JSON")

    walk(value, 0, "")
    size = len(_JSON.dump_json(value))  # as the fleet stores it: compact, UTF-8
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes of JSON, over the {max_bytes} allowed")
    return value


def _no_control(value: str) -> str:
    return check_text(value, max_length=len(value))


NO_CONTROL = AfterValidator(_no_control)
"""Put in ``Annotated[str, Field(max_length=N), NO_CONTROL]``: text without control
characters (tab, newline and carriage return allowed)."""
JSON_DOCUMENT = AfterValidator(check_json_document)
"""Put in ``Annotated[dict[str, Any], JSON_DOCUMENT]``: a bounded free-form document."""

ShortText = Annotated[str, Field(max_length=256), NO_CONTROL]
DETAIL_MAX_CHARS = 2000
Detail = Annotated[str, Field(max_length=DETAIL_MAX_CHARS), NO_CONTROL]
"""Why something happened, as a person reads it (an ack's detail, an operator's reason)."""
Url = Annotated[str, Field(max_length=2048), NO_CONTROL]
