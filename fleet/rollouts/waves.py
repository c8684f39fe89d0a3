"""Creating a rollout: which devices it takes, and which wave each of them is in.

Waves are cumulative percentages of the selected devices (``1, 10, 50, 100``) or cohort
tags (``canary``: every selected device with that tag not already in an earlier wave).
Devices are ordered by ``sha256(rollout id : device id)``, so a wave's members are
deterministic and stay the same for the whole rollout, and differ between rollouts.

:func:`plan_rollout` decides all of it without writing; :func:`create_rollout` stores its
plan, and a preview (``POST /rollouts/preview``) shows it, with the rollout id it used so
that creating with that id takes the very same devices in the very same waves.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, insert
from sqlmodel import Session, select

from .. import audit
from ..errors import ConflictError, NotFoundError, RequestError
from ..models import (
    Bundle,
    Device,
    DeviceState,
    Rollout,
    RolloutCreate,
    RolloutDevice,
    RolloutDeviceState,
)

__all__ = ["WavePlan", "create_rollout", "is_cohort", "plan_rollout"]


@dataclass(frozen=True)
class WavePlan:
    """Which devices a rollout takes, in which wave: what creating it stores, and what a
    preview shows without storing anything."""

    rollout_id: str
    bundle: Bundle
    profile: str
    selected: int
    """Active devices of the profile carrying every tag asked for."""
    waves: list[list[Device]]
    """Each wave's devices, in the order they are ranked."""

    @property
    def unassigned(self) -> int:
        """Selected devices no wave takes (the waves end below 100 %)."""
        return self.selected - sum(len(wave) for wave in self.waves)


def plan_rollout(session: Session, data: RolloutCreate) -> WavePlan:
    """Select the devices and order them into waves; nothing is written.

    Refuses (``RequestError``) a bundle built for another profile, a selection of no
    device, percentages that do not increase, and a cohort that no selected device carries
    (a misspelt cohort must not skip the canary). ``data.id`` keeps the id a preview chose.
    """
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
    rollout_id = data.id or f"r-{secrets.token_hex(6)}"
    if data.id is not None and session.get(Rollout, data.id) is not None:
        raise ConflictError(
            f"rollout {data.id} exists already: preview again for a new id, or leave id out"
        )
    devices = _select_devices(session, profile=profile, tags=data.tags)
    _check_cohorts(data.waves, devices, profile=profile)
    return WavePlan(
        rollout_id=rollout_id,
        bundle=bundle,
        profile=profile,
        selected=len(devices),
        waves=_assign_waves(rollout_id, devices, data.waves),
    )


def create_rollout(session: Session, *, data: RolloutCreate, actor: str) -> Rollout:
    """Select the devices, order them into waves, persist everything, start wave 0."""
    plan = plan_rollout(session, data)
    rollout = Rollout(
        id=plan.rollout_id,
        bundle_id=plan.bundle.id or 0,
        profile=plan.profile,
        tags=data.tags,
        waves=data.waves,
        gate=data.gate.model_dump(),
        auto_advance=data.auto_advance,
        on_failure=data.on_failure,
        mode=data.mode,
        created_by=actor,
    )
    bundle_ids = {
        b.bundle_name: b.id
        for b in session.exec(select(Bundle).where(Bundle.profile == plan.profile))
    }
    session.add(rollout)
    session.flush()
    members = [
        {
            "rollout_id": rollout.id,
            "device_id": device.id,
            "wave": wave,
            "rank": _rank(rollout.id, device.id),
            "state": RolloutDeviceState.PENDING,
            "previous_bundle_id": bundle_ids.get(device.bundle or ""),
            "detail": "",
            "updated_at": rollout.created_at,
        }
        for wave, devices in enumerate(plan.waves)
        for device in devices
    ]
    if members:  # one executemany, however many devices
        table = cast(Table, RolloutDevice.__table__)  # type: ignore[attr-defined]
        session.connection().execute(insert(table), members)
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
        if is_cohort(wave):
            continue
        percent = float(wave)
        if not last < percent <= 100:
            raise RequestError(
                f"wave {wave!r}: percentages must increase and lie in (0, 100], e.g. 1,10,50,100"
            )
        last = percent


def is_cohort(wave: str) -> bool:
    """Whether a wave is a cohort tag rather than a percentage."""
    try:
        float(wave)
    except ValueError:
        return True
    return False


def _check_cohorts(waves: Sequence[str], devices: Sequence[Device], *, profile: str) -> None:
    carried = {tag for device in devices for tag in device.tags}
    unknown = [wave for wave in waves if is_cohort(wave) and wave not in carried]
    if unknown:
        known = ", ".join(sorted(carried)[:20]) or "no tags at all"
        raise RequestError(
            f"no selected device carries the cohort tag {', '.join(map(repr, unknown))}; the "
            f"{len(devices)} selected devices of profile {profile} carry: {known}. Check the "
            "spelling, or tag devices first (PUT /devices/ID/tags)"
        )


def _rank(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def _assign_waves(
    rollout_id: str, devices: Sequence[Device], waves: Sequence[str]
) -> list[list[Device]]:
    remaining = sorted(devices, key=lambda d: _rank(rollout_id, d.id))
    assigned: list[list[Device]] = []
    taken_so_far = 0
    for wave in waves:
        if is_cohort(wave):
            members = [d for d in remaining if wave in d.tags]
        else:
            wanted = math.ceil(len(devices) * float(wave) / 100) - taken_so_far
            members = remaining[: max(wanted, 0)]
        taken = {d.id for d in members}
        remaining = [d for d in remaining if d.id not in taken]
        assigned.append(members)
        taken_so_far += len(members)
    return assigned
