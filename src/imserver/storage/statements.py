"""Core statements compiled once and run through the driver, for hot store paths.

A store operation that runs on every batch or every page cannot afford SQLAlchemy's
per-execution statement building and cache-key walk: :class:`DriverStatement`
compiles a Core statement once per dialect, :class:`KeyLookup` fetches rows by many
composite keys with one statement per size class. Shared by every service's store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, bindparam, or_, select

K = TypeVar("K")

CHUNK = 300
"""Values per ``IN`` list: far below every engine's bound-parameter limit."""


def chunks(items: Sequence[K], size: int = CHUNK) -> Iterable[Sequence[K]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DriverStatement:
    """A Core statement compiled once per dialect, then run with ``exec_driver_sql``.

    The hot statements of a batch (the idempotency lookup, the message insert) would
    otherwise pay SQLAlchemy's per-execution cache-key walk and per-row parameter
    processing, a third of the batch's cost. Their parameters are plain str/int/bool/
    None, which every driver takes as they are, so nothing is lost by skipping it.
    """

    def __init__(self, stmt: Any, column_keys: Sequence[str] | None = None) -> None:
        self._stmt = stmt
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._compiled: dict[str, tuple[str, list[str] | None]] = {}

    def _compile(self, conn: Connection) -> tuple[str, list[str] | None]:
        name = conn.dialect.name
        found = self._compiled.get(name)
        if found is None:
            kw: dict[str, Any] = {}
            if self._column_keys is not None:
                kw["column_keys"] = self._column_keys
            compiled = self._stmt.compile(dialect=conn.dialect, **kw)
            order = list(compiled.positiontup) if compiled.positional else None
            found = (compiled.string, order)
            self._compiled[name] = found
        return found

    def execute(self, conn: Connection, values: dict[str, Any]) -> Any:
        """Execute with named ``values``; returns the cursor result."""
        sql_text, order = self._compile(conn)
        if order is not None:
            return conn.exec_driver_sql(sql_text, tuple(values[n] for n in order))
        return conn.exec_driver_sql(sql_text, values)

    def executemany(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Execute once per row; each row is a tuple in ``column_keys`` order."""
        assert self._column_keys is not None
        sql_text, order = self._compile(conn)
        keys = self._column_keys
        if order is not None:
            if order != keys:
                index = [keys.index(n) for n in order]
                rows = [tuple(row[i] for i in index) for row in rows]
            conn.exec_driver_sql(sql_text, list(rows))
        else:
            conn.exec_driver_sql(sql_text, [dict(zip(keys, row, strict=True)) for row in rows])


class KeyLookup:
    """``SELECT cols WHERE (k1 = ? AND k2 = ?) OR (...) ...`` for many composite keys.

    Row-value ``IN`` would say the same, but SQLite answers ``(a, b) IN (VALUES ...)``
    with a full scan, while an ``OR`` of equalities is one index probe per key on
    every engine. The statement has a fixed number of terms per size class (keys are
    padded by repeating the last one), so each size is compiled once.
    """

    SIZES = (4, 32, 256)

    def __init__(self, cols: Sequence[Any], key_cols: Sequence[Any]) -> None:
        self._cols = list(cols)
        self._key_cols = list(key_cols)
        self._stmts: dict[int, DriverStatement] = {}

    def _stmt(self, size: int) -> DriverStatement:
        stmt = self._stmts.get(size)
        if stmt is None:
            terms = [
                and_(*(col == bindparam(f"k{i}_{j}") for j, col in enumerate(self._key_cols)))
                for i in range(size)
            ]
            stmt = DriverStatement(select(*self._cols).where(or_(*terms)))
            self._stmts[size] = stmt
        return stmt

    def fetch(self, conn: Connection, keys: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The rows matching any of ``keys`` (each row once, in no particular order)."""
        found: list[Any] = []
        for chunk in chunks(keys, self.SIZES[-1]):
            size = next(n for n in self.SIZES if n >= len(chunk))
            padded = list(chunk) + [chunk[-1]] * (size - len(chunk))
            params = {f"k{i}_{j}": v for i, key in enumerate(padded) for j, v in enumerate(key)}
            found.extend(self._stmt(size).execute(conn, params))
        return found
