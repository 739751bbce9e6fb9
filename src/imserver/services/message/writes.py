"""The write transaction of the message store: what one group commit reads and writes.

The writer opens it with :func:`load` (the stored idempotency keys, last seqs,
targets and markers a batch needs) and ends it with :func:`write`, which applies a
:class:`WriteBatch` and commits, both on the writer's pinned connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypedDict

import msgspec
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from imserver.services.message.counters import lock_seqs, store_seqs
from imserver.services.message.reads import last_seqs
from imserver.services.message.schema import (
    MESSAGE_COLUMNS,
    IdemKey,
    MarkerKey,
    MessageKey,
    direct_peers,
    markers,
    message_files,
    message_mentions,
    messages,
    outbox,
    reactions,
)
from imserver.services.message.search import MessageSearch
from imserver.storage.outbox import OUTBOX_COLUMNS
from imserver.storage.statements import DriverStatement, KeyLookup
from imserver.utils.ids import ConvId

_BY_IDEM_KEY = KeyLookup(
    [messages.c.conv, messages.c.sender, messages.c.cid, messages.c.seq, messages.c.ts],
    [messages.c.conv, messages.c.sender, messages.c.cid],
)
_TARGETS = KeyLookup(
    [messages.c.conv, messages.c.seq, messages.c.sender, messages.c.type, messages.c.recalled],
    [messages.c.conv, messages.c.seq],
)
_MARKERS = KeyLookup(
    [markers.c.conv, markers.c.user_id, markers.c.read_seq, markers.c.recv_seq],
    [markers.c.conv, markers.c.user_id],
)

_INSERT_MESSAGES = DriverStatement(insert(messages), MESSAGE_COLUMNS)
_MAX_ID = DriverStatement(select(func.max(messages.c.id)))
_INSERT_OUTBOX = DriverStatement(insert(outbox), OUTBOX_COLUMNS)


class Target(NamedTuple):
    """What the writer needs to know about the target of an edit/recall/react."""

    sender: str
    type: str
    recalled: bool


class Loaded(NamedTuple):
    """What a batch reads before it writes (see :func:`load`)."""

    existing: dict[IdemKey, tuple[int, int]]
    """Idempotency keys already stored -> (seq, ts)."""
    last: dict[ConvId, int]
    """Last stored seq per conversation (0 when it has none)."""
    targets: dict[MessageKey, Target]
    markers: dict[MarkerKey, tuple[int, int]]
    """(conv, user) -> (read_seq, recv_seq) of existing marker rows."""


class MentionRow(TypedDict):
    """A ``message_mentions`` row."""

    conv: ConvId
    user_id: str
    seq: int


class FileRow(TypedDict):
    """A ``message_files`` row: a message naming an uploaded file."""

    file_id: str
    conv: ConvId
    seq: int


class PeerRow(TypedDict):
    """A ``direct_peers`` row (one per user of a direct conversation)."""

    user_id: str
    peer_id: str
    conv: ConvId


class WriteBatch(msgspec.Struct, kw_only=True):
    """Everything one group commit writes, in one transaction.

    Applied in this order: messages (and their search index), mentions, file
    references, direct peers, edits, recalls (which also blank the recalled message's edit rows and
    drop its reactions), reaction changes, markers, counters, outbox events.
    """

    messages: list[tuple[Any, ...]] = msgspec.field(default_factory=list)
    """Rows in :data:`MESSAGE_COLUMNS` order."""
    mentions: list[MentionRow] = msgspec.field(default_factory=list)
    files: list[FileRow] = msgspec.field(default_factory=list)
    peers: list[PeerRow] = msgspec.field(default_factory=list)
    edits: dict[MessageKey, str] = msgspec.field(default_factory=dict)
    recalls: list[MessageKey] = msgspec.field(default_factory=list)
    reactions: dict[tuple[ConvId, int, str, str], int | None] = msgspec.field(default_factory=dict)
    """(conv, seq, emoji, user) -> the reaction's seq when present now, None when removed."""
    markers: dict[MarkerKey, tuple[int, int, bool]] = msgspec.field(default_factory=dict)
    """(conv, user) -> (read_seq, recv_seq, row already exists)."""
    counters: dict[ConvId, int] = msgspec.field(default_factory=dict)
    """conv -> its new last seq, for the counter rows of a shared database
    (:mod:`imserver.services.message.counters`); empty otherwise."""
    events: list[tuple[str, str, bytes, int]] = msgspec.field(default_factory=list)
    """Outbox rows (``message.stored`` events, :data:`OUTBOX_COLUMNS`) when the event
    stream is on."""


def load(
    conn: Connection,
    idem_keys: Sequence[IdemKey],
    convs: Sequence[ConvId],
    target_keys: Sequence[MessageKey],
    marker_keys: Sequence[MarkerKey],
    lock: bool = False,
) -> Loaded:
    """Open the transaction and read what a batch needs in one step (see :class:`Loaded`).

    ``lock``: take the counter rows of ``convs`` first and read their last seqs from
    them (a shared database: :mod:`imserver.services.message.counters`), so that all
    the rest is read under those locks.
    """
    if not conn.in_transaction():
        conn.begin()
    last = lock_seqs(conn, convs) if lock else None
    existing = {
        (r.conv, r.sender, r.cid): (r.seq, r.ts) for r in _BY_IDEM_KEY.fetch(conn, idem_keys)
    }
    if last is None:
        last = last_seqs(conn, convs)
    targets = {
        (r.conv, r.seq): Target(r.sender, r.type, bool(r.recalled))
        for r in _TARGETS.fetch(conn, target_keys)
    }
    found_markers = {
        (r.conv, r.user_id): (r.read_seq, r.recv_seq) for r in _MARKERS.fetch(conn, marker_keys)
    }
    return Loaded(existing, last, targets, found_markers)


def write(conn: Connection, batch: WriteBatch, search: MessageSearch) -> None:
    """Apply ``batch`` (opening the transaction if :func:`load` did not); :func:`commit`
    commits it."""
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
    if batch.edits or batch.recalls:
        search.index_changed(conn, batch.edits, batch.recalls)
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
    store_seqs(conn, batch.counters)
    if batch.events:
        _INSERT_OUTBOX.executemany(conn, batch.events)


def commit(conn: Connection) -> None:
    """Commit the open transaction."""
    conn.commit()


def rollback(conn: Connection) -> None:
    """Abandon the open transaction."""
    conn.rollback()


class KeyConflict(Exception):
    """A batch's write hit a unique key that is already stored.

    The writer loads only the idempotency keys it was told to check, so a batch that
    skipped the check can meet a stored key here; the transaction is then abandoned
    and the batch is applied again with every key checked.
    """
