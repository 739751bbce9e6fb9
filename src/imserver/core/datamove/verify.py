"""The verification of a copy: every table's rows counted and checksummed on both sides.

A table's checksum is the sum, modulo 2**128, of a hash of each of its rows (their
values as the schema reads them, in column order, MessagePack-encoded). A sum does
not depend on the order the rows are read in, which differs between engines (a
server's collation orders text its own way), and every row counts: one value
changed, one row lost or added, changes it.

Besides the tables, two things the target derives are checked against what the
source implies: ``conv_seqs`` (each conversation's last seq, the source's
``MAX(seq)``) and the search index (the ids of the visible text messages, and on
MySQL/MariaDB the folded words of each).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import Connection, Executable, Table, false, func, select, text

from imserver.core.datamove.tables import TABLES
from imserver.services.message.counters import conv_seqs
from imserver.services.message.schema import messages
from imserver.services.message.search import fold

MODULUS = 2**128
_encode = msgspec.msgpack.Encoder().encode

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Sums:
    """The row count and the checksum of one table on one side."""

    rows: int
    checksum: int


@dataclass(frozen=True)
class Check:
    """One line of the report: a table's sums on the source and on the target."""

    service: str
    table: str
    source: Sums
    target: Sums

    @property
    def ok(self) -> bool:
        """Whether the copy has the source's rows, value for value."""
        return self.source == self.target


def sums(rows: Iterable[Row]) -> Sums:
    """The :class:`Sums` of ``rows``."""
    n = total = 0
    for row in rows:
        digest = hashlib.blake2b(_encode(list(row)), digest_size=16).digest()
        total = (total + int.from_bytes(digest, "big")) % MODULUS
        n += 1
    return Sums(n, total)


def _rows(conn: Connection, statement: Executable, batch: int) -> Iterable[Row]:
    result = conn.execute(statement, execution_options={"yield_per": batch})
    for part in result.partitions():
        yield from (tuple(row) for row in part)


def table_sums(conn: Connection, table: Table, batch: int) -> Sums:
    """The sums of every row of ``table`` (its schema's columns)."""
    return sums(_rows(conn, select(*table.c), batch))


def _seqs_of_messages(conn: Connection, batch: int) -> Sums:
    last = select(messages.c.conv, func.max(messages.c.seq)).group_by(messages.c.conv)
    return sums(_rows(conn, last, batch))


def _visible_text(conn: Connection, batch: int, folded: bool) -> Sums:
    visible = select(messages.c.id, messages.c.body).where(
        messages.c.type == "text", messages.c.recalled == false()
    )
    rows = _rows(conn, visible, batch)
    return sums((i, fold(body)) if folded else (i,) for i, body in rows)


def _indexed(conn: Connection, batch: int) -> Sums:
    if conn.dialect.name == "postgresql":
        statement = text("SELECT id FROM messages WHERE search_vector IS NOT NULL")
    else:
        statement = text("SELECT id, search_text FROM messages WHERE search_text IS NOT NULL")
    return sums(_rows(conn, statement, batch))


Measure = Callable[[Connection, int], Sums]


def checks(service: str, target_dialect: str) -> list[tuple[str, Measure, Measure]]:
    """What is compared for ``service``: (name, on the source, on the target)."""
    out: list[tuple[str, Measure, Measure]] = []
    for table in TABLES[service]:

        def measure(conn: Connection, batch: int, table: Table = table) -> Sums:
            return table_sums(conn, table, batch)

        out.append((table.name, measure, measure))
    if service == "message":
        out.append(
            (
                conv_seqs.name,
                _seqs_of_messages,
                lambda conn, batch: table_sums(conn, conv_seqs, batch),
            )
        )
        folded = target_dialect != "postgresql"
        out.append(
            (
                "search index",
                lambda conn, batch: _visible_text(conn, batch, folded),
                _indexed,
            )
        )
    return out
