"""The message service's tables and the mapping between their rows and models.

Everything here is portable SQL that runs unchanged on SQLite, PostgreSQL and
MySQL/MariaDB.

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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

from imserver.protocol.models import Message
from imserver.storage.outbox import outbox_table
from imserver.utils.ids import ConvId

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

outbox = outbox_table(metadata, "message")
"""``message.stored`` events waiting for the relay (:mod:`imserver.storage.outbox`),
written in the batch's transaction when the event stream is on."""

UNREAD_TYPES = ("text", "image", "file", "custom", "system")
"""Message types that count as unread (edits, recalls and reactions do not)."""


MSG_COLS = (
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


MessageKey = tuple[ConvId, int]
"""(conv, seq) of a message."""

IdemKey = tuple[ConvId, str, str]
"""(conv, sender, cid): the idempotency key of a write."""

MarkerKey = tuple[ConvId, str]
"""(conv, user) of a read/recv watermark."""


# --- rows <-> models ----------------------------------------------------------------


class StoredMessage(NamedTuple):
    """A message with its storage id (the global insertion order)."""

    id: int
    message: Message


def to_message(row: Any) -> Message:
    """The model of a ``messages`` row selected with :data:`MSG_COLS`."""
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
