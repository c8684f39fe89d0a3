"""The fleet replicas' broker accounts, and the credential file they share.

Every replica connects as ``edgefleet-fleet-REPLICA`` (its client id too, so the session
the broker keeps for it is its own), its ingest workers as ``edgefleet-fleet-REPLICA-ingest-K``
(fleet/ingest_workers.py) and, with a standalone mosquitto, administers device
accounts as ``edgefleet-fleet-REPLICA-admin``. The passwords are shared by every replica:
they live in one file (JSON, mode 0600) that ``edgefleet fleet broker`` writes on its first
start and every ``fleet serve --mqtt-credential-file`` reads:

```
{"fleet_password": "...", "admin_password": "..."}
```

``admin_password`` is there only for a standalone mosquitto (devices are added and removed
through its dynamic-security plugin); with a broker that asks the fleet over HTTP
(:mod:`fleet.api.broker`) the fleet password alone is needed, for the replicas' own logins.
Sharing the fleet password is what lets a living replica take over a dead one's session
and store what the broker kept there for it (:mod:`fleet.bridge`, draining).
"""

from __future__ import annotations

import json
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from contracts.durable import write_atomic

__all__ = [
    "FLEET_ACCOUNT_PREFIX",
    "REPLICA_ID",
    "BrokerCredential",
    "ingest_username",
    "is_ingest_username",
    "replica_admin_username",
    "replica_of",
    "replica_username",
]

FLEET_ACCOUNT_PREFIX = "edgefleet-fleet-"
REPLICA_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
"""A replica's name: lowercase letters, digits and inner ``-``, at most 32."""
_ADMIN_SUFFIX = "-admin"
_INGEST_WORKER = re.compile(r"(?P<owner>.+)-ingest-[1-9][0-9]*")
"""An ingest worker's name: its replica's, then ``-ingest-K`` (fleet/ingest_workers.py)."""


def replica_username(replica_id: str) -> str:
    """Replica ``replica_id``'s MQTT account and client id."""
    return f"{FLEET_ACCOUNT_PREFIX}{replica_id}"


def replica_admin_username(replica_id: str) -> str:
    """Its account for the dynamic-security plugin ($CONTROL) of a standalone mosquitto."""
    return f"{replica_username(replica_id)}{_ADMIN_SUFFIX}"


def ingest_username(replica_id: str, index: int) -> str:
    """The account and client id of replica ``replica_id``'s ingest worker ``index`` (1 on)."""
    if index < 1:
        raise ValueError(f"ingest workers are numbered from 1, not {index}")
    return f"{replica_username(replica_id)}-ingest-{index}"


def is_ingest_username(name: str) -> bool:
    """Whether ``name`` (an account, or a replica id) ends like an ingest worker's."""
    return _INGEST_WORKER.fullmatch(name) is not None


def replica_of(username: str) -> str | None:
    """The replica whose bridge account, or ingest worker's account, ``username`` is; or
    ``None``."""
    if not username.startswith(FLEET_ACCOUNT_PREFIX):
        return None
    replica = username.removeprefix(FLEET_ACCOUNT_PREFIX)
    if worker := _INGEST_WORKER.fullmatch(replica):
        replica = worker["owner"]
        if is_ingest_username(replica):  # no replica may be named so (fleet/config.py)
            return None
    if replica.endswith(_ADMIN_SUFFIX) or not REPLICA_ID.fullmatch(replica):
        return None
    return replica


@dataclass(frozen=True)
class BrokerCredential:
    """The passwords every replica's broker accounts share."""

    fleet_password: str = field(repr=False)
    admin_password: str | None = field(default=None, repr=False)

    @classmethod
    def create(cls, path: Path) -> BrokerCredential:
        """New random passwords, written to ``path`` (0600)."""
        credential = cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24))
        body = {
            "fleet_password": credential.fleet_password,
            "admin_password": credential.admin_password,
        }
        write_atomic(path, (json.dumps(body, indent=1) + "\n").encode(), mode=0o600)
        return credential

    @classmethod
    def load(cls, path: Path) -> BrokerCredential:
        """Read ``path``; ``ValueError`` saying what is wrong with it."""
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(
                f"no broker credential file at {path}: `edgefleet fleet broker` writes one "
                "into its data directory on its first start; copy it to every replica"
            ) from None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the broker credential file {path}: {e}") from None
        if mode & 0o077:
            raise ValueError(
                f"the broker credential file {path} has mode {mode:04o}: group or others may "
                f"read the fleet's broker passwords; `chmod 600 {path}`"
            )
        if not isinstance(body, dict) or set(body) - {"fleet_password", "admin_password"}:
            raise ValueError(
                f"{path} must be a JSON object with fleet_password and, for a standalone "
                "mosquitto, admin_password"
            )
        fleet, admin = body.get("fleet_password"), body.get("admin_password") or None
        if not isinstance(fleet, str) or len(fleet) < 16:
            raise ValueError(f"{path}: fleet_password must be a string of 16 characters or more")
        if admin is not None and (not isinstance(admin, str) or len(admin) < 16):
            raise ValueError(f"{path}: admin_password must be a string of 16 characters or more")
        return cls(fleet, admin)
