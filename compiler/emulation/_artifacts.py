"""Run artifacts on an emulated board, through the agent's own runtime loader.

:func:`run_artifacts` copies the artifacts (with their ``.json`` signature sidecars), the
inputs, the ``agent`` and ``contracts`` sources of this edgefleet and a small worker into a
job folder, shares it with a board and runs the worker there in one process: the outputs
come back as the board computed them. Nothing is timed: an emulated CPU says nothing about
a board's speed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import agent
import contracts
from contracts.artifacts import RuntimeName

from ..errors import EmulationError
from . import _worker
from ._board import BoardSpec, describe_exit
from ._userland import VENV, Userland

__all__ = ["ArtifactToRun", "EmulatedRunError", "run_artifacts"]

_GUEST_JOB = "/mnt/edgefleet-job"


@dataclass(frozen=True)
class ArtifactToRun:
    """One artifact: ``name`` labels its outputs; a sidecar ``PATH.json`` goes with it."""

    name: str
    runtime: RuntimeName
    path: Path


class EmulatedRunError(EmulationError):
    """An artifact failed on the emulated board (it crashed, or its runtime refused it):
    ``artifact`` names it when the worker got that far, ``detail`` says how it failed."""

    def __init__(self, artifact: str | None, board: str, detail: str) -> None:
        super().__init__(f"{artifact or 'the job'} failed on {board}: {detail}")
        self.artifact, self.detail = artifact, detail


def run_artifacts(
    userland: Userland,
    board: BoardSpec,
    artifacts: Sequence[ArtifactToRun],
    inputs: Mapping[str, np.ndarray],
    work: Path,
    *,
    timeout_s: float = 1800,
) -> dict[str, list[np.ndarray]]:
    """Each artifact's outputs for ``inputs`` (samples on the first axis), computed on the
    emulated ``board``; ``work`` is a scratch folder."""
    job = work / "job"
    job.mkdir(parents=True)
    for package in (agent, contracts):
        source = Path(package.__file__ or "").parent
        shutil.copytree(
            source, job / "src" / source.name, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copyfile(_worker.__file__ or "", job / "worker.py")
    with (job / "inputs.npz").open("wb") as f:
        np.savez(f, **inputs)  # type: ignore[arg-type]
    items = []
    for index, artifact in enumerate(artifacts):
        folder = job / f"artifact-{index}"
        folder.mkdir()
        shutil.copyfile(artifact.path, folder / artifact.path.name)
        sidecar = artifact.path.with_suffix(".json")
        if sidecar.is_file():
            shutil.copyfile(sidecar, folder / sidecar.name)
        items.append(
            {
                "name": artifact.name,
                "runtime": artifact.runtime,
                "path": f"{folder.name}/{artifact.path.name}",
                "outputs": f"{folder.name}/outputs.npz",
            }
        )
    (job / "job.json").write_text(json.dumps({"artifacts": items}))
    command = [f"{VENV}/bin/python", f"{_GUEST_JOB}/worker.py", f"{_GUEST_JOB}/job.json"]
    with userland.board(board, work / "board", binds={job: _GUEST_JOB}) as running:
        done = running.run(
            command, env={"PYTHONPATH": f"{_GUEST_JOB}/src"}, timeout_s=timeout_s, check=False
        )
    if done.returncode != 0:
        started = [
            line.removeprefix(_worker.PROGRESS)
            for line in done.stdout.splitlines()
            if line.startswith(_worker.PROGRESS)
        ]
        culprit = started[-1] if started else None
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise EmulatedRunError(culprit, board.summary, f"{describe_exit(done.returncode)}\n{tail}")
    machine = json.loads((job / "machine.json").read_text())["machine"]
    if machine != userland.spec.arch:
        raise EmulationError(f"the board reported machine {machine!r}, not {userland.spec.arch}")
    results = {}
    for item in items:
        with np.load(job / item["outputs"], allow_pickle=False) as data:
            results[item["name"]] = [data[f"arr_{i}"] for i in range(len(data.files))]
    return results
