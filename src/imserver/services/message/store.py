"""SQL storage of the message service (SQLAlchemy 2 Core).

Everything here is portable SQL that runs unchanged on SQLite, PostgreSQL and
MySQL/MariaDB, except full-text search, which sits behind :class:`MessageSearch`:
:class:`Fts5Search` for SQLite (an FTS5 table over ``messages``) and
:class:`LikeSearch`, a portable fallback. A PostgreSQL ``tsvector`` implementation
is one more class plus its migration; the service never sees the difference.

Tables (all owned by the message service; no other service reads them):

- ``messages`` — one row per stored message. ``(conv, seq)`` is unique and gap-free;
  ``(conv, sender, cid)`` is unique, which makes idempotency permanent. ``edited``,
  ``recalled`` and ``body`` of a row are annotations rewritten by later
  ``edit``/``recall`` messages; ``target`` is the seq an edit/recall/reaction
  refers to.
- ``reactions`` — the current reactions: one row per (message, emoji, user).
- ``message_mentions`` — one row per (message, mentioned user), for unread-mention counts.
- ``direct_peers`` — two rows per direct conversation, written with its first message.
- ``markers`` — read/recv watermarks per (conv, user).
- ``message_files`` — one row per (file, message) for ``image``/``file`` messages,
  so the file service can tell a referenced upload from an orphan.

How statements reach the database is a :class:`Runner`: each store operation is a
synchronous function of a SQLAlchemy :class:`~sqlalchemy.engine.Connection` run in
ONE hand-off. On SQLite that hand-off is to a thread owning a synchronous
connection (:class:`ThreadRunner`): aiosqlite costs several thread round trips per
statement (measured ~1.2 ms per statement here, against ~0.15 ms per hand-off),
which would cap the group commit far below its target. On PostgreSQL/MySQL the
async engine's connection runs the same functions through ``run_sync``
(:class:`AsyncRunner`).

The store translates database exceptions into :mod:`imserver.utils.errors` at its
boundary (:func:`translate`): storage failures become ``Unavailable``
(:mod:`imserver.storage.failures`), anything else ``Internal``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imserver.protocol.models import Message
from imserver.storage import sql
from imserver.storage.failures import is_database_failure, unavailable
from imserver.utils.errors import IMError, Internal

logger = logging.getLogger(__name__)

# --- schema -------------------------------------------------------------------------

metadata = MetaData()
"""The message service's tables (the migration ``message_0001`` creates them)."""

LONG_TEXT = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
"""Bodies up to 16 KiB characters need more than MySQL's 64 KB ``TEXT``."""

ROW_ID = BigInteger().with_variant(Integer(), "sqlite")
"""``INTEGER PRIMARY KEY`` on SQLite (a rowid alias the FTS index points at)."""

messages = Table(
    "messages",
    metadata,
    Column("id", ROW_ID, primary_key=True, autoincrement=True),
    Column("conv", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("sender", String(64), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("type", String(16), nullable=False),
    Column("body", LONG_TEXT, nullable=False),
    Column("cid", String(64), nullable=False),
    Column("meta", LONG_TEXT, nullable=True),
    Column("reply_to", BigInteger, nullable=True),
    Column("mentions", Text, nullable=True),
    Column("target", BigInteger, nullable=True),
    Column("edited", Boolean, nullable=False, default=False),
    Column("recalled", Boolean, nullable=False, default=False),
    Index("uq_messages_conv_seq", "conv", "seq", unique=True),
    Index("uq_messages_conv_sender_cid", "conv", "sender", "cid", unique=True),
)

reactions = Table(
    "reactions",
    metadata,
    Column("conv", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("emoji", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("rseq", BigInteger, nullable=False),
    PrimaryKeyConstraint("conv", "seq", "emoji", "user_id", name="pk_reactions"),
)

message_mentions = Table(
    "message_mentions",
    metadata,
    Column("conv", String(200), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    PrimaryKeyConstraint("conv", "user_id", "seq", name="pk_message_mentions"),
)

direct_peers = Table(
    "direct_peers",
    metadata,
    Column("user_id", String(64), nullable=False),
    Column("peer_id", String(64), nullable=False),
    Column("conv", String(200), nullable=False),
    PrimaryKeyConstraint("user_id", "peer_id", name="pk_direct_peers"),
)

markers = Table(
    "markers",
    metadata,
    Column("conv", String(200), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("read_seq", BigInteger, nullable=False),
    Column("recv_seq", BigInteger, nullable=False),
    PrimaryKeyConstraint("conv", "user_id", name="pk_markers"),
)

message_files = Table(
    "message_files",
    metadata,
    Column("file_id", String(64), nullable=False),
    Column("conv", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    PrimaryKeyConstraint("file_id", "conv", "seq", name="pk_message_files"),
)

UNREAD_TYPES = ("text", "image", "file", "custom", "system")
"""Message types that count as unread (edits, recalls and reactions do not)."""

_CHUNK = 300
"""Values per ``IN`` list: far below every engine's bound-parameter limit."""

_MSG_COLS = (
    messages.c.id,
    messages.c.conv,
    messages.c.seq,
    messages.c.sender,
    messages.c.ts,
    messages.c.type,
    messages.c.body,
    messages.c.cid,
    messages.c.meta,
    messages.c.reply_to,
    messages.c.mentions,
    messages.c.edited,
    messages.c.recalled,
)

_json_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(dict[str, Any])
_list_decoder = msgspec.json.Decoder(list[str])

K = TypeVar("K")
T = TypeVar("T")

MessageKey = tuple[str, int]
"""(conv, seq) of a message."""

IdemKey = tuple[str, str, str]
"""(conv, sender, cid): the idempotency key of a write."""


def _chunks(items: Sequence[K], size: int = _CHUNK) -> Iterable[Sequence[K]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DriverStatement:
    """A Core statement compiled once per dialect, then run with ``exec_driver_sql``.

    The hot statements of a batch (the idempotency lookup, the message insert) would
    otherwise pay SQLAlchemy's per-execution cache-key walk and per-row parameter
    processing, a third of the batch's cost. Their parameters are plain str/int/bool/
    None, which every driver takes as they are, so nothing is lost by skipping it.
    """

    def __init__(self, stmt: Any, column_keys: Sequence[str] | None = None) -> None:
        self._stmt = stmt
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._compiled: dict[str, tuple[str, list[str] | None]] = {}

    def _compile(self, conn: Connection) -> tuple[str, list[str] | None]:
        name = conn.dialect.name
        found = self._compiled.get(name)
        if found is None:
            kw: dict[str, Any] = {}
            if self._column_keys is not None:
                kw["column_keys"] = self._column_keys
            compiled = self._stmt.compile(dialect=conn.dialect, **kw)
            order = list(compiled.positiontup) if compiled.positional else None
            found = (compiled.string, order)
            self._compiled[name] = found
        return found

    def execute(self, conn: Connection, values: dict[str, Any]) -> Any:
        """Execute with named ``values``; returns the cursor result."""
        sql_text, order = self._compile(conn)
        if order is not None:
            return conn.exec_driver_sql(sql_text, tuple(values[n] for n in order))
        return conn.exec_driver_sql(sql_text, values)

    def executemany(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Execute once per row; each row is a tuple in ``column_keys`` order."""
        assert self._column_keys is not None
        sql_text, order = self._compile(conn)
        keys = self._column_keys
        if order is not None:
            if order != keys:
                index = [keys.index(n) for n in order]
                rows = [tuple(row[i] for i in index) for row in rows]
            conn.exec_driver_sql(sql_text, list(rows))
        else:
            conn.exec_driver_sql(sql_text, [dict(zip(keys, row, strict=True)) for row in rows])


class KeyLookup:
    """``SELECT cols WHERE (k1 = ? AND k2 = ?) OR (...) ...`` for many composite keys.

    Row-value ``IN`` would say the same, but SQLite answers ``(a, b) IN (VALUES ...)``
    with a full scan, while an ``OR`` of equalities is one index probe per key on
    every engine. The statement has a fixed number of terms per size class (keys are
    padded by repeating the last one), so each size is compiled once.
    """

    SIZES = (4, 32, 256)

    def __init__(self, cols: Sequence[Any], key_cols: Sequence[Any]) -> None:
        self._cols = list(cols)
        self._key_cols = list(key_cols)
        self._stmts: dict[int, DriverStatement] = {}

    def _stmt(self, size: int) -> DriverStatement:
        stmt = self._stmts.get(size)
        if stmt is None:
            terms = [
                and_(*(col == bindparam(f"k{i}_{j}") for j, col in enumerate(self._key_cols)))
                for i in range(size)
            ]
            stmt = DriverStatement(select(*self._cols).where(or_(*terms)))
            self._stmts[size] = stmt
        return stmt

    def fetch(self, conn: Connection, keys: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The rows matching any of ``keys`` (each row once, in no particular order)."""
        found: list[Any] = []
        for chunk in _chunks(keys, self.SIZES[-1]):
            size = next(n for n in self.SIZES if n >= len(chunk))
            padded = list(chunk) + [chunk[-1]] * (size - len(chunk))
            params = {f"k{i}_{j}": v for i, key in enumerate(padded) for j, v in enumerate(key)}
            found.extend(self._stmt(size).execute(conn, params))
        return found


class LastSeqLookup:
    """The last seq of many conversations in one statement.

    ``max(seq) ... GROUP BY conv`` reads every row of those conversations; a union
    of one ``(SELECT max(seq) WHERE conv = ?)`` per conversation is one index probe
    each. Sized and compiled like :class:`KeyLookup`.
    """

    SIZES = (1, 8, 64)

    def __init__(self) -> None:
        self._stmts: dict[int, DriverStatement] = {}

    def _stmt(self, size: int) -> DriverStatement:
        stmt = self._stmts.get(size)
        if stmt is None:
            c = messages.c
            parts = [
                select(
                    cast(bindparam(f"c{i}", type_=String(200)), String(200)).label("conv"),
                    select(func.max(c.seq))
                    .where(c.conv == bindparam(f"c{i}", type_=String(200)))
                    .scalar_subquery()
                    .label("last"),
                )
                for i in range(size)
            ]
            stmt = DriverStatement(parts[0] if size == 1 else union_all(*parts))
            self._stmts[size] = stmt
        return stmt

    def fetch(self, conn: Connection, convs: Sequence[str]) -> dict[str, int]:
        """conv -> last seq (0 when it has no message)."""
        found = dict.fromkeys(convs, 0)
        for chunk in _chunks(convs, self.SIZES[-1]):
            size = next(n for n in self.SIZES if n >= len(chunk))
            padded = list(chunk) + [chunk[-1]] * (size - len(chunk))
            params = {f"c{i}": conv for i, conv in enumerate(padded)}
            for conv, last in self._stmt(size).execute(conn, params):
                found[conv] = int(last or 0)
        return found


_LAST_SEQS = LastSeqLookup()

_BY_IDEM_KEY = KeyLookup(
    [messages.c.conv, messages.c.sender, messages.c.cid, messages.c.seq, messages.c.ts],
    [messages.c.conv, messages.c.sender, messages.c.cid],
)
_TARGETS = KeyLookup(
    [messages.c.conv, messages.c.seq, messages.c.sender, messages.c.type, messages.c.recalled],
    [messages.c.conv, messages.c.seq],
)
_MESSAGES = KeyLookup(_MSG_COLS, [messages.c.conv, messages.c.seq])
_MARKERS = KeyLookup(
    [markers.c.conv, markers.c.user_id, markers.c.read_seq, markers.c.recv_seq],
    [markers.c.conv, markers.c.user_id],
)
_REACTIONS = KeyLookup(
    [reactions.c.conv, reactions.c.seq, reactions.c.emoji, reactions.c.user_id, reactions.c.rseq],
    [reactions.c.conv, reactions.c.seq],
)


def translate(exc: BaseException) -> IMError:
    """The client-facing error for a database error: ``unavailable`` for a storage
    failure (:mod:`imserver.storage.failures`), ``internal`` (logged with its
    traceback) for anything else, which is a bug."""
    if isinstance(exc, OSError) or is_database_failure(exc):
        return unavailable(exc, "message database")
    logger.error("message store error", exc_info=exc)
    return Internal("message store error")


# --- rows <-> models ----------------------------------------------------------------


class StoredMessage(NamedTuple):
    """A message with its storage id (the global insertion order)."""

    id: int
    message: Message


def _to_message(row: Any) -> Message:
    meta = row.meta
    mentions = row.mentions
    return Message(
        conv=row.conv,
        seq=row.seq,
        from_=row.sender,
        ts=row.ts,
        type=row.type,
        body=row.body,
        cid=row.cid,
        meta=_meta_decoder.decode(meta) if meta is not None else None,
        reply_to=row.reply_to,
        mentions=_list_decoder.decode(mentions) if mentions is not None else None,
        edited=bool(row.edited),
        recalled=bool(row.recalled),
    )


MESSAGE_COLUMNS = (
    "conv",
    "seq",
    "sender",
    "ts",
    "type",
    "body",
    "cid",
    "meta",
    "reply_to",
    "mentions",
    "target",
    "edited",
    "recalled",
)
"""The order of the values in a :func:`message_row`."""

_INSERT_MESSAGES = DriverStatement(insert(messages), MESSAGE_COLUMNS)
_MAX_ID = DriverStatement(select(func.max(messages.c.id)))


def message_row(m: Message, target: int | None) -> tuple[Any, ...]:
    """The ``messages`` row of a new message, in :data:`MESSAGE_COLUMNS` order."""
    return (
        m.conv,
        m.seq,
        m.from_,
        m.ts,
        m.type,
        m.body,
        m.cid,
        _json_encoder.encode(m.meta).decode() if m.meta is not None else None,
        m.reply_to,
        _json_encoder.encode(m.mentions).decode() if m.mentions is not None else None,
        target,
        False,
        False,
    )


# --- full-text search ---------------------------------------------------------------


class MessageSearch(Protocol):
    """Full-text search over the visible text messages of some conversations.

    The store calls :meth:`index_new` in the write transaction right after
    inserting a batch of messages; re-indexing edited and recalled rows is left to
    the database (triggers or generated columns created by that dialect's migration).
    """

    def index_new(self, conn: Connection, after_id: int) -> None:
        """Index the messages just inserted: every row with id > ``after_id``."""

    def search(
        self, conn: Connection, query: str, convs: Sequence[str], before: int | None, limit: int
    ) -> list[int]:
        """Ids of matching messages in ``convs`` with id < ``before``, newest first."""


def fts5_query(query: str) -> str:
    """Quote a user's query for FTS5: every whitespace-separated word becomes a
    quoted phrase (internal quotes doubled) and the last one a prefix match, so no
    user input is ever parsed as FTS5 syntax. Empty for a blank query.

    Inside a quoted phrase every character is text to the tokenizer except NUL: FTS5
    reads the query as a C string, so a NUL would end it inside the phrase
    ("unterminated string"). The tokenizer treats NUL in a body as a separator, like
    any character that is not a letter or digit, so it becomes a space: ``a<NUL>b`` is
    the phrase "a b", as ``a,b`` is.
    """
    words = query.split()
    if not words:
        return ""
    phrases = ['"' + word.replace('"', '""').replace("\0", " ") + '"' for word in words]
    phrases[-1] += "*"
    return " ".join(phrases)


def like_words(query: str) -> list[str]:
    """The words of a query for :class:`LikeSearch`: split on whitespace and NUL.
    A NUL cannot go into a ``LIKE`` pattern: SQLite's ``LIKE`` stops reading at it
    and PostgreSQL refuses it in text."""
    return query.replace("\0", " ").split()


class Fts5Search:
    """SQLite FTS5 over ``messages_fts`` (an external-content index of ``messages``).

    New rows are indexed by one ``INSERT ... SELECT`` per batch: five times cheaper
    than a per-row trigger. The migration's triggers handle edits and recalls.
    """

    _index = text(
        "INSERT INTO messages_fts(rowid, body) SELECT id, body FROM messages "
        "WHERE id > :after AND type = 'text' AND recalled = 0"
    )
    _search = text(
        "SELECT m.id FROM messages_fts JOIN messages AS m ON m.id = messages_fts.rowid "
        "WHERE messages_fts MATCH :match AND messages_fts.rowid < :before "
        "AND m.conv IN :convs AND m.type = 'text' AND m.recalled = 0 "
        "ORDER BY messages_fts.rowid DESC LIMIT :limit"
    ).bindparams(bindparam("convs", expanding=True))

    def index_new(self, conn: Connection, after_id: int) -> None:
        conn.execute(self._index, {"after": after_id})

    def search(
        self, conn: Connection, query: str, convs: Sequence[str], before: int | None, limit: int
    ) -> list[int]:
        match = fts5_query(query)
        if not match or not convs:
            return []
        params = {
            "match": match,
            "before": before if before is not None else 2**63 - 1,
            "convs": list(convs),
            "limit": limit,
        }
        return [int(r[0]) for r in conn.execute(self._search, params)]


class LikeSearch:
    """Portable fallback: every token must occur in the body (``LIKE``, no index)."""

    def index_new(self, conn: Connection, after_id: int) -> None:
        return None

    def search(
        self, conn: Connection, query: str, convs: Sequence[str], before: int | None, limit: int
    ) -> list[int]:
        tokens = like_words(query)
        if not tokens or not convs:
            return []
        conds: list[ColumnElement[bool]] = [
            messages.c.conv.in_(list(convs)),
            messages.c.type == "text",
            messages.c.recalled.is_(False),
        ]
        for token in tokens:
            escaped = token.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append(func.lower(messages.c.body).like(f"%{escaped.lower()}%", escape="\\"))
        if before is not None:
            conds.append(messages.c.id < before)
        stmt = select(messages.c.id).where(*conds).order_by(messages.c.id.desc()).limit(limit)
        return [int(r[0]) for r in conn.execute(stmt)]


def search_for_dialect(dialect: str) -> MessageSearch:
    """The search implementation whose index the migration builds on ``dialect``."""
    if dialect == "sqlite":
        return Fts5Search()
    return LikeSearch()


# --- runners ------------------------------------------------------------------------


class Runner(Protocol):
    """Runs ``fn(connection, *args)`` — one store operation — in one hand-off."""

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` with a connection and return its result."""

    async def close(self) -> None:
        """Release the runner's connections."""


class ThreadRunner:
    """A synchronous engine driven from ``threads`` dedicated threads.

    ``pinned``: one long-lived connection used by a single thread, so a transaction
    may stay open between calls (the writer). Otherwise every call takes a pooled
    connection for its duration (readers).
    """

    def __init__(self, engine: Engine, *, threads: int = 1, pinned: bool = False) -> None:
        if pinned and threads != 1:
            raise ValueError("a pinned connection needs exactly one thread")
        self._engine = engine
        self._pinned = pinned
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="message-store")
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

    For SQLite, whose calls are short (a batch's statements plus one WAL fsync take
    a few milliseconds), running them inline costs less than handing each batch to a
    thread: no executor hop and no contention for the interpreter lock.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return fn(self._conn, *args)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()


class AsyncRunner:
    """An async engine; the functions run through ``AsyncConnection.run_sync``.

    ``pinned`` as for :class:`ThreadRunner`.
    """

    def __init__(self, engine: AsyncEngine, *, pinned: bool = False) -> None:
        self._engine = engine
        self._pinned = pinned
        self._conn: AsyncConnection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._pinned:
            async with self._engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = await self._engine.connect()
        return await self._conn.run_sync(fn, *args)

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
    # database file and fsync it) run on a reader thread instead, see
    # SqlMessageStore.after_commit.
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def _checkpoint(conn: Connection) -> None:
    # Outside any transaction: the DBAPI connection is in autocommit mode.
    conn.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]


def _select_one(conn: Connection) -> None:
    conn.exec_driver_sql("SELECT 1")


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_deferred(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def sqlite_engine(url: str, *, writer: bool) -> Engine:
    """A synchronous engine on the SQLite database of ``url`` (an async URL is fine).

    The writer's transactions start with ``BEGIN IMMEDIATE``: it holds the write
    lock from its first read, so what it loads is what it writes against. A
    reader's transaction is a plain ``BEGIN``: one snapshot per store operation.
    """
    engine = create_engine(sql.sync_url(url), connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _no_implicit_begin)
    event.listen(engine, "connect", sql._set_sqlite_pragmas)
    if writer:
        event.listen(engine, "connect", _no_autocheckpoint)
    event.listen(engine, "begin", _begin_immediate if writer else _begin_deferred)
    return engine


# --- the write transaction ----------------------------------------------------------


class Target(NamedTuple):
    """What the writer needs to know about the target of an edit/recall/react."""

    sender: str
    type: str
    recalled: bool


class Loaded(NamedTuple):
    """What a batch reads before it writes (see :meth:`WriteTx.load`)."""

    existing: dict[IdemKey, tuple[int, int]]
    """Idempotency keys already stored -> (seq, ts)."""
    last: dict[str, int]
    """Last stored seq per conversation (0 when it has none)."""
    targets: dict[MessageKey, Target]
    markers: dict[tuple[str, str], tuple[int, int]]
    """(conv, user) -> (read_seq, recv_seq) of existing marker rows."""


class WriteBatch(msgspec.Struct, kw_only=True):
    """Everything one group commit writes, in one transaction.

    Applied in this order: messages (and their search index), mentions, file
    references, direct peers, edits, recalls (which also blank the recalled message's edit rows and
    drop its reactions), reaction changes, markers.
    """

    messages: list[tuple[Any, ...]] = msgspec.field(default_factory=list)
    """Rows in :data:`MESSAGE_COLUMNS` order."""
    mentions: list[dict[str, Any]] = msgspec.field(default_factory=list)
    files: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """``message_files`` rows."""
    peers: list[dict[str, Any]] = msgspec.field(default_factory=list)
    edits: dict[MessageKey, str] = msgspec.field(default_factory=dict)
    recalls: list[MessageKey] = msgspec.field(default_factory=list)
    reactions: dict[tuple[str, int, str, str], int | None] = msgspec.field(default_factory=dict)
    """(conv, seq, emoji, user) -> the reaction's seq when present now, None when removed."""
    markers: dict[tuple[str, str], tuple[int, int, bool]] = msgspec.field(default_factory=dict)
    """(conv, user) -> (read_seq, recv_seq, row already exists)."""


def _load(
    conn: Connection,
    idem_keys: Sequence[IdemKey],
    convs: Sequence[str],
    target_keys: Sequence[MessageKey],
    marker_keys: Sequence[tuple[str, str]],
) -> Loaded:
    if not conn.in_transaction():
        conn.begin()
    existing = {
        (r.conv, r.sender, r.cid): (r.seq, r.ts) for r in _BY_IDEM_KEY.fetch(conn, idem_keys)
    }
    last = _last_seqs(conn, convs)
    targets = {
        (r.conv, r.seq): Target(r.sender, r.type, bool(r.recalled))
        for r in _TARGETS.fetch(conn, target_keys)
    }
    found_markers = {
        (r.conv, r.user_id): (r.read_seq, r.recv_seq) for r in _MARKERS.fetch(conn, marker_keys)
    }
    return Loaded(existing, last, targets, found_markers)


def _write(conn: Connection, batch: WriteBatch, search: MessageSearch) -> None:
    if not conn.in_transaction():
        conn.begin()
    c = messages.c
    r = reactions.c
    if batch.messages:
        last_id = _MAX_ID.execute(conn, {}).scalar()
        _INSERT_MESSAGES.executemany(conn, batch.messages)
        search.index_new(conn, int(last_id or 0))
    if batch.mentions:
        conn.execute(insert(message_mentions), batch.mentions)
    if batch.files:
        conn.execute(insert(message_files), batch.files)
    if batch.peers:
        conn.execute(insert(direct_peers), batch.peers)
    if batch.edits:
        conn.execute(
            update(messages)
            .where(c.conv == bindparam("k_conv"), c.seq == bindparam("k_seq"))
            .values(body=bindparam("k_body"), edited=True),
            [{"k_conv": k[0], "k_seq": k[1], "k_body": b} for k, b in batch.edits.items()],
        )
    recalled = [{"k_conv": k[0], "k_seq": k[1]} for k in batch.recalls]
    if recalled:
        conn.execute(
            update(messages)
            .where(c.conv == bindparam("k_conv"), c.seq == bindparam("k_seq"))
            .values(body="", meta=None, recalled=True),
            recalled,
        )
        # The edit rows of a recalled message carry its text too.
        conn.execute(
            update(messages)
            .where(c.conv == bindparam("k_conv"), c.target == bindparam("k_seq"), c.type == "edit")
            .values(body=""),
            recalled,
        )
    if batch.reactions:
        conn.execute(
            delete(reactions).where(
                r.conv == bindparam("k_conv"),
                r.seq == bindparam("k_seq"),
                r.emoji == bindparam("k_emoji"),
                r.user_id == bindparam("k_user"),
            ),
            [
                {"k_conv": k[0], "k_seq": k[1], "k_emoji": k[2], "k_user": k[3]}
                for k in batch.reactions
            ],
        )
        present = [
            {"conv": k[0], "seq": k[1], "emoji": k[2], "user_id": k[3], "rseq": rseq}
            for k, rseq in batch.reactions.items()
            if rseq is not None
        ]
        if present:
            conn.execute(insert(reactions), present)
    if recalled:
        conn.execute(
            delete(reactions).where(r.conv == bindparam("k_conv"), r.seq == bindparam("k_seq")),
            recalled,
        )
    if batch.markers:
        m = markers.c
        updates = []
        inserts = []
        for (conv, user), (read, recv, exists) in batch.markers.items():
            if exists:
                updates.append({"k_conv": conv, "k_user": user, "k_read": read, "k_recv": recv})
            else:
                inserts.append({"conv": conv, "user_id": user, "read_seq": read, "recv_seq": recv})
        if updates:
            conn.execute(
                update(markers)
                .where(m.conv == bindparam("k_conv"), m.user_id == bindparam("k_user"))
                .values(read_seq=bindparam("k_read"), recv_seq=bindparam("k_recv")),
                updates,
            )
        if inserts:
            conn.execute(insert(markers), inserts)
    conn.commit()


def _rollback(conn: Connection) -> None:
    conn.rollback()


class KeyConflict(Exception):
    """A batch's write hit a unique key that is already stored.

    The writer loads only the idempotency keys it was told to check, so a batch that
    skipped the check can meet a stored key here; the transaction is then abandoned
    and the batch is applied again with every key checked.
    """


class WriteTx:
    """One batch's transaction: :meth:`load` (optional), then :meth:`commit` (else
    rolled back)."""

    def __init__(
        self, runner: Runner, search: MessageSearch, committed: Callable[[], None]
    ) -> None:
        self._runner = runner
        self._search = search
        self._committed = committed
        self.done = False

    async def load(
        self,
        idem_keys: Sequence[IdemKey],
        convs: Sequence[str],
        target_keys: Sequence[MessageKey],
        marker_keys: Sequence[tuple[str, str]],
    ) -> Loaded:
        """Open the transaction and read, in one step, the stored idempotency keys,
        the last seqs of ``convs``, the targets and the markers the batch needs."""
        try:
            return await self._runner.call(_load, idem_keys, convs, target_keys, marker_keys)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def commit(self, batch: WriteBatch) -> None:
        """Write ``batch`` and commit, in one step (opening the transaction if
        :meth:`load` did not). Raises :class:`KeyConflict` when a unique key exists."""
        try:
            await self._runner.call(_write, batch, self._search)
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
            await self._runner.call(_rollback)
        except Exception:
            logger.warning("rollback of a message batch failed", exc_info=True)


# --- reads --------------------------------------------------------------------------


class ConvState(NamedTuple):
    """A user's view of one conversation, as ``convs`` reports it."""

    last_seq: int
    read_seq: int
    recv_seq: int
    unread: int
    mentions: int
    last: StoredMessage | None


def _last_seqs(conn: Connection, convs: Sequence[str]) -> dict[str, int]:
    return _LAST_SEQS.fetch(conn, convs)


def _reaction_map(rows: Iterable[Any]) -> dict[tuple[str, int], dict[str, list[str]]]:
    out: dict[tuple[str, int], dict[str, list[str]]] = {}
    for r in rows:
        out.setdefault((r.conv, r.seq), {}).setdefault(r.emoji, []).append(r.user_id)
    return out


def _add_reactions(conn: Connection, msgs: list[Message]) -> None:
    if not msgs:
        return
    rows = _REACTIONS.fetch(conn, [(m.conv, m.seq) for m in msgs])
    if rows:
        rows.sort(key=lambda r: (r.rseq, r.user_id))
        found = _reaction_map(rows)
        for m in msgs:
            m.reactions = found.get((m.conv, m.seq))


def _history_statements() -> dict[str, DriverStatement]:
    """The statements of a history page, built and compiled once (a page is on the
    read path of every reconnect: building a Core statement per call costs more than
    running it)."""
    c = messages.c
    rc = reactions.c
    base = select(*_MSG_COLS).where(c.conv == bindparam("conv"))
    lim = bindparam("lim", type_=Integer)
    # SQLite renders LIMIT with an OFFSET; a bind parameter of our own keeps the
    # compiled statement's parameters all named here.
    off = bindparam("off", type_=Integer)
    return {
        "after": DriverStatement(
            base.where(c.seq > bindparam("seq", type_=BigInteger))
            .order_by(c.seq.asc())
            .limit(lim)
            .offset(off)
        ),
        "before": DriverStatement(
            base.where(c.seq < bindparam("seq", type_=BigInteger))
            .order_by(c.seq.desc())
            .limit(lim)
            .offset(off)
        ),
        "latest": DriverStatement(base.order_by(c.seq.desc()).limit(lim).offset(off)),
        "reactions": DriverStatement(
            select(rc.conv, rc.seq, rc.emoji, rc.user_id)
            .where(
                rc.conv == bindparam("conv"),
                rc.seq.between(
                    bindparam("lo", type_=BigInteger), bindparam("hi", type_=BigInteger)
                ),
            )
            .order_by(rc.rseq, rc.user_id)
        ),
    }


_HISTORY = _history_statements()


def _history(
    conn: Connection, conv: str, after: int | None, before: int | None, limit: int
) -> tuple[list[Message], bool]:
    if after is not None:
        rows = _HISTORY["after"].execute(
            conn, {"conv": conv, "seq": after, "lim": limit + 1, "off": 0}
        )
    elif before is not None:
        rows = _HISTORY["before"].execute(
            conn, {"conv": conv, "seq": before, "lim": limit + 1, "off": 0}
        )
    else:
        rows = _HISTORY["latest"].execute(conn, {"conv": conv, "lim": limit + 1, "off": 0})
    page = [_to_message(r) for r in rows]
    has_more = len(page) > limit
    del page[limit:]
    if after is None:
        page.reverse()
    if page:
        found = _reaction_map(
            _HISTORY["reactions"].execute(
                conn, {"conv": conv, "lo": page[0].seq, "hi": page[-1].seq}
            )
        )
        if found:
            for m in page:
                m.reactions = found.get((m.conv, m.seq))
    return page, has_more


def _conv_states(conn: Connection, user: str, convs: Sequence[str]) -> dict[str, ConvState]:
    c = messages.c
    mm = message_mentions.c
    k = markers.c
    last = _last_seqs(conn, convs)
    marks: dict[str, tuple[int, int]] = {}
    for chunk in _chunks(list(convs)):
        stmt = select(k.conv, k.read_seq, k.recv_seq).where(k.user_id == user, k.conv.in_(chunk))
        for r in conn.execute(stmt):
            marks[r.conv] = (r.read_seq, r.recv_seq)
    read = {cv: min(marks.get(cv, (0, 0))[0], last[cv]) for cv in convs}
    # Unread counts only where something lies past the read marker: one grouped
    # query per chunk, each conversation a range of the (conv, seq) index.
    behind = [(cv, read[cv]) for cv in convs if read[cv] < last[cv]]
    unread: dict[str, int] = {}
    mentioned: dict[str, int] = {}
    for part in _chunks(behind, _CHUNK // 2):
        ranges = or_(*(and_(c.conv == cv, c.seq > seq) for cv, seq in part))
        ustmt = (
            select(c.conv, func.count())
            .where(ranges, c.sender != user, c.type.in_(UNREAD_TYPES), c.recalled.is_(False))
            .group_by(c.conv)
        )
        unread.update({cv: int(n) for cv, n in conn.execute(ustmt)})
        mranges = or_(*(and_(mm.conv == cv, mm.seq > seq) for cv, seq in part))
        mstmt = (
            select(mm.conv, func.count())
            .select_from(message_mentions.join(messages, and_(c.conv == mm.conv, c.seq == mm.seq)))
            .where(mm.user_id == user, mranges, c.sender != user, c.recalled.is_(False))
            .group_by(mm.conv)
        )
        mentioned.update({cv: int(n) for cv, n in conn.execute(mstmt)})
    lasts = {
        (r.conv, r.seq): StoredMessage(r.id, _to_message(r))
        for r in _MESSAGES.fetch(conn, [(cv, last[cv]) for cv in convs if last[cv]])
    }
    _add_reactions(conn, [s.message for s in lasts.values()])
    return {
        cv: ConvState(
            last_seq=last[cv],
            read_seq=read[cv],
            recv_seq=min(marks.get(cv, (0, 0))[1], last[cv]),
            unread=unread.get(cv, 0),
            mentions=mentioned.get(cv, 0),
            last=lasts.get((cv, last[cv])),
        )
        for cv in convs
    }


def _referenced_files(conn: Connection, file_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    f = message_files.c
    for chunk in _chunks(file_ids):
        found.update(
            conn.execute(select(f.file_id).where(f.file_id.in_(chunk)).distinct()).scalars()
        )
    return found


def _direct_convs(conn: Connection, user: str) -> dict[str, str]:
    d = direct_peers.c
    return {
        r.peer_id: r.conv for r in conn.execute(select(d.peer_id, d.conv).where(d.user_id == user))
    }


def _search(
    conn: Connection,
    search: MessageSearch,
    query: str,
    convs: Sequence[str],
    before: int | None,
    limit: int,
) -> list[StoredMessage]:
    ids = search.search(conn, query, convs, before, limit)
    if not ids:
        return []
    by_id: dict[int, Message] = {}
    for chunk in _chunks(ids):
        for r in conn.execute(select(*_MSG_COLS).where(messages.c.id.in_(list(chunk)))):
            by_id[r.id] = _to_message(r)
    found = [StoredMessage(i, by_id[i]) for i in ids if i in by_id]
    _add_reactions(conn, [s.message for s in found])
    return found


# --- the store ----------------------------------------------------------------------


class SqlMessageStore:
    """Messages, reactions, mentions, direct peers and markers in one SQL database.

    Reads run through ``reads``; writes through :meth:`begin` on ``writes``, used by
    the service's single writer. Build one with :meth:`open`.
    """

    CHECKPOINT_EVERY = 1.0
    """Seconds between background WAL checkpoints while writes go on (SQLite)."""

    def __init__(
        self,
        *,
        reads: Runner,
        writes: Runner,
        search: MessageSearch,
        background_checkpoints: bool = False,
    ) -> None:
        self._reads = reads
        self._writes = writes
        self._search = search
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
            await self._reads.call(_checkpoint)
        except Exception as exc:
            # Tried again after a later commit; a full disk is no bug to trace.
            if isinstance(exc, OSError) or is_database_failure(exc):
                logger.warning("WAL checkpoint failed: %s", exc)
            else:
                logger.warning("WAL checkpoint failed", exc_info=True)

    @classmethod
    def open(cls, url: str, engine: AsyncEngine, *, read_threads: int = 2) -> SqlMessageStore:
        """The store of the database at ``url``; ``engine`` is its async engine.

        SQLite gets synchronous engines of its own (``engine``, never connected, is
        left unused): the writer runs inline on the event loop (see
        :class:`InlineRunner`), readers on threads. Other dialects run on ``engine``.
        """
        search = search_for_dialect(engine.dialect.name)
        if engine.dialect.name == "sqlite":
            reads: Runner = ThreadRunner(sqlite_engine(url, writer=False), threads=read_threads)
            writes: Runner = InlineRunner(sqlite_engine(url, writer=True))
            return cls(reads=reads, writes=writes, search=search, background_checkpoints=True)
        return cls(
            reads=AsyncRunner(engine),
            writes=AsyncRunner(engine, pinned=True),
            search=search,
        )

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._reads.call(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[WriteTx]:
        """One write transaction; rolled back unless :meth:`WriteTx.commit` succeeded."""
        tx = WriteTx(self._writes, self._search, self.after_commit)
        try:
            yield tx
        finally:
            if not tx.done:
                await tx.rollback()

    async def check(self) -> None:
        """Run a trivial query on a reader: raises if the database cannot be reached."""
        await self._reads.call(_select_one)

    async def close(self) -> None:
        """Close every connection (after a last checkpoint, if any was pending)."""
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        if self._background_checkpoints:
            await self._checkpoint()
        await self._writes.close()
        await self._reads.close()

    async def last_seqs(self, convs: Sequence[str]) -> dict[str, int]:
        """The last stored seq of each conversation (0 when it has none)."""
        if not convs:
            return {}
        return await self._read(_last_seqs, list(convs))

    async def history(
        self, conv: str, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A page of ``conv`` ascending by seq, and whether more lie beyond it.

        ``after`` pages forward from a seq; ``before`` (or neither: the latest)
        pages backward. The messages carry their annotations.
        """
        return await self._read(_history, conv, after, before, limit)

    async def conv_states(self, user: str, convs: Sequence[str]) -> dict[str, ConvState]:
        """Last seq, ``user``'s markers, unread and mention counts and the last message
        of each of ``convs``.

        Unread = past the read marker, not sent by the user, of a type in
        :data:`UNREAD_TYPES`, not recalled.
        """
        if not convs:
            return {}
        return await self._read(_conv_states, user, list(convs))

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` named by a stored message."""
        if not file_ids:
            return set()
        return await self._read(_referenced_files, list(file_ids))

    async def direct_convs(self, user: str) -> dict[str, str]:
        """peer -> conv of every direct conversation of ``user`` that has messages."""
        return await self._read(_direct_convs, user)

    async def search(
        self, query: str, convs: Sequence[str], before: int | None, limit: int
    ) -> list[StoredMessage]:
        """Matching messages of ``convs`` with id < ``before``, newest first."""
        if not convs:
            return []
        return await self._read(_search, self._search, query, list(convs), before, limit)
