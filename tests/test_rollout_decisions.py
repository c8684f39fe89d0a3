"""A rollout's next step, pure (``fleet/rollouts/decision.py``), and its state machine
(``fleet/rollouts/transitions.py``) on a real SQLite database: each case is one row of
the facts a tick reads and the events it must apply, with the reason a person reads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, create_engine, select

from fleet.errors import InvalidTransitionError
from fleet.models import AuditEntry, Gate, GateVerdict, Rollout, RolloutState
from fleet.rollouts import WaveCounts, check_failures
from fleet.rollouts.decision import Decision, decide, decide_rollback
from fleet.rollouts.transitions import TRANSITIONS, Event, apply_event, operator_actions

S = RolloutState
GATE = Gate(max_failure_ratio=0.1)
PASSED = check_failures(WaveCounts(wave=0, members=4, healthy=4), GATE)
FAILED = check_failures(WaveCounts(wave=0, members=4, healthy=2, failed=2), GATE)
WAITING = GateVerdict(wave=0, checks=PASSED.checks, waiting="inferences 3 < min 100")
FAILURE = "gate failed: wave 2: failure ratio 50.0% > max 10.0% (2 of 4 devices failed)"


def counts(wave: int = 1, members: int = 4, healthy: int = 4, failed: int = 0) -> WaveCounts:
    return WaveCounts(wave=wave, members=members, healthy=healthy, failed=failed)


# state, counts, verdict, waves, soaked, auto_advance, rollback_on_failure -> decision
DECISIONS: dict[str, tuple[tuple[Any, ...], Decision]] = {
    "past the last wave": (
        (S.SOAKING, counts(wave=3), None, 3, True, True, False),
        Decision((Event.COMPLETE,), "no waves left"),
    ),
    "an empty middle wave, deploying, advancing": (
        (S.DEPLOYING, counts(members=0, healthy=0), None, 3, False, True, False),
        Decision((Event.INSTALLED, Event.PASSED), "wave 2 has no devices; skipped"),
    ),
    "an empty middle wave, soaking, held": (
        (S.SOAKING, counts(members=0, healthy=0), None, 3, False, False, False),
        Decision((Event.HOLD,), "wave 2 has no devices; skipped"),
    ),
    "an empty last wave": (
        (S.SOAKING, counts(wave=2, members=0, healthy=0), None, 3, False, True, False),
        Decision((Event.COMPLETE,), "wave 3 has no devices; skipped"),
    ),
    "a failed gate pauses": (
        (S.DEPLOYING, counts(healthy=2, failed=2), FAILED, 3, False, True, False),
        Decision((Event.PAUSE,), FAILURE, FAILED),
    ),
    "a failed gate rolls back when asked to": (
        (S.SOAKING, counts(healthy=2, failed=2), FAILED, 3, True, True, True),
        Decision((Event.ROLLBACK,), FAILURE, FAILED),
    ),
    "deploying, one device yet to answer": (
        (S.DEPLOYING, counts(healthy=3), PASSED, 3, False, True, False),
        Decision(),
    ),
    "deploying, one device, answered": (
        (S.DEPLOYING, counts(members=1, healthy=1), PASSED, 3, False, True, False),
        Decision((Event.INSTALLED,), "wave 2: 1 device answered; soaking"),
    ),
    "deploying, every device answered": (
        (S.DEPLOYING, counts(healthy=4), PASSED, 3, False, True, False),
        Decision((Event.INSTALLED,), "wave 2: 4 devices answered; soaking"),
    ),
    "soaking, not long enough": (
        (S.SOAKING, counts(), PASSED, 3, False, True, False),
        Decision(),
    ),
    "soaked, waiting for inferences": (
        (S.SOAKING, counts(), WAITING, 3, True, True, False),
        Decision(record=WAITING),
    ),
    "soaked and passed, advancing": (
        (S.SOAKING, counts(), PASSED, 3, True, True, False),
        Decision((Event.PASSED,), "wave 2 passed its gate", PASSED),
    ),
    "soaked and passed, held for an operator": (
        (S.SOAKING, counts(), PASSED, 3, True, False, False),
        Decision((Event.HOLD,), "wave 2 passed its gate", PASSED),
    ),
    "soaked and passed, the last wave": (
        (S.SOAKING, counts(wave=2), PASSED, 3, True, False, False),
        Decision((Event.COMPLETE,), "wave 3 passed its gate", PASSED),
    ),
}


@pytest.mark.parametrize(("facts", "expected"), DECISIONS.values(), ids=DECISIONS)
def test_each_tick_decides_its_events_and_reason(
    facts: tuple[Any, ...], expected: Decision
) -> None:
    state, wave_counts, verdict, waves, soaked, auto_advance, rollback = facts
    decision = decide(
        state,
        wave_counts,
        verdict,
        waves=waves,
        soaked=soaked,
        auto_advance=auto_advance,
        rollback_on_failure=rollback,
    )
    assert decision == expected


@pytest.mark.parametrize("state", [S.PAUSED, S.AWAITING_APPROVAL, S.COMPLETED, S.ROLLING_BACK])
def test_only_deploying_and_soaking_rollouts_are_decided(state: RolloutState) -> None:
    with pytest.raises(ValueError, match=f"not {state}"):
        decide(state, counts(), PASSED, waves=3, soaked=True, auto_advance=True,
               rollback_on_failure=False)  # fmt: skip


def test_a_wave_with_members_and_no_verdict_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="wave 1 has 4 members but no verdict"):
        decide(S.SOAKING, counts(), None, waves=3, soaked=True, auto_advance=True,
               rollback_on_failure=False)  # fmt: skip


ROLLBACKS = {
    "every device answered": (
        (0, 1.0, 60.0),
        Decision((Event.ROLLED_BACK,), "every device that took the bundle answered the rollback"),
    ),
    "still waiting": ((2, 59.0, 60.0), Decision()),
    "timed out, exactly at the timeout": (
        (2, 60.0, 60.0),
        Decision(
            (Event.ROLLED_BACK,),
            "2 devices did not answer the rollback within the deploy timeout",
        ),
    ),
}


@pytest.mark.parametrize(("facts", "expected"), ROLLBACKS.values(), ids=ROLLBACKS)
def test_a_rollback_ends_when_every_device_answered_or_the_timeout_passed(
    facts: tuple[int, float, float], expected: Decision
) -> None:
    waiting, waited_s, timeout_s = facts
    assert decide_rollback(waiting=waiting, waited_s=waited_s, timeout_s=timeout_s) == expected


# --- the state machine ----------------------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def rollout(state: RolloutState, **fields: Any) -> Rollout:
    values: dict[str, Any] = {
        "wave": 1,
        "wave_started_at": LONG_AGO,
        "soak_started_at": LONG_AGO,
        "step_failures": 2,
        "updated_at": LONG_AGO,
    }
    values.update(fields)
    return Rollout(id="r-1", bundle_id=1, profile="host", state=state, **values)


MOVES = {
    "installed: the soak starts now": (S.DEPLOYING, Event.INSTALLED, S.SOAKING, 1, "soak"),
    "passed: the next wave starts": (S.SOAKING, Event.PASSED, S.DEPLOYING, 2, "wave"),
    "advanced: the next wave starts": (S.AWAITING_APPROVAL, Event.ADVANCE, S.DEPLOYING, 2, "wave"),
    "resumed: the same wave again": (S.PAUSED, Event.RESUME, S.DEPLOYING, 1, "wave"),
    "held": (S.SOAKING, Event.HOLD, S.AWAITING_APPROVAL, 1, ""),
    "paused": (S.SOAKING, Event.PAUSE, S.PAUSED, 1, ""),
    "rolled back": (S.ROLLING_BACK, Event.ROLLED_BACK, S.ROLLED_BACK, 1, ""),
}


@pytest.mark.parametrize(
    ("state", "event", "target", "wave", "restarts"), MOVES.values(), ids=MOVES
)
def test_an_event_moves_the_rollout_resets_its_clocks_and_is_audited(
    engine: Engine, state: RolloutState, event: Event, target: RolloutState, wave: int,
    restarts: str,
) -> None:  # fmt: skip
    with Session(engine) as session:
        session.add(rollout(state))
        session.commit()
    with Session(engine) as session:
        apply_event(session, session.get_one(Rollout, "r-1"), event, actor="alice")
        session.commit()
    with Session(engine) as session:  # what was stored, read back
        row = session.get_one(Rollout, "r-1")
        [entry] = session.exec(select(AuditEntry)).all()

    assert (row.state, row.wave, row.step_failures) == (target, wave, 0)
    assert row.reason == f"{event.value} by alice"
    assert row.updated_at > LONG_AGO
    if restarts == "wave":
        assert row.wave_started_at > LONG_AGO and row.soak_started_at is None
    elif restarts == "soak":
        assert row.wave_started_at == LONG_AGO
        assert row.soak_started_at is not None and row.soak_started_at > LONG_AGO
    else:
        assert row.wave_started_at == LONG_AGO and row.soak_started_at == LONG_AGO
    assert (entry.actor, entry.action, entry.target) == ("alice", f"rollout.{event}", "rollout:r-1")
    assert entry.before is not None and entry.after is not None
    assert (entry.before["state"], entry.after["state"]) == (state.value, target.value)


def test_the_reason_given_is_kept(engine: Engine) -> None:
    row = rollout(S.DEPLOYING)
    with Session(engine) as session:
        apply_event(session, row, Event.PAUSE, actor="engine", reason="gate failed: x")
    assert row.reason == "gate failed: x"


FORBIDDEN = {
    "a completed rollout cannot pause": (S.COMPLETED, Event.PAUSE, "rollback"),
    "a rolling back one cannot pause": (S.ROLLING_BACK, Event.PAUSE, "abort, rolled_back"),
    "an aborted one cannot resume": (S.ABORTED, Event.RESUME, "nothing, it has finished"),
    "a deploying one cannot advance": (
        S.DEPLOYING,
        Event.ADVANCE,
        "abort, complete, installed, pause, rollback",
    ),
}


@pytest.mark.parametrize(("state", "event", "possible"), FORBIDDEN.values(), ids=FORBIDDEN)
def test_an_event_the_table_lacks_is_refused_and_names_what_is_possible(
    engine: Engine, state: RolloutState, event: Event, possible: str
) -> None:
    row = rollout(state)
    with Session(engine) as session, pytest.raises(InvalidTransitionError) as raised:
        apply_event(session, row, event, actor="alice")
    assert str(raised.value) == (
        f"rollout r-1 is {state.value}: cannot {event.value} (possible: {possible})"
    )
    assert (row.state, row.wave, row.step_failures) == (state, 1, 2)


def test_operators_are_offered_exactly_the_table_s_operator_events() -> None:
    assert operator_actions(S.PAUSED) == [Event.RESUME, Event.ADVANCE, Event.ABORT, Event.ROLLBACK]
    assert operator_actions(S.DEPLOYING) == [Event.PAUSE, Event.ABORT, Event.ROLLBACK]
    assert operator_actions(S.COMPLETED) == [Event.ROLLBACK]
    assert operator_actions(S.ROLLED_BACK) == []
    assert all((S.ROLLING_BACK, e) not in TRANSITIONS for e in (Event.PAUSE, Event.RESUME))
