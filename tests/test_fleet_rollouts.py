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

from contracts.mqtt import Ack, AckState, CommandKind
from fleet.models import RolloutDevice, RolloutDeviceState
from fleet.rollouts.acks import _apply_ack
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


def _failures(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed checks of the rollout's last gate verdict."""
    verdict = rollout["last_gate"]
    assert verdict is not None and verdict["outcome"] == "failed", verdict
    return [c for c in verdict["checks"] if not c["passed"]]


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
        metrics = fleet.metrics()
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
        # one failed device of the two already trips it: the second may not have answered
        assert paused["reason"].startswith("gate failed: wave 1: failure ratio ")
        assert "% > max 0.0% (" in paused["reason"]
        [failure] = _failures(paused)
        assert (failure["metric"], failure["threshold"]) == ("failure_ratio", 0.0)
        assert failure["value"] in (0.5, 1.0)
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
        assert [c["metric"] for c in _failures(done)] == ["error_rate"]
        members = _members(fleet, rollout["id"])
        first_wave = {d for d, m in members.items() if m["wave"] == 0}
        assert observer.devices_sent("deploy") == first_wave
        assert observer.devices_sent("rollback") == first_wave
        assert all(members[d]["state"] == "rolled_back" for d in first_wave)
        assert all(devices.current_bundle(d) == V1 for d in members)
        observer.close()


def test_the_sequential_gate_halts_a_canary_the_fixed_threshold_would_pass(
    fleet: RunningFleet,
) -> None:
    # 4 % errors against 2 %: within the default +2 points, but twice the rate of the
    # devices still on the previous version over the same soak
    behaviour = Behaviour(
        error_rate={V1: 0.02, V2: 0.04}, telemetry_interval_s=0.2, inferences_per_report=50
    )
    with _simulate(fleet, 10, behaviour):
        rollout = _rollout(
            fleet,
            fleet.v2["id"],
            waves=["20", "100"],
            gate={"soak_s": 0.5, "compare": "baseline", "max_error_rate_increase": 0.02},
        )
        done = wait_for(
            lambda: _state(fleet, rollout["id"], "paused", "completed"), what="the gate"
        )
        assert done["state"] == "paused" and done["wave"] == 0
        [failure] = _failures(done)
        assert failure["metric"] == "error_rate_vs_baseline"
        assert failure["value"] < failure["threshold"] == 0.025
        assert "mixture SPRT" in failure["reason"] and "ratio 2.00x" in failure["reason"]
        members = _members(fleet, rollout["id"])
        assert {m["state"] for m in members.values() if m["wave"] == 1} == {"pending"}


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
        [agreement] = [c for c in done["last_gate"]["checks"] if c["metric"] == "agreement"]
        assert agreement["passed"] and agreement["threshold"] == 0.9
        assert all(devices.current_bundle(d) == V1 for d in _members(fleet, rollout["id"]))


def test_the_baseline_comes_only_from_the_rollouts_own_devices(fleet: RunningFleet) -> None:
    """A device outside the rollout reporting the previous bundle with every inference
    failing would raise the baseline so far that the new version's 40 % passed; it must
    not weigh in."""
    pilots = fleet.enroll(10, tags=lambda i: ["pilot"], bundle=V1, bundle_version_number=1_000_000)
    outsider = fleet.enroll(1, prefix="out", bundle=V1, bundle_version_number=1_000_000)
    members = Behaviour(
        error_rate={V1: 0.0, V2: 0.4}, telemetry_interval_s=0.2, inferences_per_report=50
    )
    wild = Behaviour(error_rate={V1: 1.0}, telemetry_interval_s=0.2, inferences_per_report=5000)
    with (
        FleetSimulator("127.0.0.1", fleet.mqtt_port, pilots, members) as devices,
        FleetSimulator("127.0.0.1", fleet.mqtt_port, outsider, wild) as stranger,
    ):
        devices.start(connect_timeout_s=60)
        stranger.start(connect_timeout_s=60)
        wait_for(
            lambda: (
                _telemetry_records(fleet, "out-0000") >= 3
                and _telemetry_records(fleet, "dev-0009") >= 3
            ),
            what="baseline telemetry from the pilots and the outsider",
        )
        rollout = _rollout(
            fleet,
            fleet.v2["id"],  # type: ignore[attr-defined]
            tags=["pilot"],
            waves=["20", "100"],
            gate={"soak_s": 0.5, "min_inferences": 100},
        )
        assert "out-0000" not in _members(fleet, rollout["id"])
        done = wait_for(
            lambda: _state(fleet, rollout["id"], "paused", "completed"), what="the gate"
        )
        assert done["state"] == "paused", done["reason"]
        [failure] = _failures(done)
        assert failure["metric"] == "error_rate"
        assert failure["value"] == pytest.approx(0.4)
        assert failure["threshold"] == pytest.approx(0.02)  # the pilots' 0 % + 2 % allowed
        assert done["last_gate"]["baseline"]["error_rate"] == 0.0
        assert _telemetry_records(fleet, "out-0000") >= 3  # it did report, all along


def _telemetry_records(fleet: RunningFleet, device_id: str) -> int:
    from sqlmodel import Session, func, select

    from fleet.models import TelemetryRecordRow

    with Session(fleet.server.db) as session:
        return session.exec(
            select(func.count()).where(TelemetryRecordRow.device_id == device_id)
        ).one()


def test_a_rollout_advanced_past_its_last_wave_completes(fleet: RunningFleet) -> None:
    with _simulate(fleet, 4, Behaviour()):  # no telemetry: the gate waits for it
        rollout = _rollout(
            fleet,
            fleet.v2["id"],  # type: ignore[attr-defined]
            waves=["100"],
            gate={"min_inferences": 1000},
        )
        soaking = wait_for(
            lambda: (r := _state(fleet, rollout["id"], "soaking")) and r["last_gate"] and r,
            what="the gate to wait",
        )
        assert soaking["last_gate"]["outcome"] == "waiting"
        assert soaking["last_gate"]["waiting"].startswith("inferences 0 < min 1000")
        fleet.api("POST", f"/rollouts/{rollout['id']}/pause")
        fleet.api("POST", f"/rollouts/{rollout['id']}/advance", json={"reason": "seen enough"})
        done = wait_for(lambda: _state(fleet, rollout["id"], "completed"), what="completion")
        assert (done["wave"], done["reason"]) == (1, "no waves left")


def test_a_failing_rollout_is_paused_after_its_failures_and_the_others_go_on(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """One rollout's step raises at every tick (its bundle row was deleted behind the
    fleet's back, as ``sqlite3 fleet.db`` allows: foreign keys are off there). It is
    older, so it steps first in every tick; the younger one must still complete."""
    import sqlite3

    with running_fleet(tmp_path / "fleet", rollout_max_step_failures=3) as fleet:
        v1, v2 = fleet.publish(bundles[0], stage="production"), fleet.publish(bundles[1])
        old = fleet.enroll(
            2, prefix="old", tags=lambda i: ["a"], bundle=V1, bundle_version_number=1_000_000
        )
        new = fleet.enroll(2, prefix="new", tags=lambda i: ["b"])
        with FleetSimulator("127.0.0.1", fleet.mqtt_port, old + new, Behaviour()) as devices:
            devices.start(connect_timeout_s=60)
            failing = _rollout(fleet, v2["id"], tags=["a"], waves=["50", "100"], auto_advance=False)
            wait_for(lambda: _state(fleet, failing["id"], "awaiting_approval"), what="wave 0")
            with sqlite3.connect(fleet.server.settings.data_dir / "fleet.db") as db:
                db.execute("DELETE FROM bundle WHERE id = ?", (v2["id"],))
            db.close()
            fleet.api("POST", f"/rollouts/{failing['id']}/advance")
            healthy = _rollout(fleet, v1["id"], tags=["b"], waves=["50", "100"])

            paused = wait_for(lambda: _state(fleet, failing["id"], "paused"), what="the pause")
            done = wait_for(lambda: _state(fleet, healthy["id"], "completed"), what="the other")

        assert paused["reason"] == (
            "paused after 3 failed steps in a row: NotFoundError: bundle "
            f"{v2['id']} of rollout {failing['id']} is no longer in the database"
        )
        assert (paused["wave"], paused["step_failures"]) == (1, 0)  # a new state counts afresh
        assert {m["state"] for m in _members(fleet, failing["id"]).values() if m["wave"] == 1} == {
            "pending"
        }
        pauses = [
            e
            for e in fleet.api("GET", "/audit?limit=500")
            if e["action"] == "rollout.pause" and e["target"] == f"rollout:{failing['id']}"
        ]
        assert [(e["actor"], e["before"]["step_failures"]) for e in pauses] == [("fleet:main", 3)]
        assert done["wave"] == 1
        assert fleet.server.rollouts.errors >= 3


def test_failed_steps_are_counted_in_a_row_and_hold_up_no_other_rollout(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    """The test drives the ticks (the engine's thread is stopped). The older rollout's gate
    is made unreadable in the database and mended, as an operator with ``sqlite3`` could;
    the younger one takes its step in the very tick the older one fails."""
    import sqlite3

    from sqlmodel import Session

    from fleet.models import Rollout

    with running_fleet(tmp_path / "fleet", rollout_max_step_failures=3) as fleet:
        fleet.publish(bundles[0], stage="production")
        v2 = fleet.publish(bundles[1])
        for group in ("a", "b"):  # never online: both rollouts stay deploying
            fleet.enroll(2, prefix=group, tags=lambda i, g=group: [g], bundle=V1)
        engine = fleet.server.rollouts
        engine.stop()
        failing = _rollout(fleet, v2["id"], tags=["a"], waves=["100"])["id"]
        other = _rollout(fleet, v2["id"], tags=["b"], waves=["100"])["id"]
        database = fleet.server.settings.data_dir / "fleet.db"

        def set_gate(gate: str) -> None:
            with sqlite3.connect(database) as db:
                db.execute("UPDATE rollout SET gate = ? WHERE id = ?", (gate, failing))
            db.close()

        def where() -> tuple[str, int]:
            with Session(fleet.server.db) as session:
                row = session.get_one(Rollout, failing)
                return row.state.value, row.step_failures

        def commanded(rollout_id: str) -> bool:
            return all(m["state"] == "commanded" for m in _members(fleet, rollout_id).values())

        set_gate('{"soak_s": -1}')
        engine.tick()
        assert where() == ("deploying", 1)
        assert commanded(other)  # its step ran in the tick the older one failed in
        engine.tick()
        assert where() == ("deploying", 2)
        set_gate('{"soak_s": 0}')
        engine.tick()
        assert where() == ("deploying", 0)  # a good step: the count starts again
        assert commanded(failing)
        set_gate('{"soak_s": -1}')
        engine.tick()
        engine.tick()
        assert where() == ("deploying", 2)
        engine.tick()
        assert where() == ("paused", 0)
        with Session(fleet.server.db) as session:
            reason = session.get_one(Rollout, failing).reason
        assert reason.startswith("paused after 3 failed steps in a row: ValidationError: ")
        assert "soak_s" in reason
        assert engine.errors == 5


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


def _verdict(outcome: str, wave: int = 0) -> Any:
    """A verdict of ``outcome``: failed or passed failure ratio, or waiting inferences."""
    from fleet.models import GateCheck, GateMetric, GateVerdict

    failed = outcome == "failed"
    metric = GateMetric.INFERENCES if outcome == "waiting" else GateMetric.FAILURE_RATIO
    check = GateCheck(
        metric=metric,
        value=0.5 if failed else 0.0,
        threshold=0.1,
        bound="max",
        passed=outcome == "passed",
        reason=f"{metric.value} is {outcome}",
    )
    waiting = check.reason if outcome == "waiting" else ""
    return GateVerdict(wave=wave, checks=[check], waiting=waiting)


DECISIONS: dict[str, tuple[str, tuple[int, int, int], str | None, dict[str, Any], list[str]]] = {
    # name: (state, (wave, members, answered), verdict, options, events)
    "deploying, devices still at work": ("deploying", (0, 10, 4), "passed", {}, []),
    "deploying, every device answered": ("deploying", (0, 10, 10), "passed", {}, ["installed"]),
    "deploying, too many failed": ("deploying", (0, 10, 6), "failed", {}, ["pause"]),
    "deploying, too many failed, rollback": (
        "deploying",
        (0, 10, 6),
        "failed",
        {"rollback_on_failure": True},
        ["rollback"],
    ),
    "soaking, not yet soaked": ("soaking", (0, 10, 10), "passed", {"soaked": False}, []),
    "soaking, waiting for inferences": ("soaking", (0, 10, 10), "waiting", {}, []),
    "soaking, passed": ("soaking", (0, 10, 10), "passed", {}, ["passed"]),
    "soaking, passed, held": ("soaking", (0, 10, 10), "passed", {"auto_advance": False}, ["hold"]),
    "soaking, last wave passed": ("soaking", (2, 10, 10), "passed", {}, ["complete"]),
    "soaking, failed": ("soaking", (1, 10, 10), "failed", {}, ["pause"]),
    "deploying an empty wave": ("deploying", (1, 0, 0), None, {}, ["installed", "passed"]),
    "deploying past the last wave": ("deploying", (3, 0, 0), None, {}, ["complete"]),
}


@pytest.mark.parametrize(
    ("state", "counts", "outcome", "options", "events"), DECISIONS.values(), ids=DECISIONS
)
def test_each_tick_decides_from_state_counts_and_verdict_alone(
    state: str,
    counts: tuple[int, int, int],
    outcome: str | None,
    options: dict[str, Any],
    events: list[str],
) -> None:
    from fleet.models import RolloutState
    from fleet.rollouts import TRANSITIONS, Event, WaveCounts, decide

    wave, members, answered = counts
    verdict = None if outcome is None else _verdict(outcome, wave)
    settings = {"soaked": True, "auto_advance": True, "rollback_on_failure": False, **options}
    decision = decide(
        RolloutState(state),
        WaveCounts(wave=wave, members=members, healthy=answered),
        verdict,
        waves=3,
        **settings,
    )

    assert [e.value for e in decision.events] == events
    at = RolloutState(state)
    for event in decision.events:  # a path the table allows
        at = TRANSITIONS[at, Event(event)]
    kept = outcome == "failed" or (state == "soaking" and settings["soaked"] and verdict)
    assert decision.record is (verdict if kept else None)
    if outcome == "failed":
        assert decision.reason == f"gate failed: wave {wave + 1}: failure_ratio is failed"


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


def _ack(state: AckState, detail: str = "") -> Ack:
    return Ack(command="c-1", state=state, detail=detail, ts=1.0)


@pytest.mark.parametrize(
    ("before", "kind", "ack", "after"),
    [
        # a deploy's acks replace the detail
        (("in_progress", "verifying"), "deploy", ("failed", "golden vectors: 0%"),
         ("failed", "golden vectors: 0%")),
        # a rollback after a failure keeps the device's reason, then says what it did
        (("failed", "golden vectors: 0%"), "rollback", ("rolled_back", "already serving v1"),
         ("rolled_back", "golden vectors: 0%; then rolled_back: already serving v1")),
        # ...also when the rollback's answer arrives twice
        (("rolled_back", "golden vectors: 0%; then rolled_back: already serving v1"),
         "rollback", ("rolled_back", ""), ("rolled_back", "golden vectors: 0%; then rolled_back")),
        # a healthy device rolled back has no failure to keep
        (("healthy", "4 golden vectors within tolerance"), "rollback", ("rolled_back", "back"),
         ("rolled_back", "back")),
    ],
)  # fmt: skip
def test_a_rollback_adds_to_the_reason_a_device_failed_and_never_replaces_it(
    before: tuple[str, str], kind: str, ack: tuple[str, str], after: tuple[str, str]
) -> None:
    member = RolloutDevice(
        rollout_id="r", device_id="d", wave=0, rank="0",
        state=RolloutDeviceState(before[0]), detail=before[1],
    )  # fmt: skip
    _apply_ack(member, CommandKind(kind), _ack(AckState(ack[0]), ack[1]))
    assert (member.state.value, member.detail) == after
