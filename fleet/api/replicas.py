"""``/api/v1/replicas``: the fleet servers sharing this database, and which drives rollouts."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from pydantic import BaseModel
from sqlmodel import col, select

from ..models import FleetReplica, RolloutLease
from ..rollouts.lease import database_now
from .deps import ServerDep, SessionDep, Viewer
from .responses import errors

__all__ = ["LeasePublic", "ReplicaPublic", "Replicas", "router"]

router = APIRouter(tags=["replicas"], responses=errors(401, 403))


class LeasePublic(BaseModel):
    holder: str | None
    """The replica driving rollouts while the lease has not expired."""
    epoch: int
    """The term: one higher at every takeover."""
    expires_at: dt.datetime
    acquired_at: dt.datetime
    held: bool
    """Whether the holder's term is still running (not expired, not released)."""


class ReplicaPublic(BaseModel):
    id: str
    started_at: dt.datetime
    seen_at: dt.datetime
    """Its last heartbeat (every quarter of the lease time)."""
    alive: bool
    """Seen within the lease time."""
    leader: bool
    drained_at: dt.datetime | None
    """When another replica last took over its MQTT session after it stopped beating."""


class Replicas(BaseModel):
    lease: LeasePublic
    replicas: list[ReplicaPublic]


@router.get("/replicas")
def replicas(session: SessionDep, server: ServerDep, _: Viewer) -> Replicas:
    """Every replica that ever ran on this database, and the rollout lease."""
    now = database_now(session)
    row = session.get_one(RolloutLease, 1)
    held = row.holder is not None and row.expires_at > now
    stale = now - dt.timedelta(seconds=server.settings.rollout_lease_s)
    return Replicas(
        lease=LeasePublic(
            holder=row.holder,
            epoch=row.epoch,
            expires_at=row.expires_at,
            acquired_at=row.acquired_at,
            held=held,
        ),
        replicas=[
            ReplicaPublic(
                id=r.id,
                started_at=r.started_at,
                seen_at=r.seen_at,
                alive=r.seen_at >= stale,
                leader=held and r.id == row.holder,
                drained_at=r.drained_at,
            )
            for r in session.exec(select(FleetReplica).order_by(col(FleetReplica.id)))
        ],
    )
