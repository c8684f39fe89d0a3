"""MetaSchedule tuning into one database per (profile, target), shared by every model.

The database lives in ``CACHE/tuning/PROFILE/TARGETHASH/``. MetaSchedule keeps its records
per workload (an operator's structure and shapes), so a model whose layers were tuned for
another model on the same profile gets their schedules without new trials: only the tasks
with no record are tuned, with their share of the budget (trials and time scaled by new
tasks / all tasks, what a tune from scratch would spend on them). A later compile of the
same model does not tune again unless it asks for more trials than that model was tuned
with (the marker file remembers, per model).
A tune writes into a copy of the database that replaces it only when it finished, under a
lock, so an interrupted tune leaves nothing half and two compiles never mix records.
The budget is trials, or time (``time_budget_s``: tasks are stopped when it is spent), and
progress (trials done / budget, fastest kernel measured, ETA) goes to ``echo`` as it runs.
Measurements run on this machine, or on boards through a TVM RPC tracker.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.durable import fsync_directory, fsync_tree, write_atomic
from contracts.report import Latency
from contracts.tensors import TensorSpec
from hw_profiles import Profile

from .errors import StepError
from .importers import sha256_file
from .measure import latency_of
from .targets import tvm_target
from .tvm_build import import_relax

__all__ = [
    "TIME_ONLY_TRIALS",
    "RpcTarget",
    "TuneResult",
    "database_dir",
    "parse_duration",
    "rpc_latency",
    "tune_model",
]

TIME_ONLY_TRIALS = 20_000
"""The trial cap of a tune given only a time budget: the time runs out first."""
_UNITS_S = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``20m``, ``90s``, ``1.5h`` or plain seconds, as seconds (more than 0)."""
    value = text.strip().lower()
    unit = _UNITS_S.get(value[-1:])
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"expected a duration like 20m, 90s or 1h, got {text!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"expected a duration more than 0, got {text!r}")
    return seconds


_MARKER = "edgefleet-tuning.json"
_RECORDS = "database_tuning_record.json"


@dataclass(frozen=True)
class RpcTarget:
    """A TVM RPC tracker and the key under which the boards registered."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str) -> RpcTarget:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected the RPC tracker as HOST:PORT, got {address!r}")
        return cls(host, int(port), key)


@dataclass(frozen=True)
class TuneResult:
    """``reused``: nothing was tuned; ``tasks_reused``: tasks whose schedules were already in
    the shared database (tuned for this or another model); ``trials``: trials measured now."""

    database: Path
    trials_requested: int
    records: int
    reused: bool
    measured_on: str
    seconds: float
    tasks: int = 0
    tasks_reused: int = 0
    trials: int = 0
    time_budget_s: float | None = None

    def as_detail(self) -> dict[str, Any]:
        return {**asdict(self), "database": str(self.database), "seconds": round(self.seconds, 3)}


def database_dir(cache_root: Path, profile: Profile, target_json: str) -> Path:
    """The profile's shared database for one target."""
    target_hash = hashlib.sha256(target_json.encode()).hexdigest()[:12]
    return cache_root / "tuning" / profile.name / target_hash


def _records(database: Path) -> int:
    path = database / _RECORDS
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def _marker(database: Path) -> dict[str, Any]:
    try:
        marker = json.loads((database / _MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _tuned_with(database: Path, model_hash: str) -> int:
    """The trials this model was tuned with into ``database`` (0: never)."""
    models = _marker(database).get("models")
    trials = models.get(model_hash) if isinstance(models, dict) else None
    return trials if isinstance(trials, int) else 0


@contextmanager
def _locked(database: Path) -> Iterator[None]:
    """One tune at a time per database (other processes wait)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    with (database.parent / f".{database.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Below this budget an evolutionary search spends its time breeding candidates it never
# gets to measure; sampling schedules at random (replay-trace) is as good and much faster.
_EVOLUTIONARY_MIN_TRIALS = 64


def _strategy(trials: int) -> str:
    return "evolutionary" if trials >= _EVOLUTIONARY_MIN_TRIALS else "replay-trace"


def _trials_per_round(trials: int, tasks: int, *, timed: bool = False) -> int:
    """Spread the budget over every task: MetaSchedule's default of 64 a round would spend
    a budget of 64 on one operator of a 30-operator network and leave the rest untuned.
    A time budget is checked between rounds, so there rounds are short (at most 8)."""
    return max(1, min(8 if timed else 64, trials // max(tasks, 1)))


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``.

    That import takes ~20 s, every builder worker pays it again each round, and on 2 cores
    builds then hit the builder's timeout. The schedules are made in this process, which has
    the intrinsics loaded; the workers only lower and compile them.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _drop_stale_tuning_loggers() -> None:
    """Close the handlers an earlier tune in this process left on MetaSchedule's logger.

    They write into that tune's (since renamed) directory, and TVM 0.27 cannot rebuild its
    logging config around them: a second tune in one process fails in ``create_loggers``.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _fused(mod: Any, target: Any) -> Any:
    """The module as ``compile_relax`` sees it before applying the database: dispatched,
    legalized and fused, so the tasks tuned here are the functions it looks up."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    with target:
        return tvm.transform.Sequential(
            [
                *pipeline.library_dispatch_passes(target),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)


class _Progress:
    """Counts measured trials, stops every task once the time budget is spent, and says
    where the tune is (trials done / budget, fastest kernel, ETA) at most every few seconds."""

    def __init__(
        self, trials: int, time_budget_s: float | None, echo: Callable[[str], None] | None
    ) -> None:
        self.trials, self.time_budget_s, self.echo = trials, time_budget_s, echo
        self.done = 0
        self.best_ms: float | None = None
        self.start = time.monotonic()
        self._said = 0.0
        self.stopped_early = False

    def measured(self, scheduler: Any, results: list[Any]) -> None:
        self.done += len(results)
        for result in results:
            if getattr(result, "error_msg", None) is None and result.run_secs:
                ms = 1000.0 * float(np.mean([float(s) for s in result.run_secs]))
                self.best_ms = ms if self.best_ms is None else min(self.best_ms, ms)
        elapsed = time.monotonic() - self.start
        if self.time_budget_s is not None and elapsed >= self.time_budget_s:
            self.stopped_early = True
            for task_id, task in enumerate(scheduler.tasks_):
                if not task.is_terminated:  # terminating one twice fails a check in TVM
                    scheduler.terminate_task(task_id)
        if self.echo is not None and (elapsed - self._said >= 5.0 or self.done >= self.trials):
            self._said = elapsed
            self.echo(self.line(elapsed))

    def line(self, elapsed: float) -> str:
        best = f"{1000 * self.best_ms:.1f} us" if self.best_ms is not None else "n/a"
        left = self.trials - self.done
        eta = elapsed / self.done * left if self.done else None
        if self.time_budget_s is not None:
            budget_left = max(0.0, self.time_budget_s - elapsed)
            eta = budget_left if eta is None else min(eta, budget_left)
        eta_text = f"{eta:.0f} s" if eta is not None else "n/a"
        return (
            f"tuning: {self.done}/{self.trials} trials, fastest kernel {best}, "
            f"{elapsed:.0f} s elapsed, ETA {eta_text}"
        )


def _callbacks(progress: _Progress) -> list[Any]:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Report(ms.measure_callback.PyMeasureCallback):
        def apply(
            self,
            task_scheduler: Any,
            task_id: int,
            measure_candidates: Any,
            builder_results: Any,
            runner_results: Any,
        ) -> None:
            progress.measured(task_scheduler, list(runner_results))

    return [*ms.measure_callback.MeasureCallback.create("default"), Report()]


def tune_model(
    onnx_path: Path,
    profile: Profile,
    *,
    inputs: list[TensorSpec],
    trials: int,
    cache_root: Path,
    rpc: RpcTarget | None = None,
    time_budget_s: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune the tasks of ``onnx_path`` that the profile's shared database has no schedule
    for, within ``trials`` (and ``time_budget_s``), or reuse what is there."""
    start = time.perf_counter()
    target = tvm_target(profile, "cpu")
    database = database_dir(cache_root, profile, str(target))
    model_hash = sha256_file(onnx_path)[:16]
    where = f"rpc {rpc.host}:{rpc.port} key {rpc.key}" if rpc else "this machine"

    def result(reused: bool, **counts: Any) -> TuneResult:
        return TuneResult(
            database,
            trials,
            _records(database),
            reused,
            where,
            time.perf_counter() - start,
            time_budget_s=time_budget_s,
            **counts,
        )

    from tvm.s_tir import meta_schedule as ms

    mod = _fused(import_relax(onnx_path, inputs), target)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    with _locked(database):
        if _tuned_with(database, model_hash) >= trials and _records(database) > 0:
            return result(True, tasks=len(extracted), tasks_reused=len(extracted))
        known = ms.database.JSONDatabase(work_dir=str(database)) if database.exists() else None
        new = [t for t in extracted if known is None or not known.has_workload(t.mod)]
        if not new:
            _mark(database, model_hash, trials, str(target))
            return result(True, tasks=len(extracted), tasks_reused=len(extracted))
        scratch = database.parent / f".{database.name}.tuning-{uuid.uuid4().hex[:8]}"
        if database.exists():
            shutil.copytree(database, scratch)
        else:
            scratch.mkdir(parents=True)
        # The tasks already tuned keep their schedules; the new ones get the share of the
        # budget a tune from scratch would have spent on them (per task), not all of it.
        share = len(new) / len(extracted)
        budget = max(len(new), math.ceil(trials * share))
        progress = _Progress(budget, None if time_budget_s is None else time_budget_s * share, echo)
        try:
            _tune(new, scratch, budget, rpc, progress)
            _mark(scratch, model_hash, trials, str(target))
            fsync_tree(scratch)
            if database.exists():
                shutil.rmtree(database)
            scratch.rename(database)
            fsync_directory(database.parent)
        except Exception as e:
            shutil.rmtree(scratch, ignore_errors=True)
            raise StepError(f"MetaSchedule tuning failed for {profile.name}: {e}") from e
    return result(
        False, tasks=len(extracted), tasks_reused=len(extracted) - len(new), trials=progress.done
    )


def _tune(
    extracted: list[Any], work: Path, trials: int, rpc: RpcTarget | None, progress: _Progress
) -> None:
    from tvm.s_tir import meta_schedule as ms

    runner: Any = "local"
    if rpc is not None:
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(
                tracker_host=rpc.host,
                tracker_port=rpc.port,
                tracker_key=rpc.key,
                session_timeout_sec=120,
            )
        )
    _drop_stale_tuning_loggers()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, work_dir=str(work), strategy=_strategy(trials), seed=0
    )
    timed = progress.time_budget_s is not None
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work),
        max_trials_global=trials,
        num_trials_per_iter=_trials_per_round(trials, len(contexts), timed=timed),
        # The gradient scheduler's first rounds visit every task in turn, terminated or
        # not, so a time budget spent before then would stop TVM on a check; round-robin
        # skips terminated tasks.
        task_scheduler="round-robin" if timed else "gradient",
        builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=120),
        runner=runner,
        database=ms.database.JSONDatabase(work_dir=str(work)),
        measure_callbacks=_callbacks(progress),
    )


def _mark(database: Path, model_hash: str, trials: int, target: str) -> None:
    """Remember that this model was tuned with ``trials`` into ``database``."""
    marker = _marker(database)
    models = marker.get("models") if isinstance(marker.get("models"), dict) else {}
    assert isinstance(models, dict)
    models[model_hash] = max(trials, int(models.get(model_hash, 0)))
    write_atomic(database / _MARKER, json.dumps({"target": target, "models": models}).encode())


def rpc_latency(
    library: Path, rpc: RpcTarget, sample: Mapping[str, np.ndarray], runs: int
) -> Latency:
    """Upload a TVM library to a board from the tracker and time ``main`` there."""
    import tvm
    from tvm import rpc as tvm_rpc

    from agent.runtimes import read_signature

    inputs, _ = read_signature(library)
    try:
        tracker = tvm_rpc.connect_tracker(rpc.host, rpc.port)
        remote = tracker.request(rpc.key, priority=1, session_timeout=120)
        remote.upload(str(library))
        device = remote.cpu()
        vm = tvm.relax.VirtualMachine(remote.load_module(library.name), device)
        args = [tvm.runtime.tensor(np.ascontiguousarray(sample[s.name]), device) for s in inputs]
        timer = vm.time_evaluator("main", device, number=1, repeat=runs, min_repeat_ms=0)
        results = np.array(timer(*args).results) * 1000.0
    except Exception as e:
        raise StepError(f"measuring {library.name} through the RPC tracker failed: {e}") from e
    return latency_of(results, f"rpc key {rpc.key}")
