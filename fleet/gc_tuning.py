"""The garbage collector set for a process that keeps a large heap and allocates fast.

CPython collects its oldest generation, a walk over every object the process holds, as
the young generations fill; a fleet process allocates a few container objects for every
MQTT message (paho's message, its lock and condition; the decoded payload; SQLAlchemy's
rows), so under load that happens every few seconds over a heap of hundreds of thousands
of objects. Measured (``bench/fleet_bench.py --rollout-devices 10000 --waves
25,50,75,100``, the fleet's collections timed through ``gc.callbacks``, 2026-11-30, 2
cores): with CPython's default thresholds the fleet process ran 23 full collections of up
to 290,000 objects, 5.0 s of its 14.0 s of CPU, and the rollout took 15.8 s; with
:data:`THRESHOLDS` it ran none once serving (6.3 s of CPU), and the rollout took 10.5 s.
Cycles are still collected: young ones as before, old ones after :data:`THRESHOLDS`'
allocations rather than CPython's.
"""

from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "tune_for_serving"]

THRESHOLDS = (50_000, 20, 10)
"""Container allocations (net) between young collections (CPython: 700), young collections
between middle ones (10), middle ones between full ones (10): a full collection at most
every 10 million allocations, where the default allows one every 70,000."""


def tune_for_serving() -> None:
    """Set :data:`THRESHOLDS` for this process (``fleet serve``, an ingest worker)."""
    gc.set_threshold(*THRESHOLDS)
