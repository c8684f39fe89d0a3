"""What a tick does with a rollout, decided without I/O from what the engine read.

The engine gathers the facts (state, the wave's counts, the gate's verdict, how long
devices have been asked to go back) and carries out the :class:`Decision`: the events to
apply, in order, with one reason, and the verdict to keep in ``last_gate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import GateOutcome, GateVerdict, RolloutState
from .gate import WaveCounts
from .transitions import Event

__all__ = ["Decision", "decide", "decide_rollback"]


@dataclass(frozen=True)
class Decision:
    events: tuple[Event, ...] = ()
    """Applied in this order; none: the rollout stays where it is."""
    reason: str = ""
    record: GateVerdict | None = None
    """A verdict to store in ``last_gate`` (a full gate's, or a failure that stopped it)."""


def decide(
    state: RolloutState,
    counts: WaveCounts,
    verdict: GateVerdict | None,
    *,
    waves: int,
    soaked: bool,
    auto_advance: bool,
    rollback_on_failure: bool,
) -> Decision:
    """The next step of a DEPLOYING or SOAKING rollout now in wave ``counts.wave``.

    ``verdict`` is the full gate's (:func:`~.gate.evaluate`) once the wave has ``soaked``,
    else the failure check's (:func:`~.gate.check_failures`); ``None`` only for an empty
    wave, or one past the last, where there is nothing to judge.
    """
    if state not in (RolloutState.DEPLOYING, RolloutState.SOAKING):
        raise ValueError(f"the engine moves deploying and soaking rollouts on, not {state}")
    wave = counts.wave
    shown = wave + 1  # reasons are read by people, who count waves from 1
    if wave >= waves:
        return Decision((Event.COMPLETE,), "no waves left")
    if not counts.members:  # 1 % of a few devices, a cohort taken by earlier waves
        return _passed(state, wave, waves, auto_advance, f"wave {shown} has no devices; skipped")
    if verdict is None:
        raise ValueError(f"wave {wave} has {counts.members} members but no verdict")
    if verdict.outcome is GateOutcome.FAILED:
        event = Event.ROLLBACK if rollback_on_failure else Event.PAUSE
        return Decision((event,), f"gate failed: wave {shown}: {verdict.summary}", verdict)
    if state is RolloutState.DEPLOYING:
        if counts.answered < counts.members:
            return Decision()
        answered = f"{counts.answered} device{'' if counts.answered == 1 else 's'} answered"
        return Decision((Event.INSTALLED,), f"wave {shown}: {answered}; soaking")
    if not soaked:
        return Decision()
    if verdict.outcome is GateOutcome.WAITING:
        return Decision(record=verdict)
    decision = _passed(state, wave, waves, auto_advance, f"wave {shown} passed its gate")
    return Decision(decision.events, decision.reason, verdict)


def decide_rollback(*, waiting: int, waited_s: float, timeout_s: float) -> Decision:
    """A ROLLING_BACK rollout whose ``waiting`` devices have not yet answered their
    rollback command, ``waited_s`` seconds after the rollback began."""
    if not waiting:
        return Decision(
            (Event.ROLLED_BACK,), "every device that took the bundle answered the rollback"
        )
    if waited_s < timeout_s:
        return Decision()
    reason = f"{waiting} devices did not answer the rollback within the deploy timeout"
    return Decision((Event.ROLLED_BACK,), reason)


def _passed(
    state: RolloutState, wave: int, waves: int, auto_advance: bool, reason: str
) -> Decision:
    if wave + 1 >= waves:
        event = Event.COMPLETE
    elif auto_advance:
        event = Event.PASSED
    else:
        event = Event.HOLD
    installed = (Event.INSTALLED,) if state is RolloutState.DEPLOYING else ()
    return Decision((*installed, event), reason)
