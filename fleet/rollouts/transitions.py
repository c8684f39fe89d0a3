"""The rollout's state machine: every transition in one table, one function to take them.

```
 DEPLOYING --installed--> SOAKING --passed--> DEPLOYING (next wave)
     |                      |   \\--hold----> AWAITING_APPROVAL --advance--> DEPLOYING
     |                      |   \\--complete-> COMPLETED
     +--complete (advanced past the last wave)-> COMPLETED
     +--pause (gate failed, engine errors, operator)--> PAUSED --resume--> DEPLOYING (same wave)
     +--rollback----------------------------> ROLLING_BACK --rolled_back--> ROLLED_BACK
     +--abort--> ABORTED
```

:func:`apply_event` is the only place a rollout's state changes, and it writes the audit
entry in the same transaction.

After a restart every rollout resumes in the state it had committed, nothing restarted:
the engine keeps nothing in memory, each tick reads the rollouts from the database.


- DEPLOYING: commands sent but never acknowledged are sent again at start and whenever
  their device comes online (devices act once per command id); members still pending are
  commanded at the next tick; the deploy timeout still counts from ``wave_started_at``.
- SOAKING: the soak still counts from ``soak_started_at``, and the gate reads telemetry
  since then, so the time the server was down counts as soak.
- AWAITING_APPROVAL, PAUSED: wait for an operator, as before.
- ROLLING_BACK: unanswered rollback commands are sent again; the deploy timeout counts
  from the rollback's start (``updated_at``).
- COMPLETED, ROLLED_BACK, ABORTED: nothing to do.

A step under way when the server died left all of its writes or none (one transaction),
except where it sends commands: it commits what it has done so far with the commands
before sending them, so at worst a command is sent twice.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from sqlmodel import Session

from .. import audit
from ..errors import InvalidTransitionError
from ..models import Rollout, RolloutState, utcnow

__all__ = ["OPERATOR_EVENTS", "TRANSITIONS", "Event", "apply_event", "operator_actions"]


class Event(enum.StrEnum):
    INSTALLED = "installed"
    """Every device of the wave has answered (or timed out)."""
    PASSED = "passed"
    """The gate passed and the next wave starts on its own."""
    HOLD = "hold"
    """The gate passed; the next wave waits for an operator (``auto_advance`` off)."""
    COMPLETE = "complete"
    PAUSE = "pause"
    RESUME = "resume"
    ADVANCE = "advance"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    ABORT = "abort"


S = RolloutState
_ACTIVE = (S.DEPLOYING, S.SOAKING, S.AWAITING_APPROVAL, S.PAUSED)

TRANSITIONS: Final[Mapping[tuple[RolloutState, Event], RolloutState]] = {
    (S.DEPLOYING, Event.INSTALLED): S.SOAKING,
    # an operator advanced a paused rollout past its last wave: nothing left to deploy
    (S.DEPLOYING, Event.COMPLETE): S.COMPLETED,
    (S.SOAKING, Event.PASSED): S.DEPLOYING,
    (S.SOAKING, Event.HOLD): S.AWAITING_APPROVAL,
    (S.SOAKING, Event.COMPLETE): S.COMPLETED,
    (S.AWAITING_APPROVAL, Event.ADVANCE): S.DEPLOYING,
    (S.PAUSED, Event.ADVANCE): S.DEPLOYING,
    (S.PAUSED, Event.RESUME): S.DEPLOYING,
    (S.ROLLING_BACK, Event.ROLLED_BACK): S.ROLLED_BACK,
    **{(state, Event.PAUSE): S.PAUSED for state in (S.DEPLOYING, S.SOAKING, S.AWAITING_APPROVAL)},
    **{(state, Event.ABORT): S.ABORTED for state in (*_ACTIVE, S.ROLLING_BACK)},
    **{(state, Event.ROLLBACK): S.ROLLING_BACK for state in (*_ACTIVE, S.COMPLETED)},
}
"""Every allowed (state, event) → next state. Terminal states have no way out except
rolling back a completed rollout. ROLLING_BACK cannot be paused: it is the way out."""

OPERATOR_EVENTS: Final = (Event.PAUSE, Event.RESUME, Event.ADVANCE, Event.ABORT, Event.ROLLBACK)
"""The events an operator sends (``POST /rollouts/ID/ACTION``); the others are the engine's."""


def operator_actions(state: RolloutState) -> list[Event]:
    """The operator events ``TRANSITIONS`` allows from ``state``: what a dashboard offers."""
    return [event for event in OPERATOR_EVENTS if (state, event) in TRANSITIONS]


_NEXT_WAVE = {Event.PASSED, Event.ADVANCE}


def apply_event(
    session: Session, rollout: Rollout, event: Event, *, actor: str, reason: str = ""
) -> None:
    """Move ``rollout`` along ``TRANSITIONS`` (or raise ``InvalidTransitionError``).

    Entering a state starts its count of failed engine steps afresh.
    """
    target = TRANSITIONS.get((rollout.state, event))
    if target is None:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == rollout.state)
        raise InvalidTransitionError(
            f"rollout {rollout.id} is {rollout.state.value}: cannot {event.value} "
            f"(possible: {', '.join(allowed) or 'nothing, it has finished'})"
        )
    before = audit.snapshot(rollout)
    now = utcnow()
    if event in _NEXT_WAVE:
        rollout.wave += 1
    if target == S.DEPLOYING:
        rollout.wave_started_at = now
        rollout.soak_started_at = None
    if target == S.SOAKING:
        rollout.soak_started_at = now
    rollout.state = target
    rollout.reason = reason or f"{event.value} by {actor}"
    rollout.step_failures = 0
    rollout.updated_at = now
    session.add(rollout)
    audit.record(
        session,
        actor=actor,
        action=f"rollout.{event.value}",
        target=f"rollout:{rollout.id}",
        before=before,
        after=audit.snapshot(rollout),
    )
