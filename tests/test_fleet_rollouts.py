"""Staged rollouts end to end: a real fleet server, mosquitto, SQLite and simulated devices.

The devices are ``fleet.simulator`` devices: they speak the real MQTT protocol through the
real broker with their enrolled credentials, and their install outcome (healthy, failed,
error rate in telemetry) is set per bundle by the test — they run no model.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.simulator import Behaviour, FleetSimulator, SimulatedDeviceSpec
from ota.archive import read_manifest
from tests.utils.fleet import (
    CommandObserver,
    RunningFleet,
    running_fleet,
    wait_for,
)
from tests.utils.mqtt import free_port

V1, V2 = "digits-host-1.0.0", "digits-host-1.1.0"


@pytest.fixture
def fleet(tmp_path: Path, bundles: tuple[Path, Path]) -> Any:
    with running_fleet(tmp_path / "fleet") as running:
        running.v1 = running.publish(bundles[0], stage="production")  # type: ignore[attr-defined]
        running.v2 = running.publish(bundles[1])  # type: ignore[attr-defined]
        yield running


def _simulate(
    fleet: RunningFleet, count: int, behaviour: Behaviour, **kwargs: Any
) -> FleetSimulator:
    specs = fleet.enroll(count, bundle=V1, bundle_version_number=1_000_000, **kwargs)
    simulator = FleetSimulator("127.0.0.1", fleet.mqtt_port, specs, behaviour)
    simulator.start(connect_timeout_s=60)
    wait_for(
        lambda: len(fleet.api("GET", "/devices?online=true")) == count,
        what="every simulated device online in the fleet's view",
    )
    return simulator


def _rollout(fleet: RunningFleet, bundle_id: int, **body: Any) -> dict[str, Any]:
    gate = {"soak_s": 0, **body.pop("gate", {})}
    return fleet.api(  # type: ignore[no-any-return]
        "POST", "/rollouts", json={"bundle_id": bundle_id, "gate": gate, **body}
    )


def _state(fleet: RunningFleet, rollout_id: str, *states: str) -> dict[str, Any] | None:
    found = fleet.api("GET", f"/rollouts/{rollout_id}")
    return found if found["state"] in states else None


def _members(fleet: RunningFleet, rollout_id: str) -> dict[str, dict[str, Any]]:
    return {m["device_id"]: m for m in fleet.api("GET", f"/rollouts/{rollout_id}/devices")}


def test_a_rollout_advances_through_every_wave_to_every_device(fleet: RunningFleet) -> None:
    with _simulate(fleet, 20, Behaviour()) as devices:
        observer = CommandObserver(fleet)
        rollout = _rollout(fleet, fleet.v2["id"], waves=["10", "50", "100"])  # type: ignore[attr-defined]
        done = wait_for(
            lambda: _state(fleet, rollout["id"], "completed", "paused", "rolled_back"),
            what="the rollout to finish",
        )
        assert done["state"] == "completed", done["reason"]
        members = _members(fleet, rollout["id"])
        assert Counter(m["wave"] for m in members.values()) == {0: 2, 1: 8, 2: 10}
        assert all(m["state"] == "healthy" for m in members.values())
        assert all(devices.current_bundle(d) == V2 for d in members)
        # each device was commanded once, and waves went out in order
        deploys = [d for d, c in observer.commands if c.kind.value == "deploy"]
        assert sorted(deploys) == sorted(members)
        assert [members[d]["wave"] for d in deploys] == sorted(members[d]["wave"] for d in deploys)
        waves_seen = wait_for(
            lambda: [
                e for e in fleet.api("GET", "/audit?limit=500") if e["action"] == "rollout.passed"
            ],
            what="audit entries",
        )
        assert len(waves_seen) == 2  # wave 1 → 2 → 3, then complete
        observer.close()
        metrics = fleet.client.get("/metrics").text
        assert "edgefleet_devices_online 20.0" in metrics
        assert "edgefleet_rollouts_active 0.0" in metrics
        assert 'edgefleet_commands_sent_total{kind="deploy"} 20.0' in metrics


def test_assignment_is_deterministic_and_sticky(fleet: RunningFleet) -> None:
    fleet.enroll(30, bundle=V1)
    body = {"waves": ["10", "100"], "auto_advance": False}
    first = _rollout(fleet, fleet.v2["id"], **body)  # type: ignore[attr-defined]
    waves = {d: m["wave"] for d, m in _members(fleet, first["id"]).items()}
    fleet.api("POST", f"/rollouts/{first['id']}/abort")
    second = _rollout(fleet, fleet.v2["id"], **body)  # type: ignore[attr-defined]
    again = {d: m["wave"] for d, m in _members(fleet, second["id"]).items()}
    # the same hash ordering with another rollout id picks other devices for the canary...
    assert {d for d, w in waves.items() if w == 0} != {d for d, w in again.items() if w == 0}
    # ...and a rollout keeps its assignment: re-reading it gives the same waves
    assert waves == {d: m["wave"] for d, m in _members(fleet, first["id"]).items()}
    assert sum(w == 0 for w in waves.values()) == 3


def test_a_failing_bundle_halts_in_the_first_wave_and_nobody_else_is_commanded(
    fleet: RunningFleet,
) -> None:
    behaviour = Behaviour(failing_bundles={V2})
    with _simulate(fleet, 20, behaviour) as devices:
        observer = CommandObserver(fleet)
        rollout = _rollout(
            fleet,
            fleet.v2["id"],
            waves=["10", "50", "100"],  # type: ignore[attr-defined]
            gate={"max_failure_ratio": 0.0},
        )
        paused = wait_for(lambda: _state(fleet, rollout["id"], "paused"), what="the pause")
        assert "gate failed" in paused["reason"] and "failed" in paused["reason"]
        time.sleep(1.0)  # give a wrongly advancing engine the time to send wave 2
        members = _members(fleet, rollout["id"])
        first_wave = {d for d, m in members.items() if m["wave"] == 0}
        assert observer.devices_sent("deploy") == first_wave
        assert all(devices.current_bundle(d) == V1 for d in members)
        observer.close()


def test_a_high_error_rate_rolls_the_first_wave_back(fleet: RunningFleet) -> None:
    behaviour = Behaviour(
        error_rate={V1: 0.01, V2: 0.4}, telemetry_interval_s=0.2, inferences_per_report=50
    )
    with _simulate(fleet, 10, behaviour) as devices:
        # a baseline for the running version
        wait_for(
            lambda: fleet.server.metrics.telemetry_records._value.get() >= 20,
            what="baseline telemetry",
        )
        observer = CommandObserver(fleet)
        rollout = _rollout(
            fleet,
            fleet.v2["id"],
            waves=["20", "100"],
            on_failure="rollback",  # type: ignore[attr-defined]
            gate={"soak_s": 0.5, "min_inferences": 100},
        )
        done = wait_for(
            lambda: _state(fleet, rollout["id"], "rolled_back", "completed", "paused"),
            what="the rollback",
        )
        assert done["state"] == "rolled_back"
        assert "error rate" in done["last_gate"]["failures"][0]
        members = _members(fleet, rollout["id"])
        first_wave = {d for d, m in members.items() if m["wave"] == 0}
        assert observer.devices_sent("deploy") == first_wave
        assert observer.devices_sent("rollback") == first_wave
        assert all(members[d]["state"] == "rolled_back" for d in first_wave)
        assert all(devices.current_bundle(d) == V1 for d in members)
        observer.close()


def test_operators_pause_resume_and_cannot_skip_the_state_machine(fleet: RunningFleet) -> None:
    with _simulate(fleet, 10, Behaviour()):
        rollout = _rollout(
            fleet,
            fleet.v2["id"],
            waves=["10", "100"],
            auto_advance=False,  # type: ignore[attr-defined]
        )
        held = wait_for(lambda: _state(fleet, rollout["id"], "awaiting_approval"), what="hold")
        assert held["wave"] == 0
        refused = fleet.call("POST", f"/rollouts/{rollout['id']}/resume")
        assert refused.status_code == 409 and "cannot resume" in refused.json()["detail"]
        fleet.api("POST", f"/rollouts/{rollout['id']}/pause", json={"reason": "friday"})
        fleet.api("POST", f"/rollouts/{rollout['id']}/advance")
        done = wait_for(lambda: _state(fleet, rollout["id"], "completed"), what="completion")
        assert done["wave"] == 1
        viewer = fleet.token("viewer")
        assert (
            fleet.call("POST", f"/rollouts/{rollout['id']}/rollback", token=viewer).status_code
            == 403
        )


def test_a_shadow_rollout_reports_agreement_without_serving(fleet: RunningFleet) -> None:
    behaviour = Behaviour(
        shadow_agreement={V2: 0.97}, telemetry_interval_s=0.2, inferences_per_report=50
    )
    with _simulate(fleet, 5, behaviour) as devices:
        rollout = _rollout(
            fleet,
            fleet.v2["id"],
            waves=["100"],
            mode="shadow",  # type: ignore[attr-defined]
            gate={"soak_s": 0.5, "min_inferences": 100, "min_agreement": 0.9},
        )
        done = wait_for(lambda: _state(fleet, rollout["id"], "completed", "paused"), what="gate")
        assert done["state"] == "completed", done["reason"]
        assert done["last_gate"]["new"]["agreement"] == pytest.approx(0.97, abs=0.02)
        assert all(devices.current_bundle(d) == V1 for d in _members(fleet, rollout["id"]))


# --- a fleet server process killed mid-rollout -----------------------------------------------


def _serve(data_dir: Path, port: int, mqtt_port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "fleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--mqtt-port",
            str(mqtt_port),
            "--rollout-tick",
            "0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / f"serve-{port}-{time.time_ns()}.log", "wb"),  # noqa: SIM115
    )
    wait_for(lambda: _ready(port), timeout_s=60, what="the fleet server to answer")
    return process


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_fleet_server_resumes_the_rollout_where_it_was(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    data_dir = tmp_path / "fleet"
    data_dir.mkdir()
    port, mqtt_port = free_port(), free_port()
    process = _serve(data_dir, port, mqtt_port)
    token = (data_dir / "admin.token").read_text().strip()
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    try:
        for bundle in bundles:
            manifest = read_manifest(bundle)
            api.post("/models", json={"name": "digits", "version": manifest.model.version})
            attached = api.post(
                f"/models/digits/versions/{manifest.model.version}/bundles",
                content=bundle.read_bytes(),
            ).json()
        grant = api.post("/enrollment-tokens", json={"profile": "host", "uses": 10}).json()["token"]
        specs = []
        for i in range(10):
            body = api.post("/enroll", json={"token": grant, "device_id": f"dev-{i}"}).json()
            specs.append(
                SimulatedDeviceSpec(
                    device_id=body["device_id"],
                    username=body["mqtt"]["username"],
                    password=body["mqtt"]["password"],
                    bundle=V1,
                    bundle_version_number=1_000_000,
                )
            )
        with FleetSimulator("127.0.0.1", mqtt_port, specs, Behaviour()) as devices:
            devices.start(connect_timeout_s=60)
            rollout = api.post(
                "/rollouts",
                json={
                    "bundle_id": attached["id"],
                    "waves": ["10", "50", "100"],
                    "gate": {"soak_s": 10},  # longer than a restart takes
                },
            ).json()
            wait_for(
                lambda: api.get(f"/rollouts/{rollout['id']}").json()["state"] == "soaking",
                what="wave 1 soaking",
            )
            before = api.get(f"/rollouts/{rollout['id']}").json()
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process = _serve(data_dir, port, mqtt_port)
            after = api.get(f"/rollouts/{rollout['id']}").json()
            assert (
                (after["state"], after["wave"])
                == (before["state"], before["wave"])
                == ("soaking", 0)
            )
            done = wait_for(
                lambda: (
                    (r := api.get(f"/rollouts/{rollout['id']}").json())["state"] == "completed"
                    and r
                ),
                timeout_s=60,
                what="completion after the restart",
            )
            assert done["wave"] == 2
            assert all(devices.current_bundle(s.device_id) == V2 for s in specs)
            for spec in specs:  # resends are recognised, never installed twice
                kinds = Counter(c.id for c in devices.received_commands(spec.device_id))
                assert len(kinds) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        api.close()


# --- the state machine itself ----------------------------------------------------------------


def test_every_unfinished_state_has_a_way_out_and_finished_ones_stay_finished() -> None:
    from fleet.models import RolloutState
    from fleet.rollouts import TRANSITIONS, Event

    for state in RolloutState:
        exits = {event for (s, event) in TRANSITIONS if s == state}
        if state.terminal:
            # only a completed rollout can still be undone
            assert exits == ({Event.ROLLBACK} if state == RolloutState.COMPLETED else set())
        else:
            assert Event.ABORT in exits, f"{state} cannot be aborted"
            assert exits & {Event.PAUSE, Event.ROLLBACK, Event.ROLLED_BACK}, f"{state} cannot fail"
    assert all(
        not target.terminal or event in {Event.COMPLETE, Event.ABORT, Event.ROLLED_BACK}
        for (_, event), target in TRANSITIONS.items()
    )


def test_the_fleet_runs_a_rollout_and_ingests_telemetry_on_postgresql(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    from tests.utils.postgres import postgres_available, postgres_server

    if not postgres_available():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    (tmp_path / "pg").mkdir()
    with (
        postgres_server(tmp_path / "pg") as url,
        running_fleet(tmp_path / "fleet", database_url=url) as fleet,
    ):
        fleet.publish(bundles[0], stage="production")
        v2 = fleet.publish(bundles[1])
        behaviour = Behaviour(telemetry_interval_s=None)
        with _simulate(fleet, 10, behaviour) as devices:
            rollout = _rollout(fleet, v2["id"], waves=["10", "100"])
            done = wait_for(lambda: _state(fleet, rollout["id"], "completed", "paused"), what="end")
            assert done["state"] == "completed", done["reason"]
            assert all(devices.current_bundle(d) == V2 for d in _members(fleet, rollout["id"]))
            devices.publish_telemetry()
            wait_for(
                lambda: fleet.server.metrics.telemetry_records._value.get() == 10,
                what="10 records in PostgreSQL",
            )
        assert fleet.server.db.dialect.name == "postgresql"
