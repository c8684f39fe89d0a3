"""``make mutate``: mutation testing of the safety-critical modules, each with the tests
that cover it (mutmut; docs/mutation.md says why and how to read the score).

Each target runs in its own copy of the tree under ``build/mutation/TARGET/`` (the working
tree is never mutated), with a ``[tool.mutmut]`` section naming its files and tests. mutmut
runs a mutant only with the tests that called the mutated function in its own process;
functions reached only from a subprocess (the SIGKILL tests' agents, the updater's
driver) are invisible to that, so every mutant mutmut leaves alive or untested is run
again with the target's whole test selection, ``MUTANT_UNDER_TEST`` and ``PYTHONPATH``
set so that the subprocesses load the mutated code too.

Survivors listed in docs/mutation.md as equivalent (same behaviour, no test can tell) are
counted apart: score = killed / (mutants - equivalent). Those it lists as timing-only
(they change when the agent acts, and no test pins it) are counted apart too, but as not
killed: they stay in the score's denominator. Each target has a time budget;
mutants left unjudged when it is spent count as survivors.

    .venv/bin/python .ci/mutate.py [TARGET ...]     # default: every target
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "mutation"
EQUIVALENTS = REPO / "docs" / "mutation.md"
PACKAGES = ("contracts", "hw_profiles", "ota", "agent", "compiler", "fleet", "edgefleet")
COPIED = (*PACKAGES, "tests", "examples")
PYTEST_ARGS = ("-p", "no:cacheprovider", "-x", "-q", "--timeout=300")
RECHECK_TIMEOUT_S = 600
RECHECK_MIN_S = 30
TMPFS = Path("/dev/shm")


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]
    tests: tuple[str, ...]
    budget_s: int
    """The whole target's time limit (mutmut's run and the rechecks)."""
    recheck: bool = True
    """Whether mutmut's survivors are run again with every test in a fresh process: only
    for tests that reach the code from a subprocess or at import time. ``False`` where the
    tests run it all in their own process, so mutmut's verdict is final."""
    pytest_args: tuple[str, ...] = ()
    """More pytest options for every run of this target's tests (after ``PYTEST_ARGS``)."""
    scratch_in_memory: bool = False
    """Whether the tests' temporary files (``TMPDIR``, so ``tmp_path``) go to tmpfs, where
    there is one: for tests whose time goes to fsync and to deleting files, not to what
    they check (the code still calls fsync; only the disk's latency is gone)."""
    children_per_core: int = 1
    """mutmut's workers per core (``--children`` times this): more than one for tests that
    spend their time waiting on a broker and on the sender's pauses, not on the CPU."""
    autoload_plugins: bool = True
    """``False``: pytest loads only the plugins ``pytest_args`` names (``-p MODULE``), not
    every installed one (schemathesis, hypothesis, anyio hook each session)."""


TARGETS = {
    "rollout-gate": Target(
        ("fleet/rollouts/gate.py",),
        ("tests/test_rollout_gate.py",),
        budget_s=90,
    ),
    "rollout-decisions": Target(
        ("fleet/rollouts/decision.py", "fleet/rollouts/transitions.py"),
        ("tests/test_rollout_decisions.py",),
        budget_s=90,
    ),
    "agent-updater": Target(
        ("agent/updater.py",),
        # in-process, with a plain TUF repository: tests/test_agent_updater.py's fleet and
        # SIGKILLed subprocesses take minutes per surviving mutant
        ("tests/test_updater_unit.py",),
        budget_s=420,
        recheck=False,
        # pytest's unraisable-exception hook runs gc.collect() at every session's end: in a
        # child forked from mutmut's warmed process that is ~0.5 s a mutant, and such an
        # exception is only a warning here (pyproject.toml sets no "error" filter); the
        # installed plugins' session hooks cost ~0.25 s a mutant (docs/mutation.md)
        pytest_args=("-p", "no:unraisableexception", "-p", "pytest_timeout"),
        scratch_in_memory=True,
        autoload_plugins=False,
    ),
    "telemetry-queue": Target(
        ("agent/telemetry_queue.py",),
        (
            "tests/test_telemetry_queue_unit.py",
            # the receipts file's queue cases: its broker and bridge cases take 3.5 s a mutant
            *(
                f"tests/test_telemetry_receipts.py::{test}"
                for test in (
                    "test_queue_numbers_are_never_reused_once_the_newest_records_are_receipted",
                    "test_a_queue_from_before_receipts_is_renumbered_without_losing_a_record",
                )
            ),
        ),
        budget_s=150,
        recheck=False,
        pytest_args=("-p", "no:unraisableexception"),
        scratch_in_memory=True,
    ),
    "telemetry-resend": Target(
        ("agent/telemetry_resend.py",),
        ("tests/test_telemetry_receipts.py",),
        budget_s=30,
        recheck=False,
    ),
    "telemetry": Target(
        ("agent/telemetry.py",),
        # the statistics, and the sender's thread against one real mosquitto, all in the
        # test's process: tests/test_agent_telemetry.py's SIGKILLed agents take minutes per
        # surviving mutant
        ("tests/test_telemetry_unit.py",),
        budget_s=210,
        recheck=False,
        pytest_args=("-p", "no:unraisableexception"),
        scratch_in_memory=True,
        children_per_core=2,
    ),
    "authorisation": Target(
        ("fleet/api/deps.py", "fleet/security.py"),
        ("tests/test_fleet_authorisation.py", "tests/test_fleet_route_roles.py"),
        budget_s=240,
    ),
    "ota-archive": Target(
        ("ota/archive.py",),
        ("tests/test_archive_unit.py",),
        budget_s=60,
        recheck=False,
    ),
    "ota-verify": Target(
        ("ota/verify.py",),
        (
            "tests/test_ota_tuf.py",
            # the fuzz file's fixed cases: its Hypothesis searches take minutes per mutant
            *(
                f"tests/test_ota_fuzz.py::{test}"
                for test in (
                    "test_each_named_attack_is_refused",
                    "test_a_listed_file_whose_data_is_absent_is_refused_without_reading_10_gb",
                    "test_listed_paths_the_filesystem_cannot_hold_raise_only_bundle_error",
                    "test_a_valid_manifest_parses_and_round_trips",
                    "test_the_reference_bundle_and_an_unchanged_crafted_tar_are_accepted",
                    "test_a_tampered_file_is_caught_by_the_harness",
                )
            ),
        ),
        budget_s=330,
    ),
    "compiler-validate": Target(
        ("compiler/validate.py",),
        ("tests/test_validate.py", "tests/test_validate_edges.py"),
        budget_s=180,
    ),
}

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def models_cache() -> Path:
    """The trained and compiled digits model every mutant's tests reuse (tests/conftest.py,
    ``EDGEFLEET_TEST_MODELS``), kept across runs while what builds it is unchanged."""
    sources = sorted(
        p
        for tree in ("examples/digits", "compiler", "hw_profiles")
        for p in (REPO / tree).rglob("*")
        if p.is_file() and p.suffix in (".py", ".toml")
    )
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    cache = WORK / f"models-{digest}"
    for stale in WORK.glob("models-*"):
        if stale != cache:
            shutil.rmtree(stale)
    return cache


EQUIVALENT_HEADING = "Equivalent mutants"
TIMING_ONLY_HEADING = "Timing-only mutants, not killed"


def listed(heading: str) -> set[str]:
    """Mutant names docs/mutation.md lists under ``## HEADING`` (``- `NAME`: why``)."""
    text = EQUIVALENTS.read_text()
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        raise SystemExit(f"{EQUIVALENTS} has no '## {heading}' section")
    return set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", section.group(1)))


def prepare(name: str, target: Target) -> None:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for path in COPIED:
        shutil.copytree(
            REPO / path, work / path, ignore=shutil.ignore_patterns("__pycache__", "mutants")
        )
    settings = {
        "source_paths": [f"{p}/" for p in PACKAGES],
        "only_mutate": list(target.files),
        "also_copy": ["examples/"],
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": [*PYTEST_ARGS, *target.pytest_args],
        "use_git_change_detection": False,
        # log calls: their wording is for people, and no test reads it (docs/mutation.md)
        "do_not_mutate_patterns": [r"\blog\.(debug|info|warning|error|exception)\("],
    }
    section = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + section)


def statuses(work: Path, file: str) -> dict[str, str]:
    """mutmut's verdict on each mutant of ``file``."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / f"{file}.meta").read_text())
    return {mutant: status_by_exit_code[code] for mutant, code in meta["exit_code_by_key"].items()}


@contextmanager
def runs_environment(name: str, target: Target) -> Iterator[dict[str, str]]:
    """The environment of the target's test runs: without plugin autoloading if the target
    says so, and ``TMPDIR`` a folder on tmpfs, removed afterwards, if the target asks for
    it and the machine has one."""
    env = dict(os.environ)
    if not target.autoload_plugins:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    if not (target.scratch_in_memory and TMPFS.is_dir()):
        yield env
        return
    scratch = TMPFS / f"edgefleet-mutation-{name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield {**env, "TMPDIR": str(scratch)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def recheck(work: Path, target: Target, mutant: str, deadline: float, env: dict[str, str]) -> str:
    """Run the target's whole test selection against ``mutant``, subprocesses included;
    the output goes to ``rechecks/MUTANT.log``. Only a run given its full time can time out:
    one cut short by the target's budget is "not rechecked"."""
    limit = min(deadline - time.monotonic(), RECHECK_TIMEOUT_S)
    if limit < RECHECK_MIN_S:
        return "not rechecked (budget spent)"
    mutants = work / "mutants"
    env = {**env, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(mutants)}
    log = work / "rechecks" / f"{mutant}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as sink:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", *PYTEST_ARGS, *target.pytest_args, *target.tests],
                cwd=mutants,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=limit,
            )
        except subprocess.TimeoutExpired:
            return "timeout" if limit >= RECHECK_TIMEOUT_S else "not rechecked (budget spent)"
    return "killed" if done.returncode == 1 else "survived"


@dataclass
class Score:
    """One module's mutants: killed, equivalent and timing-only (docs/mutation.md), and
    the other survivors."""

    mutants: int = 0
    killed: int = 0
    equivalent: int = 0
    timing_only: int = 0
    """Survivors docs/mutation.md lists as timing-only: not killed, and in the score."""
    survivors: tuple[str, ...] = ()
    seconds: float = 0.0
    """The whole target's time, this module's and the others' it was run with."""
    error: str = ""
    """Why there is no score (the tests fail unmutated)."""
    note: str = ""

    @property
    def score(self) -> float:
        judged = self.mutants - self.equivalent
        return self.killed / judged if judged else 1.0

    def row(self, module: str) -> str:
        if self.error:
            return f"{module:<28} {self.error}"
        return (
            f"{module:<28} {self.mutants:>7} {self.killed:>6} {len(self.survivors):>8} "
            f"{self.timing_only:>6} {self.equivalent:>6} {self.score:>6.1%} "
            f"{self.seconds:>5.0f}s {self.note}"
        ).rstrip()


HEADER = (
    f"{'module':<28} {'mutants':>7} {'killed':>6} {'survived':>8} {'timing':>6} {'equiv.':>6} "
    f"{'score':>6}  time"
)


def mutmut_run(work: Path, children: int, timeout_s: float, env: dict[str, str]) -> bool:
    """``mutmut run`` in ``work``, its output in ``mutmut.log``; whether it finished in
    time (if not, it and its workers are stopped, and what it judged so far stands)."""
    command = [
        str(Path(sys.executable).with_name("mutmut")),
        "run",
        "--max-children",
        str(children),
    ]
    with (work / "mutmut.log").open("a") as sink:
        process = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return False
    if code:
        raise subprocess.CalledProcessError(code, command)
    return True


def run(name: str, target: Target, children: int, *, resume: bool) -> dict[str, Score]:
    """Each of the target's modules' score. ``resume``: go on in the copy a run left
    (mutmut keeps its verdicts and judges only the mutants it has not)."""
    started = time.monotonic()
    deadline = started + target.budget_s
    work = WORK / name
    if not (resume and (work / "mutants").is_dir()):
        prepare(name, target)
    with runs_environment(name, target) as env:
        try:
            workers = children * target.children_per_core
            finished = mutmut_run(work, workers, target.budget_s, env)
        except subprocess.CalledProcessError:
            log = f"{work}/mutmut.log"
            failed = Score(error=f"mutmut failed (do the tests pass unmutated?): see {log}")
            return dict.fromkeys(target.files, failed)
        if not all((work / "mutants" / f"{file}.meta").is_file() for file in target.files):
            late = Score(error=f"the budget ran out before any verdict: see {work}/mutmut.log")
            return dict.fromkeys(target.files, late)
        equivalent = listed(EQUIVALENT_HEADING)
        timing_only = listed(TIMING_ONLY_HEADING) - equivalent
        found = {file: statuses(work, file) for file in target.files}
        for verdicts in found.values():
            for mutant, status in sorted(verdicts.items()):
                rechecked = target.recheck and mutant not in equivalent
                if rechecked and status in ("survived", "no tests"):
                    verdicts[mutant] = recheck(work, target, mutant, deadline, env)
    seconds = time.monotonic() - started
    scores = {}
    for file, verdicts in found.items():
        alive = [m for m, s in verdicts.items() if s not in KILLED]
        scores[file] = Score(
            mutants=len(verdicts),
            killed=len(verdicts) - len(alive),
            equivalent=sum(m in equivalent for m in alive),
            timing_only=sum(m in timing_only for m in alive),
            survivors=tuple(sorted(m for m in alive if m not in equivalent | timing_only)),
            seconds=seconds,
            note="" if finished else "budget spent: unjudged mutants count as survivors",
        )
    (work / "survivors.txt").write_text(
        "".join(
            f"{mutant}: {found[file][mutant]}\n"
            for file, score in scores.items()
            for mutant in score.survivors
        )
    )
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--resume", action="store_true", help="go on where a run that ran out of time stopped"
    )
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    os.environ["EDGEFLEET_TEST_MODELS"] = str(models_cache())
    scores: dict[str, tuple[str, Score]] = {}
    for name in args.targets or TARGETS:
        for module, score in run(name, TARGETS[name], args.children, resume=args.resume).items():
            scores[module] = (name, score)
            print(score.row(module), flush=True)
    print(f"\n{HEADER}")
    for module, (_, score) in scores.items():
        print(score.row(module))
    for name, score in scores.values():
        for mutant in score.survivors:
            print(f"survived: {mutant}  (cd build/mutation/{name} && mutmut show {mutant})")
    return 0 if all(not s.error and s.score >= 0.9 for _, s in scores.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
