"""The read queries of the message store: history pages, conversation states,
referenced files, direct conversations and search results.

Each is a synchronous function of a connection, run by the store on a reader
(:mod:`imserver.storage.runners`) in one hand-off, one snapshot per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    String,
    and_,
    bindparam,
    cast,
    func,
    literal_column,
    or_,
    select,
    union_all,
)

from imserver.protocol.models import Message
from imserver.services.message.api import PREVIEW_CHARS, CommittedMessage
from imserver.services.message.schema import (
    MSG_COLS,
    UNREAD_TYPES,
    StoredMessage,
    direct_peers,
    markers,
    message_files,
    message_mentions,
    messages,
    reactions,
    to_message,
)
from imserver.services.message.search import MessageSearch
from imserver.storage.statements import CHUNK, DriverStatement, KeyLookup, chunks
from imserver.utils.ids import ConvId, UserId


class ProbeUnion:
    """Many keys in one statement: a ``UNION ALL`` of one ``SELECT`` per key, each an
    index probe (a grouped query over the same rows would read them all). Statements
    have a fixed number of parts per size class, the last one repeated to fill a
    chunk, so each size is compiled once (as :class:`KeyLookup`). A subclass names
    each part's parameters (:meth:`part`, :meth:`params`)."""

    SIZES = (1, 8, 64)

    def __init__(self) -> None:
        self._stmts: dict[int, DriverStatement] = {}

    def part(self, i: int) -> Any:
        """The ``SELECT`` of the ``i``-th key, its parameters suffixed with ``i``."""
        raise NotImplementedError

    def params(self, i: int, key: Any) -> dict[str, Any]:
        """The ``i``-th part's parameters for ``key``."""
        raise NotImplementedError

    def rows(self, conn: Connection, keys: Sequence[Any]) -> list[Any]:
        """The rows of every part, the repeated ones included."""
        found: list[Any] = []
        for chunk in chunks(keys, self.SIZES[-1]):
            size = next(n for n in self.SIZES if n >= len(chunk))
            stmt = self._stmts.get(size)
            if stmt is None:
                parts = [self.part(i) for i in range(size)]
                stmt = DriverStatement(parts[0] if size == 1 else union_all(*parts))
                self._stmts[size] = stmt
            values: dict[str, Any] = {}
            for i in range(size):
                values.update(self.params(i, chunk[min(i, len(chunk) - 1)]))
            found.extend(stmt.execute(conn, values))
        return found


class LastSeqLookup(ProbeUnion):
    """The last seq of many conversations: one ``(SELECT max(seq) WHERE conv = ?)``
    per conversation."""

    def part(self, i: int) -> Any:
        c = messages.c
        return select(
            cast(bindparam(f"c{i}", type_=String(200)), String(200)).label("conv"),
            select(func.max(c.seq))
            .where(c.conv == bindparam(f"c{i}", type_=String(200)))
            .scalar_subquery()
            .label("last"),
        )

    def params(self, i: int, key: Any) -> dict[str, Any]:
        return {f"c{i}": key}

    def fetch(self, conn: Connection, convs: Sequence[ConvId]) -> dict[ConvId, int]:
        """conv -> last seq (0 when it has no message)."""
        found = dict.fromkeys(convs, 0)
        for conv, last in self.rows(conn, convs):
            found[conv] = int(last or 0)
        return found


_LAST_SEQS = LastSeqLookup()


class UnreadCount(ProbeUnion):
    """Unread messages of many (user, conv, read seq) triples: one ``(SELECT count(*)
    WHERE conv = ? AND seq > ? AND sender <> ? ...)`` per triple, each a range of the
    (conv, seq) index. Unread = past the read seq, not sent by the user, of a type in
    :data:`UNREAD_TYPES`, not recalled."""

    def part(self, i: int) -> Any:
        c = messages.c
        return select(
            cast(bindparam(f"u{i}", type_=String(64)), String(64)).label("user_id"),
            cast(bindparam(f"c{i}", type_=String(200)), String(200)).label("conv"),
            select(func.count())
            .where(
                c.conv == bindparam(f"c{i}", type_=String(200)),
                c.seq > bindparam(f"s{i}", type_=BigInteger),
                c.sender != bindparam(f"u{i}", type_=String(64)),
                c.type.in_([literal_column(f"'{t}'") for t in UNREAD_TYPES]),
                c.recalled.is_(False),
            )
            .scalar_subquery()
            .label("n"),
        )

    def params(self, i: int, key: Any) -> dict[str, Any]:
        user, conv, seq = key
        return {f"u{i}": user, f"c{i}": conv, f"s{i}": seq}

    def fetch(
        self, conn: Connection, behind: Sequence[tuple[str, ConvId, int]]
    ) -> dict[tuple[str, ConvId], int]:
        """(user, conv) -> unread, for each (user, conv, read seq) of ``behind`` with any."""
        return {(user, conv): int(n) for user, conv, n in self.rows(conn, behind) if n}


_UNREAD = UnreadCount()

_MESSAGES = KeyLookup(MSG_COLS, [messages.c.conv, messages.c.seq])

_READ_MARKERS = KeyLookup(
    [markers.c.user_id, markers.c.conv, markers.c.read_seq], [markers.c.user_id, markers.c.conv]
)

_REACTIONS = KeyLookup(
    [reactions.c.conv, reactions.c.seq, reactions.c.emoji, reactions.c.user_id, reactions.c.rseq],
    [reactions.c.conv, reactions.c.seq],
)


class ConvState(NamedTuple):
    """A user's view of one conversation, as ``convs`` reports it."""

    last_seq: int
    read_seq: int
    recv_seq: int
    unread: int
    mentions: int
    last: StoredMessage | None


def last_seqs(conn: Connection, convs: Sequence[ConvId]) -> dict[ConvId, int]:
    """conv -> last stored seq (0 when it has no message)."""
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
    base = select(*MSG_COLS).where(c.conv == bindparam("conv"))
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


def history(
    conn: Connection, conv: ConvId, after: int | None, before: int | None, limit: int
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
    page = [to_message(r) for r in rows]
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


def conv_states(conn: Connection, user: str, convs: Sequence[ConvId]) -> dict[ConvId, ConvState]:
    c = messages.c
    last = last_seqs(conn, convs)
    marks = _markers(conn, user, convs)
    read = {cv: min(marks.get(cv, (0, 0))[0], last[cv]) for cv in convs}
    behind = [(cv, read[cv]) for cv in convs if read[cv] < last[cv]]
    counts = _UNREAD.fetch(conn, [(user, cv, seq) for cv, seq in behind])
    unread = {cv: n for (_, cv), n in counts.items()}
    mm = message_mentions.c
    mentioned: dict[ConvId, int] = {}
    for part in chunks(behind, CHUNK // 2):
        mranges = or_(*(and_(mm.conv == cv, mm.seq > seq) for cv, seq in part))
        mstmt = (
            select(mm.conv, func.count())
            .select_from(message_mentions.join(messages, and_(c.conv == mm.conv, c.seq == mm.seq)))
            .where(mm.user_id == user, mranges, c.sender != user, c.recalled.is_(False))
            .group_by(mm.conv)
        )
        mentioned.update({cv: int(n) for cv, n in conn.execute(mstmt)})
    lasts = {
        (r.conv, r.seq): StoredMessage(r.id, to_message(r))
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


def unread_totals(conn: Connection, wanted: Mapping[str, Sequence[ConvId]]) -> dict[str, int]:
    """user -> unread messages over ``wanted[user]`` and the user's direct
    conversations (a push batch's badges: a few statements for the whole batch)."""
    d = direct_peers.c
    direct: dict[str, list[ConvId]] = {}
    for chunk in chunks(list(wanted)):
        for user, conv in conn.execute(select(d.user_id, d.conv).where(d.user_id.in_(chunk))):
            direct.setdefault(user, []).append(conv)
    pairs = [
        (user, conv)
        for user, convs in wanted.items()
        for conv in dict.fromkeys([*convs, *direct.get(user, ())])
    ]
    last = last_seqs(conn, list({conv for _, conv in pairs}))
    read = {(r.user_id, r.conv): r.read_seq for r in _READ_MARKERS.fetch(conn, pairs)}
    behind = [
        (user, conv, seq)
        for user, conv in pairs
        if (seq := min(read.get((user, conv), 0), last[conv])) < last[conv]
    ]
    out = dict.fromkeys(wanted, 0)
    for (user, _), n in _UNREAD.fetch(conn, behind).items():
        out[user] += n
    return out


def _markers(conn: Connection, user: str, convs: Sequence[ConvId]) -> dict[ConvId, tuple[int, int]]:
    """conv -> (read_seq, recv_seq) of ``user``, where a marker row exists."""
    k = markers.c
    marks: dict[ConvId, tuple[int, int]] = {}
    for chunk in chunks(list(convs)):
        stmt = select(k.conv, k.read_seq, k.recv_seq).where(k.user_id == user, k.conv.in_(chunk))
        for r in conn.execute(stmt):
            marks[r.conv] = (r.read_seq, r.recv_seq)
    return marks


def referenced_files(conn: Connection, file_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    f = message_files.c
    for chunk in chunks(file_ids):
        found.update(
            conn.execute(select(f.file_id).where(f.file_id.in_(chunk)).distinct()).scalars()
        )
    return found


def stored_since(conn: Connection, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
    """Messages with ``ts`` at or after ``ts`` and an id above ``after_id``, by id."""
    m = messages.c
    rows = conn.execute(
        select(m.id, m.conv, m.seq, m.ts, m.sender, m.type, m.body, m.mentions)
        .where(m.id > after_id, m.ts >= ts)
        .order_by(m.id)
        .limit(limit)
    )
    return [
        CommittedMessage(
            id=r.id,
            conv=r.conv,
            seq=r.seq,
            ts=r.ts,
            sender=r.sender,
            type=r.type,
            body=r.body[:PREVIEW_CHARS],
            mentions=tuple(msgspec.json.decode(r.mentions)) if r.mentions else (),
        )
        for r in rows
    ]


def direct_convs(conn: Connection, user: str) -> dict[UserId, ConvId]:
    d = direct_peers.c
    return {
        r.peer_id: r.conv for r in conn.execute(select(d.peer_id, d.conv).where(d.user_id == user))
    }


def search(
    conn: Connection,
    search: MessageSearch,
    query: str,
    convs: Sequence[ConvId],
    before: int | None,
    limit: int,
) -> list[StoredMessage]:
    ids = search.search(conn, query, convs, before, limit)
    if not ids:
        return []
    by_id: dict[int, Message] = {}
    for chunk in chunks(ids):
        for r in conn.execute(select(*MSG_COLS).where(messages.c.id.in_(list(chunk)))):
            by_id[r.id] = to_message(r)
    found = [StoredMessage(i, by_id[i]) for i in ids if i in by_id]
    _add_reactions(conn, [s.message for s in found])
    return found
