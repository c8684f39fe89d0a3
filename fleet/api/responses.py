"""The error answers of the fleet's HTTP API, for the OpenAPI schema.

Every error is ``{"detail": MESSAGE}`` (:class:`ErrorDetail`), but FastAPI's 422, whose
``detail`` lists the fields that failed validation (documented by FastAPI itself), and the
inference routes' ``{"error": MESSAGE}`` (``fleet.inference``). Routers and routes pass
``responses=errors(...)`` with every status they can answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ErrorDetail", "errors"]


class ErrorDetail(BaseModel):
    detail: str
    """What was expected, what was found, what to do."""


_WHY = {
    400: "a request that cannot be carried out as sent (a body that is not JSON, a bundle "
    "that does not verify, a selection that matches nothing)",
    401: "no token, or an unknown or revoked one",
    403: "the token's role (or a device's token) is not enough for this route",
    404: "no such record",
    409: "the request contradicts what is stored (a duplicate, a transition the state "
    "forbids, the last active admin token)",
    413: "the request body is over this route's limit",
    503: "a service the fleet needs (the MQTT broker) did not answer; try again",
}


def errors(*statuses: int, model: type[BaseModel] = ErrorDetail) -> dict[int | str, Any]:
    """``responses=`` for these statuses, each answered with ``model``."""
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}
