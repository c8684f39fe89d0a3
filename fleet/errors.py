"""Errors the fleet server raises at its boundary.

Two families, as in ``ota.errors``: what a caller sent that cannot be done (a missing
record, a transition the state machine forbids, a bad enrollment token), which the API
turns into 4xx answers, and what the server's own infrastructure failed at (the broker
would not start, the certificate authority is unreadable).
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "CertificateError",
    "ConflictError",
    "EnrollmentError",
    "FleetError",
    "InferenceError",
    "InvalidTransitionError",
    "LeaseLost",
    "ModelUnavailableError",
    "NotFoundError",
    "RequestError",
    "StartupError",
]


class FleetError(Exception):
    """Base of every error this package raises."""


class RequestError(FleetError, ValueError):
    """A request that cannot be carried out as asked (HTTP 4xx)."""

    status_code = 400


class NotFoundError(RequestError, LookupError):
    status_code = 404


class ConflictError(RequestError):
    """The request contradicts what is stored: a duplicate, a stage that forbids it."""

    status_code = 409


class InvalidTransitionError(ConflictError):
    """A rollout was asked for a transition its state machine does not allow from here."""


class EnrollmentError(RequestError):
    """An enrollment token that is unknown, used or expired, or a bad device request."""

    status_code = 403


class InferenceError(RequestError):
    """An inference request the model cannot run (wrong input names, shapes, types)."""


class ModelUnavailableError(FleetError, RuntimeError):
    """The model exists but cannot be served now (its file does not load): HTTP 503."""

    status_code = 503


class BrokerError(FleetError, RuntimeError):
    """The MQTT broker could not be started, configured or reached."""


class CertificateError(FleetError):
    """The fleet's certificate authority could not be created, loaded or used."""


class LeaseLost(FleetError, RuntimeError):
    """The rollout engine's replica no longer holds the term it began a step in: the
    step's transaction is rolled back (``fleet.rollouts.lease``)."""


class StartupError(FleetError, RuntimeError):
    """``fleet serve`` cannot start as configured (a port in use): nothing was set up."""
