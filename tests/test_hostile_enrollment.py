"""Enrollment against hostile or unlucky devices: races on a token, a broker that is down,
chosen tags, revoked ids, ids that would break the broker's configuration.

Requests go through real HTTP (uvicorn in front of the running fleet) where concurrency
matters, otherwise through the app's test client; the broker is the fleet's real
mosquitto; the database SQLite, and PostgreSQL where it matters.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Connection

from contracts.mqtt import device_topic
from fleet.broker import MqttEndpoint
from fleet.db import make_engine
from tests.utils.fleet import RunningFleet, device_endpoint, running_fleet, wait_for
from tests.utils.http import serve_app
from tests.utils.mqtt import REFUSED, PahoClient, free_port, mqtt_pub

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` (the fleet's own SQLite file), or a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: str = request.getfixturevalue("postgres_url")
    name = re.sub(r"\W", "_", request.node.name)[:63].lower()
    with autocommit(server) as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return f"{server.rsplit('/', 1)[0]}/{name}"


@contextmanager
def autocommit(url: str) -> Iterator[Connection]:
    """An autocommit connection to the server at ``url`` (CREATE DATABASE needs one)."""
    engine = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def grant(fleet: RunningFleet, **body: Any) -> str:
    token: str = fleet.api("POST", "/enrollment-tokens", json={"profile": "host", **body})["token"]
    return token


def accepted(endpoint: MqttEndpoint, device_id: str) -> bool:
    """Whether the broker takes ``device_id``'s status from ``endpoint``."""
    rc, _, err = mqtt_pub(endpoint, device_topic(device_id, "status"), "{}")
    return rc == 0 and err == ""


def broker_clients(fleet: RunningFleet) -> set[str]:
    broker = fleet.server.broker
    assert broker is not None
    answer = broker.control([{"command": "listClients"}])[0]
    return set(answer["data"]["clients"])


# --- a one-use token, raced ----------------------------------------------------------------------


def test_twelve_concurrent_enrollments_on_a_one_use_token_enroll_exactly_one(
    database_url: str | None, tmp_path: Path
) -> None:
    with (
        running_fleet(tmp_path / "fleet", database_url=database_url) as fleet,
        serve_app(fleet.client.app) as served,
    ):
        token = grant(fleet, uses=1)
        start = threading.Barrier(12)

        def attempt(i: int) -> tuple[int, dict[str, Any]]:
            with httpx.Client(base_url=served.url, timeout=60) as http:
                start.wait()
                answer = http.post("/api/v1/enroll", json={"token": token, "device_id": f"r{i}"})
                return answer.status_code, answer.json()

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(attempt, range(12)))
        assert Counter(status for status, _ in results) == {201: 1, 403: 11}, results
        assert all("used up" in body["detail"] for status, body in results if status == 403)
        (winner,) = [body["device_id"] for status, body in results if status == 201]
        assert [d["id"] for d in fleet.api("GET", "/devices")] == [winner]
        assert {c for c in broker_clients(fleet) if c.startswith("r")} == {winner}


def test_an_expired_token_enrolls_nobody(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet") as fleet:
        token = grant(fleet, uses=5, ttl_s=1)
        time.sleep(1.2)
        expired = fleet.client.post("/api/v1/enroll", json={"token": token, "device_id": "late"})
        assert expired.status_code == 403 and "expired at" in expired.json()["detail"]
        assert fleet.call("GET", "/devices/late").status_code == 404


def test_a_commit_that_fails_after_the_broker_accepted_takes_the_device_out_again(
    postgres_url: str, tmp_path: Path
) -> None:
    with autocommit(postgres_url) as connection:
        connection.exec_driver_sql('CREATE DATABASE "late_failure"')
    url = f"{postgres_url.rsplit('/', 1)[0]}/late_failure"
    with (
        running_fleet(tmp_path / "fleet", database_url=url) as fleet,
        serve_app(fleet.client.app) as served,
    ):
        # a deferred constraint trigger: PostgreSQL refuses the device at COMMIT, after
        # the broker has accepted it
        with fleet.server.db.begin() as connection:
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ BEGIN "
                "IF NEW.id = 'doomed' THEN RAISE EXCEPTION 'refused at commit'; END IF; "
                "RETURN NULL; END $$ LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER doomed AFTER INSERT ON device DEFERRABLE "
                "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_doomed()"
            )
        token = grant(fleet, uses=1)
        failed = httpx.post(
            f"{served.url}/api/v1/enroll", json={"token": token, "device_id": "doomed"}
        )
        assert failed.status_code == 500
        assert "doomed" not in broker_clients(fleet)
        assert fleet.call("GET", "/devices/doomed").status_code == 404
        # the token's use was rolled back with the device
        fine = fleet.client.post("/api/v1/enroll", json={"token": token, "device_id": "fine"})
        assert fine.status_code == 201, fine.text


# --- the broker down -------------------------------------------------------------------------


def test_enrollment_while_the_broker_is_down_answers_503_and_the_token_still_works(
    tmp_path: Path,
) -> None:
    # the fleet restarts its broker by itself: 5 s later, time enough to enroll meanwhile
    with running_fleet(tmp_path / "fleet", mqtt_port=free_port(), mqtt_restart_delay_s=5) as fleet:
        broker, supervisor = fleet.server.broker, fleet.server.supervisor
        assert broker is not None and broker.pid is not None and supervisor is not None
        token = grant(fleet, uses=1)
        os.kill(broker.pid, signal.SIGKILL)
        wait_for(lambda: not supervisor.up, timeout_s=5, what="the fleet to notice")

        request = {"token": token, "device_id": "patient"}
        down = fleet.client.post("/api/v1/enroll", json=request)
        assert down.status_code == 503, down.text
        assert "the enrollment token was not used" in down.json()["detail"]
        assert "mosquitto" not in down.json()["detail"]  # no broker log to an anonymous caller
        assert down.headers["Retry-After"]
        assert fleet.call("GET", "/devices/patient").status_code == 404

        # the broker is back, from the database
        wait_for(lambda: supervisor.up, timeout_s=30, what="the broker restarted")
        again = fleet.client.post("/api/v1/enroll", json=request)
        assert again.status_code == 201, again.text
        assert accepted(device_endpoint(again.json(), tmp_path), "patient")
        used = fleet.client.post("/api/v1/enroll", json={**request, "device_id": "second"})
        assert used.status_code == 403 and "used up" in used.json()["detail"]


# --- tags ------------------------------------------------------------------------------------


def test_a_device_cannot_choose_its_tags(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet") as fleet:
        token = grant(fleet, tags=["lab"], uses=1)
        for chosen in (["canary"], ["lab", "canary"]):
            refused = fleet.client.post(
                "/api/v1/enroll", json={"token": token, "device_id": "tagger", "tags": chosen}
            )
            assert refused.status_code == 422, refused.text
            assert "they come from the enrollment token" in refused.text
        # what agents before 0.2 send: an empty list asks for nothing, and is let through
        enrolled = fleet.client.post(
            "/api/v1/enroll", json={"token": token, "device_id": "tagger", "tags": []}
        )
        assert enrolled.status_code == 201, enrolled.text
        assert enrolled.json()["tags"] == ["lab"]
        assert fleet.api("GET", "/devices/tagger")["tags"] == ["lab"]
    # the agent's command line refuses --tag and says why
    done = subprocess.run(
        [EDGEFLEET, "agent", "enroll", "--fleet", "http://127.0.0.1:9", "--token", "efe_x",
         "--device-id", "tagger", "--tag", "canary", "--out", str(tmp_path / "agent")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", done.stderr).split())
    assert done.returncode == 2 and "they come from the enrollment token" in said, done.stderr
    assert not (tmp_path / "agent").exists()


# --- revoked ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["password", "mtls"])
def test_a_revoked_id_is_enrolled_again_only_with_a_reenroll_token(
    mode: str, tmp_path: Path
) -> None:
    with running_fleet(tmp_path / "fleet", mqtt_tls=mode == "mtls") as fleet:
        first = fleet.api("POST", "/enroll", json={"token": grant(fleet), "device_id": "phoenix"})
        old = device_endpoint(first, tmp_path / "old")
        assert accepted(old, "phoenix")
        fleet.api("POST", "/devices/phoenix/revoke")
        assert not accepted(old, "phoenix")

        plain = grant(fleet, uses=1)
        refused = fleet.client.post("/api/v1/enroll", json={"token": plain, "device_id": "phoenix"})
        assert refused.status_code == 409, refused.text
        assert '"reenroll_revoked": true' in refused.json()["detail"]

        reenroll = grant(fleet, uses=2, reenroll_revoked=True)
        second = fleet.api("POST", "/enroll", json={"token": reenroll, "device_id": "phoenix"})
        new = device_endpoint(second, tmp_path / "new")
        assert accepted(new, "phoenix") and not accepted(old, "phoenix")
        device = fleet.api("GET", "/devices/phoenix")
        assert device["state"] == "active" and device["revoked_at"] is None
        assert second["api_token"] != first["api_token"]

        # an active id stays taken, whatever the token
        taken = fleet.client.post(
            "/api/v1/enroll", json={"token": reenroll, "device_id": "phoenix"}
        )
        assert taken.status_code == 409 and "already enrolled" in taken.json()["detail"]
        # and the refusals used no token
        other = fleet.client.post("/api/v1/enroll", json={"token": plain, "device_id": "other"})
        assert other.status_code == 201, other.text


# --- ids that would break the broker's configuration -----------------------------------------


MALFORMED_IDS = ["zz\n", "a/b", "#", "+", "$share", "a b", "x" * 65, "", "dev\x00", "ünï", "-x"]
RESERVED_IDS = ["edgefleet-fleet", "edgefleet-fleet-admin", "edgefleet-other"]


def test_ids_that_would_break_the_broker_are_refused_and_it_is_untouched(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet") as fleet:
        broker = fleet.server.broker
        assert broker is not None
        before = broker.security_path.read_bytes()
        token = grant(fleet, uses=1)
        for bad in MALFORMED_IDS:
            answer = fleet.client.post("/api/v1/enroll", json={"token": token, "device_id": bad})
            assert answer.status_code == 422, (bad, answer.text)
        for reserved in RESERVED_IDS:
            answer = fleet.client.post(
                "/api/v1/enroll", json={"token": token, "device_id": reserved}
            )
            assert answer.status_code == 403, (reserved, answer.text)
            assert "are the fleet's own" in answer.json()["detail"]
        assert broker.security_path.read_bytes() == before
        # the token is unused, and the broker enforces as before
        ok = fleet.client.post("/api/v1/enroll", json={"token": token, "device_id": "ok"})
        assert ok.status_code == 201, ok.text
        device = PahoClient(device_endpoint(ok.json(), tmp_path), "ok")
        try:
            assert device.subscribe("#") == REFUSED
            assert device.subscribe(device_topic("ok", "cmd")) == 1
        finally:
            device.close()
