"""Seq allocation when several processes write one database: the conversation counters.

Embedded mode has one writer per database, which keeps each conversation's last seq
in memory (:mod:`imserver.services.message.writer`). On PostgreSQL and MySQL/MariaDB
more than one message service may write the same database, so a seq comes from the
database itself, under a row lock:

* ``conv_seqs`` holds one row per conversation: its last seq (``message_0005``
  creates it on the servers and fills it from the stored messages; SQLite has none).
* A batch's transaction first locks the counter rows of every conversation it
  touches (:func:`lock_seqs`, in conversation order, ``SELECT ... FOR UPDATE``;
  missing rows are created at 0 by the dialect's upsert: :mod:`imserver.storage.locks`).
  Everything else the batch reads of those conversations (idempotency keys, targets,
  markers) is read after, under the same locks.
* The batch allocates seqs from the locked values and writes the new last seqs back
  (:func:`store_seqs`) in the same transaction, so the commit releases the rows with
  the messages they count. Another process's batch on the same conversation waits
  for that commit and continues from there: seqs stay gap-free (a failed or refused
  write consumes none, as before) and duplicate-free, and a resend of a stored
  (conv, sender, cid) meets the unique index and is answered with the original seq.

The cost is one locking read per batch (plus an insert per new conversation) and
one update per conversation written; two processes writing the same conversation
take turns per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    text,
    update,
)

from imserver.storage.locks import lock_keys
from imserver.utils.ids import ConvId

metadata = MetaData()
"""The counter table, apart from the portable schema (the servers have it, SQLite not)."""

conv_seqs = Table(
    "conv_seqs",
    metadata,
    Column("conv", String(200), nullable=False),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("conv", name="pk_conv_seqs"),
)


def lock_seqs(conn: Connection, convs: Sequence[ConvId]) -> dict[ConvId, int]:
    """Lock the counter rows of ``convs`` until the transaction ends; conv -> last seq."""
    locked = lock_keys(conn, conv_seqs.c.conv, convs, [conv_seqs.c.last_seq])
    return {ConvId(conv): int(values[0]) for conv, values in locked.items()}


def store_seqs(conn: Connection, last: Mapping[ConvId, int]) -> None:
    """Write the new last seqs of the locked conversations."""
    if not last:
        return
    c = conv_seqs.c
    conn.execute(
        update(conv_seqs).where(c.conv == bindparam("k_conv")).values(last_seq=bindparam("k_last")),
        [{"k_conv": conv, "k_last": seq} for conv, seq in last.items()],
    )
