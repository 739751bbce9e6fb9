"""The databases a store's contract tests run on: ``sqlite``, ``postgresql``, ``mariadb``.

Which of them a run uses: ``pytest --databases=sqlite,postgresql`` or the variable
``IMS_TEST_DATABASES`` (the option wins); all three by default. (The variables here
do not start with ``IMSERVER_``: a server started by the tests would read those as
its settings.) A test takes the
``dialect`` fixture (one run per selected database) and the ``databases`` fixture,
whose :meth:`Databases.url` names a service's database on that dialect.

SQLite: one file per service in the test's ``tmp_path``. The servers: the test session
creates one fresh database on each (``imserver_test_<pid>_<random>``, binary
``utf8mb4`` collation on MariaDB) and drops it when the session ends; every test
starts on it emptied (PostgreSQL: the ``public`` schema recreated; MariaDB: every
table dropped), so the services of one test share the database as the services of a
deployment with one ``storage.url`` do.

The end-to-end suite runs its ``imserver serve`` processes on the database
``IMS_E2E_DATABASE`` names (``sqlite`` by default): on a server, each process
gets a fresh database of its own (``storage.url``), dropped after its test.

Where a server does not answer (PostgreSQL on 127.0.0.1:5432 as ``postgres``,
MariaDB on 127.0.0.1:3306 as ``root``; ``IMS_TEST_POSTGRES`` and
``IMS_TEST_MARIADB`` give other server URLs) its tests are skipped with the
reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from imserver.storage import servers
from imserver.storage.servers import run_blocking
from imserver.storage.sql import make_engine, sqlite_url

T = TypeVar("T")

DIALECTS = ("sqlite", "postgresql", "mariadb")
SERVER_NAMES = frozenset({"postgresql", "mariadb"})
ENV = "IMS_TEST_DATABASES"
SERVERS = {
    "postgresql": os.environ.get(
        "IMS_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get(
        "IMS_TEST_MARIADB", "mysql+asyncmy://root@127.0.0.1:3306/mysql?charset=utf8mb4"
    ),
}
"""The server of each dialect, as an administrator's URL (its database is only used
to create and drop the test database)."""


def add_option(parser: pytest.Parser) -> None:
    """The ``--databases`` option."""
    parser.addoption(
        "--databases",
        default=None,
        help=f"comma-separated databases for the store tests: {', '.join(DIALECTS)} "
        f"(default: ${ENV}, else all)",
    )


def selected(config: pytest.Config) -> list[str]:
    """The databases this run tests on (see the module docstring)."""
    raw = config.getoption("--databases") or os.environ.get(ENV) or ",".join(DIALECTS)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in DIALECTS]
    if unknown or not names:
        raise pytest.UsageError(f"--databases: unknown {unknown}; choose from {DIALECTS}")
    return names


def unavailable(reason: str) -> None:
    """Skip (fail under ``CI=true``) a test whose database server is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: every database must be tested)")
    pytest.skip(reason)


async def admin(dialect: str, statements: list[str]) -> None:
    """Run ``statements`` as the server's administrator (outside any test database)."""
    await servers.admin(SERVERS[dialect], statements)


E2E_ENV = "IMS_E2E_DATABASE"


def e2e_database() -> str:
    """The database the end-to-end servers use: ``$IMS_E2E_DATABASE``, else sqlite."""
    name = os.environ.get(E2E_ENV, "sqlite")
    if name not in DIALECTS:
        raise pytest.UsageError(f"{E2E_ENV}={name}: choose from {DIALECTS}")
    return name


def create_database(dialect: str, label: str) -> ServerDatabase:
    """A fresh database on ``dialect``'s server, for one end-to-end server (blocking);
    a missing server skips (fails under ``CI=true``)."""
    name = f"imserver_{label}_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        run_blocking(admin(dialect, [servers.create_statement(dialect, name)]))
    except (OSError, TimeoutError, ImportError) as exc:
        unavailable(f"{dialect} server not reachable: {exc}")
    return ServerDatabase(dialect, name, servers.database_url(SERVERS[dialect], name))


def drop_database(db: ServerDatabase) -> None:
    """Drop a database of :func:`create_database` (blocking)."""
    run_blocking(admin(db.dialect, [servers.drop_statement(db.dialect, db.name)]))


@dataclass
class ServerDatabase:
    """One fresh database on a server, for the whole session."""

    dialect: str
    name: str
    url: str


@dataclass
class ServerDatabases:
    """The session's databases, created on first use and dropped at the end."""

    created: dict[str, ServerDatabase] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    async def get(self, dialect: str) -> ServerDatabase:
        if dialect in self.missing:
            unavailable(self.missing[dialect])
        found = self.created.get(dialect)
        if found is not None:
            return found
        name = f"imserver_test_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            await admin(dialect, [servers.create_statement(dialect, name)])
        except (OSError, TimeoutError, ImportError) as exc:
            server = make_url(SERVERS[dialect]).render_as_string(hide_password=True)
            self.missing[dialect] = f"{dialect} server not reachable at {server}: {exc}"
            unavailable(self.missing[dialect])
        made = ServerDatabase(dialect, name, servers.database_url(SERVERS[dialect], name))
        self.created[dialect] = made
        return made

    async def empty(self, db: ServerDatabase) -> None:
        """Drop everything in ``db`` (the state a test starts from)."""
        if db.dialect == "postgresql":
            await servers.admin(
                SERVERS["postgresql"],
                ["DROP SCHEMA public CASCADE", "CREATE SCHEMA public"],
                database=db.name,
            )
            return
        await admin(
            "mariadb", [f"DROP DATABASE {db.name}", servers.create_statement("mariadb", db.name)]
        )

    async def drop_all(self) -> None:
        for db in self.created.values():
            await admin(db.dialect, [servers.drop_statement(db.dialect, db.name)])
        self.created.clear()


@dataclass
class Databases:
    """The databases of one test on one dialect."""

    dialect: str
    tmp_path: Path
    server: ServerDatabase | None = None
    servers: ServerDatabases | None = None
    resets: int = 0

    @property
    def directory(self) -> Path:
        """Where the SQLite files are."""
        return self.tmp_path if not self.resets else self.tmp_path / f"reset{self.resets}"

    def url(self, service: str) -> str:
        """The async URL of ``service``'s database (on a server, all share one)."""
        if self.server is None:
            return sqlite_url(self.directory, service)
        return self.server.url

    async def reset(self) -> None:
        """Start again from empty databases."""
        self.resets += 1
        if self.server is None:
            self.directory.mkdir()
            return
        assert self.servers is not None
        await self.servers.empty(self.server)


async def on_connection(url: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(connection, *args)`` on a synchronous view of a connection to ``url``
    (any dialect), committed after."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.commit()
            return result
    finally:
        await engine.dispose()


async def rows(
    url: str, statement: str, params: dict[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """The rows of a raw SQL statement on ``url`` (any dialect)."""

    def run(conn: Connection) -> list[tuple[Any, ...]]:
        result = conn.execute(text(statement), params or {})
        return [tuple(r) for r in result] if result.returns_rows else []

    return await on_connection(url, run)
