"""Errors a contract raises when bytes from outside do not follow it.

One family: :class:`ContractError`, each also a ``ValueError``, with a message meant for
whoever sent the bytes (a device, an HTTP client, a file on disk).
"""

from __future__ import annotations

__all__ = [
    "ContractError",
    "DriftError",
    "InferenceRequestError",
    "PayloadError",
    "ReportError",
]


class ContractError(ValueError):
    """Base of every error this package raises."""


class DriftError(ContractError):
    """A drift reference profile or a drift summary that does not follow ``contracts.drift``."""


class PayloadError(ContractError):
    """An MQTT payload or topic that does not follow ``contracts.mqtt``."""


class InferenceRequestError(ContractError):
    """An inference request the model cannot take: malformed Open Inference Protocol JSON, or
    input names, shapes or datatypes that do not match the model."""


class ReportError(ContractError):
    """A ``report.json`` that is not a compile report of a schema this release reads."""
