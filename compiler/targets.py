"""Turn a hardware profile's target dicts into ``tvm.target.Target`` objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from contracts.artifacts import Device
from hw_profiles import Profile

from .errors import UnsupportedTargetError

if TYPE_CHECKING:
    import tvm

__all__ = ["tvm_target"]


def tvm_target(profile: Profile, device: Device = "cpu") -> tvm.target.Target:
    """The TVM target for ``device`` on ``profile``; a GPU target gets the CPU as its host."""
    import tvm

    if device == "gpu":
        if profile.targets.gpu is None:
            raise UnsupportedTargetError(
                f"profile {profile.name!r} has no GPU target ({profile.source}: targets.gpu)"
            )
        field, config = "targets.gpu", {**profile.targets.gpu, "host": profile.targets.cpu}
    else:
        field, config = "targets.cpu", dict(profile.targets.cpu)
    try:
        return tvm.target.Target(config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UnsupportedTargetError(
            f"{profile.source}: {field}: TVM rejected the target: {e}"
        ) from e
