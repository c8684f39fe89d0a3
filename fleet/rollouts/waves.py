"""Creating a rollout: which devices it takes, and which wave each of them is in.

Waves are cumulative percentages of the selected devices (``1, 10, 50, 100``) or cohort
tags (``canary``: every selected device with that tag not already in an earlier wave).
Devices are ordered by ``sha256(rollout id : device id)``, so a wave's members are
deterministic and stay the same for the whole rollout, and differ between rollouts.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence

from sqlmodel import Session, select

from .. import audit
from ..errors import NotFoundError, RequestError
from ..models import Bundle, Device, DeviceState, Rollout, RolloutCreate, RolloutDevice

__all__ = ["create_rollout"]


def create_rollout(session: Session, *, data: RolloutCreate, actor: str) -> Rollout:
    """Select the devices, order them into waves, persist everything, start wave 0."""
    bundle = session.get(Bundle, data.bundle_id)
    if bundle is None:
        raise NotFoundError(f"no bundle with id {data.bundle_id}")
    profile = data.profile or bundle.profile
    if profile != bundle.profile:
        raise RequestError(
            f"bundle {bundle.target_path} is built for {bundle.profile}, not {profile}"
        )
    if not data.waves:
        raise RequestError("a rollout needs at least one wave")
    _check_waves(data.waves)
    rollout = Rollout(
        id=f"r-{secrets.token_hex(6)}",
        bundle_id=bundle.id or 0,
        profile=profile,
        tags=data.tags,
        waves=data.waves,
        gate=data.gate.model_dump(),
        auto_advance=data.auto_advance,
        on_failure=data.on_failure,
        mode=data.mode,
        created_by=actor,
    )
    devices = _select_devices(session, profile=profile, tags=data.tags)
    bundle_ids = {
        b.bundle_name: b.id for b in session.exec(select(Bundle).where(Bundle.profile == profile))
    }
    session.add(rollout)
    session.flush()
    for device, wave in _assign_waves(rollout.id, devices, data.waves):
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device.id,
                wave=wave,
                rank=_rank(rollout.id, device.id),
                previous_bundle_id=bundle_ids.get(device.bundle or ""),
            )
        )
    audit.record(
        session,
        actor=actor,
        action="rollout.create",
        target=f"rollout:{rollout.id}",
        after=audit.snapshot(rollout),
    )
    return rollout


def _select_devices(session: Session, *, profile: str, tags: Sequence[str]) -> list[Device]:
    """The active devices of ``profile`` carrying every one of ``tags``."""
    devices = [
        d
        for d in session.exec(
            select(Device).where(Device.profile == profile, Device.state == DeviceState.ACTIVE)
        )
        if set(tags) <= set(d.tags)
    ]
    if not devices:
        raise RequestError(
            f"no active device has profile {profile}"
            + (f" and tags {', '.join(tags)}" if tags else "")
        )
    return devices


def _check_waves(waves: Sequence[str]) -> None:
    last = 0.0
    for wave in waves:
        try:
            percent = float(wave)
        except ValueError:
            continue  # a cohort tag
        if not last < percent <= 100:
            raise RequestError(
                f"wave {wave!r}: percentages must increase and lie in (0, 100], e.g. 1,10,50,100"
            )
        last = percent


def _rank(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def _assign_waves(
    rollout_id: str, devices: Sequence[Device], waves: Sequence[str]
) -> list[tuple[Device, int]]:
    remaining = sorted(devices, key=lambda d: _rank(rollout_id, d.id))
    assigned: list[tuple[Device, int]] = []
    for index, wave in enumerate(waves):
        try:
            percent = float(wave)
        except ValueError:
            members = [d for d in remaining if wave in d.tags]
        else:
            wanted = math.ceil(len(devices) * percent / 100) - len(assigned)
            members = remaining[: max(wanted, 0)]
        taken = {d.id for d in members}
        remaining = [d for d in remaining if d.id not in taken]
        assigned.extend((d, index) for d in members)
    return assigned
