"""Which storage errors mean "the storage cannot serve now", and their one translation.

Every store raises :class:`~imserver.utils.errors.Unavailable` (``unavailable``, 503)
when its storage fails, whatever the engine: a full disk or quota, an I/O error, a
file that cannot be opened, a read-only database, a lock held past ``busy_timeout``,
a corrupt file, a lost or refused connection, an exhausted pool. The client can do
nothing about these but try again later, and the change it asked for was not made.

Errors that are not storage failures keep their type: a unique or foreign-key
violation (:class:`~sqlalchemy.exc.IntegrityError`, which stores use on purpose), or
a bad statement (SQLite's generic ``SQLITE_ERROR``: no such table, syntax), which is
a bug and is answered ``internal`` with its traceback in the log.

The translation happens once, where the foreign exception leaves the storage code
(:class:`imserver.storage.runners.SqlStore`, the base of every service's SQL store,
and the blob stores), and logs one warning line naming the store and the cause; no
traceback, since the cause is outside the program.
"""

from __future__ import annotations

import logging
import sqlite3

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from imserver.utils.errors import Unavailable

logger = logging.getLogger(__name__)

SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOLFS,
        sqlite3.SQLITE_NOTADB,
    }
)
"""Primary SQLite result codes of a storage failure (extended codes are reduced to
these): permission, busy/locked past the timeout, out of memory, read-only, I/O
error, corrupt, full, cannot open, lock protocol, no large-file support, not a
database."""

SQLSTATE_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
"""SQLSTATE classes of a storage failure: connection exception, insufficient resources
(disk full, out of memory, too many connections), operator intervention (shutdown,
cancelled), system error (I/O)."""

SQLSTATE_UNAVAILABLE = frozenset({"25006", "40001", "40P01", "55P03"})
"""Single SQLSTATEs of a storage failure: read-only transaction (a standby),
serialization failure, deadlock, lock not available."""


def is_database_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a database engine or its driver, is a storage failure
    (see the module docstring) rather than a bug or a constraint the caller checks."""
    if isinstance(exc, PoolTimeout):
        return True
    orig: BaseException | None = exc
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in SQLITE_UNAVAILABLE
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str) and len(state) == 5:
        return state[:2] in SQLSTATE_UNAVAILABLE_CLASSES or state in SQLSTATE_UNAVAILABLE
    # Drivers without codes (and SQLite errors raised before a statement ran, such as a
    # connection already closed) follow PEP 249: operational and interface errors are
    # about the database and its connection, not the statement.
    return isinstance(exc, (OperationalError, InterfaceError)) or isinstance(
        orig, (sqlite3.OperationalError, sqlite3.InterfaceError)
    )


def _cause(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        cause = str(exc.orig)
        statement = " ".join((exc.statement or "").split())
        if statement:
            cause += f" [{statement[:160]}]"
        return cause
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc) or type(exc).__name__


def unavailable(exc: BaseException, store: str) -> Unavailable:
    """The ``unavailable`` answer for a storage failure of ``store`` (``"user
    database"``, ``"file storage"``…), logged here once; raise it ``from exc``."""
    logger.warning("%s unavailable: %s", store, _cause(exc))
    return Unavailable(f"{store} unavailable")
