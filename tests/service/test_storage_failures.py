"""The storage boundary (``imserver.storage.failures``, ``SqlStore._read`` /
``_write``) on real SQLite files failing in each way a server meets: full, read-only,
impossible to open, locked past ``busy_timeout``. Each becomes ``unavailable``, logged
once as a warning without traceback; a constraint violation and a bad statement keep
their types (the first is used on purpose by stores, the second is a bug).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    Table,
    Text,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from imserver.services.message.store import translate
from imserver.storage.failures import is_database_failure
from imserver.storage.runners import SqlStore
from imserver.storage.sql import make_engine
from imserver.utils.errors import Internal, Unavailable

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("body", Text))


class Notes(SqlStore):
    """The smallest store: what every service store does, on one table."""

    name = "notes database"

    async def add(self, note: int, body: str = "x") -> None:
        def run(conn: Connection) -> None:
            conn.execute(insert(notes).values(id=note, body=body))

        await self._write(run)

    async def count(self) -> int:
        def run(conn: Connection) -> int:
            return int(conn.scalar(select(func.count()).select_from(notes)) or 0)

        return await self._read(run)

    async def bad_statement(self) -> None:
        def run(conn: Connection) -> None:
            conn.exec_driver_sql("SELECT * FROM no_such_table")

        await self._read(run)


Pragma = Callable[[Any, Any], None]


def pragma(sql: str) -> Pragma:
    def run(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        cursor.close()

    return run


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes VALUES (1, 'first')")
    return path


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., Notes]]:
    stores: list[Notes] = []

    def open_notes(url: str, *on_connect: Pragma) -> Notes:
        engine = make_engine(url)
        for listener in on_connect:  # after make_engine's own pragmas
            event.listen(engine.sync_engine, "connect", listener)
        stores.append(Notes.on_engine(engine))
        return stores[-1]

    yield open_notes
    for store in stores:
        await store.close()


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def unavailable(aw: Awaitable[Any], caplog: pytest.LogCaptureFixture, cause: str) -> None:
    """``aw`` raises exactly ``Unavailable`` and logs one warning line naming ``cause``."""
    caplog.clear()
    with pytest.raises(Unavailable) as info:
        await aw
    assert info.value.message == "notes database unavailable"
    assert isinstance(info.value.__cause__, DBAPIError)
    [record] = caplog.records
    assert (record.levelno, record.exc_info) == (logging.WARNING, None)
    assert record.getMessage().startswith("notes database unavailable: ")
    assert cause in record.getMessage(), record.getMessage()


async def test_a_full_database(
    db: Path, opened: Callable[..., Notes], caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    store = opened(url_of(db), pragma(f"PRAGMA max_page_count={pages}"))
    await unavailable(store.add(2, "y" * 1_000_000), caplog, "database or disk is full")
    assert await store.count() == 1
    roomy = opened(url_of(db))
    await roomy.add(2, "y" * 1_000_000)
    assert await roomy.count() == 2


async def test_a_read_only_database(
    db: Path, opened: Callable[..., Notes], caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true")
    assert await store.count() == 1
    await unavailable(store.add(2), caplog, "readonly database")
    assert await store.count() == 1


async def test_a_database_that_cannot_be_opened(
    tmp_path: Path, opened: Callable[..., Notes], caplog: pytest.LogCaptureFixture
) -> None:
    before = set(threading.enumerate())
    store = opened(url_of(tmp_path / "no such directory" / "notes.db"))
    await unavailable(store.count(), caplog, "unable to open database file")
    await unavailable(store.add(2), caplog, "unable to open database file")
    await unavailable(store.check(), caplog, "unable to open database file")
    # aiosqlite stops the thread of a failed connect without waiting for it: let each
    # finish while this test's event loop can still take its last callback.
    for thread in set(threading.enumerate()) - before:
        await asyncio.to_thread(thread.join, 10)


async def test_a_lock_held_past_busy_timeout(
    db: Path, opened: Callable[..., Notes], caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(url_of(db), pragma("PRAGMA busy_timeout=50"))
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        await unavailable(store.add(2), caplog, "database is locked")
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    await store.add(2)
    assert await store.count() == 2


async def test_constraints_and_bugs_keep_their_types(
    db: Path, opened: Callable[..., Notes], caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(url_of(db))
    with pytest.raises(IntegrityError):
        await store.add(1)
    with pytest.raises(OperationalError) as info:
        await store.bad_statement()
    assert "no such table" in str(info.value)
    assert caplog.records == []
    # The message store's boundary agrees: a bug is internal (and logged with its
    # traceback), a storage failure unavailable.
    assert not is_database_failure(info.value)
    assert type(translate(info.value)) is Internal
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    full = opened(url_of(db), pragma("PRAGMA max_page_count=1"))
    with pytest.raises(Unavailable) as failed:
        await full.add(3, "z" * 1_000_000)
    assert isinstance(failed.value.__cause__, OperationalError)
    assert type(translate(failed.value.__cause__)) is Unavailable


class _PgError(Exception):
    """The shape of a PostgreSQL driver's error: a SQLSTATE, no SQLite code."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "failure"),
    [
        ("53100", True),  # disk full
        ("08006", True),  # connection failure
        ("57P01", True),  # admin shutdown
        ("58030", True),  # I/O error
        ("40P01", True),  # deadlock
        ("55P03", True),  # lock not available
        ("25006", True),  # read-only transaction (a standby)
        ("23505", False),  # unique violation
        ("42P01", False),  # undefined table: a bug
    ],
)
def test_sqlstates(sqlstate: str, failure: bool) -> None:
    exc = DBAPIError.instance("SELECT 1", {}, _PgError(sqlstate), Exception)
    assert is_database_failure(exc) is failure
