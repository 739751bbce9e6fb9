"""The body of every service's Alembic ``env.py``: online migrations on one connection.

SQLite migrations run on the synchronous driver (:func:`imserver.storage.sql.sync_url`);
PostgreSQL and MySQL/MariaDB ones on the async driver of the URL (asyncpg, asyncmy),
through ``run_sync`` in an event loop of the migrating thread, so IMServer needs no
second, synchronous driver for them.

On MySQL/MariaDB the database must compare text byte for byte: ids, client ids and
usernames are case-sensitive keys, and a ``_ci`` collation would make ``a`` and ``A``
one key. A database whose default collation is not a ``utf8mb4`` ``_bin`` one is
refused before any table is created (``CREATE DATABASE im CHARACTER SET utf8mb4
COLLATE utf8mb4_bin``).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, create_engine, event, pool

from imserver.storage.sql import make_engine, set_sqlite_pragmas


class WrongCollation(RuntimeError):
    """The MySQL/MariaDB database does not compare text byte for byte."""


def check_collation(connection: Connection) -> None:
    """Raise :class:`WrongCollation` unless a MySQL/MariaDB database's default collation
    is a ``utf8mb4`` binary one (no-op on other dialects)."""
    if connection.dialect.name not in ("mysql", "mariadb"):
        return
    collation = str(connection.exec_driver_sql("SELECT @@collation_database").scalar())
    if not (collation.startswith("utf8mb4") and collation.endswith("_bin")):
        raise WrongCollation(
            f"the database's collation is {collation}: IMServer needs a binary utf8mb4 one "
            "(CREATE DATABASE ... CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)"
        )


def _migrate(connection: Connection) -> None:
    check_collation(connection)
    context.configure(
        connection=connection,
        render_as_batch=True,
        version_table=context.config.get_main_option("version_table") or "alembic_version",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
            await connection.commit()
    finally:
        await engine.dispose()


def run() -> None:
    """Run the migrations Alembic has selected against ``sqlalchemy.url``."""
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    if not url.startswith("sqlite"):
        asyncio.run(_run_async(url))
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    event.listen(engine, "connect", set_sqlite_pragmas)
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()
