"""Staged rollouts: a persisted state machine that walks a bundle through device waves.

- :mod:`.transitions`: the states' ``TRANSITIONS`` and :func:`apply_event`, the only
  place a rollout's state changes; what happens after a restart.
- :mod:`.waves`: :func:`create_rollout`, which devices a rollout takes, in which wave.
- :mod:`.acks`: :func:`handle_acks` and :func:`reconcile_statuses`, how devices' answers
  and statuses move their place in a rollout.
- :mod:`.gate`: the gate, pure: counts and telemetry in, a :class:`GateVerdict` out.
- :mod:`.sequential`: the gate's sequential test of a canary's rate against its
  baseline's (``compare: baseline``), pure: counts in, halt, pass or wait out.
- :mod:`.decision`: the next step of a rollout, pure: state, counts and verdict in.
- :mod:`.engine`: :class:`RolloutEngine`, the I/O: queries, commands, one step per tick.
- :mod:`.commands`: one command per wave, encoded once and filled in per device.
- :mod:`.public`: rollouts as the API shows them.
"""

from __future__ import annotations

from ..models import GateCheck, GateMetric, GateOutcome, GateVerdict
from .acks import handle_acks, lock_answered, reconcile_statuses
from .decision import Decision, decide, decide_rollback
from .engine import CommandSink, Link, RolloutEngine
from .gate import WaveCounts, check_failures, evaluate
from .public import get_rollout, public_rollout
from .transitions import TRANSITIONS, Event, apply_event
from .waves import create_rollout

__all__ = [
    "TRANSITIONS",
    "CommandSink",
    "Decision",
    "Event",
    "GateCheck",
    "GateMetric",
    "GateOutcome",
    "GateVerdict",
    "Link",
    "RolloutEngine",
    "WaveCounts",
    "apply_event",
    "check_failures",
    "create_rollout",
    "decide",
    "decide_rollback",
    "evaluate",
    "get_rollout",
    "handle_acks",
    "lock_answered",
    "public_rollout",
    "reconcile_statuses",
]
