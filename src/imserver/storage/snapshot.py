"""Online snapshots of SQLite databases, several of them as of one instant.

:func:`snapshot` copies a set of SQLite files (in WAL mode, as every store opens
them) while other processes keep reading and writing them, through SQLite's online
backup API (``sqlite3_backup_*``, Python's :meth:`sqlite3.Connection.backup`). Each
copy is a complete database as it stood at one commit: the backup reads the source
inside a read transaction, and WAL mode gives that transaction a fixed view however
many commits land meanwhile.

One instant for all of them: the databases are attached to two connections. The
first takes the write lock of every database at once (``BEGIN IMMEDIATE`` starts a
write transaction on each attached database); while it holds them no commit can land
anywhere, and the second opens its read transaction on each database; then the
first lets go. The writers of the server wait for that millisecond (their
``busy_timeout`` covers it) and readers are never blocked. The copies are then made
from the second connection's read transactions, so a commit that lands during the
copy is in none of them. Together the copies are a state the server had: no copy
holds a commit of its database while another lacks an earlier commit of its own (a
message naming a file is there only with the file's record).

The locks are taken without waiting: a busy database ends the try, every lock is let
go, and the next try comes a few milliseconds later. Waiting for one lock while
holding another could hold up a server writer that itself waits, with a
transaction open, for something the first writer's wait blocks (the message
writer's inline transaction on the event loop, say) until a busy timeout ends it.

While the copy runs, the read transactions keep the sources' WAL from being
checkpointed past them: the WAL files grow by what is written during the copy and
are checkpointed as usual after it.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

LOCK_TIMEOUT = 30.0
"""Seconds to keep trying for the write locks of the databases (a writer's
transaction in progress holds one until it commits)."""


def _uri(path: Path) -> str:
    """A read-write URI of an existing file: ``mode=rw`` never creates one."""
    return f"file:{quote(str(path.resolve()))}?mode=rw"


def _attached(paths: list[Path], timeout: float) -> tuple[sqlite3.Connection, list[str]]:
    """A connection with ``paths`` open as ``main``, ``s1``, ``s2``, …; the schema names."""
    conn = sqlite3.connect(_uri(paths[0]), uri=True, timeout=timeout, isolation_level=None)
    schemas = ["main"]
    try:
        for i, path in enumerate(paths[1:], start=1):
            conn.execute(f"ATTACH DATABASE ? AS s{i}", (_uri(path),))
            schemas.append(f"s{i}")
    except BaseException:
        conn.close()
        raise
    return conn, schemas


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _freeze(locker: sqlite3.Connection, reader: sqlite3.Connection, schemas: list[str]) -> bool:
    """One try at opening the reader's transactions while every writer is held; whether
    it worked. Nothing waits while a lock is held: a lock or a read that is busy ends
    the try at once, with every lock let go."""
    try:
        locker.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            return False
        raise
    try:
        reader.execute("BEGIN")
        for schema in schemas:
            # The first read of a schema starts its read transaction.
            reader.execute(f"SELECT count(*) FROM {schema}.sqlite_master").fetchall()
    except sqlite3.OperationalError as exc:
        if reader.in_transaction:
            reader.execute("ROLLBACK")
        if _is_busy(exc):
            return False
        raise
    finally:
        locker.execute("ROLLBACK")
    return True


def snapshot(databases: Mapping[Path, Path], *, lock_timeout: float = LOCK_TIMEOUT) -> float:
    """Copy each source database (key) to its target file (value), all as of one
    instant; returns that instant (seconds since the epoch).

    The locks are taken in the mapping's order, each without waiting: a try that meets
    a busy database lets go of all of them and tries again a few milliseconds later,
    so the snapshot never holds one writer's lock while it waits for another's (which
    could hold up a writer that itself waits, with a transaction open, for something
    else). The busiest database is best put last: its writer is held the shortest.

    Each copy is a single file in rollback-journal mode. The targets must not exist
    yet. Raises :class:`sqlite3.Error` if a source cannot be
    opened, and ``TimeoutError`` if the locks were not had within ``lock_timeout``
    seconds.
    """
    sources = list(databases)
    if not sources:
        return time.time()
    for target in databases.values():
        if target.exists():
            raise FileExistsError(f"snapshot target {target} exists")
    locker, _ = _attached(sources, 0)
    try:
        reader, schemas = _attached(sources, 0)
        try:
            deadline = time.monotonic() + lock_timeout
            pause = 0.001
            while not _freeze(locker, reader, schemas):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the databases stayed busy for {lock_timeout} s")
                time.sleep(random.uniform(0, pause))
                pause = min(pause * 2, 0.05)
            instant = time.time()
            for schema, source in zip(schemas, sources, strict=True):
                out = sqlite3.connect(databases[source], isolation_level=None)
                try:
                    reader.backup(out, name=schema)
                    # A copy is one self-contained file: inspecting it makes no -wal
                    # beside it (a server opening it switches it back to WAL).
                    out.execute("PRAGMA journal_mode=DELETE")
                finally:
                    out.close()
            reader.execute("COMMIT")
        finally:
            reader.close()
    finally:
        locker.close()
    return instant


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of the database at ``path``: ``ok``, or its findings."""
    conn = sqlite3.connect(_uri(path), uri=True, isolation_level=None)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(row[0]) for row in rows)
