"""What storing a direct message costs in SQLite alone, on the message service's schema.

Creates the message database with the service's own migrations and replays, through
``sqlite3`` directly (no SQLAlchemy, no service logic, no network), the statements
the group-commit writer runs per batch of new messages: ``MAX(id)``, the ``INSERT``
of the rows, the FTS5 index of the new rows and the commit (WAL,
``synchronous=FULL``, the store's pragmas; a passive checkpoint every second as the
store does). It prints the CPU per message of each step: the floor under the
server's CPU per message, since the server runs these same statements and more.

``--lookup`` adds the idempotency lookup (one ``OR`` of ``(conv, sender, cid)``
equalities) that the writer runs only for a batch that met a stored key it did not
have in memory (a resend after a restart), and that it ran for every batch before.

    .venv/bin/python benchmarks/bench_storage_floor.py
    .venv/bin/python benchmarks/bench_storage_floor.py --convs 16 128 --batch 32 128 --cids seq uuid
    .venv/bin/python benchmarks/bench_storage_floor.py --lookup
"""

from __future__ import annotations

import argparse
import itertools
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from imserver.storage.sql import SQLITE_PRAGMAS, sqlite_url, upgrade_sync

STEPS = ("max id", "insert", "fts", "commit")
LOOKUP_SIZES = (4, 32, 256)  # the store's KeyLookup size classes
INSERT = (
    "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, meta, reply_to, mentions,"
    " target, edited, recalled) VALUES (?, ?, ?, ?, 'text', ?, ?, NULL, NULL, NULL, NULL, 0, 0)"
)
FTS = (
    "INSERT INTO messages_fts(rowid, body) SELECT id, body FROM messages "
    "WHERE id > ? AND type = 'text' AND recalled = 0"
)


def lookup_sql(size: int) -> str:
    terms = " OR ".join(["(conv = ? AND sender = ? AND cid = ?)"] * size)
    return f"SELECT conv, sender, cid, seq, ts FROM messages WHERE {terms}"


def run(
    root: Path, convs: int, batch: int, cids: str, prefill: int, measure: int, lookup: bool
) -> list[float]:
    """CPU µs per message of each step, over ``measure`` messages after ``prefill``."""
    db_dir = root / f"c{convs}-b{batch}-{cids}"
    db_dir.mkdir()
    upgrade_sync(sqlite_url(db_dir, "message"), "imserver.services.message.migrations")
    db = sqlite3.connect(db_dir / "message.db", isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        db.execute(pragma)
    db.execute("PRAGMA wal_autocheckpoint=0")
    users = [f"u{i:06d}{uuid.uuid4().hex[:12]}" for i in range(2 * convs)]
    conv_ids = [f"d:{users[2 * i]}:{users[2 * i + 1]}" for i in range(convs)]
    seqs = [0] * convs
    counter = itertools.count()
    lookups = {size: lookup_sql(size) for size in LOOKUP_SIZES}
    steps = ("lookup", *STEPS) if lookup else STEPS
    totals = [0.0] * len(steps)
    last_checkpoint = time.monotonic()

    def one_batch(timed: bool) -> None:
        nonlocal last_checkpoint
        rows = []
        keys: list[str] = []
        ts = time.time_ns() // 1_000_000
        for _ in range(batch):
            n = next(counter)
            c = n % convs
            seqs[c] += 1
            sender = users[2 * c + (n // convs) % 2]
            cid = f"{sender[:7]}-{n}" if cids == "seq" else str(uuid.uuid4())
            rows.append((conv_ids[c], seqs[c], sender, ts, f"message {n} with a few words", cid))
            keys += (conv_ids[c], sender, cid)
        marks = [time.process_time()]
        db.execute("BEGIN IMMEDIATE")
        if lookup:
            for i in range(0, batch, LOOKUP_SIZES[-1]):
                chunk = keys[3 * i : 3 * (i + LOOKUP_SIZES[-1])]
                size = next(s for s in LOOKUP_SIZES if 3 * s >= len(chunk))
                chunk += chunk[-3:] * (size - len(chunk) // 3)
                assert not db.execute(lookups[size], chunk).fetchall()
            marks.append(time.process_time())
        last_id = db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
        marks.append(time.process_time())
        db.executemany(INSERT, rows)
        marks.append(time.process_time())
        db.execute(FTS, (last_id,))
        marks.append(time.process_time())
        db.execute("COMMIT")
        marks.append(time.process_time())
        if timed:
            for i in range(len(steps)):
                totals[i] += marks[i + 1] - marks[i]
        now = time.monotonic()
        if now - last_checkpoint >= 1.0:
            last_checkpoint = now
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    for _ in range(prefill // batch):
        one_batch(False)
    done = 0
    while done < measure:
        one_batch(True)
        done += batch
    stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert stored == next(counter), "every row stored"
    db.close()
    return [1e6 * t / done for t in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--convs", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--cids", choices=("seq", "uuid"), nargs="+", default=["seq", "uuid"])
    parser.add_argument("--prefill", type=int, default=100_000, help="rows before measuring")
    parser.add_argument("--measure", type=int, default=50_000, help="rows measured")
    parser.add_argument("--lookup", action="store_true", help="add the idempotency lookup step")
    args = parser.parse_args()
    steps = ("lookup", *STEPS) if args.lookup else STEPS
    head = f"{'convs':>6} {'batch':>6} {'cids':>5} " + " ".join(f"{s:>8}" for s in steps)
    print("CPU µs per message, by step")
    print(head + f" {'total':>8}")
    with tempfile.TemporaryDirectory(prefix="imserver-storage-floor-") as tmp:
        for convs, batch, cids in itertools.product(args.convs, args.batch, args.cids):
            per_step = run(Path(tmp), convs, batch, cids, args.prefill, args.measure, args.lookup)
            cells = " ".join(f"{v:>8.2f}" for v in per_step)
            print(f"{convs:>6} {batch:>6} {cids:>5} {cells} {sum(per_step):>8.2f}")


if __name__ == "__main__":
    main()
