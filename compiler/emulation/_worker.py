"""The board's half of :func:`compiler.emulation.run_artifacts`: run each artifact of a job
through the agent's runtime loader on this machine and save its outputs.

It runs on the emulated board with ``agent`` and ``contracts`` on ``PYTHONPATH`` and needs
nothing else of edgefleet: ``python worker.py JOB.json``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from agent.runtimes import load_runtime

PROGRESS = "edgefleet-worker: running "


def main(job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    directory = job_file.parent
    with np.load(directory / "inputs.npz", allow_pickle=False) as data:
        inputs = {name: data[name] for name in data.files}
    for item in job["artifacts"]:
        print(PROGRESS + item["name"], flush=True)
        runtime = load_runtime(item["runtime"], directory / item["path"])
        outputs = runtime.predict_batch(inputs)
        runtime.close()
        with (directory / item["outputs"]).open("wb") as f:
            np.savez(f, *outputs)
    (directory / "machine.json").write_text(json.dumps({"machine": platform.machine()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
