"""MetaSchedule tuning with a database that persists per (profile, model, target).

The database lives in ``CACHE/tuning/PROFILE/MODELHASH-TARGETHASH/``. A later compile of
the same model for the same profile finds it and does not tune again, unless it asks for
more trials than the database was tuned with. A tune writes into a fresh directory that
replaces the old one only when it finished, so an interrupted tune leaves nothing half.
Measurements run on this machine, or on boards through a TVM RPC tracker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.durable import fsync_directory, fsync_tree
from contracts.report import Latency
from contracts.tensors import TensorSpec
from hw_profiles import Profile

from .errors import StepError
from .importers import sha256_file
from .measure import latency_of
from .targets import tvm_target
from .tvm_build import import_relax

__all__ = ["RpcTarget", "TuneResult", "database_dir", "rpc_latency", "tune_model"]

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
    database: Path
    trials_requested: int
    records: int
    reused: bool
    measured_on: str
    seconds: float

    def as_detail(self) -> dict[str, Any]:
        return {**asdict(self), "database": str(self.database), "seconds": round(self.seconds, 3)}


def database_dir(cache_root: Path, profile: Profile, model: Path, target_json: str) -> Path:
    target_hash = hashlib.sha256(target_json.encode()).hexdigest()[:12]
    return cache_root / "tuning" / profile.name / f"{sha256_file(model)[:16]}-{target_hash}"


def _records(database: Path) -> int:
    path = database / _RECORDS
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def _tuned_with(database: Path) -> int:
    try:
        return int(json.loads((database / _MARKER).read_text())["trials"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# Below this budget an evolutionary search spends its time breeding candidates it never
# gets to measure; sampling schedules at random (replay-trace) is as good and much faster.
_EVOLUTIONARY_MIN_TRIALS = 64


def _strategy(trials: int) -> str:
    return "evolutionary" if trials >= _EVOLUTIONARY_MIN_TRIALS else "replay-trace"


def _trials_per_round(trials: int, tasks: int) -> int:
    """Spread the budget over every task: MetaSchedule's default of 64 a round would spend
    a budget of 64 on one operator of a 30-operator network and leave the rest untuned."""
    return max(1, min(64, trials // max(tasks, 1)))


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


def tune_model(
    onnx_path: Path,
    profile: Profile,
    *,
    inputs: list[TensorSpec],
    trials: int,
    cache_root: Path,
    rpc: RpcTarget | None = None,
) -> TuneResult:
    """Tune ``onnx_path`` for the profile's CPU target, or reuse the cached database."""
    start = time.perf_counter()
    target = tvm_target(profile, "cpu")
    database = database_dir(cache_root, profile, onnx_path, str(target))
    where = f"rpc {rpc.host}:{rpc.port} key {rpc.key}" if rpc else "this machine"
    if _tuned_with(database) >= trials and _records(database) > 0:
        return TuneResult(
            database, trials, _records(database), True, where, time.perf_counter() - start
        )

    from tvm.s_tir import meta_schedule as ms

    mod = _fused(import_relax(onnx_path, inputs), target)
    scratch = database.parent / f".{database.name}.tuning-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
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
    try:
        tasks = len(ms.relax_integration.extract_tasks(mod, target))
        ms.relax_integration.tune_relax(
            mod,
            params={},
            target=target,
            work_dir=str(scratch),
            max_trials_global=trials,
            num_trials_per_iter=_trials_per_round(trials, tasks),
            runner=runner,
            builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=120),
            strategy=_strategy(trials),
            seed=0,
        )
        (scratch / _MARKER).write_text(json.dumps({"trials": trials, "target": str(target)}))
        fsync_tree(scratch)
        if database.exists():
            shutil.rmtree(database)
        scratch.rename(database)
        fsync_directory(database.parent)
    except Exception as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise StepError(f"MetaSchedule tuning failed for {profile.name}: {e}") from e
    return TuneResult(
        database, trials, _records(database), False, where, time.perf_counter() - start
    )


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
