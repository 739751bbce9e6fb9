"""SQL engines and schema migrations shared by every service's store.

Each service owns one database (embedded mode: one SQLite file per service under the
data directory) and one Alembic migration history kept in its own package
(``imserver/services/<name>/migrations``). Migrations run at start-up and through
``imserver migrate``.

SQLite is opened in WAL mode with ``synchronous=FULL``: a committed transaction has
been fsynced, which is what lets the message service acknowledge a send only after
commit. Everything else is portable SQLAlchemy Core, so PostgreSQL and MySQL slot in
by URL.

How a store's operations reach these engines, and how their failures are
translated, is :mod:`imserver.storage.runners`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from imserver.storage import pg_text

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
    "PRAGMA cache_size=-16000",
)


def sqlite_url(data_dir: Path, service: str) -> str:
    """The async URL of a service's SQLite file under ``data_dir``."""
    return f"sqlite+aiosqlite:///{(data_dir / f'{service}.db').resolve()}"


def sync_url(url: str) -> str:
    """The synchronous-driver form of an async URL, used to run migrations."""
    return url.replace("sqlite+aiosqlite://", "sqlite://", 1)


def set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """A ``connect`` listener: :data:`SQLITE_PRAGMAS` on a new SQLite connection."""
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Create an async engine; SQLite connections get the durability pragmas,
    PostgreSQL ones the NUL-escaping text codec (:mod:`imserver.storage.pg_text`),
    MySQL/MariaDB ones ``READ COMMITTED``."""
    if url.startswith(("mysql", "mariadb")):
        # PostgreSQL's default; InnoDB's REPEATABLE READ takes gap locks on reads of
        # missing rows, on which two lock-row transactions deadlock (storage/locks.py).
        kwargs.setdefault("isolation_level", "READ COMMITTED")
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", set_sqlite_pragmas)
    elif engine.dialect.name == "postgresql":
        pg_text.install(engine)
    return engine


def alembic_config(url: str, migrations_package: str) -> AlembicConfig:
    """An Alembic config for one service's migrations, built without an ini file.

    ``migrations_package`` is a dotted package name such as
    ``imserver.services.user.migrations``.
    """
    cfg = AlembicConfig()
    top, _, rest = migrations_package.partition(".")
    cfg.set_main_option("script_location", f"{top}:{rest.replace('.', '/')}")
    # The ini syntax interpolates "%" (as in a URL-encoded password): doubled, it is itself.
    cfg.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    # One version table per service, so services may share a database (or schema).
    cfg.set_main_option("version_table", f"alembic_version_{rest.split('.')[-2]}")
    return cfg


def upgrade_sync(url: str, migrations_package: str) -> None:
    """Apply every pending migration of one service's database (blocking)."""
    command.upgrade(alembic_config(url, migrations_package), "head")


async def upgrade(url: str, migrations_package: str) -> None:
    """Apply every pending migration off the event loop."""
    await asyncio.to_thread(upgrade_sync, url, migrations_package)
