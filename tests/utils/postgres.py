"""A throwaway PostgreSQL server for tests: initdb, start on a loopback port, stop.

Needs the server binaries (``initdb``, ``pg_ctl``); Debian's ``postgresql`` package puts
them in ``/usr/lib/postgresql/VERSION/bin``, off PATH. The cluster lives in a short
directory of its own under the system temp dir (a Unix socket path must stay under 108
bytes; pytest's ``tmp_path`` is private to root, and PostgreSQL refuses to run as root,
so as root the cluster belongs to the ``postgres`` user), removed at exit; its log is
copied into ``tmp``. Durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the cluster dies with the test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.utils.mqtt import free_port

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["migrated_engine", "postgres_available", "postgres_server"]

USER = "postgres"
"""The cluster's superuser; loopback connections are trusted, so no password."""
DATABASE = "edgefleet"
_RUN_AS = "postgres"
"""The system user that runs the server when the tests run as root."""


def postgres_available() -> bool:
    """Whether ``postgres_server`` can run here (binaries, and a user to run them as)."""
    if _bin_dir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam(_RUN_AS)
    except KeyError:
        return False
    return shutil.which("runuser") is not None


@contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """A fresh cluster with one empty database; yields ``postgresql://USER@127.0.0.1:PORT/DB``."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb) on PATH or under /usr/lib")
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam(_RUN_AS)
        os.chown(base, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", _RUN_AS, "--"]
    data, log = base / "data", base / "server.log"

    def run(*command: str | Path) -> None:
        done = subprocess.run(
            [*prefix, *map(str, command)], cwd=base, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            server_log = log.read_text()[-4000:] if log.exists() else ""
            raise RuntimeError(
                f"{Path(command[0]).name} exited {done.returncode}: "
                f"{done.stdout}{done.stderr}{server_log}"
            )

    try:
        run(bin_dir / "initdb", "-D", data, "-U", USER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{base}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        port = free_port()
        run(bin_dir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", "30",
            "-o", f"-p {port}")  # fmt: skip
        try:
            run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            run(bin_dir / "pg_ctl", "stop", "-D", data, "-m", "immediate", "-w")
    finally:
        if log.exists():
            shutil.copy(log, tmp / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


def _bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin``, else where ``initdb`` on PATH lives."""
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda initdb: [int(part) for part in initdb.parts[-3].split(".") if part.isdigit()],
    )
    if installed:
        return installed[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def migrated_engine(kind: str, postgres_url: Callable[[], str], directory: Path) -> Engine:
    """An empty fleet database at head: SQLite in ``directory``, or (``kind`` "postgresql")
    a new database on the server ``postgres_url()`` gives (asked only then, so a SQLite
    test never starts one). The caller disposes of the engine."""
    from fleet.db import make_engine
    from fleet.migrate import upgrade

    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{directory / 'fleet.db'}")
    else:
        server = postgres_url()
        name = f"test_{uuid.uuid4().hex}"
        admin = make_engine(server).execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        engine = make_engine(f"{server.rsplit('/', 1)[0]}/{name}")
    upgrade(engine)
    return engine
