"""The shape of a hardware profile, validated with pydantic.

A profile is data about a board: what TVM should generate code for, which compiler links
it, what the board can spend, which runtimes and precisions to try and how strict the
accuracy gate is. Nothing here imports TVM, so a device can read its own profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from contracts.artifacts import LEGACY_FP32, Device, Precision, RuntimeName
from contracts.report import AccuracyGate

__all__ = [
    "AccuracyGate",
    "AgentInstall",
    "Arch",
    "Emulation",
    "Profile",
    "Resources",
    "RuntimeChoice",
    "Targets",
    "Toolchain",
]

Arch = Literal["aarch64", "x86_64"]


def _not_legacy_fp32(value: object) -> object:
    if value == LEGACY_FP32:
        raise ValueError(f'"{LEGACY_FP32}" is now called "fp32": write "fp32" in quantization')
    return value


_ProfilePrecision = Annotated[Precision, BeforeValidator(_not_legacy_fp32)]

# The LLVM triple prefix each architecture's CPU target must use.
_TRIPLE_PREFIX: dict[str, str] = {"aarch64": "aarch64", "x86_64": "x86_64"}


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a profile must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Targets(_Strict):
    """TVM 0.27 targets as JSON dicts, exactly what ``tvm.target.Target(dict)`` accepts."""

    cpu: dict[str, Any] = Field(description="the board's CPU; kind 'llvm'")
    gpu: dict[str, Any] | None = Field(
        default=None, description="the board's GPU (kind 'cuda'); its host is the cpu target"
    )

    @field_validator("cpu")
    @classmethod
    def _cpu_is_llvm(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("kind") != "llvm":
            raise ValueError(
                f'expected kind = "llvm" for the CPU target, got {value.get("kind")!r}'
            )
        if "mtriple" not in value:
            raise ValueError("expected an 'mtriple' (e.g. \"aarch64-linux-gnu\") in the CPU target")
        return value

    @field_validator("gpu")
    @classmethod
    def _gpu_is_cuda(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if value.get("kind") != "cuda":
            raise ValueError(
                f'expected kind = "cuda" for the GPU target, got {value.get("kind")!r}'
            )
        if "host" in value:
            raise ValueError("leave out 'host': the GPU target's host is always targets.cpu")
        return value


class Toolchain(_Strict):
    cc: str = Field(description="C compiler that links TVM modules for the board")
    cc_options: list[str] = Field(default_factory=list, description="extra link options")
    apt_packages: list[str] = Field(
        default_factory=list,
        description="Debian packages that provide cc and the target's C library, for hints",
    )


class Resources(_Strict):
    cores: PositiveInt
    memory_budget_mb: PositiveInt = Field(description="memory the model and the agent may use")


class RuntimeChoice(_Strict):
    name: RuntimeName
    device: Device = "cpu"
    providers: list[str] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers, most preferred first",
    )

    @model_validator(mode="after")
    def _providers_only_for_onnxruntime(self) -> RuntimeChoice:
        if self.providers and self.name != "onnxruntime":
            raise ValueError(f"'providers' applies to onnxruntime only, not to {self.name!r}")
        if self.name == "onnxruntime" and not self.providers:
            raise ValueError(
                "expected 'providers' for onnxruntime, e.g. [\"CPUExecutionProvider\"]"
            )
        return self


class AgentInstall(_Strict):
    python: str = Field(pattern=r"^3\.\d+$", description="Python the agent runs on, e.g. '3.11'")
    os_image: str
    jetpack: str | None = None
    notes: str = ""


class Emulation(_Strict):
    """How the compiler and the tests imitate the board on a build machine of another
    architecture: qemu user mode with this CPU model (``compiler/emulation``)."""

    qemu_cpu: str = Field(
        pattern=r"^[a-z0-9-]+$",
        description="qemu's model of the board's CPU, or the nearest one "
        "(`qemu-aarch64-static -cpu help` lists them)",
    )


class Profile(_Strict):
    """One hardware target. ``name`` is the file's stem; ``source`` where it was read."""

    name: str
    source: Path
    detected: bool = Field(default=False, description="filled in from the machine at load time")
    description: str
    arch: Arch
    targets: Targets
    toolchain: Toolchain
    resources: Resources
    runtimes: list[RuntimeChoice] = Field(min_length=1, description="most preferred first")
    quantization: list[_ProfilePrecision] = Field(
        min_length=1, description="precisions worth trying on this board"
    )
    accuracy_gate: AccuracyGate = Field(
        description="the gate's default thresholds (a compile may override them)"
    )
    agent_install: AgentInstall
    emulation: Emulation | None = Field(
        default=None, description="unset: the board is not emulated (its artifacts run on it)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        triple = str(self.targets.cpu["mtriple"])
        if not triple.startswith(_TRIPLE_PREFIX[self.arch]):
            raise ValueError(
                f"targets.cpu.mtriple {triple!r} does not match arch {self.arch!r}; "
                f"expected a triple starting with {_TRIPLE_PREFIX[self.arch]!r}"
            )
        names = [runtime.name for runtime in self.runtimes]
        if len(set(names)) != len(names):
            raise ValueError(f"runtimes lists a runtime twice: {names}")
        if any(r.device == "gpu" for r in self.runtimes) and self.targets.gpu is None:
            raise ValueError('a runtime asks for device = "gpu" but targets.gpu is not set')
        return self

    def runtime(self, name: RuntimeName) -> RuntimeChoice | None:
        """The profile's settings for runtime ``name``, or ``None`` if it is not supported."""
        return next((r for r in self.runtimes if r.name == name), None)
