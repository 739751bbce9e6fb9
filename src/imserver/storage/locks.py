"""Row locks that serialise the transactions of one key, on every database.

A check that reads several rows and then writes (a user's upload total against the
quota; a conversation's last seq before the next message) is safe on SQLite, where
a writing transaction holds the database's only write lock. On PostgreSQL and
MySQL/MariaDB two such transactions run at once and would both pass the check. A
**lock row** per key makes them take turns: :func:`lock_key` reads the key's row
``FOR UPDATE``, which holds it until the transaction ends, and creates it first when
it is missing. A second transaction of the same key waits, and then sees what the
first committed.

Creating the row is where the dialects differ (an upsert each):

* PostgreSQL: ``INSERT ... ON CONFLICT DO NOTHING`` (it waits for a concurrent insert
  of the same key to commit), then the ``FOR UPDATE`` read;
* MySQL/MariaDB: ``INSERT ... ON DUPLICATE KEY UPDATE``, which takes the existing
  row's exclusive lock itself. ``INSERT IGNORE`` (or a failed plain insert) would
  take a *shared* lock on it, and two transactions upgrading shared locks to
  exclusive ones deadlock. The first read finds no gap lock to take because
  MySQL/MariaDB connections run at ``READ COMMITTED``
  (:func:`imserver.storage.sql.make_engine`), as PostgreSQL's do;
* SQLite: ``INSERT ... ON CONFLICT DO NOTHING``; ``FOR UPDATE`` is not rendered, the
  transaction's write lock already serialises.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Connection, Table, select
from sqlalchemy.dialects import mysql, postgresql, sqlite


def lock_key(conn: Connection, column: Column[Any], key: Any) -> None:
    """Take the lock row of ``key`` (``column`` is its table's one-column primary key)
    until the transaction ends, creating the row if it is missing."""
    table = column.table
    assert isinstance(table, Table)
    locking = select(column).where(column == key).with_for_update()
    if conn.execute(locking).first() is not None:
        return
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        upsert = mysql.insert(table).values({column.name: key})
        conn.execute(upsert.on_duplicate_key_update({column.name: upsert.inserted[column.name]}))
        return
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    conn.execute(insert(table).values({column.name: key}).on_conflict_do_nothing())
    conn.execute(locking)
