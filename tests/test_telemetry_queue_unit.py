"""``agent.telemetry_queue.TelemetryQueue`` in one process, fast: order and numbering, the
drop-oldest bound and its exact count, records too large, rows that are no longer records,
corrupt and locked files (corrupted under an open queue too: what it held is counted),
SQLite's own failures (a full file, a read-only connection), an older schema, a lowered
bound. Real SQLite files on disk; the
SIGKILL and power-cut cases are in tests/test_agent_telemetry.py. ``make mutate`` runs these
(.ci/mutate.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.errors import TelemetryQueueError
from agent.telemetry_queue import MIN_QUEUE_BYTES, QueuedRecord, TelemetryQueue
from contracts.mqtt import TelemetryRecord


def _record(n: int, *, dropped: int = 0, padding: int = 0) -> TelemetryRecord:
    extra = {"padding": "p" * padding} if padding else {}
    return TelemetryRecord(
        id=f"rec-{n}", ts=1_700_000_000.0 + n, inferences=n, dropped=dropped, extra=extra
    )


def _ids(records: list[TelemetryRecord]) -> list[str]:
    return [r.id for r in records]


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[TelemetryQueue]:
    made = TelemetryQueue(tmp_path / "queue" / "telemetry.db", MIN_QUEUE_BYTES * 4)
    yield made
    made.close()


def test_a_bound_below_64_kib_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as raised:
        TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES - 1)
    assert str(raised.value) == "max_bytes must be at least 65536 (64 KiB), got 65535"
    with TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES) as smallest:
        # three quarters of the bound hold records, whole 4 KiB pages; a record a quarter
        assert smallest.max_record_bytes == (MIN_QUEUE_BYTES * 3 // 4) // 4096 * 4096 // 4
        assert smallest.max_bytes == MIN_QUEUE_BYTES
    assert not (tmp_path / "q.db-shm").exists()


def test_records_come_back_oldest_first_numbered_and_stay(queue: TelemetryQueue) -> None:
    stored = [queue.put(_record(n)) for n in range(5)]
    assert stored == [_record(n) for n in range(5)]
    assert len(queue) == 5
    assert _ids(queue.peek(3)) == ["rec-0", "rec-1", "rec-2"]
    assert _ids(queue.peek(100)) == [f"rec-{n}" for n in range(5)]
    queued = queue.peek_after(0, 100)
    assert [q.record for q in queued] == [_record(n) for n in range(5)]
    seqs = [q.seq for q in queued]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert queue.peek_after(seqs[2], 100) == queued[3:]
    assert queue.peek_after(seqs[2], 1) == [queued[3]]
    assert queue.peek_after(seqs[-1], 10) == []
    assert isinstance(queued[0], QueuedRecord)
    assert queue.count_through(seqs[2]) == 3
    assert queue.count_through(seqs[0] - 1) == 0
    assert len(queue) == 5 and queue.dropped == 0


def test_the_oldest_number_is_the_first_still_queued(queue: TelemetryQueue) -> None:
    assert queue.oldest_seq() is None
    queue.put_many(_record(n) for n in range(3))
    seqs = [q.seq for q in queue.peek_after(0, 10)]
    assert queue.oldest_seq() == seqs[0]
    queue.remove(["rec-0"])
    assert queue.oldest_seq() == seqs[1]


def test_peeking_needs_a_limit_of_one_or_more(queue: TelemetryQueue) -> None:
    with pytest.raises(ValueError) as raised:
        queue.peek_after(0, 0)
    assert str(raised.value) == "limit must be at least 1, got 0"
    queue.put(_record(1))
    assert _ids(queue.peek(1)) == ["rec-1"]


def test_remove_deletes_what_it_names_and_says_how_many_were_there(
    queue: TelemetryQueue,
) -> None:
    queue.put_many(_record(n) for n in range(4))
    assert queue.remove(["rec-1", "rec-3", "rec-9"]) == 2
    assert _ids(queue.peek(10)) == ["rec-0", "rec-2"]
    assert queue.remove([]) == 0
    assert queue.dropped == 0  # removed after a receipt is not dropped


def test_remove_takes_more_ids_than_one_statement_holds(queue: TelemetryQueue) -> None:
    queue.put_many(_record(n) for n in range(1200))
    assert queue.remove([f"rec-{n}" for n in range(1, 1200)] + ["absent"]) == 1199
    assert _ids(queue.peek(10)) == ["rec-0"]


def test_numbers_are_never_reused(queue: TelemetryQueue) -> None:
    queue.put_many(_record(n) for n in range(3))
    newest = queue.peek_after(0, 10)[-1].seq
    queue.remove(["rec-2"])
    queue.put(_record(3))
    assert queue.peek_after(0, 10)[-1].seq > newest


def test_an_id_already_queued_is_refused(queue: TelemetryQueue) -> None:
    queue.put(_record(1))
    with pytest.raises(ValueError) as raised:
        queue.put(_record(1))
    assert str(raised.value) == (
        "telemetry record id 'rec-1' is already queued; ids must be unique per device"
    )
    assert len(queue) == 1
    with pytest.raises(ValueError):
        queue.put_many([_record(2), _record(2)])
    assert _ids(queue.peek(10)) == ["rec-1"]  # the whole batch was rolled back


def test_a_record_too_large_is_dropped_and_counted_on_the_next(queue: TelemetryQueue) -> None:
    large = _record(1, dropped=2, padding=queue.max_record_bytes)
    assert queue.put(large) is None
    assert queue.dropped == 3  # itself and the two it carried
    assert len(queue) == 0
    fits = _record(2, padding=queue.max_record_bytes - 200)
    stored = queue.put(fits)
    assert stored is not None and stored.dropped == 3
    assert queue.peek(1)[0].dropped == 3
    assert queue.dropped == 0
    assert queue.put_many([_record(3), large, _record(4)]) == [_record(3), _record(4, dropped=3)]


def _total(queue: TelemetryQueue) -> int:
    """Records in the queue plus every drop it reported or will report."""
    rows = queue.peek(100_000)
    return len(rows) + sum(r.dropped for r in rows) + queue.dropped


def test_past_the_bound_the_oldest_go_and_every_loss_is_counted(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES)
    try:
        put = 0
        for n in range(60):
            queue.put(_record(n, padding=2500))
            put += 1
            assert queue.disk_bytes() <= MIN_QUEUE_BYTES
        rows = queue.peek(1000)
        assert 0 < len(rows) < 40
        assert rows[-1].id == "rec-59"  # the newest is always kept
        assert _ids(rows) == [f"rec-{n}" for n in range(60 - len(rows), 60)]  # oldest went
        assert _total(queue) == put
        assert rows[-1].dropped + sum(r.dropped for r in rows[:-1]) > 0
    finally:
        queue.close()
    assert (tmp_path / "q.db").stat().st_size <= MIN_QUEUE_BYTES


def test_a_lowered_bound_applies_when_the_queue_opens(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 16) as big:
        big.put_many(_record(n, padding=1500) for n in range(200))
        assert len(big) == 200
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as small:
        assert 0 < len(small) < 40
        assert small.dropped == 200 - len(small)
        assert _ids(small.peek(1))[0] == f"rec-{200 - len(small)}"
        assert small.disk_bytes() <= MIN_QUEUE_BYTES * 2


def test_records_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as first:
        first.put_many([_record(1), _record(2)])
        first.put(_record(3, padding=first.max_record_bytes))  # dropped, counted
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as again:
        assert _ids(again.peek(10)) == ["rec-1", "rec-2"]
        assert again.dropped == 1


def _raw(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    for sql, args in statements:
        conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_a_row_that_is_no_longer_a_record_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        queue.put_many([_record(1), _record(2)])
    _raw(
        path,
        ("INSERT INTO records (id, dropped, body) VALUES (?, ?, ?)", ("bad", 4, '{"id": 5}')),
        ("UPDATE records SET body = ? WHERE id = ?", ("not json", "rec-1")),
    )
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert _ids(queue.peek(10)) == ["rec-2"]
        assert queue.dropped == 1 + 1 + 4  # both rows, and the four drops "bad" carried
        assert len(queue) == 1
        assert queue.put(_record(3)) == _record(3, dropped=6)


def test_a_queue_from_before_receipts_is_renumbered_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    _raw(
        path,
        (
            "CREATE TABLE records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
            "dropped INTEGER NOT NULL, body TEXT NOT NULL)",
            (),
        ),
        ("CREATE TABLE state (singleton INTEGER PRIMARY KEY, dropped INTEGER NOT NULL)", ()),
        ("INSERT INTO state VALUES (1, 2)", ()),
        *(
            (
                "INSERT INTO records (seq, id, dropped, body) VALUES (?, ?, 0, ?)",
                (n, f"rec-{n}", _record(n).model_dump_json()),
            )
            for n in (1, 2, 3)
        ),
    )
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert [q.seq for q in queue.peek_after(0, 10)] == [1, 2, 3]
        assert queue.dropped == 2
        queue.remove(["rec-3"])
        queue.put(_record(4))
        assert queue.peek_after(2, 10)[0].seq == 4  # 3 is not given out again
    conn = sqlite3.connect(path)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()
    conn.close()
    assert "AUTOINCREMENT" in sql


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    garbage = b"this is not an SQLite database, just bytes" * 200
    path.write_bytes(garbage)
    (tmp_path / "q.db.corrupt").write_bytes(b"an older one")
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        assert len(queue) == 0 and queue.dropped == 0
        queue.put(_record(1))
        assert _ids(queue.peek(10)) == ["rec-1"]
    assert (tmp_path / "q.db.corrupt").read_bytes() == garbage


def test_corrupt_pages_start_a_fresh_queue(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put_many(_record(n, padding=3000) for n in range(30))
    data = bytearray(path.read_bytes())
    for offset in range(4096 * 3, len(data), 4096):  # page headers past the schema
        data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as fresh:
        assert len(fresh) == 0
        assert fresh.dropped == 0  # how many were lost is unknown: no number is made up
        fresh.put(_record(99))
        assert _ids(fresh.peek(10)) == ["rec-99"]
    aside = (tmp_path / "q.db.corrupt").read_bytes()
    assert aside[100:] == bytes(data)[100:]  # (SQLite bumped its change counter in the header)


def test_a_closed_queue_says_so(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q.db", MIN_QUEUE_BYTES)
    with queue:
        queue.put(_record(1))
    with pytest.raises(RuntimeError) as raised:
        queue.peek(1)
    assert str(raised.value) == f"the telemetry queue {tmp_path / 'q.db'} is closed"
    queue.close()  # twice is fine


def test_a_second_queue_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as first:
        first.put(_record(1))
        with pytest.raises(TelemetryQueueError) as raised:
            TelemetryQueue(path, MIN_QUEUE_BYTES)
        assert str(raised.value) == (
            f"cannot open the telemetry queue {path}: another process holds it; is a second "
            "agent running on this data_dir?"
        )
        assert _ids(first.peek(10)) == ["rec-1"]


def test_a_folder_that_cannot_be_made_is_a_queue_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(TelemetryQueueError) as raised:
        TelemetryQueue(tmp_path / "file" / "q.db", MIN_QUEUE_BYTES)
    assert str(raised.value) == (
        f"cannot create the telemetry queue's folder {tmp_path / 'file'}: File exists; "
        "check agent.toml's data_dir"
    )


def test_missing_folders_are_made(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "a" / "b" / "q.db", MIN_QUEUE_BYTES) as queue:
        queue.put(_record(1))
    assert (tmp_path / "a" / "b" / "q.db").is_file()


def test_the_queue_is_used_from_other_threads(queue: TelemetryQueue) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(queue.put, _record(1)).result() == _record(1)
        assert _ids(pool.submit(queue.peek, 5).result()) == ["rec-1"]
    assert queue.remove(["rec-1"]) == 1


def _storage_fails(queue: TelemetryQueue) -> None:
    """A fault injected under the queue: its SQLite connection closed behind its back, so
    every statement raises ``sqlite3.ProgrammingError`` (an ``sqlite3.Error``, not a
    corrupt file)."""
    assert queue._conn is not None
    queue._conn.close()


@pytest.mark.parametrize(
    ("action", "call"),
    [
        ("read", lambda q: len(q)),
        ("read", lambda q: q.peek(1)),
        ("read", lambda q: q.dropped),
        ("read", lambda q: q.count_through(5)),
        ("read", lambda q: q.oldest_seq()),
        ("write", lambda q: q.put(_record(9))),
        ("write", lambda q: q.remove(["rec-1"])),
    ],
)
def test_a_storage_failure_is_a_queue_error_that_says_what_failed(
    tmp_path: Path, action: str, call: Callable[[TelemetryQueue], object]
) -> None:
    path = tmp_path / "q.db"
    queue = TelemetryQueue(path, MIN_QUEUE_BYTES)
    queue.put(_record(1))
    _storage_fails(queue)
    with pytest.raises(TelemetryQueueError) as raised:
        call(queue)
    assert str(raised.value) == (
        f"cannot {action} the telemetry queue {path}: Cannot operate on a closed database. "
        f"(ProgrammingError); check that {tmp_path} is writable and its disk healthy"
    )
    assert not (tmp_path / "q.db.corrupt").exists()  # not taken for corruption


def test_disk_bytes_counts_the_database_and_its_wal(queue: TelemetryQueue) -> None:
    queue.put_many(_record(n) for n in range(20))
    wal = queue.path.with_name(queue.path.name + "-wal")
    assert wal.exists()
    assert queue.disk_bytes() == queue.path.stat().st_size + wal.stat().st_size
    queue.close()  # the last connection checkpoints and removes the WAL
    assert not wal.exists()
    assert queue.disk_bytes() == queue.path.stat().st_size


def test_a_record_of_exactly_the_largest_size_is_kept(queue: TelemetryQueue) -> None:
    def size(padding: int) -> int:
        return len(_record(1, padding=padding).model_dump_json(exclude_defaults=True).encode())

    padding = queue.max_record_bytes - size(1) + 1
    assert size(padding) == queue.max_record_bytes
    assert queue.put(_record(1, padding=padding)) is not None
    assert queue.put(_record(2, padding=padding + 1)) is None
    assert (len(queue), queue.dropped) == (1, 1)


_INDEX_PAGES = (0x02, 0x0A)
"""SQLite's b-tree page types of an index: interior and leaf (the file format's page header)."""


def _garble_pages(queue: TelemetryQueue, *, index_only: bool) -> list[int]:
    """Garbage bytes written over the headers of the queue's b-tree pages on disk while it is
    open (page 1, the schema, spared): those of the id index only, or every one. The WAL is
    checkpointed first so the pages are in the file, and SQLite's page cache emptied after
    (``PRAGMA shrink_memory``, as memory pressure does), so the next statement reads the disk.
    Returns the page numbers garbled."""
    assert queue._conn is not None
    queue._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    (page_size,) = queue._conn.execute("PRAGMA page_size").fetchone()
    data = queue.path.read_bytes()
    pages = [
        n
        for n in range(2, len(data) // page_size + 1)
        if not index_only or data[(n - 1) * page_size] in _INDEX_PAGES
    ]
    with queue.path.open("r+b") as file:
        for n in pages:
            file.seek((n - 1) * page_size)
            file.write(b"\xff" * 16)
    queue._conn.execute("PRAGMA shrink_memory")
    return pages


@pytest.mark.parametrize(
    ("call", "result"),
    [
        (lambda q: q.put(_record(99)), _record(99, dropped=2 * 30 + 1)),
        (lambda q: q.remove(["rec-1"]), 0),
        (len, 0),
    ],
    ids=["put", "remove", "len"],
)
def test_a_file_corrupted_under_an_open_queue_is_set_aside_and_its_records_counted(
    tmp_path: Path, call: Callable[[TelemetryQueue], object], result: object
) -> None:
    """The records' table is still readable, the id index is garbage: the operation that
    hits it is run again on a fresh queue, and every record the old file held, the drops
    they carried and those not yet reported are counted as dropped, never silently lost."""
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put_many(_record(n, dropped=1, padding=3000) for n in range(30))
        assert queue.put(_record(30, padding=queue.max_record_bytes)) is None
        assert queue.dropped == 1
        assert _garble_pages(queue, index_only=True)
        assert call(queue) == result
        if result == 0:  # the count waits for the next record put
            assert queue.dropped == 2 * 30 + 1
            assert queue.put(_record(99)) == _record(99, dropped=2 * 30 + 1)
        assert _ids(queue.peek(10)) == ["rec-99"]
        assert (len(queue), queue.dropped) == (1, 0)
        assert queue.count_through(10**6) == 1
    aside = path.with_name("q.db.corrupt")
    assert b"\xff" * 16 in aside.read_bytes()  # what was corrupt is kept for a post-mortem
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as again:  # the fresh file is a good one
        assert _ids(again.peek(10)) == ["rec-99"]


def test_drops_pending_in_a_corrupt_queue_with_no_records_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put_many(_record(n) for n in range(3))
        assert queue.remove(["rec-0", "rec-1", "rec-2"]) == 3
        queue.put(_record(3, padding=queue.max_record_bytes))
        queue.put(_record(4, padding=queue.max_record_bytes, dropped=2))
        assert queue.dropped == 1 + 3
        assert _garble_pages(queue, index_only=True)
        assert queue.put(_record(5)) == _record(5, dropped=4)
        assert _ids(queue.peek(10)) == ["rec-5"]


@pytest.mark.parametrize(
    ("call", "result"),
    [
        (lambda q: q.put(_record(99)), _record(99)),
        (lambda q: q.peek(5), []),
        (lambda q: q.oldest_seq(), None),
        (lambda q: q.count_through(10), 0),
        (lambda q: q.dropped, 0),
    ],
    ids=["put", "peek", "oldest_seq", "count_through", "dropped"],
)
def test_a_queue_whose_every_page_is_garbage_starts_fresh_and_counts_nothing_made_up(
    tmp_path: Path, call: Callable[[TelemetryQueue], object], result: object
) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put_many(_record(n, dropped=1, padding=3000) for n in range(30))
        _garble_pages(queue, index_only=False)
        assert call(queue) == result
        assert queue.dropped == 0  # how many were lost is unknown: no number is made up
        assert path.with_name("q.db.corrupt").is_file()
        queue.put(_record(100))
        assert _ids(queue.peek(10)) == [*(["rec-99"] if result else []), "rec-100"]


def test_a_full_disk_is_a_queue_error_that_says_so_and_keeps_what_was_queued(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put(_record(1))
        assert queue._conn is not None
        # SQLite's own limit on the file's pages: past it, SQLITE_FULL as on a full disk
        pages = queue._conn.execute("PRAGMA page_count").fetchone()[0]
        queue._conn.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(TelemetryQueueError) as raised:
            queue.put(_record(2, padding=20_000))
        assert str(raised.value) == (
            f"cannot write the telemetry queue {path}: the disk is full; free space on "
            f"{tmp_path} or lower telemetry.max_queue_bytes"
        )
        assert _ids(queue.peek(10)) == ["rec-1"]


def test_a_storage_failure_names_sqlites_error(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with TelemetryQueue(path, MIN_QUEUE_BYTES) as queue:
        queue.put(_record(1))
        assert queue._conn is not None
        queue._conn.execute("PRAGMA query_only=1")  # every write refused, as on a read-only disk
        with pytest.raises(TelemetryQueueError) as raised:
            queue.remove(["rec-1"])
        assert str(raised.value) == (
            f"cannot write the telemetry queue {path}: attempt to write a readonly database "
            f"(SQLITE_READONLY); check that {tmp_path} is writable and its disk healthy"
        )
        assert not path.with_name("q.db.corrupt").exists()


def test_a_corrupt_queue_that_cannot_be_set_aside_is_a_queue_error_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    """``PATH.corrupt`` is a folder holding a file (nothing can replace it), so the corrupt
    file stays where it is: opening it, and an operation that finds it corrupt, say so."""
    path = tmp_path / "q.db"
    blocker = tmp_path / "q.db.corrupt"
    blocker.mkdir()
    (blocker / "keep").write_text("")
    with TelemetryQueue(path, MIN_QUEUE_BYTES * 4) as queue:
        queue.put_many(_record(n, padding=3000) for n in range(30))
        _garble_pages(queue, index_only=True)
        with pytest.raises(TelemetryQueueError) as raised:
            queue.put(_record(99))
        assert str(raised.value).startswith(
            f"the telemetry queue {path} is corrupt (database disk image is malformed) and a "
            "fresh one could not be started: "
        )
        assert str(raised.value).endswith(f"; delete {path} and restart the agent")
        with pytest.raises(RuntimeError) as closed:
            len(queue)
        assert str(closed.value) == f"the telemetry queue {path} is closed"
    with pytest.raises(TelemetryQueueError) as reopened:
        TelemetryQueue(path, MIN_QUEUE_BYTES * 4)
    assert str(reopened.value).startswith(
        f"the telemetry queue {path} is corrupt (integrity check: *** in database main ***\nPage "
    )
    assert path.is_file() and (blocker / "keep").is_file()  # nothing was replaced


def test_a_file_that_is_not_a_database_and_cannot_be_set_aside_says_so(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"not a database at all" * 300)
    (tmp_path / "q.db.corrupt").mkdir()
    (tmp_path / "q.db.corrupt" / "keep").write_text("")
    with pytest.raises(TelemetryQueueError) as raised:
        TelemetryQueue(path, MIN_QUEUE_BYTES)
    assert str(raised.value).startswith(
        f"the telemetry queue {path} is corrupt (file is not a database) and a fresh one "
        "could not be started: "
    )
