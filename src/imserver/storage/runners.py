"""Runners: how a store's synchronous SQL functions reach the database.

Each store operation is a synchronous function of a SQLAlchemy
:class:`~sqlalchemy.engine.Connection` run in ONE hand-off. On SQLite that hand-off
is to a thread owning a synchronous connection (:class:`ThreadRunner`), or to the
event-loop thread itself for a writer whose calls are short (:class:`InlineRunner`):
aiosqlite costs several thread round trips per statement (measured ~1.2 ms per
statement in the message store, against ~0.15 ms per hand-off), which would cap a
group commit far below its target. On PostgreSQL/MySQL the async engine's connection
runs the same functions through ``run_sync`` (:class:`AsyncRunner`).

:func:`sqlite_engine` opens the synchronous SQLite engines these runners drive, with
the durability pragmas of :mod:`imserver.storage.sql` and explicit transactions.

:class:`SqlStore` is the base of every service's SQL store: its operations run
through runners (:meth:`SqlStore._read`, and :meth:`SqlStore._write` in one
transaction), and a storage failure leaving them becomes ``unavailable``
(:mod:`imserver.storage.failures`) there, once; every other error keeps its type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Self, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imserver.storage import sql
from imserver.storage.failures import is_database_failure, unavailable

T = TypeVar("T")


class Runner(Protocol):
    """Runs ``fn(connection, *args)`` — one store operation — in one hand-off."""

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` with a connection and return its result."""

    async def call_waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`call` for a ``fn`` that mostly waits on the disk (a commit's fsync):
        never on the event loop's thread."""

    async def close(self) -> None:
        """Release the runner's connections."""


class ThreadRunner:
    """A synchronous engine driven from ``threads`` dedicated threads.

    ``pinned``: one long-lived connection used by a single thread, so a transaction
    may stay open between calls (the writer). Otherwise every call takes a pooled
    connection for its duration (readers). ``name`` prefixes the threads' names.
    """

    def __init__(
        self, engine: Engine, *, threads: int = 1, pinned: bool = False, name: str = "store"
    ) -> None:
        if pinned and threads != 1:
            raise ValueError("a pinned connection needs exactly one thread")
        self._engine = engine
        self._pinned = pinned
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._conn: Connection | None = None

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if not self._pinned:
            with self._engine.connect() as conn:
                return fn(conn, *args)
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return fn(self._conn, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn, args)

    call_waiting = call

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)


class InlineRunner:
    """A synchronous engine driven on the event-loop thread itself (one pinned connection).

    For SQLite, whose statements are short (a batch's take well under a millisecond),
    running them inline costs less than handing each batch to a thread: no executor
    hop and no contention for the interpreter lock. What waits on the disk (the
    commit's fsync, milliseconds during which the interpreter lock is free) goes to a
    thread of its own through :meth:`call_waiting`, so the event loop serves meanwhile.
    The connection is used by one of the two at a time: the owner awaits each call.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="store-commit")

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return self._conn

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._connection(), *args)

    async def call_waiting(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._connection()
        return await asyncio.get_running_loop().run_in_executor(self._waiter, fn, conn, *args)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()
        self._waiter.shutdown(wait=True)


class AsyncRunner:
    """An async engine; the functions run through ``AsyncConnection.run_sync``.

    ``pinned`` as for :class:`ThreadRunner`: calls then run one at a time, in the
    order they come (as on the pinned thread), whichever task makes them.
    """

    def __init__(self, engine: AsyncEngine, *, pinned: bool = False) -> None:
        self._engine = engine
        self._pinned = pinned
        self._conn: AsyncConnection | None = None
        self._turn = asyncio.Lock()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._pinned:
            async with self._engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        async with self._turn:
            if self._conn is None or self._conn.closed or self._conn.invalidated:
                self._conn = await self._engine.connect()
            return await self._conn.run_sync(fn, *args)

    call_waiting = call

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await self._engine.dispose()


def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite would BEGIN only before the first write; SQLAlchemy's "begin" event
    # below opens the transaction explicitly instead, before the first read.
    dbapi_connection.isolation_level = None


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    # The writer runs on the event loop; checkpoints (which copy WAL pages into the
    # database file and fsync it) run on a reader thread instead (the message
    # store's after_commit).
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def checkpoint(conn: Connection) -> None:
    """A passive WAL checkpoint (SQLite), run outside any transaction."""
    # Outside any transaction: the DBAPI connection is in autocommit mode.
    conn.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]


def select_one(conn: Connection) -> None:
    """A trivial query: raises if the database cannot be reached."""
    conn.exec_driver_sql("SELECT 1")


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_deferred(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def _synchronous_normal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def sqlite_engine(
    url: str, *, writer: bool, autocheckpoint: bool = False, durable: bool = True
) -> Engine:
    """A synchronous engine on the SQLite database of ``url`` (an async URL is fine).

    The writer's transactions start with ``BEGIN IMMEDIATE``: it holds the write
    lock from its first read, so what it loads is what it writes against. A
    reader's transaction is a plain ``BEGIN``: one snapshot per store operation.
    The writer checkpoints the WAL at its commits (SQLite's default) only with
    ``autocheckpoint``; without, its owner runs :func:`checkpoint` elsewhere.
    ``durable=False`` drops the fsync of each commit (``synchronous=NORMAL``): a
    commit survives a crash of the process, but the last ones may be lost to a power
    cut or a crash of the machine.
    """
    engine = create_engine(sql.sync_url(url), connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _no_implicit_begin)
    event.listen(engine, "connect", sql.set_sqlite_pragmas)
    if writer and not autocheckpoint:
        event.listen(engine, "connect", _no_autocheckpoint)
    if not durable:
        event.listen(engine, "connect", _synchronous_normal)
    event.listen(engine, "begin", _begin_immediate if writer else _begin_deferred)
    return engine


def in_transaction(conn: Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(conn, *args)`` in a transaction: committed when it returns, rolled back
    when it raises."""
    with conn.begin():
        return fn(conn, *args)


class SqlStore:
    """Base of a service's SQL store: each operation is a synchronous function of a
    :class:`~sqlalchemy.engine.Connection`, run by a :class:`Runner` in one hand-off.

    ``reads`` runs :meth:`_read`; ``writes`` (``reads`` when not given) runs
    :meth:`_write`; ``replica`` (``reads`` when not given) runs :meth:`_read_replica`,
    the reads that tolerate lag. ``name`` is how log lines and ``unavailable``
    messages call the database (``"user database"``).
    """

    name = "database"

    def __init__(
        self, reads: Runner, writes: Runner | None = None, *, replica: Runner | None = None
    ) -> None:
        self._reads = reads
        self._writes = reads if writes is None else writes
        self._replica = reads if replica is None else replica

    @classmethod
    def on_engine(cls, engine: AsyncEngine, replica: AsyncEngine | None = None) -> Self:
        """A store on one async engine (any dialect): a pooled connection per operation;
        lag-tolerant reads on ``replica`` when given."""
        return cls(AsyncRunner(engine), replica=None if replica is None else AsyncRunner(replica))

    @classmethod
    def with_one_writer(cls, url: str, *, durable: bool = True) -> Self:
        """A store on the database at ``url`` whose writes run one at a time, in the
        order they are asked (its transactions never interleave, so none of them has
        to lock rows against another).

        SQLite: every write runs on one thread through one pinned connection (so two
        writers of the store never wait on the file's lock, and a long write does not
        block the event loop), reads on a thread of their own; ``durable`` as for
        :func:`sqlite_engine`. Other dialects: writes through one pinned connection of
        the async engine, reads on its pool.
        """
        if make_url(url).get_backend_name() != "sqlite":
            engine = sql.make_engine(url)
            return cls(AsyncRunner(engine), AsyncRunner(engine, pinned=True))
        name = cls.name.replace(" ", "-")
        return cls(
            ThreadRunner(sqlite_engine(url, writer=False), name=f"{name}-read"),
            ThreadRunner(
                sqlite_engine(url, writer=True, autocheckpoint=True, durable=durable),
                pinned=True,
                name=f"{name}-write",
            ),
        )

    def _failure(self, exc: SQLAlchemyError | OSError) -> Exception:
        """What ``exc``, raised by the database, becomes at this store's boundary:
        ``unavailable`` for a storage failure, ``exc`` itself for anything else (a
        constraint a store uses on purpose, a bug)."""
        if isinstance(exc, OSError) or is_database_failure(exc):
            return unavailable(exc, self.name)
        return exc

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on a reader connection."""
        try:
            return await self._reads.call(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    async def _read_replica(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the replica (the primary when there is none): a read
        that may miss the latest writes."""
        try:
            return await self._replica.call(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction, committed when ``fn`` returns (rolled
        back when it raises); a storage failure, the commit's included, raises
        ``unavailable``."""
        try:
            return await self._writes.call(in_transaction, fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    async def check(self) -> None:
        """Run a trivial query: raises ``unavailable`` if the database cannot be reached."""
        await self._read(select_one)

    async def close(self) -> None:
        """Release every connection."""
        if self._replica is not self._reads:
            await self._replica.close()
        if self._writes is not self._reads:
            await self._writes.close()
        await self._reads.close()
