"""Several ``edgefleet fleet serve`` replicas on one PostgreSQL and one standalone broker
(``edgefleet fleet broker``), as processes, for tests that kill or pause them for real.

:func:`replica_cluster` starts the database (a fresh one on the given server), the broker
and the replicas, the first alone (it creates the OTA repository and the admin token in
the data directory they share, standing in for shared storage); :class:`Cluster` reads
which replica drives rollouts.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.db import make_engine
from tests.utils.fleet import wait_for
from tests.utils.served_fleet import EDGEFLEET, ServedFleet, serve_fleet

__all__ = ["BROKER_SECRET", "Cluster", "fresh_database", "replica_cluster"]

BROKER_SECRET = "test-broker-secret-0123456789"
_BROKER_LINE = re.compile(r"^MQTT listens on mqtt://\S+:(\d+);", re.M)


@dataclass
class Cluster:
    database_url: str
    broker: subprocess.Popen[bytes]
    broker_port: int
    credential: Path
    data_dir: Path
    lease_s: float
    replicas: dict[str, ServedFleet] = field(default_factory=dict)

    def lease(self, via: str) -> dict[str, Any]:
        """``/api/v1/replicas`` as replica ``via`` answers it."""
        answer: dict[str, Any] = self.replicas[via].ok("GET", "/replicas")
        return answer

    def leader(self, via: str) -> str | None:
        lease = self.lease(via)["lease"]
        return str(lease["holder"]) if lease["held"] else None


def fresh_database(server_url: str, name: str) -> str:
    """A new, empty database on ``server_url``'s server; its URL."""
    admin = make_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return f"{server_url.rsplit('/', 1)[0]}/{name}"


@contextmanager
def replica_cluster(
    tmp: Path, server_url: str, replica_ids: list[str], *, lease_s: float = 3.0
) -> Iterator[Cluster]:
    """A broker and ``replica_ids`` replicas (``--rollout-lease lease_s``) on a new
    database of ``server_url``; every process is stopped at the end."""
    database_url = fresh_database(server_url, f"fleet_{time.time_ns()}")
    broker_dir = tmp / "broker"
    log = (tmp / "broker.log").open("wb")
    out = tmp / "broker.out"
    with out.open("wb") as printed:
        broker = subprocess.Popen(
            [EDGEFLEET, "fleet", "broker", "--data-dir", str(broker_dir),
             "--database-url", database_url, "--restart-delay", "0.5"],
            stdout=printed, stderr=log,
        )  # fmt: skip
    cluster: Cluster | None = None
    try:
        found = wait_for(
            lambda: broker.poll() is None and _BROKER_LINE.search(out.read_text()),
            timeout_s=60,
            what="the standalone broker to listen",
        )
        secret = tmp / "broker-secret"
        secret.write_text(BROKER_SECRET)
        secret.chmod(0o600)
        cluster = Cluster(
            database_url=database_url,
            broker=broker,
            broker_port=int(found.group(1)),
            credential=broker_dir / "broker-credential.json",
            data_dir=tmp / "fleet",
            lease_s=lease_s,
        )
        for replica in replica_ids:
            cluster.replicas[replica] = serve_fleet(
                cluster.data_dir,
                None,
                "--replica-id", replica,
                "--database-url", database_url,
                "--mqtt-url", f"mqtt://127.0.0.1:{cluster.broker_port}",
                "--mqtt-credential-file", str(cluster.credential),
                "--rollout-lease", str(lease_s),
                "--broker-auth-secret-file", str(secret),
            )  # fmt: skip
        yield cluster
    except BaseException:
        if cluster is not None:
            _print_logs(cluster)  # pytest shows it beside the failure
        raise
    finally:
        for replica in cluster.replicas.values() if cluster else []:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGCONT)  # a paused one must hear SIGTERM
                replica.stop()
        broker.terminate()
        broker.wait(30)
        log.close()


_NOTABLE = re.compile(
    r" (WARNING|ERROR|CRITICAL) | INFO fleet\.(rollouts|bridge|server)|Traceback|^\S*Error"
)


def _print_logs(cluster: Cluster) -> None:
    """Each replica's warnings and errors, for a failure read only from CI's output."""
    for name, replica in cluster.replicas.items():
        lines = [line for line in replica.log().splitlines() if _NOTABLE.search(line)]
        print(f"--- replica {name}: {len(lines)} notable log lines (the last 60)")
        print("\n".join(lines[-60:]))
