"""What each service's database holds, and how a table is copied to a server.

Every service's database is copied: user, message, room, file and notification.
Each service's tables are its schema's (:data:`TABLES`), in
foreign-key order; a source table that is neither one of them nor SQLite's own
(the FTS5 index, Alembic's version table) stops the move, so nothing is left behind
unnoticed.

A table is read in primary-key order and written in batches, each committed. Rows
keep every value, their ids included. What the target derives from them is rebuilt
the way the target's migrations and stores build it:

* the search index: after each batch of ``messages``, the dialect's
  :meth:`~imserver.services.message.search.MessageSearch.index_new`, as the store
  after a batch of new messages (PostgreSQL's generated column needs nothing);
* ``conv_seqs``, the counters of several writers: each conversation's last seq,
  from the copied messages, as ``message_0005`` fills it (the next send continues
  at last seq + 1);
* PostgreSQL's sequence behind ``messages.id``, set to the last copied id
  (MySQL/MariaDB move ``AUTO_INCREMENT`` past explicit ids by themselves).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Table, func, insert, select, text

from imserver.services.file.store import metadata as file_metadata
from imserver.services.message.counters import conv_seqs
from imserver.services.message.schema import messages
from imserver.services.message.schema import metadata as message_metadata
from imserver.services.message.search import search_for_dialect
from imserver.services.notification.schema import metadata as notification_metadata
from imserver.services.room.store import metadata as room_metadata
from imserver.services.user.schema import metadata as user_metadata

TABLES: dict[str, tuple[Table, ...]] = {
    "user": tuple(user_metadata.sorted_tables),
    "message": tuple(message_metadata.sorted_tables),
    "room": tuple(room_metadata.sorted_tables),
    "file": tuple(file_metadata.sorted_tables),
    "notification": tuple(notification_metadata.sorted_tables),
}
"""The tables of each copied service, parents before children."""

DERIVED: dict[str, tuple[Table, ...]] = {"message": (conv_seqs,)}
"""Tables the target has and the source has not, rebuilt from the copied rows."""

SQLITE_OWN = ("sqlite_", "alembic_version_", "messages_fts")
"""Prefixes of the source tables that are SQLite's or Alembic's, not data to move."""

Advance = Callable[[int], None]
"""Told the number of rows of each batch written."""


def unknown_tables(conn: Connection, service: str) -> list[str]:
    """The tables of a source database that are neither ``service``'s nor SQLite's own."""
    names = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars()
    known = {table.name for table in TABLES[service]}
    return sorted(n for n in names if n not in known and not n.startswith(SQLITE_OWN))


def count(conn: Connection, table: Table) -> int:
    """The rows of ``table``."""
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def filled(conn: Connection, service: str) -> list[tuple[str, int]]:
    """The tables of ``service`` on a target that already hold rows, with their counts."""
    found = []
    for table in TABLES[service] + DERIVED.get(service, ()):
        rows = count(conn, table)
        if rows:
            found.append((table.name, rows))
    return found


def copy_table(
    source: Connection, target: Connection, table: Table, batch: int, advance: Advance
) -> None:
    """Copy every row of ``table`` from ``source`` to ``target``, ``batch`` rows per
    committed transaction (see the module docstring for the search index)."""
    key = list(table.primary_key.columns)
    ordered = select(table).order_by(*key)
    rows = source.execute(ordered, execution_options={"yield_per": batch})
    search = search_for_dialect(target.dialect.name) if table is messages else None
    for part in rows.partitions():
        values = [dict(row._mapping) for row in part]
        target.execute(insert(table), values)
        if search is not None:
            search.index_new(target, min(v["id"] for v in values) - 1)
        target.commit()
        advance(len(values))


def finish(target: Connection, service: str) -> None:
    """Rebuild what the target derives from ``service``'s copied rows (module docstring)."""
    if service == "message":
        target.execute(
            insert(conv_seqs).from_select(
                ["conv", "last_seq"],
                select(messages.c.conv, func.max(messages.c.seq)).group_by(messages.c.conv),
            )
        )
    if target.dialect.name == "postgresql":
        for table in TABLES[service]:
            _set_sequence(target, table)
    target.commit()


def _set_sequence(target: Connection, table: Table) -> None:
    column = table.autoincrement_column
    if column is None:
        return
    target.execute(
        text(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
            f"max({column.name})) FROM {table.name} HAVING count(*) > 0"
        )
    )
