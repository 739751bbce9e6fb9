"""SQL storage of the message service (SQLAlchemy 2 Core): :class:`SqlMessageStore`.

The store is a thin async front over synchronous SQL functions: the tables and row
mapping (:mod:`.schema`), the read queries (:mod:`.reads`), the write transaction
(:mod:`.writes`) and full-text search (:mod:`.search`). How those functions reach
the database is a :class:`~imserver.storage.runners.Runner`: on SQLite the writer
runs inline on the event loop and readers on threads; on PostgreSQL/MySQL both run
on the async engine (:mod:`imserver.storage.runners` says why).

The store translates database exceptions into :mod:`imserver.utils.errors` at its
boundary (:func:`translate`): storage failures become ``Unavailable``
(:mod:`imserver.storage.failures`), anything else ``Internal``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from imserver.protocol.models import Message
from imserver.services.message import reads, writes
from imserver.services.message.api import CommittedMessage
from imserver.services.message.reads import ConvState
from imserver.services.message.schema import IdemKey, MarkerKey, MessageKey, StoredMessage
from imserver.services.message.search import MessageSearch, search_for_dialect
from imserver.services.message.writes import KeyConflict, Loaded, WriteBatch
from imserver.storage import sql
from imserver.storage.failures import is_database_failure, unavailable
from imserver.storage.runners import (
    AsyncRunner,
    InlineRunner,
    Runner,
    SqlStore,
    ThreadRunner,
    checkpoint,
    sqlite_engine,
)
from imserver.utils.errors import IMError, Internal
from imserver.utils.ids import ConvId, UserId

logger = logging.getLogger(__name__)


def translate(exc: BaseException) -> IMError:
    """The client-facing error for a database error: ``unavailable`` for a storage
    failure (:mod:`imserver.storage.failures`), ``internal`` (logged with its
    traceback) for anything else, which is a bug."""
    if isinstance(exc, OSError) or is_database_failure(exc):
        return unavailable(exc, "message database")
    logger.error("message store error", exc_info=exc)
    return Internal("message store error")


# --- the write transaction ----------------------------------------------------------

INLINE_COMMIT_MESSAGES = 32
"""A batch this large commits on the event loop's thread. Under full load one fsync
is shared by many messages and handing the commit to a thread (and the interpreter
lock back) costs more than the loop's wait; a smaller batch — a paced load, where the
wait is the loop's whole time — commits on a thread while the loop serves the rest
(both measured: docs/performance.md, "Where the commit runs")."""


class WriteTx:
    """One batch's transaction: :meth:`load` (optional), then :meth:`commit` (else
    rolled back)."""

    def __init__(
        self,
        runner: Runner,
        search: MessageSearch,
        committed: Callable[[], None],
        *,
        shared: bool = False,
    ) -> None:
        self._runner = runner
        self._search = search
        self._committed = committed
        self._shared = shared
        self.done = False

    async def load(
        self,
        idem_keys: Sequence[IdemKey],
        convs: Sequence[ConvId],
        target_keys: Sequence[MessageKey],
        marker_keys: Sequence[MarkerKey],
    ) -> Loaded:
        """Open the transaction and read, in one step, the stored idempotency keys,
        the last seqs of ``convs`` (locking their counter rows first on a shared
        database), the targets and the markers the batch needs."""
        try:
            return await self._runner.call(
                writes.load, idem_keys, convs, target_keys, marker_keys, self._shared
            )
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def commit(self, batch: WriteBatch) -> None:
        """Write ``batch`` (opening the transaction if :meth:`load` did not), then
        commit: off the event loop (:meth:`Runner.call_waiting`) unless the batch
        has :data:`INLINE_COMMIT_MESSAGES` messages or more. Raises
        :class:`KeyConflict` when a unique key exists."""
        try:
            await self._runner.call(writes.write, batch, self._search)
            if len(batch.messages) >= INLINE_COMMIT_MESSAGES:
                await self._runner.call(writes.commit)
            else:
                await self._runner.call_waiting(writes.commit)
        except IntegrityError as exc:
            raise KeyConflict(str(exc.orig)) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        self.done = True
        self._committed()

    async def rollback(self) -> None:
        """Abandon the transaction (a failure here is logged, not raised)."""
        self.done = True
        try:
            await self._runner.call(writes.rollback)
        except Exception:
            logger.warning("rollback of a message batch failed", exc_info=True)


# --- the store ----------------------------------------------------------------------


class SqlMessageStore(SqlStore):
    """Messages, reactions, mentions, direct peers and markers in one SQL database.

    Reads run through ``reads``; writes through :meth:`begin` on ``writes``, used by
    the service's single writer. Build one with :meth:`open`.
    """

    name = "message database"

    CHECKPOINT_EVERY = 1.0
    """Seconds between background WAL checkpoints while writes go on (SQLite)."""

    def __init__(
        self,
        *,
        reads: Runner,
        writes: Runner,
        search: MessageSearch,
        background_checkpoints: bool = False,
        replica: Runner | None = None,
        shared: bool = False,
    ) -> None:
        super().__init__(reads, writes, replica=replica)
        self._search = search
        self.shared = shared
        """Whether other processes may write this database: seqs then come from the
        locked counter rows (:mod:`imserver.services.message.counters`)."""
        self._background_checkpoints = background_checkpoints
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._last_checkpoint = 0.0

    def after_commit(self) -> None:
        """Start a background WAL checkpoint when one is due (SQLite writer only)."""
        if not self._background_checkpoints:
            return
        task = self._checkpoint_task
        if task is not None and not task.done():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last_checkpoint < self.CHECKPOINT_EVERY:
            return
        self._last_checkpoint = now
        self._checkpoint_task = loop.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            await self._reads.call(checkpoint)
        except Exception as exc:
            # Tried again after a later commit; a full disk is no bug to trace.
            if isinstance(exc, OSError) or is_database_failure(exc):
                logger.warning("WAL checkpoint failed: %s", exc)
            else:
                logger.warning("WAL checkpoint failed", exc_info=True)

    @classmethod
    def open(
        cls,
        url: str,
        engine: AsyncEngine,
        *,
        read_threads: int = 2,
        replica_url: str | None = None,
    ) -> SqlMessageStore:
        """The store of the database at ``url``; ``engine`` is its async engine.

        SQLite gets synchronous engines of its own (``engine``, never connected, is
        left unused): the writer runs inline on the event loop (see
        :class:`InlineRunner`), readers on threads. Other dialects run on ``engine``.
        ``replica_url``: a replica of the same database (same dialect) for search.
        A server database is ``shared``: other message services may write it too.
        """
        search = search_for_dialect(engine.dialect.name)
        replica: Runner | None = None
        if replica_url is not None:
            if replica_url.startswith("sqlite"):
                replica = ThreadRunner(
                    sqlite_engine(replica_url, writer=False), name="message-replica"
                )
            else:
                replica = AsyncRunner(sql.make_engine(replica_url))
        if engine.dialect.name == "sqlite":
            reads: Runner = ThreadRunner(
                sqlite_engine(url, writer=False), threads=read_threads, name="message-store"
            )
            writes: Runner = InlineRunner(sqlite_engine(url, writer=True))
            return cls(
                reads=reads,
                writes=writes,
                search=search,
                background_checkpoints=True,
                replica=replica,
            )
        return cls(
            reads=AsyncRunner(engine),
            writes=AsyncRunner(engine, pinned=True),
            search=search,
            replica=replica,
            shared=True,
        )

    def _failure(self, exc: SQLAlchemyError | OSError) -> Exception:
        """A storage failure is ``unavailable``; anything else ``internal`` (:func:`translate`)."""
        return translate(exc)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[WriteTx]:
        """One write transaction; rolled back unless :meth:`WriteTx.commit` succeeded."""
        tx = WriteTx(self._writes, self._search, self.after_commit, shared=self.shared)
        try:
            yield tx
        finally:
            if not tx.done:
                await tx.rollback()

    async def close(self) -> None:
        """Close every connection (after a last checkpoint, if any was pending)."""
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        if self._background_checkpoints:
            await self._checkpoint()
        await super().close()

    async def last_seqs(self, convs: Sequence[ConvId]) -> dict[ConvId, int]:
        """The last stored seq of each conversation (0 when it has none)."""
        if not convs:
            return {}
        return await self._read(reads.last_seqs, list(convs))

    async def history(
        self, conv: ConvId, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A page of ``conv`` ascending by seq, and whether more lie beyond it.

        ``after`` pages forward from a seq; ``before`` (or neither: the latest)
        pages backward. The messages carry their annotations.
        """
        return await self._read(reads.history, conv, after, before, limit)

    async def conv_states(self, user: str, convs: Sequence[ConvId]) -> dict[ConvId, ConvState]:
        """Last seq, ``user``'s markers, unread and mention counts and the last message
        of each of ``convs``.

        Unread = past the read marker, not sent by the user, of a type in
        :data:`UNREAD_TYPES`, not recalled.
        """
        if not convs:
            return {}
        return await self._read(reads.conv_states, user, list(convs))

    async def unread_totals(self, wanted: Mapping[str, Sequence[ConvId]]) -> dict[str, int]:
        """user -> unread messages over ``wanted[user]`` and the user's direct
        conversations."""
        if not wanted:
            return {}
        return await self._read(reads.unread_totals, dict(wanted))

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` named by a stored message."""
        if not file_ids:
            return set()
        return await self._read(reads.referenced_files, list(file_ids))

    async def stored_since(self, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
        """Messages stored at ``ts`` or later with an id above ``after_id``, by id."""
        return await self._read(reads.stored_since, ts, after_id, limit)

    async def direct_convs(self, user: str) -> dict[UserId, ConvId]:
        """peer -> conv of every direct conversation of ``user`` that has messages."""
        return await self._read(reads.direct_convs, user)

    async def search(
        self, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[StoredMessage]:
        """Matching messages of ``convs`` with id < ``before``, newest first."""
        if not convs:
            return []
        return await self._read_replica(
            reads.search, self._search, query, list(convs), before, limit
        )
