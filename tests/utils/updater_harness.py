"""What the updater tests share: bundle labels, a compile output whose golden vectors no
longer match, factory provisioning, and a recorder of the acks and models an in-process
``Updater`` hands out (tests/test_agent_updater.py, tests/test_updater_unit.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.model import LoadedModel
from agent.slots import Slots
from contracts.mqtt import Ack, AckState, Command

__all__ = ["UpdaterRecorder", "bundle_label", "golden_broken", "provision"]


def bundle_label(version: str) -> str:
    return f"digits-host-{version}"


def golden_broken(compiled: Path, out: Path) -> Path:
    """The compile output with every golden output off by 1.0: a model that "regressed"."""
    broken = out / "broken-golden"
    shutil.copytree(compiled, broken)
    golden = broken / "onnxruntime-fp32.golden.npz"
    with np.load(golden) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez(golden, **{k: v + 1.0 if k.startswith("output:") else v for k, v in arrays.items()})
    return broken


def provision(data_dir: Path, *bundles: Path) -> Path:
    """A device as flashed at the factory: each bundle installed in turn, the last serving."""
    slots = Slots(data_dir)
    for bundle in bundles:
        slots.stage(bundle)
        slots.switch()
    return data_dir


@dataclass(kw_only=True)
class UpdaterRecorder:
    """The acks an updater sent and the models it handed out (the one serving kept open)."""

    acks: list[Ack] = field(default_factory=list)
    activated: list[str | None] = field(default_factory=list)
    model: LoadedModel | None = None

    def _activate(self, model: LoadedModel | None) -> None:
        if self.model is not None:
            self.model.close()
        self.model = model
        self.activated.append(model.bundle if model else None)

    def acked(self, command: Command) -> list[AckState]:
        return [a.state for a in self.acks if a.command == command.id]

    def detail(self, command: Command, state: AckState) -> str:
        return next(a.detail for a in self.acks if a.command == command.id and a.state == state)

    def close_model(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
