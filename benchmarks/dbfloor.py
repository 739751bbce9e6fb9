"""The database floor on PostgreSQL and MariaDB: a bare group-commit loop of message rows.

What storing direct messages costs the database server and its driver alone, with
nothing of IMServer around it: one connection, with the driver the server uses
(asyncpg / asyncmy), commits batches of new message rows into the real ``messages``
table (created by the message service's migrations), one transaction per batch, as
the message writer does on a server (:mod:`imserver.services.message.counters`):

1. lock the counter rows of the batch's conversations (``conv_seqs``, ``SELECT ...
   FOR UPDATE``);
2. insert the rows (asyncpg's pipelined ``executemany``; asyncmy's multi-row
   ``INSERT``), on MariaDB with the folded words in ``search_text`` (PostgreSQL
   computes its ``tsvector`` column itself); ``--search update`` writes them as the
   store does instead: the rows read back after the insert and one ``UPDATE`` each;
3. write the new last seqs back in one statement;
4. commit.

It prints, for each batch size, rows per second, the client's CPU per row (this
process: the driver and the loop) and the database server's CPU per row (its
processes, as :class:`benchmarks.databases.DatabaseMeter` counts them). The server's
figures over a run cannot be lower than these at the same batch size.

It runs after ``dm``/``room --db ... --floor`` in the run's database, or on its own
in a fresh one (the message migrations applied first)::

    .venv/bin/python -m benchmarks.dbfloor --db postgresql
    .venv/bin/python -m benchmarks.dbfloor --db mariadb --batch 32 128 --seconds 5
    .venv/bin/python -m benchmarks.dbfloor --db mariadb --search update
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy.engine import make_url

from benchmarks import databases, harness
from imserver.services.message.search import fold
from imserver.storage.sql import upgrade_sync

BATCHES: Final = (16, 64, 256)
CONVS: Final = 16
BODY: Final = "x" * 32

PG_LOCK: Final = (
    "SELECT conv, last_seq FROM conv_seqs WHERE conv = ANY($1::varchar[]) ORDER BY conv FOR UPDATE"
)
PG_INSERT: Final = (
    "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, edited, recalled) "
    "VALUES ($1, $2, $3, $4, 'text', $5, $6, false, false)"
)
PG_STORE: Final = (
    "UPDATE conv_seqs AS c SET last_seq = u.s "
    "FROM unnest($1::varchar[], $2::bigint[]) AS u(conv, s) WHERE c.conv = u.conv"
)
MY_LOCK: Final = "SELECT conv, last_seq FROM conv_seqs WHERE conv IN %s ORDER BY conv FOR UPDATE"
MY_INSERT: Final = (
    "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, edited, recalled, "
    "search_text) VALUES (%s, %s, %s, %s, 'text', %s, %s, 0, 0, %s)"
)
MY_INSERT_BARE: Final = (
    "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, edited, recalled) "
    "VALUES (%s, %s, %s, %s, 'text', %s, %s, 0, 0)"
)
MY_NEW: Final = "SELECT id, body FROM messages WHERE id > %s AND type = 'text' AND recalled = 0"
MY_SET_TEXT: Final = "UPDATE messages SET search_text = %s WHERE id = %s"
MY_STORE: Final = (
    "INSERT INTO conv_seqs (conv, last_seq) VALUES (%s, %s) "
    "ON DUPLICATE KEY UPDATE last_seq = VALUES(last_seq)"
)


class _Rows:
    """New message rows over ``convs`` direct conversations of fresh users."""

    def __init__(self, convs: int) -> None:
        run = secrets.token_hex(4)
        self.users = [f"floor{run}u{i:04d}" for i in range(2 * convs)]
        self.convs = sorted(f"d:{self.users[2 * i]}:{self.users[2 * i + 1]}" for i in range(convs))
        self.seqs = dict.fromkeys(self.convs, 0)
        self.n = 0

    def batch(self, size: int) -> tuple[list[str], list[tuple[Any, ...]]]:
        """The conversations (sorted) and rows ``(conv, sender, ts, body, cid)`` of a batch;
        seqs are given by the loop from the locked counters."""
        ts = time.time_ns() // 1_000_000
        rows = []
        touched: set[str] = set()
        for _ in range(size):
            c = self.n % len(self.convs)
            conv = self.convs[c]
            sender = self.users[2 * c]
            rows.append((conv, sender, ts, BODY, f"f{self.n}"))
            touched.add(conv)
            self.n += 1
        return sorted(touched), rows


async def _pg_loop(
    db: databases.RunDatabase, sizes: Sequence[int], seconds: float, meter: Any
) -> list[dict[str, float]]:
    import asyncpg

    url = make_url(db.url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        database=db.name,
    )  # fmt: skip
    rows = _Rows(CONVS)
    await conn.executemany(
        "INSERT INTO conv_seqs (conv, last_seq) VALUES ($1, 0)", [(c,) for c in rows.convs]
    )

    async def one(size: int) -> None:
        convs, batch = rows.batch(size)
        async with conn.transaction():
            last = {r["conv"]: r["last_seq"] for r in await conn.fetch(PG_LOCK, convs)}
            out = []
            for conv, sender, ts, body, cid in batch:
                last[conv] += 1
                out.append((conv, last[conv], sender, ts, body, cid))
            await conn.executemany(PG_INSERT, out)
            await conn.execute(PG_STORE, convs, [last[c] for c in convs])

    try:
        return [await _measure(one, size, seconds, meter) for size in sizes]
    finally:
        await conn.close()


async def _my_loop(
    db: databases.RunDatabase,
    sizes: Sequence[int],
    seconds: float,
    meter: Any,
    search: str = "insert",
) -> list[dict[str, float]]:
    import asyncmy

    url = make_url(db.url)
    conn = await asyncmy.connect(
        host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root",
        password=url.password or "", database=db.name, charset="utf8mb4", autocommit=True,
    )  # fmt: skip
    rows = _Rows(CONVS)
    async with conn.cursor() as cur:
        await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        await cur.executemany(MY_STORE, [(c, 0) for c in rows.convs])

    async def one(size: int) -> None:
        convs, batch = rows.batch(size)
        await conn.begin()
        try:
            async with conn.cursor() as cur:
                await cur.execute(MY_LOCK, (tuple(convs),))
                last = {conv: int(seq) for conv, seq in await cur.fetchall()}
                out = []
                for conv, sender, ts, body, cid in batch:
                    last[conv] += 1
                    out.append((conv, last[conv], sender, ts, body, cid))
                if search == "insert":
                    await cur.executemany(MY_INSERT, [(*row, fold(row[4])) for row in out])
                else:
                    await cur.execute("SELECT COALESCE(MAX(id), 0) FROM messages")
                    ((after,),) = await cur.fetchall()
                    await cur.executemany(MY_INSERT_BARE, out)
                    await cur.execute(MY_NEW, (after,))
                    new = await cur.fetchall()
                    await cur.executemany(MY_SET_TEXT, [(fold(b), i) for i, b in new])
                await cur.executemany(MY_STORE, [(c, last[c]) for c in convs])
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise

    try:
        return [await _measure(one, size, seconds, meter) for size in sizes]
    finally:
        conn.close()


async def _measure(one: Any, size: int, seconds: float, meter: Any) -> dict[str, float]:
    for _ in range(3):
        await one(size)  # warm the statements and the pages
    done = 0
    db0 = meter.sample()
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        await one(size)
        done += size
    cpu1, t1 = time.process_time(), time.monotonic()
    db1 = meter.sample()
    return {
        "batch": size,
        "rows": done,
        "rows_per_s": done / (t1 - t0),
        "client_us_per_row": 1e6 * (cpu1 - cpu0) / done,
        "db_us_per_row": 1e6 * (db1["ours"] - db0["ours"]) / done,
        "db_all_us_per_row": 1e6 * (db1["all"] - db0["all"]) / done,
    }


def run_floor(
    db: databases.RunDatabase,
    sizes: Sequence[int] = BATCHES,
    seconds: float = 3.0,
    search: str = "insert",
) -> list[dict[str, float]]:
    """The floor in ``db`` (whose message tables exist), one row per batch size.
    ``search`` (MariaDB): ``insert`` puts the folded words in the ``INSERT``;
    ``update`` writes them as the store does today, reading the new rows back and
    updating ``search_text`` one statement per row after the insert."""
    meter = databases.DatabaseMeter(db)
    if db.dialect == "postgresql":
        coro = _pg_loop(db, sizes, seconds, meter)
    else:
        coro = _my_loop(db, sizes, seconds, meter, search)
    result: list[dict[str, float]] = databases.run_blocking(coro)
    return result


def print_floor(db: databases.RunDatabase, floor: Sequence[dict[str, float]]) -> None:
    """The floor as a table."""
    harness.console.print(
        f"database floor on {db.dialect} (one connection, lock counters + insert + "
        "update + commit per batch):"
    )
    harness.console.print(
        f"{'batch':>6} {'rows/s':>10} {'client µs/row':>14} {'db µs/row':>10} {'db all µs/row':>14}"
    )
    idle = floor[0].get("db_idle_pct") if floor else None
    if idle is not None:
        harness.console.print(f"(the database server before the floor: {idle:.0f}% of a core)")
    for row in floor:
        harness.console.print(
            f"{row['batch']:>6.0f} {row['rows_per_s']:>10,.0f} {row['client_us_per_row']:>14.1f} "
            f"{row['db_us_per_row']:>10.1f} {row['db_all_us_per_row']:>14.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the floor in a fresh database (the message migrations applied first)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dbfloor", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--db", choices=("postgresql", "mariadb"), required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument(
        "--search",
        choices=("insert", "update"),
        default="insert",
        help="MariaDB: search_text in the INSERT (default), or one UPDATE per row after "
        "it, as the message store writes it",
    )
    args = parser.parse_args(argv)
    with databases.fresh_database(args.db, "floor") as db:
        assert db is not None
        upgrade_sync(db.url, "imserver.services.message.migrations")
        floor = run_floor(db, args.batch, args.seconds, args.search)
    print_floor(db, floor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
