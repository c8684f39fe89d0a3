"""Ground truth: the agent's prediction log, its local API, its telemetry, and the fleet's
relay through a real mosquitto to a device's ``truth`` topic.

Everything but the last test runs in process (the local API through FastAPI's TestClient);
the relay test starts one fleet with its broker. The full chain, fleet to a running agent
and back in its telemetry, is in tests/test_agent_daemon.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.api import create_local_app
from agent.config import GroundTruthConfig
from agent.ground_truth import PredictionLog, Verdict
from agent.inference import InferenceService
from agent.telemetry import InferenceOutcome, InferenceStats
from contracts.mqtt import (
    GROUND_TRUTH_MAX_LABELS,
    GroundTruth,
    GroundTruthBatch,
    Status,
    device_topic,
)
from fleet.broker import MqttEndpoint
from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.mqtt import PahoClient


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _truth(request_id: str, label: int) -> GroundTruth:
    return GroundTruth(request_id=request_id, label=label)


# --- the prediction log ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recorded", "labels", "verdicts"),
    [
        ({"a": 3}, [("a", 3)], [Verdict.CORRECT]),
        ({"a": 3}, [("a", 4)], [Verdict.WRONG]),
        ({"a": 3}, [("b", 3)], [Verdict.UNKNOWN]),
        ({"a": 3}, [("a", 3), ("a", 4)], [Verdict.CORRECT, Verdict.ALREADY_LABELLED]),
        ({"a": None}, [("a", 0)], [Verdict.NO_CLASS]),
    ],
)
def test_a_label_is_matched_with_its_prediction_once(
    recorded: dict[str, int | None], labels: list[tuple[str, int]], verdicts: list[Verdict]
) -> None:
    heard: list[tuple[str | None, bool]] = []
    log = PredictionLog(on_label=lambda bundle, correct: heard.append((bundle, correct)))
    for request_id, predicted in recorded.items():
        assert log.record(request_id, "digits-1.0.0", predicted)
    outcomes = log.label([_truth(r, label) for r, label in labels])
    assert [o.verdict for o in outcomes] == verdicts
    counted = [v for v in verdicts if v in (Verdict.CORRECT, Verdict.WRONG)]
    assert heard == [("digits-1.0.0", v is Verdict.CORRECT) for v in counted]


def test_the_log_forgets_past_its_count_and_its_age() -> None:
    clock = _Clock()
    log = PredictionLog(GroundTruthConfig(max_predictions=3, max_age_s=60), clock=clock)
    for i in range(5):
        log.record(f"r{i}", None, 1)
        clock.now += 10
    assert len(log) == 3
    assert [o.verdict for o in log.label([_truth("r1", 1), _truth("r2", 1)])] == [
        Verdict.UNKNOWN,
        Verdict.CORRECT,
    ]
    clock.now += 35  # r3 is now 55 s old, r4 45 s
    clock.now += 10
    assert [o.verdict for o in log.label([_truth("r3", 1), _truth("r4", 1)])] == [
        Verdict.UNKNOWN,
        Verdict.CORRECT,
    ]


def test_an_id_no_label_could_name_is_not_kept() -> None:
    log = PredictionLog()
    assert not log.record("has space", None, 1)
    assert not log.record("x" * 129, None, 1)
    assert not log.record("", None, 1)
    assert log.record("x" * 128, None, 1)
    assert len(log) == 1


# --- telemetry -------------------------------------------------------------------------------


def _outcome(bundle: str, shadow: str | None = None) -> InferenceOutcome:
    return InferenceOutcome(
        bundle=bundle,
        served_by="local",
        latency_ms=1.0,
        local_error=False,
        fallback_reason=None,
        predicted_class=1,
        shadow_bundle=shadow,
    )


def test_labels_reach_the_record_of_their_bundle_as_labelled_and_correct() -> None:
    stats = InferenceStats()
    log = PredictionLog(on_label=stats.observe_truth)
    stats.observe(_outcome("digits-1.0.0", shadow="digits-1.1.0"))
    stats.observe(_outcome("other-2.0.0"))
    log.record("a", "digits-1.0.0", 1)
    log.record("b", "digits-1.0.0", 1)
    log.record("c", None, 2)  # the cloud answered: no bundle of this device's
    log.label([_truth("a", 1), _truth("b", 7), _truth("c", 2), _truth("a", 1)])
    records = {r.bundle: r for r in stats.report()}
    assert set(records) == {"digits-1.0.0", "other-2.0.0", None}
    assert records["digits-1.0.0"].shadow_bundle == "digits-1.1.0"  # one record, not two
    assert records["digits-1.0.0"].extra["truth"] == {"labelled": 2, "correct": 1}
    assert records[None].extra["truth"] == {"labelled": 1, "correct": 1}
    assert records[None].inferences == 0
    assert "truth" not in records["other-2.0.0"].extra
    assert stats.report() == []  # counted once


# --- the local API ---------------------------------------------------------------------------


@pytest.fixture
def local() -> Iterator[tuple[TestClient, PredictionLog]]:
    log = PredictionLog()
    with InferenceService() as service, TestClient(create_local_app(service, predictions=log)) as c:
        yield c, log


def test_the_local_api_answers_each_label_with_its_status(
    local: tuple[TestClient, PredictionLog],
) -> None:
    client, log = local
    log.record("r-1", "digits-1.0.0", 3)
    log.record("r-2", "digits-1.0.0", 3)
    log.record("r-3", None, None)
    one = client.post("/v2/ground-truth", json={"request_id": "r-1", "label": 3})
    assert (one.status_code, one.json()) == (
        200,
        {"request_id": "r-1", "result": "correct", "bundle": "digits-1.0.0"},
    )
    again = client.post("/v2/ground-truth", json={"request_id": "r-1", "label": 3})
    assert (again.status_code, again.json()["result"]) == (409, "already_labelled")
    unknown = client.post("/v2/ground-truth", json={"request_id": "nope", "label": 3})
    assert unknown.status_code == 404
    assert "max_age_s" in unknown.json()["error"]
    batch = client.post(
        "/v2/ground-truth",
        json={"labels": [{"request_id": r, "label": 4} for r in ("r-2", "r-3", "nope")]},
    )
    assert batch.status_code == 200
    assert [(r["result"], r["status"]) for r in batch.json()["results"]] == [
        ("wrong", 200),
        ("no_class", 409),
        ("unknown", 404),
    ]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "not JSON"),
        (b"[]", 400, "the body"),
        (json.dumps({"request_id": "r", "label": "3"}).encode(), 400, "label"),
        (json.dumps({"request_id": "r", "label": True}).encode(), 400, "label"),
        (json.dumps({"request_id": "r", "label": 3.5}).encode(), 400, "label"),
        (json.dumps({"request_id": "r", "label": -1}).encode(), 400, "label"),
        (json.dumps({"request_id": "r"}).encode(), 400, "label"),
        (json.dumps({"request_id": "a b", "label": 1}).encode(), 400, "request_id"),
        (json.dumps({"labels": []}).encode(), 400, "labels"),
        (
            json.dumps(
                {"labels": [{"request_id": "r", "label": 1}] * (GROUND_TRUTH_MAX_LABELS + 1)}
            ).encode(),
            400,
            "labels",
        ),
        (b'{"labels": "' + b"x" * (1 << 20) + b'"}', 413, "fewer labels"),
        (b"[" * 100_000, 400, "not JSON"),
    ],
)
def test_a_hostile_label_is_refused_with_what_to_send(
    local: tuple[TestClient, PredictionLog], body: bytes, status: int, says: str
) -> None:
    client, log = local
    log.record("r", "digits-1.0.0", 3)
    answer = client.post(
        "/v2/ground-truth", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]
    assert log.label([_truth("r", 3)])[0].verdict is Verdict.CORRECT  # nothing counted


# --- the fleet's relay -----------------------------------------------------------------------


def _online_device(fleet: RunningFleet, device_id: str) -> PahoClient:
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    enrolled = fleet.client.post(
        "/api/v1/enroll", json={"token": grant, "device_id": device_id}
    ).json()
    mqtt = enrolled["mqtt"]
    endpoint = MqttEndpoint(
        mqtt["host"], mqtt["port"], username=device_id, password=mqtt["password"]
    )
    return PahoClient(endpoint, device_id)


def test_the_fleet_relays_labels_to_the_device_s_truth_topic_only_when_it_can(
    tmp_path: Path,
) -> None:
    labels: dict[str, Any] = {"labels": [{"request_id": "r-1", "label": 3}]}
    with running_fleet(tmp_path / "fleet") as fleet:
        path = "/api/v1/devices/{}/ground-truth"
        operator = {"Authorization": f"Bearer {fleet.token('operator')}"}
        device = _online_device(fleet, "truth-dev")
        try:
            assert device.subscribe(device_topic("truth-dev", "truth")) == 1
            other = device.subscribe(device_topic("someone-else", "truth"))
            assert other >= 0x80, "a device reads its own truth topic only"

            offline = fleet.client.post(path.format("truth-dev"), json=labels, headers=operator)
            assert offline.status_code == 409 and "offline" in offline.json()["detail"]

            status = Status(online=True).model_dump_json()
            device.publish(device_topic("truth-dev", "status"), status, retain=True)
            wait_for(
                lambda: fleet.api("GET", "/devices/truth-dev")["online"],
                what="the device online",
            )
            sent = fleet.client.post(path.format("truth-dev"), json=labels, headers=operator)
            assert (sent.status_code, sent.json()) == (
                202,
                {"device_id": "truth-dev", "relayed": 1},
            )
            topic, payload = device.next_message(timeout_s=10)
            assert topic == device_topic("truth-dev", "truth")
            assert GroundTruthBatch.model_validate_json(payload).labels == [_truth("r-1", 3)]

            hostile = [
                ("no-such-device", labels, 404),
                ("truth-dev", {"labels": []}, 422),
                ("truth-dev", {"labels": [{"request_id": "r", "label": "3"}]}, 422),
                ("truth-dev", {"labels": [{"request_id": "r", "label": 1.5}]}, 422),
                ("truth-dev", [{"request_id": "r", "label": 1}], 422),
                (
                    "truth-dev",
                    {"labels": [{"request_id": "r", "label": 1}] * (GROUND_TRUTH_MAX_LABELS + 1)},
                    422,
                ),
            ]
            for device_id, body, status_code in hostile:
                answer = fleet.client.post(path.format(device_id), json=body, headers=operator)
                assert answer.status_code == status_code, (device_id, body, answer.text)
            viewer = {"Authorization": f"Bearer {fleet.token('viewer')}"}
            refused = fleet.client.post(path.format("truth-dev"), json=labels, headers=viewer)
            assert refused.status_code == 403
            assert device.messages.empty(), "nothing refused reached the device"

            fleet.api("POST", "/devices/truth-dev/revoke")
            revoked = fleet.client.post(path.format("truth-dev"), json=labels, headers=operator)
            assert revoked.status_code == 409 and "revoked" in revoked.json()["detail"]
        finally:
            device.close()
