"""The SQLite data directory a move reads, held exclusively while it is read.

A server keeps every database of its data directory open while it runs, so "in use"
is decided by SQLite's own locks: each file is opened in ``EXCLUSIVE`` locking mode
and an exclusive transaction is begun on it. In WAL mode that needs every other
connection to the file closed (an idle server's included), so a server running on
the directory is refused, and a server started during the move cannot open it. The
move reads the files inside those transactions: one consistent snapshot of each.

Once the directory is known to be unused, the schemas of the files an older IMServer
left are brought to this version's head (as ``imserver serve`` would at start-up;
the files are let go for it and held again after), so the copy reads the tables it
knows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, pool, text
from sqlalchemy.exc import DatabaseError, OperationalError

from imserver.core.datamove.refusals import SourceInUse, SourceMissing
from imserver.storage.sql import alembic_config, sqlite_url, upgrade

LOCK_TIMEOUT = 2.0
"""Seconds to wait for a file's lock (a server's commit in progress) before refusing."""


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: a missing file is an error, never a new empty database.
    return sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=rw",  # as_uri: '?', '#' and '%' in names escaped
        uri=True,
        timeout=LOCK_TIMEOUT,
        isolation_level=None,
        check_same_thread=False,
    )


@dataclass
class SourceDir:
    """The data directory ``path`` and its service databases (``<service>.db``)."""

    path: Path
    copied: tuple[str, ...]
    """The services whose databases are copied (all present, or :class:`SourceMissing`),
    held while the move runs."""
    _engines: dict[str, Engine] = field(default_factory=dict)
    _conns: dict[str, Connection] = field(default_factory=dict)

    @classmethod
    def find(cls, path: Path, copied: Iterable[str]) -> SourceDir:
        """The data directory at ``path``; :class:`SourceMissing` unless it holds the
        database of every service of ``copied``."""
        copied = tuple(copied)
        if not path.is_dir():
            raise SourceMissing(f"{path}: no such directory")
        missing = [f"{name}.db" for name in copied if not (path / f"{name}.db").is_file()]
        if missing:
            raise SourceMissing(f"{path} holds no IMServer data (missing: {', '.join(missing)})")
        return cls(path.resolve(), copied)

    def file(self, service: str) -> Path:
        """The SQLite file of ``service``."""
        return self.path / f"{service}.db"

    def url(self, service: str) -> str:
        """The async URL of ``service``'s SQLite file."""
        return sqlite_url(self.path, service)

    def _engine(self, service: str) -> Engine:
        engine = self._engines.get(service)
        if engine is None:
            path = self.file(service)
            engine = create_engine(
                "sqlite://", creator=lambda: _connect(path), poolclass=pool.NullPool
            )
            self._engines[service] = engine
        return engine

    def _hold(self, service: str) -> Connection:
        conn = self._engine(service).connect()
        try:
            conn.exec_driver_sql("PRAGMA locking_mode=EXCLUSIVE")
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
            # The first read takes the lock for good (and, in WAL mode, proves that no
            # other connection has the file open).
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
        except OperationalError as exc:
            conn.close()
            if "locked" in str(exc.orig) or "busy" in str(exc.orig):
                raise SourceInUse(
                    f"{self.path} is in use: {service}.db is open in another process "
                    f"({exc.orig}); stop the server first"
                ) from None
            raise SourceMissing(f"{self.file(service)} cannot be read: {exc.orig}") from None
        except DatabaseError as exc:  # not a database at all
            conn.close()
            raise SourceMissing(f"{self.file(service)} cannot be read: {exc.orig}") from None
        return conn

    def hold(self) -> None:
        """Hold every database of the directory exclusively (:class:`SourceInUse` if a
        process has one open), until :meth:`release`."""
        try:
            for service in self.copied:
                self._conns[service] = self._hold(service)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let the files go (nothing was written: the transactions roll back)."""
        for conn in self._conns.values():
            conn.rollback()
            conn.close()
        self._conns.clear()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def connection(self, service: str) -> Connection:
        """The held connection of ``service`` (after :meth:`hold`)."""
        return self._conns[service]

    def behind(self, packages: dict[str, str]) -> list[str]:
        """The copied services whose database is not at this version's head (held)."""
        stale = []
        for service in self.copied:
            config = alembic_config(self.url(service), packages[service])
            head = ScriptDirectory.from_config(config).get_current_head()
            conn = self.connection(service)
            table = f"alembic_version_{service}"
            exists = conn.execute(
                text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :t"),
                {"t": table},
            ).first()
            if exists is None:
                stale.append(service)
                continue
            version = conn.exec_driver_sql(f"SELECT version_num FROM {table}").scalar()
            if version != head:
                stale.append(service)
        return stale

    async def upgrade(self, services: list[str], packages: dict[str, str]) -> None:
        """Apply this version's migrations to ``services`` (files not held)."""
        for service in services:
            await upgrade(self.url(service), packages[service])
