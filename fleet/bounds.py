"""The types every value a client sends the fleet's HTTP API is held to.

They are :mod:`contracts.ids` and :mod:`contracts.bounded` with their rule written into
the OpenAPI schema as well (``pattern``, ``maxLength``), so clients and property tests see
what is accepted. The rule is a validator, never a ``max_length`` that SQLModel would turn
into a column length: the tables keep their migrated types.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated, Any

from pydantic import AfterValidator, Field, WithJsonSchema

from contracts import ids
from contracts.bounded import JSON_DOCUMENT, MAX_COUNT, check_text

__all__ = [
    "MAX_ROW_ID",
    "MAX_TTL_S",
    "BundleLabel",
    "Count",
    "DeviceId",
    "Document",
    "LongText",
    "Metrics",
    "Name",
    "RowId",
    "ShortText",
    "Tag",
    "Text",
    "TokenName",
    "Version",
    "Wave",
    "check_wave",
]

MAX_ROW_ID = 2**63 - 1
"""Row ids are 64-bit integers in SQLite and PostgreSQL."""
MAX_TTL_S = 366 * 24 * 3600
"""An enrollment token lives a year at most."""


def _identifier(kind: ids.IdentifierKind, max_length: int | None = None) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": max_length or kind.max_length,
            "pattern": f"^{kind.pattern.pattern}$",
        }
    )


def _check_token_name(value: str) -> str:
    ids.check_name(value)
    if len(value) > 64:
        raise ValueError(f"API token names are at most 64 characters; {value[:20]!r}... is longer")
    return value


DeviceId = Annotated[ids.DeviceId, _identifier(ids.DEVICE_ID)]
Name = Annotated[ids.Name, _identifier(ids.NAME)]
BundleLabel = Annotated[ids.BundleLabel, _identifier(ids.BUNDLE_LABEL)]
"""``NAME-VERSION``, as devices report the bundle they serve."""
"""Model, profile and rollout names and ids."""
TokenName = Annotated[str, AfterValidator(_check_token_name), _identifier(ids.NAME, 64)]
Tag = Annotated[ids.Tag, _identifier(ids.TAG)]
Version = Annotated[ids.Version, _identifier(ids.VERSION)]

RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]

_PRINTABLE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def _text(max_length: int) -> tuple[AfterValidator, WithJsonSchema]:
    return (
        AfterValidator(partial(check_text, max_length=max_length)),
        WithJsonSchema({"type": "string", "maxLength": max_length, "pattern": _PRINTABLE}),
    )


_SHORT, _TEXT, _LONG = _text(256), _text(2000), _text(64 << 10)
ShortText = Annotated[str, _SHORT[0], _SHORT[1]]
"""A person's or a team's name, a label."""
Text = Annotated[str, _TEXT[0], _TEXT[1]]
"""A description, a reason, a URI."""
LongText = Annotated[str, _LONG[0], _LONG[1]]
"""A model card (Markdown)."""

Document = Annotated[dict[str, Any], JSON_DOCUMENT]
"""Free-form JSON: at most 8 levels deep and 256 KiB, finite numbers, no control
characters (:func:`contracts.bounded.check_json_document`)."""
Metrics = Annotated[
    dict[
        Annotated[str, _SHORT[0], WithJsonSchema({"type": "string", "maxLength": 256})],
        Annotated[float, Field(allow_inf_nan=False)],
    ],
    Field(max_length=1000),
    JSON_DOCUMENT,
]
"""Named figures (``{"accuracy": 0.99}``): finite numbers, 1,000 at most."""

_PERCENT = re.compile(r"[0-9]+(\.[0-9]+)?")


def check_wave(value: str) -> str:
    """A rollout wave: a cumulative percentage in (0, 100] written as a decimal (``10``,
    ``12.5``), or a cohort :data:`Tag` that does not read as a number."""
    if _PERCENT.fullmatch(value):
        if not 0 < float(value) <= 100:
            raise ValueError(f"wave {value!r}: a percentage must lie in (0, 100], e.g. 1,10,50,100")
        return value
    ids.check_tag(value)
    try:
        float(value)
    except ValueError:
        return value
    raise ValueError(
        f"wave {value!r} reads as a number but is not a percentage written like 10 or 12.5; "
        "a cohort tag must not read as a number"
    )


Wave = Annotated[
    str,
    AfterValidator(check_wave),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": ids.TAG.max_length,
            "pattern": f"^([0-9]{{1,3}}(\\.[0-9]{{1,6}})?|{ids.TAG.pattern.pattern})$",
            "examples": ["10", "canary"],
        }
    ),
]
