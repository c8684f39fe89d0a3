"""The agent's offline telemetry queue: one SQLite file (WAL mode) bounded on disk.

Records wait here until the fleet's storage receipt names them, surviving crashes and
reboots; the sender reads them oldest first by sequence number (:meth:`TelemetryQueue.
peek_after`, the number being how ``agent/telemetry_resend.py`` knows what is in flight)
and removes them only when a receipt says the fleet stored or refused them. Past ``max_bytes``
on disk (database + WAL) the oldest records are deleted, and the number deleted is kept in
the file and added to the ``dropped`` field of the next record :meth:`TelemetryQueue.put`
stores, in the same transaction, so no crash loses the count and the fleet sees every loss.

Durability: ``synchronous=FULL``, so every commit is fsynced and a power cut loses nothing
already put. The cost is one fsync per put (a record every ``interval_s``) and one per
receipt, which is nothing at that rate; ``NORMAL`` would survive a crash of the
process but lose everything since the last checkpoint on a power cut, the most common
failure of an edge device.

The connection runs in exclusive locking mode: no ``-shm`` file, and a second agent on the
same ``data_dir`` is refused instead of sharing the queue.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, TypeVar

from pydantic import ValidationError

from contracts.mqtt import TelemetryRecord

from .errors import TelemetryQueueError

__all__ = ["MIN_QUEUE_BYTES", "QueuedRecord", "TelemetryQueue"]

log = logging.getLogger(__name__)

MIN_QUEUE_BYTES = 64 * 1024
"""The smallest bound that still holds a few records beside SQLite's own pages."""

_PAGE_SIZE = 4096
_WAL_SHARE = 4
"""A quarter of the bound is left to the WAL, the rest holds records."""
_RECORD_SHARE = 4
"""A record may take at most a quarter of the records' share; larger ones are dropped."""
_CHECKPOINT_PAGES = 1000
"""SQLite's default: the WAL is copied into the database once it holds this many pages."""
_LOCK_TIMEOUT_S = 1.0
"""How long to wait for another process (an agent still exiting) to let go of the file."""
_DELETE_CHUNK = 500
"""Ids per ``DELETE ... IN`` statement."""

_RECORDS = """(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    dropped INTEGER NOT NULL,
    body TEXT NOT NULL
)"""
"""``AUTOINCREMENT``: a sequence number is never reused, even once the newest records
are deleted, so "put after ``seq``" keeps meaning "not sent yet"."""
_UNNUMBERED = "seq INTEGER PRIMARY KEY,"
"""How queues written before storage receipts numbered records (numbers could be reused)."""
_RENUMBER = f"""
CREATE TABLE records_numbered {_RECORDS};
INSERT INTO records_numbered (seq, id, dropped, body) SELECT seq, id, dropped, body FROM records;
DROP TABLE records;
ALTER TABLE records_numbered RENAME TO records;
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records {_RECORDS};
CREATE TABLE IF NOT EXISTS state (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    dropped INTEGER NOT NULL
);
INSERT OR IGNORE INTO state (singleton, dropped) VALUES (1, 0);
"""

T = TypeVar("T")


class QueuedRecord(NamedTuple):
    seq: int
    """Its place in the queue: larger for every record put later, never reused."""
    record: TelemetryRecord


class _CorruptFile(Exception):
    """SQLite opened the file but its integrity check failed."""


class TelemetryQueue:
    """Telemetry records on disk, oldest first, at most ``max_bytes`` of database and WAL.

    Thread-safe: one connection behind a lock. A file that is not a database, or whose
    pages are corrupt, is moved aside to ``PATH.corrupt`` (replacing an older one) and a
    fresh queue is started, with the records it is known to have held counted as dropped.
    Any other storage failure (disk full, unwritable directory) raises
    :class:`TelemetryQueueError`.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < MIN_QUEUE_BYTES:
            raise ValueError(
                f"max_bytes must be at least {MIN_QUEUE_BYTES} (64 KiB), got {max_bytes}"
            )
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._wal_bytes = max_bytes // _WAL_SHARE
        self._data_pages = (max_bytes - self._wal_bytes) // _PAGE_SIZE
        self._checkpoint_pages = max(1, min(_CHECKPOINT_PAGES, self._wal_bytes // _PAGE_SIZE))
        self.max_record_bytes = self._data_pages * _PAGE_SIZE // _RECORD_SHARE
        """Records whose JSON is larger are dropped at :meth:`put`."""
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        with self._lock:
            self._open()

    # --- public -------------------------------------------------------------------------

    def put(self, record: TelemetryRecord) -> TelemetryRecord | None:
        """Store ``record`` (its ``dropped`` raised by the drops not yet reported).

        Returns what was stored, or ``None`` when the record alone is over
        :attr:`max_record_bytes` (it is counted as dropped and logged). ``ValueError`` if
        a record with this id is already queued.
        """
        stored = self.put_many([record])
        return stored[0] if stored else None

    def put_many(self, records: Iterable[TelemetryRecord]) -> list[TelemetryRecord]:
        """:meth:`put` each record, all in one transaction (one fsync): what was stored."""
        batch = list(records)
        return self._call("write", lambda conn: self._put(conn, batch))

    def peek(self, limit: int) -> list[TelemetryRecord]:
        """Up to ``limit`` records, oldest first, left in the queue.

        A stored row that is no longer a valid record (written by another version, or
        damaged) is deleted and counted as dropped rather than blocking the queue.
        """
        return [queued.record for queued in self.peek_after(0, limit)]

    def peek_after(self, seq: int, limit: int) -> list[QueuedRecord]:
        """Up to ``limit`` records put after the one numbered ``seq``, oldest first, left in
        the queue (dropping invalid ones as :meth:`peek` does)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return self._call("read", lambda conn: self._peek(conn, limit, seq))

    def count_through(self, seq: int) -> int:
        """How many queued records are numbered ``seq`` or lower."""
        return self._call(
            "read",
            lambda conn: int(
                conn.execute("SELECT count(*) FROM records WHERE seq <= ?", (seq,)).fetchone()[0]
            ),
        )

    def oldest_seq(self) -> int | None:
        """The sequence number of the oldest queued record; ``None`` when empty."""
        return self._call(
            "read", lambda conn: conn.execute("SELECT min(seq) FROM records").fetchone()[0]
        )

    def remove(self, ids: Iterable[str]) -> int:
        """Delete the records a receipt named; returns how many were queued."""
        wanted = list(ids)
        return self._call("write", lambda conn: self._delete(conn, wanted, count=False))

    @property
    def dropped(self) -> int:
        """Records dropped since the last :meth:`put` reported them."""
        return self._call("read", _pending_dropped)

    def __len__(self) -> int:
        return self._call("read", _count)

    def disk_bytes(self) -> int:
        """The queue's size on disk: the database file plus its WAL."""
        return sum(_file_size(p) for p in (self.path, _wal_path(self.path)))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> TelemetryQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- operations (called with the lock held) -----------------------------------------

    def _put(
        self, conn: sqlite3.Connection, records: list[TelemetryRecord]
    ) -> list[TelemetryRecord]:
        stored: list[TelemetryRecord] = []
        newest: int | None = None
        with _transaction(conn):
            for record in records:
                pending = _pending_dropped(conn)
                row = record.model_copy(update={"dropped": record.dropped + pending})
                body = row.model_dump_json(exclude_defaults=True)
                size = len(body.encode())
                if size > self.max_record_bytes:
                    _add_dropped(conn, 1 + record.dropped)
                    log.warning(
                        "dropped telemetry record %s: it is %d bytes, over the %d bytes one "
                        "record may take in a queue of telemetry.max_queue_bytes = %d",
                        record.id,
                        size,
                        self.max_record_bytes,
                        self.max_bytes,
                    )
                    continue
                try:
                    newest = conn.execute(
                        "INSERT INTO records (id, dropped, body) VALUES (?, ?, ?)",
                        (row.id, row.dropped, body),
                    ).lastrowid
                except sqlite3.IntegrityError as e:
                    raise ValueError(
                        f"telemetry record id {record.id!r} is already queued; ids must be "
                        "unique per device"
                    ) from e
                conn.execute("UPDATE state SET dropped = 0")
                stored.append(row)
            self._drop_oldest(conn, keep=newest)
        self._compact(conn)
        return stored

    def _peek(self, conn: sqlite3.Connection, limit: int, after: int) -> list[QueuedRecord]:
        rows = conn.execute(
            "SELECT seq, id, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        records: list[QueuedRecord] = []
        bad: list[str] = []
        for seq, record_id, body in rows:
            try:
                records.append(QueuedRecord(seq, TelemetryRecord.model_validate_json(body)))
            except ValidationError as e:
                log.warning(
                    "dropped queued telemetry record %s: not a valid record (%s)",
                    record_id,
                    e.errors()[0]["msg"],
                )
                bad.append(record_id)
        if bad:
            self._delete(conn, bad, count=True)
        return records

    def _delete(self, conn: sqlite3.Connection, ids: Sequence[str], *, count: bool) -> int:
        removed = 0
        with _transaction(conn):
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = ids[start : start + _DELETE_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"DELETE FROM records WHERE id IN ({marks}) RETURNING dropped", chunk
                ).fetchall()
                removed += len(rows)
                if count:
                    _add_dropped(conn, len(rows) + sum(r[0] for r in rows))
        self._compact(conn)
        return removed

    def _drop_oldest(self, conn: sqlite3.Connection, *, keep: int | None) -> None:
        """Delete the oldest records (never ``keep``) until the pages in use fit the bound.

        Each dropped record adds itself and the drops it was carrying to the counter, so
        the total the fleet is told stays exact.
        """
        while (used := _used_pages(conn)) > self._data_pages:
            rows = _count(conn)
            excess = math.ceil(rows * (used - self._data_pages) / used)
            dropped = conn.execute(
                "DELETE FROM records WHERE seq IN "
                "(SELECT seq FROM records WHERE seq IS NOT ? ORDER BY seq LIMIT ?) "
                "RETURNING dropped",
                (keep, max(1, excess)),
            ).fetchall()
            if not dropped:
                return
            _add_dropped(conn, len(dropped) + sum(r[0] for r in dropped))
            log.info(
                "telemetry queue over telemetry.max_queue_bytes = %d: dropped the %d oldest "
                "record(s)",
                self.max_bytes,
                len(dropped),
            )

    def _compact(self, conn: sqlite3.Connection) -> None:
        """Give freed pages back to the file system and keep database + WAL under the bound.

        Runs after a commit: a failure here (other than corruption) leaves the data as
        committed, so it is logged and the next write tries again.
        """
        try:
            if conn.execute("PRAGMA freelist_count").fetchone()[0]:
                # executescript steps the pragma to completion; execute() frees one page only.
                conn.executescript("PRAGMA incremental_vacuum;")
            if self.disk_bytes() > self.max_bytes:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:
            if _is_corrupt(e):
                raise
            log.warning("could not compact the telemetry queue %s: %s", self.path, e)

    # --- opening, errors and recovery ----------------------------------------------------

    def _call(self, action: str, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation``; on a corrupt file start a fresh queue and run it there."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"the telemetry queue {self.path} is closed")
            try:
                return operation(self._conn)
            except sqlite3.Error as e:
                if not _is_corrupt(e):
                    raise self._error(action, e) from e
                self._start_fresh(str(e))
            try:
                return operation(self._conn)
            except sqlite3.Error as e:
                raise self._error(action, e) from e

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
        except OSError as e:
            raise TelemetryQueueError(
                f"cannot create the telemetry queue's folder {self.path.parent}: "
                f"{e.strerror or e}; check agent.toml's data_dir"
            ) from e
        except _CorruptFile as e:
            self._start_fresh(str(e))
        except sqlite3.Error as e:
            if not _is_corrupt(e):
                raise self._error("open", e) from e
            self._start_fresh(str(e))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=_LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            # Order matters: page size and auto-vacuum only take on a new file, before WAL;
            # exclusive locking before WAL keeps SQLite from creating a -shm file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA wal_autocheckpoint={self._checkpoint_pages}")
            conn.execute(f"PRAGMA journal_size_limit={self._wal_bytes}")
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _CorruptFile(f"integrity check: {'; '.join(problems[:3])}")
            conn.executescript(_SCHEMA)
            _renumber(conn)
            # A bound lowered since the file was written applies at once.
            with _transaction(conn):
                self._drop_oldest(conn, keep=None)
            self._compact(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _start_fresh(self, cause: str) -> None:
        """Move the corrupt file (and its WAL) aside and open an empty queue in its place."""
        lost = self._salvage_count()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            for source, target in ((self.path, aside), (_wal_path(self.path), _wal_path(aside))):
                if source.exists():
                    os.replace(source, target)
                else:
                    target.unlink(missing_ok=True)
            self._conn = self._connect()
            if lost:
                with _transaction(self._conn):
                    _add_dropped(self._conn, lost)
        except (OSError, sqlite3.Error) as e:
            raise TelemetryQueueError(
                f"the telemetry queue {self.path} is corrupt ({cause}) and a fresh one could not "
                f"be started: {e}; delete {self.path} and restart the agent"
            ) from e
        log.error(
            "the telemetry queue %s was corrupt (%s): moved it aside to %s and started an empty "
            "queue; %s record(s) in it are lost and reported as dropped",
            self.path,
            cause,
            aside,
            lost if lost is not None else "an unknown number of",
        )

    def _salvage_count(self) -> int | None:
        """Records (and unreported drops) the corrupt queue held, if it can still say."""
        if self._conn is None:
            return None
        try:
            row = self._conn.execute(
                "SELECT (SELECT count(*) + coalesce(sum(dropped), 0) FROM records) "
                "+ (SELECT dropped FROM state)"
            ).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0]) if row and row[0] is not None else None

    def _error(self, action: str, e: sqlite3.Error) -> TelemetryQueueError:
        code = _primary_code(e)
        where = f"cannot {action} the telemetry queue {self.path}"
        if code == sqlite3.SQLITE_FULL:
            hint = (
                f"the disk is full; free space on {self.path.parent} or lower "
                "telemetry.max_queue_bytes"
            )
        elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            hint = "another process holds it; is a second agent running on this data_dir?"
        else:
            hint = (
                f"{e} ({getattr(e, 'sqlite_errorname', type(e).__name__)}); check that "
                f"{self.path.parent} is writable and its disk healthy"
            )
        return TelemetryQueueError(f"{where}: {hint}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _renumber(conn: sqlite3.Connection) -> None:
    """Give a queue from before storage receipts its never-reused numbers, in one transaction."""
    table = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()[0]
    if _UNNUMBERED in table:
        with _transaction(conn):
            for statement in filter(str.strip, _RENUMBER.split(";")):
                conn.execute(statement)


def _pending_dropped(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT dropped FROM state").fetchone()[0])


def _add_dropped(conn: sqlite3.Connection, count: int) -> None:
    conn.execute("UPDATE state SET dropped = dropped + ?", (count,))


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


def _used_pages(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages) - int(free)


def _primary_code(e: sqlite3.Error) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_corrupt(e: sqlite3.Error) -> bool:
    return _primary_code(e) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
