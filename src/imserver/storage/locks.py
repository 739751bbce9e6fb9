"""Row locks that serialise the transactions of one key, on every database.

A check that reads several rows and then writes (a user's upload total against the
quota; a conversation's last seq before the next message) is safe on SQLite, where
a writing transaction holds the database's only write lock. On PostgreSQL and
MySQL/MariaDB two such transactions run at once and would both pass the check. A
**lock row** per key makes them take turns: :func:`lock_keys` reads the keys' rows
``FOR UPDATE``, which holds them until the transaction ends, creating the missing
ones first. A second transaction of the same key waits, and then sees what the first
committed.

Rows are locked in key order (the read sorts them; missing keys are created in
order), so two transactions locking several keys mostly take them in the same
order. Only a transaction that finds some keys missing locks in two rounds; should
two such transactions deadlock, the engine aborts one, whose store answers
``unavailable`` (a retry succeeds).

Creating a row is where the dialects differ (an upsert each; the other columns take
their server defaults):

* PostgreSQL: ``INSERT ... ON CONFLICT DO NOTHING`` (it waits for a concurrent insert
  of the same key to commit), then the ``FOR UPDATE`` read;
* MySQL/MariaDB: ``INSERT ... ON DUPLICATE KEY UPDATE``, which takes the existing
  row's exclusive lock itself. ``INSERT IGNORE`` (or a failed plain insert) would
  take a *shared* lock on it, and two transactions upgrading shared locks to
  exclusive ones deadlock. The first read takes no gap lock because MySQL/MariaDB
  connections run at ``READ COMMITTED`` (:func:`imserver.storage.sql.make_engine`),
  as PostgreSQL's do;
* SQLite: ``INSERT ... ON CONFLICT DO NOTHING``; ``FOR UPDATE`` is not rendered, the
  transaction's write lock already serialises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Connection, Table, select
from sqlalchemy.dialects import mysql, postgresql, sqlite

from imserver.storage.statements import chunks


def _create(conn: Connection, table: Table, key: Column[Any], value: Any) -> None:
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        upsert = mysql.insert(table).values({key.name: value})
        conn.execute(upsert.on_duplicate_key_update({key.name: upsert.inserted[key.name]}))
        return
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    conn.execute(insert(table).values({key.name: value}).on_conflict_do_nothing())


def _locked(
    conn: Connection, key: Column[Any], keys: Sequence[Any], columns: Sequence[Column[Any]]
) -> dict[Any, tuple[Any, ...]]:
    found: dict[Any, tuple[Any, ...]] = {}
    for chunk in chunks(keys):
        query = select(key, *columns).where(key.in_(chunk)).order_by(key).with_for_update()
        for row in conn.execute(query):
            found[row[0]] = tuple(row[1:])
    return found


def lock_keys(
    conn: Connection,
    key: Column[Any],
    keys: Sequence[Any],
    columns: Sequence[Column[Any]] = (),
) -> dict[Any, tuple[Any, ...]]:
    """Take the lock rows of ``keys`` (``key`` is their table's one-column primary key)
    until the transaction ends, creating the missing ones; returns each key's values
    of ``columns`` as locked."""
    table = key.table
    assert isinstance(table, Table)
    ordered = sorted(set(keys))
    found = _locked(conn, key, ordered, columns)
    missing = [k for k in ordered if k not in found]
    if missing:
        for value in missing:
            _create(conn, table, key, value)
        found.update(_locked(conn, key, missing, columns))
    return found


def lock_key(conn: Connection, key: Column[Any], value: Any) -> None:
    """Take the lock row of one key (see :func:`lock_keys`)."""
    lock_keys(conn, key, [value])
