"""Tests of :mod:`imserver.storage.snapshot`: copies of several SQLite databases taken
while other connections write them are all as of one instant, and taking them never
holds a writer of one database while it waits for another's lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imserver.storage.snapshot import integrity, snapshot


def create(path: Path) -> None:
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, pad BLOB)")
    db.close()


def top(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        value: int = db.execute("SELECT coalesce(max(x), 0) FROM t").fetchone()[0]
        return value
    finally:
        db.close()


class Writer:
    """A thread committing ``i`` to database ``a``, then ``i`` to ``b``, for i = 1, 2, …:
    at every instant ``max(a)`` is ``max(b)`` or ``max(b) + 1``."""

    def __init__(self, a: Path, b: Path, busy_timeout: float = 10.0) -> None:
        self.paths = (a, b)
        self.busy_timeout = busy_timeout
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        conns = [
            sqlite3.connect(p, isolation_level=None, timeout=self.busy_timeout) for p in self.paths
        ]
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                for conn in conns:
                    try:
                        conn.execute("INSERT INTO t VALUES (?, randomblob(2000))", (i,))
                    except sqlite3.OperationalError as exc:
                        self.errors.append(str(exc))
                        return
                self.done = i
        finally:
            for conn in conns:
                conn.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    create(a)
    create(b)
    yield a, b


def test_copies_of_databases_written_meanwhile_are_of_one_instant(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    a, b = pair
    writer = Writer(a, b)
    writer.thread.start()
    try:
        tops: list[int] = []
        for n in range(15):
            while writer.done < 50 * (n + 1):
                time.sleep(0.001)
            ca, cb = tmp_path / f"a{n}.db", tmp_path / f"b{n}.db"
            snapshot({a: ca, b: cb})
            assert (integrity(ca), integrity(cb)) == ("ok", "ok")
            top_a, top_b = top(ca), top(cb)
            assert top_a - top_b in (0, 1), (n, top_a, top_b)
            tops.append(top_a)
    finally:
        writer.stop.set()
        writer.thread.join()
    assert writer.errors == []
    # Each copy was of its own instant while the writer kept writing.
    assert tops == sorted(tops) and len(set(tops)) == len(tops)
    assert writer.done > tops[-1]


def test_a_busy_database_never_holds_up_the_writers_of_the_others(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """While ``b``'s lock is held for a second, the snapshot keeps trying; writers of
    ``a`` (which the snapshot locks first) never wait past their short busy timeout."""
    a, b = pair
    blocker = sqlite3.connect(b, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    errors: list[str] = []
    writes = 0
    stop = threading.Event()

    def write_a() -> None:
        nonlocal writes
        conn = sqlite3.connect(a, isolation_level=None, timeout=0.2)
        try:
            while not stop.is_set():
                try:
                    conn.execute("INSERT INTO t VALUES (NULL, x'00')")
                    writes += 1
                except sqlite3.OperationalError as exc:
                    errors.append(str(exc))
                time.sleep(0.001)
        finally:
            conn.close()

    writer = threading.Thread(target=write_a)
    taker = threading.Thread(
        target=snapshot, args=({a: tmp_path / "ca.db", b: tmp_path / "cb.db"},)
    )
    writer.start()
    taker.start()
    time.sleep(1.0)
    assert taker.is_alive(), "the snapshot did not wait for b's lock"
    blocker.execute("ROLLBACK")
    blocker.close()
    taker.join(10)
    stop.set()
    writer.join()
    assert not taker.is_alive()
    assert errors == []
    assert writes > 100
    assert integrity(tmp_path / "ca.db") == "ok"


def test_databases_locked_too_long_time_out_and_write_nothing(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    a, b = pair
    blocker = sqlite3.connect(b, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TimeoutError, match=r"^the databases stayed busy for 0\.3 s$"):
            snapshot({a: tmp_path / "ca.db", b: tmp_path / "cb.db"}, lock_timeout=0.3)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not (tmp_path / "ca.db").exists()
    assert not (tmp_path / "cb.db").exists()


def test_an_existing_target_is_refused_before_anything_is_copied(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    a, b = pair
    (tmp_path / "cb.db").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match=r"cb\.db exists$"):
        snapshot({a: tmp_path / "ca.db", b: tmp_path / "cb.db"})
    assert not (tmp_path / "ca.db").exists()
    assert (tmp_path / "cb.db").read_bytes() == b"keep"
