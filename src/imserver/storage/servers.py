"""Databases on a PostgreSQL or MariaDB server, made and dropped by its administrator:
the fresh databases the tests (``tests/databases.py``) and the benchmarks
(``benchmarks/databases.py``) run on, and the local cluster's (``imserver cluster``).

A database is created ``CHARACTER SET utf8mb4 COLLATE utf8mb4_bin`` on MariaDB (ids
and usernames compare byte for byte, as the migrations require) and dropped ``WITH
(FORCE)`` on PostgreSQL (its last connections may still be closing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")


async def admin(server_url: str, statements: Sequence[str], *, database: str | None = None) -> None:
    """Run ``statements`` as the administrator of ``server_url`` (a PostgreSQL or
    MySQL/MariaDB URL), in ``database`` when given, else in the URL's own (MariaDB:
    none)."""
    url = make_url(server_url)
    if url.get_backend_name() == "postgresql":
        import asyncpg

        pg = await asyncpg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            database=database or url.database,
            timeout=5,
        )
        try:
            for statement in statements:
                await pg.execute(statement)
        finally:
            await pg.close()
        return
    import asyncmy

    my = await asyncmy.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=database,
        connect_timeout=5,
    )
    try:
        async with my.cursor() as cur:
            for statement in statements:
                await cur.execute(statement)
    finally:
        my.close()


def create_statement(dialect: str, name: str) -> str:
    """``CREATE DATABASE name`` as IMServer needs it on ``dialect``."""
    create = f"CREATE DATABASE {name}"
    if dialect == "mariadb":
        create += " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    return create


def drop_statement(dialect: str, name: str) -> str:
    """``DROP DATABASE IF EXISTS name``, connections or not."""
    drop = f"DROP DATABASE IF EXISTS {name}"
    if dialect == "postgresql":
        drop += " WITH (FORCE)"
    return drop


def database_url(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``server_url`` (a PostgreSQL URL
    loses its query: asyncpg takes none of the administrator's)."""
    url = make_url(server_url).set(database=name)
    if url.get_backend_name() == "postgresql":
        url = url.set(query={})
    return url.render_as_string(hide_password=False)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running event
    loop (in a thread of its own, with a loop of its own)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
