"""Every route of the fleet's app, for every kind of caller: who is let in, who is not.

The routes come from the app's own routing table, so a route added without an entry in
``MINIMUM`` fails here: no route can skip authorisation by being forgotten. Each case
sends a harmless request (ids that do not exist, empty bodies) and checks only the
authorisation outcome: 401 for no, a wrong or a revoked token, 403 for a caller whose
role is too low, and anything but 401/403 for a caller who may pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from starlette.routing import BaseRoute

from fleet.app import create_app
from fleet.config import FleetSettings
from tests.utils.fleet import RunningFleet, running_fleet

OPEN = "open"
"""No token needed."""
TOKEN = "token"
"""Any valid token: a device's or any role's."""
BROKER = "broker"
"""The broker's shared secret header, which no API token replaces (no secret is set here:
every caller is refused, the broker's side is tests/test_replicas.py)."""
VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"

MINIMUM: dict[str, str] = {
    # the app's own pages
    "GET /": OPEN,
    "GET /docs": OPEN,
    "HEAD /docs": OPEN,
    "GET /docs/oauth2-redirect": OPEN,
    "HEAD /docs/oauth2-redirect": OPEN,
    "GET /openapi.json": OPEN,
    "HEAD /openapi.json": OPEN,
    "GET /static/{path:path}": OPEN,  # the dashboard's files and Swagger UI's
    "HEAD /static/{path:path}": OPEN,
    "GET /metrics": VIEWER,
    # registry
    "GET /api/v1/models": VIEWER,
    "POST /api/v1/models": OPERATOR,
    "GET /api/v1/models/{name}/versions/{version}": VIEWER,
    "GET /api/v1/models/{name}/stages/{stage}": VIEWER,
    "GET /api/v1/models/{name}/health": VIEWER,
    "GET /api/v1/models/{name}/versions/{version}/drift": VIEWER,
    "GET /api/v1/models/{name}/versions/{version}/accuracy": VIEWER,
    "PUT /api/v1/models/{name}/versions/{version}/stage": OPERATOR,
    "POST /api/v1/models/{name}/versions/{version}/bundles": OPERATOR,
    # devices
    "POST /api/v1/enrollment-tokens": ADMIN,
    "POST /api/v1/enroll": OPEN,  # the enrollment token is in the body
    "GET /api/v1/devices": VIEWER,
    "GET /api/v1/devices/{device_id}": VIEWER,
    "PUT /api/v1/devices/{device_id}/tags": OPERATOR,
    "GET /api/v1/devices/{device_id}/telemetry": VIEWER,
    "GET /api/v1/devices/{device_id}/history": VIEWER,
    "GET /api/v1/device-summary": VIEWER,
    "POST /api/v1/devices/{device_id}/revoke": ADMIN,
    "POST /api/v1/devices/{device_id}/ground-truth": OPERATOR,
    # rollouts
    "GET /api/v1/rollouts": VIEWER,
    "POST /api/v1/rollouts": OPERATOR,
    "GET /api/v1/rollouts/{rollout_id}": VIEWER,
    "GET /api/v1/rollouts/{rollout_id}/devices": VIEWER,
    "GET /api/v1/rollouts/{rollout_id}/progress": VIEWER,
    "GET /api/v1/rollouts/{rollout_id}/history": VIEWER,
    "POST /api/v1/rollouts/preview": OPERATOR,
    "POST /api/v1/rollouts/{rollout_id}/{action}": OPERATOR,
    # admin
    "GET /api/v1/tokens": ADMIN,
    "POST /api/v1/tokens": ADMIN,
    "DELETE /api/v1/tokens/{token_id}": ADMIN,
    "GET /api/v1/audit": ADMIN,
    "GET /api/v1/whoami": VIEWER,
    # replicas, and an external broker's authentication and authorization hooks
    "GET /api/v1/replicas": VIEWER,
    "POST /api/v1/broker/authenticate": BROKER,
    "POST /api/v1/broker/authorize": BROKER,
    # OTA: metadata is signed and public, bundles need a token
    "GET /ota/metadata/{name}": OPEN,
    "HEAD /ota/metadata/{name}": OPEN,
    "GET /ota/targets/{path:path}": TOKEN,
    "HEAD /ota/targets/{path:path}": TOKEN,
    # cloud inference: health is open, models need a token
    "GET /v2/health/live": OPEN,
    "GET /v2/health/ready": OPEN,
    "GET /v2/models/{name}": TOKEN,
    "GET /v2/models/{name}/versions/{version}": TOKEN,
    "GET /v2/models/{name}/ready": TOKEN,
    "GET /v2/models/{name}/versions/{version}/ready": TOKEN,
    "POST /v2/models/{name}/infer": TOKEN,
    "POST /v2/models/{name}/versions/{version}/infer": TOKEN,
}

PRINCIPALS = ("none", "wrong", "revoked", "device", VIEWER, OPERATOR, ADMIN)
_RANK = {VIEWER: 1, OPERATOR: 2, ADMIN: 3}

# path parameters that name nothing stored, so an allowed call changes nothing
_PARAMS = {
    "name": "no-such-model",
    "version": "0.0.0",
    "stage": "production",
    "device_id": "no-such-device",
    "rollout_id": "r-none",
    "action": "pause",
    "token_id": "999999999",
    "path": "host/no-such-bundle.efb",
}


def _routes(routes: Sequence[BaseRoute]) -> list[str]:
    """``METHOD PATH`` of every route the app serves, those of included routers too
    (FastAPI 0.16x keeps them nested: ``iter_route_contexts`` walks them)."""
    walk = getattr(fastapi.routing, "iter_route_contexts", lambda routes: routes)
    found = []
    for route in walk(routes):
        methods = getattr(route, "methods", None) or set()
        found += [f"{method} {route.path}" for method in sorted(methods)]
    return sorted(found)


ROUTES = _routes(create_app(FleetSettings(data_dir=Path("unused"))).routes)


def expected(minimum: str, principal: str) -> int | None:
    """401 or 403 when ``principal`` must be refused, ``None`` when it may pass."""
    if minimum == OPEN:
        return None
    if minimum == BROKER or principal in ("none", "wrong", "revoked"):
        return 401
    if minimum == TOKEN:
        return None
    if principal == "device" or _RANK[principal] < _RANK[minimum]:
        return 403
    return None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path_factory.mktemp("roles") / "fleet") as running:
        yield running


@pytest.fixture(scope="module")
def tokens(fleet: RunningFleet) -> dict[str, str | None]:
    revoked = fleet.api("POST", "/tokens", json={"name": "gone", "role": "admin"})
    fleet.api("DELETE", f"/tokens/{revoked['id']}")
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    device_token = fleet.client.post(
        "/api/v1/enroll", json={"token": grant, "device_id": "roles-device"}
    ).json()["api_token"]
    return {
        "none": None,
        "wrong": "efa_" + "x" * 43,
        "revoked": revoked["token"],
        "device": device_token,
        VIEWER: fleet.token(VIEWER),
        OPERATOR: fleet.token(OPERATOR),
        ADMIN: fleet.admin_token,
    }


def test_every_route_of_the_app_has_a_minimum_role() -> None:
    missing = sorted(set(ROUTES) - set(MINIMUM))
    stale = sorted(set(MINIMUM) - set(ROUTES))
    assert not missing, f"routes without an entry in MINIMUM (add each with its role): {missing}"
    assert not stale, f"MINIMUM names routes the app no longer has (remove them): {stale}"


@pytest.mark.parametrize("route", ROUTES)
def test_each_caller_is_let_in_only_with_the_role_the_route_needs(
    route: str, fleet: RunningFleet, tokens: dict[str, str | None]
) -> None:
    assert route in MINIMUM, f"{route} has no minimum role in MINIMUM: add it"
    method, path = route.split(" ", 1)
    url = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: _PARAMS[m.group(1)], path)
    wrong = []
    for principal in PRINCIPALS:
        token = tokens[principal]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"json": {}} if method in ("POST", "PUT") else {}
        status = fleet.client.request(method, url, headers=headers, **kwargs).status_code
        want = expected(MINIMUM[route], principal)
        if want is None and status in (401, 403):
            wrong.append(f"{principal}: refused with {status}, but {MINIMUM[route]} may pass")
        elif want is not None and status != want:
            wrong.append(f"{principal}: answered {status}, expected {want}")
    assert not wrong, f"{route} (needs {MINIMUM[route]}): " + "; ".join(wrong)
