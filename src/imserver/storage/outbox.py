"""The transactional outbox: a service's events are rows of its own database first.

A producing service (message, room, file) that must tell the event stream about a
change inserts the event into its ``<service>_outbox`` table **in the transaction of
the change itself**. The commit stores both or neither, so a change and its event
cannot diverge, whether the broker is up or not. A relay
(:class:`OutboxRelay`) then publishes the rows, in id order, waits for the broker's
confirms (a claim goes out as one or a few broker messages, see
:mod:`imserver.storage.events_rabbitmq`), and deletes them. While the broker is
down the rows wait, and the relay retries with backoff; the ack to the client
never waits for the broker.

Delivery is at least once: a relay that crashes after the broker confirmed a row
and before its delete commits publishes it again at restart, and consumers absorb
the repeat (:mod:`imserver.storage.events`).

**Several instances of one service on a server database.** The relay claims its
rows with ``SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`` in a transaction
that publishes them and deletes them before it commits: two relays never publish
the same row at once, and a relay that dies mid-turn leaves its rows to the next
turn of another (its transaction rolls back). Each relay publishes its rows in id
order; two relays running turns at once may interleave theirs, which consumers
accept (no consumer relies on the order of distinct events: ``message.stored``
carries its seq). **SQLite** has one process per database: the relay reads a page,
publishes it and deletes it in a second short transaction, so that no transaction
is held open across the broker's round trip (the message writer would wait for it);
both run on a thread of the relay's own, with a synchronous connection, because
the message writer takes SQLite's write lock on the event loop's thread and a
relay transaction that needed the loop to commit would wait for it forever.

The table's name carries the service's name, so services sharing one database (one
``storage.url`` for all) keep separate outboxes; each service's Alembic history
creates its own (:func:`create_outbox_table`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    delete,
    func,
    select,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from imserver.storage.events import Event, EventStreamDown, OutgoingEvent, encode_event
from imserver.storage.runners import ThreadRunner, in_transaction, sqlite_engine
from imserver.storage.sql import make_engine
from imserver.storage.statements import DriverStatement
from imserver.utils.clock import now_ms

logger = logging.getLogger(__name__)

KEY_LEN = 64
EVENT_ID_LEN = 64

# An event of a large room carries its members: MariaDB's BLOB stops at 64 KiB.
_BODY = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def outbox_columns() -> list[Any]:
    """The columns (and primary key) of an outbox table, for the schema and for the
    migrations (which must create exactly these)."""
    return [
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), autoincrement=True),
        Column("event_id", String(EVENT_ID_LEN), nullable=False),
        Column("key", String(KEY_LEN), nullable=False),
        Column("body", _BODY, nullable=False),
        Column("created", BigInteger(), nullable=False),
    ]


def outbox_table(metadata: MetaData, service: str) -> Table:
    """The ``<service>_outbox`` table in ``metadata``."""
    name = f"{service}_outbox"
    return Table(name, metadata, *outbox_columns(), PrimaryKeyConstraint("id", name=f"pk_{name}"))


def create_outbox_table(service: str) -> None:
    """Create ``<service>_outbox`` (called from a service's Alembic migration)."""
    from alembic import op

    name = f"{service}_outbox"
    op.create_table(name, *outbox_columns(), PrimaryKeyConstraint("id", name=f"pk_{name}"))


OUTBOX_COLUMNS = ("event_id", "key", "body", "created")
"""The columns a producer writes, in the order of :meth:`Outbox.row`'s tuples."""


class Outbox:
    """A producing service's outbox: the rows its transactions insert, and the
    relays to wake once they are committed."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._insert = DriverStatement(table.insert(), OUTBOX_COLUMNS)
        self._wakers: list[Callable[[], None]] = []

    @staticmethod
    def row(key: str, event: Event) -> tuple[str, str, bytes, int]:
        """The row of ``event`` under routing key ``key`` (:data:`OUTBOX_COLUMNS`)."""
        return (event.id, key, encode_event(event), now_ms())

    def insert(self, conn: Connection, rows: Sequence[tuple[str, str, bytes, int]]) -> None:
        """Insert ``rows`` in ``conn``'s open transaction (one statement, compiled once)."""
        if rows:
            self._insert.executemany(conn, rows)

    def on_commit(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after each commit that added rows (a relay's :meth:`OutboxRelay.wake`)."""
        self._wakers.append(wake)

    def committed(self) -> None:
        """Tell the relays that committed rows wait (the producer calls this after
        its commit; a relay also polls, so a missed call only delays)."""
        for wake in self._wakers:
            wake()


class EventPublisher(Protocol):
    """What the outbox relay needs of the event stream."""

    async def publish(self, events: Sequence[OutgoingEvent]) -> None:
        """Publish ``events`` in order and return once the broker has confirmed every
        one; raise :class:`~imserver.storage.events.EventStreamDown` otherwise (some
        may have been published: they will be again)."""


class OutboxRelay:
    """Publishes one outbox's rows and deletes them (see the module docstring).

    ``batch`` is the most rows a turn claims. A turn's costs are mostly fixed — its
    transactions (on SQLite, two waits for the write lock the message writer holds
    most of the time under load), one broker round trip for the confirms, one
    delete — so the claim is large: with a few hundred rows the relay fell behind
    the writer of a busy server. The claim goes out as one message per routing key,
    or a few when it is larger than the stream's bound in bytes.
    """

    POLL = 2.0
    """Seconds between turns when nobody wakes the relay. Each instance's commits wake
    its own relay; the poll is for rows nobody announced (those of an instance that
    stopped before its relay moved them, on a shared database), and every poll is a
    transaction, so at rest it is rare."""

    GATHER = 0.05
    """Seconds at least from the start of one turn to the start of the next when a
    commit wakes the relay. Each turn costs a transaction, a broker round trip and a
    consumer's transaction whatever it moves; under load the writer commits every
    few milliseconds, and a turn per commit (a few dozen rows each) cost more than
    the rows themselves. Rows committed meanwhile wait for the next turn: an event
    reaches the stream at most this much later; a relay behind (a full claim) does
    not wait."""

    def __init__(
        self,
        url: str,
        outbox: Outbox,
        publisher: EventPublisher,
        *,
        batch: int = 2048,
        backoff: tuple[float, float] = (0.2, 10.0),
        claims: dict[str, int] | None = None,
        service: str = "",
    ) -> None:
        self._table = outbox.table
        self._claims = claims
        self._service = service or outbox.table.name
        self._sqlite: ThreadRunner | None = None
        self._engine: AsyncEngine | None = None
        if make_url(url).get_backend_name() == "sqlite":
            # Its own thread and connection: a transaction holding SQLite's write lock
            # must never wait for the event loop, which the message writer (inline on
            # the loop) may be blocking while it waits for that very lock.
            self._sqlite = ThreadRunner(sqlite_engine(url, writer=True), name="outbox-relay")
        else:
            self._engine = make_engine(url)
        self._publisher = publisher
        self._batch = batch
        self._backoff = backoff
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        """Rows published and deleted since the start."""
        self.failures = 0
        """Turns that failed (the broker or the database down)."""
        self.last_claim = 0
        """Rows in the last turn's claim: ``batch`` while the relay is behind."""
        outbox.on_commit(self.wake)

    def start(self) -> None:
        """Start the relay task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"outbox-relay-{self._table.name}"
            )

    def wake(self) -> None:
        """Rows were committed: run a turn now."""
        self._wake.set()

    async def close(self, grace: float = 5.0) -> None:
        """Stop after the current turn, log the rows still waiting, then publish
        what is left for at most ``grace`` seconds (a broker that does not answer
        leaves the rows for the next start)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            # The backlog the relay had not caught up with when the service stopped.
            async with asyncio.timeout(grace):
                waiting = await self.pending()
            logger.info("outbox %s: %d rows waiting at close", self._table.name, waiting)
        except Exception as exc:
            logger.warning("outbox %s: cannot count its rows: %r", self._table.name, exc)
        try:
            async with asyncio.timeout(grace):
                while await self.turn():
                    pass
        except Exception as exc:
            logger.warning("outbox %s: rows left for the next start: %r", self._table.name, exc)
        if self._sqlite is not None:
            await self._sqlite.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def _run(self) -> None:
        delay = self._backoff[0]
        loop = asyncio.get_running_loop()
        while not self._closed:
            started = loop.time()
            try:
                moved = await self.turn()
            except Exception as exc:
                self.failures += 1
                if isinstance(exc, EventStreamDown):
                    logger.warning("outbox %s: %s; retrying in %.1fs", self._table.name, exc, delay)
                else:
                    logger.exception(
                        "outbox %s relay failed; retrying in %.1fs", self._table.name, delay
                    )
                # Full jitter: instances that lost the broker together do not return together.
                await self._sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if moved < self._batch:
                await self._sleep(self.POLL)
                gather = started + self.GATHER - loop.time()
                if gather > 0 and not self._closed:
                    await asyncio.sleep(gather)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def turn(self) -> int:
        """Publish and delete up to ``batch`` rows, oldest first; the rows moved."""
        self._claim(0)
        if self._sqlite is not None:
            rows = await self._sqlite.call(in_transaction, self._page, False)
            if not rows:
                return 0
            await self._publish(rows)
            await self._sqlite.call(in_transaction, self._delete, [r.id for r in rows])
        else:
            assert self._engine is not None
            async with self._engine.connect() as conn, conn.begin():
                rows = await conn.run_sync(self._page, True)
                if not rows:
                    return 0
                await self._publish(rows)
                await conn.run_sync(self._delete, [r.id for r in rows])
        self.published += len(rows)
        self._claim(len(rows))
        return len(rows)

    def _claim(self, rows: int) -> None:
        self.last_claim = rows
        if self._claims is not None:
            self._claims[self._service] = rows

    def _page(self, conn: Connection, lock: bool) -> list[Any]:
        t = self._table.c
        query = select(t.id, t.event_id, t.key, t.body).order_by(t.id).limit(self._batch)
        if lock:
            query = query.with_for_update(skip_locked=True)
        return list(conn.execute(query).all())

    def _delete(self, conn: Connection, ids: list[int]) -> None:
        t = self._table
        if conn.dialect.name in ("mysql", "mariadb"):
            # One primary-key look-up per row: InnoDB answers an IN list with a range
            # scan whose locks reach the rows another relay holds, and two relays then
            # deadlock (and one publishes its page again).
            conn.execute(delete(t).where(t.c.id == bindparam("k")), [{"k": i} for i in ids])
            return
        conn.execute(delete(t).where(t.c.id.in_(ids)))

    async def _publish(self, rows: Sequence[Any]) -> None:
        await self._publisher.publish(
            [OutgoingEvent(r.event_id, r.key, bytes(r.body)) for r in rows]
        )

    async def pending(self) -> int:
        """Rows waiting in the outbox."""

        def count(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(self._table)).scalar_one())

        if self._sqlite is not None:
            return await self._sqlite.call(count)
        assert self._engine is not None
        async with self._engine.connect() as conn:
            return await conn.run_sync(count)
