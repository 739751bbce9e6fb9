"""The database a benchmark's server runs on (``--db``), and that database server's CPU.

``--db sqlite`` (the default) is the embedded deployment: one SQLite file per service
in the server's data directory. ``--db postgresql`` and ``--db mariadb`` create a
fresh database on the local server for the run (``imserver_bench_<pid>_<random>``;
``CHARACTER SET utf8mb4 COLLATE utf8mb4_bin`` on MariaDB, as the tests create theirs),
give the server ``storage.url`` naming it (every service's tables in it, created by
the services' migrations when the server starts), and drop it after the run.

The servers: PostgreSQL on 127.0.0.1:5432 as ``postgres`` and MariaDB on
127.0.0.1:3306 as ``root``; ``IMS_BENCH_POSTGRES`` and ``IMS_BENCH_MARIADB`` give
other administrator URLs.

The database server's CPU (:class:`DatabaseMeter`) is read from ``/proc`` like the
IMServer process's: PostgreSQL runs a process per connection, named ``postgres``;
MariaDB one process, ``mariadbd`` (``mysqld`` on older packages). ``ours`` sums the
PostgreSQL processes that serve this run: the backends connected to the run's
database and the server's own processes (WAL writer, checkpointer, background
writer...); backends of other databases, which other work on the machine may be
using, are left out of it but counted in ``all``. MariaDB's one process cannot be
split by database, so there ``ours`` is ``all``. On PostgreSQL the meter also reads
the run's database's committed transactions (``pg_stat_database.xact_commit``), so a
run reports how many messages the writer committed per transaction.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.engine import make_url

from benchmarks import harness
from imserver.storage import servers
from imserver.storage.servers import run_blocking

DIALECTS: Final = ("sqlite", "postgresql", "mariadb")
SERVERS: Final = {
    "postgresql": os.environ.get(
        "IMS_BENCH_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get(
        "IMS_BENCH_MARIADB", "mysql+asyncmy://root@127.0.0.1:3306/mysql?charset=utf8mb4"
    ),
}
"""The administrator's URL of each server (its database only serves to create and
drop the run's database)."""

PROCESS_NAMES: Final = {"postgresql": ("postgres",), "mariadb": ("mariadbd", "mysqld")}
"""The names (``/proc/<pid>/comm``) of each database server's processes."""

_PG_BACKEND = re.compile(r"\[local\]|\(\d+\)")
"""A PostgreSQL client backend's title names its client: ``host(port)`` or ``[local]``."""


def add_arguments(parser: Any) -> None:
    """``--db`` and ``--floor`` (for the scenarios that store messages)."""
    group = parser.add_argument_group("database")
    group.add_argument(
        "--db",
        choices=DIALECTS,
        default="sqlite",
        help="where the server stores its data: sqlite (one file per service, the default) "
        "or a fresh database on the local postgresql / mariadb server, dropped after",
    )
    group.add_argument(
        "--floor",
        action="store_true",
        help="after the run, the database floor: a bare group-commit loop of message rows "
        "with the same driver, in the run's database (benchmarks.dbfloor)",
    )


# --- the run's database -----------------------------------------------------------------


@dataclass(frozen=True)
class RunDatabase:
    """A fresh database on a server, for one run."""

    dialect: str
    name: str
    url: str
    """The server's URL naming this database, with the driver IMServer uses."""

    def settings(self) -> dict[str, Any]:
        """The server settings that put every service's data in it."""
        return {"storage": {"url": self.url}}


async def admin(dialect: str, statements: list[str], *, database: str | None = None) -> None:
    """Run ``statements`` as the server's administrator (in ``database``, if given)."""
    await servers.admin(SERVERS[dialect], statements, database=database)


@contextlib.contextmanager
def fresh_database(dialect: str, label: str = "bench") -> Iterator[RunDatabase | None]:
    """A new database on ``dialect``'s server for the ``with`` block, dropped after;
    ``None`` for SQLite (the server's own files). Raises :class:`RuntimeError` when
    the server does not answer."""
    if dialect == "sqlite":
        yield None
        return
    if dialect not in SERVERS:
        raise ValueError(f"unknown database {dialect!r}: choose from {DIALECTS}")
    name = f"imserver_{label}_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        run_blocking(admin(dialect, [servers.create_statement(dialect, name)]))
    except (OSError, TimeoutError, ImportError) as exc:
        shown = make_url(SERVERS[dialect]).render_as_string(hide_password=True)
        raise RuntimeError(f"{dialect} server not reachable at {shown}: {exc}") from exc
    try:
        yield RunDatabase(dialect, name, servers.database_url(SERVERS[dialect], name))
    finally:
        run_blocking(admin(dialect, [servers.drop_statement(dialect, name)]))


# --- the database server's CPU ----------------------------------------------------------


def server_processes(dialect: str) -> list[int]:
    """The process ids of ``dialect``'s server on this machine."""
    names = PROCESS_NAMES[dialect]
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        if comm in names:
            out.append(int(entry))
    return out


def serves_run(title: str, database: str) -> bool:
    """Whether the PostgreSQL process titled ``title`` works for a run on ``database``:
    a backend connected to it, or one of the server's own processes (not a client
    backend of another database)."""
    if not _PG_BACKEND.search(title):
        return True
    return f" {database} " in f"{title} "


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class DatabaseMeter:
    """The CPU of the database server's processes, and (PostgreSQL) the run's commits."""

    def __init__(self, db: RunDatabase) -> None:
        """Meter the server of ``db``."""
        self.db = db

    def sample(self) -> dict[str, float]:
        """``ours`` and ``all`` CPU seconds so far (see the module docstring), and on
        PostgreSQL ``commits``: the run's database's committed transactions so far."""
        ours = every = 0.0
        for pid in server_processes(self.db.dialect):
            try:
                cpu = harness.proc_cpu_seconds(pid)
            except OSError:
                continue  # the process just ended
            every += cpu
            if self.db.dialect != "postgresql":
                ours += cpu
                continue
            if serves_run(_title(pid), self.db.name):
                ours += cpu
        out = {"ours": ours, "all": every}
        if self.db.dialect == "postgresql":
            with contextlib.suppress(OSError, TimeoutError):
                out["commits"] = float(run_blocking(self._commits()))
        return out

    async def _commits(self) -> int:
        import asyncpg

        url = make_url(SERVERS["postgresql"])
        pg = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password,
            database=url.database, timeout=5,
        )  # fmt: skip
        try:
            value = await pg.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.db.name
            )
        finally:
            await pg.close()
        return int(value or 0)


def idle_rate(meter: harness.DatabaseSampler | None, seconds: float = 2.0) -> float | None:
    """The database server's CPU (``ours``, % of one core) over ``seconds`` while this
    run sends nothing: the work of others on a shared server, which the figures of
    the run include (all of it on MariaDB). ``None`` on SQLite."""
    if meter is None:
        return None
    a = meter.sample()
    t0 = time.monotonic()
    time.sleep(seconds)
    b = meter.sample()
    return 100.0 * (b["ours"] - a["ours"]) / (time.monotonic() - t0)


def per_message(
    a: harness.CpuSnapshot, b: harness.CpuSnapshot, messages: int
) -> dict[str, float | None]:
    """The database server's CPU per message between two snapshots (µs), ``ours`` and
    ``all``, with the commits and messages per commit where known; empty for SQLite."""
    if not a.database or not b.database:
        return {}

    def delta(key: str) -> float | None:
        if key not in a.database or key not in b.database:
            return None
        return b.database[key] - a.database[key]

    wall = b.wall - a.wall
    ours, every, commits = delta("ours"), delta("all"), delta("commits")
    out: dict[str, float | None] = {
        "db_pct": 100.0 * ours / wall if ours is not None and wall > 0 else None,
        "db_us_per_msg": 1e6 * ours / messages if ours is not None and messages else None,
        "db_all_us_per_msg": 1e6 * every / messages if every is not None and messages else None,
    }
    if commits is not None:
        out["db_commits"] = commits
        out["msgs_per_commit"] = messages / commits if commits > 0 else None
    return out


def meter(db: RunDatabase | None) -> DatabaseMeter | None:
    """The meter of ``db``'s server (``None`` on SQLite)."""
    return DatabaseMeter(db) if db is not None else None


def settings(db: RunDatabase | None) -> dict[str, Any]:
    """The server settings for ``db`` (none on SQLite)."""
    return db.settings() if db is not None else {}


def add_rows(report: harness.Report, figures: dict[str, Any], unit: str = "message") -> None:
    """The database server's rows of a results table, from :func:`per_message`."""
    if figures.get("db_pct") is None:
        return
    idle = figures.get("db_idle_pct")
    before = f" (before the load: {idle:.0f}%)" if idle is not None else ""
    report.add("DB server CPU (% of one core)", f"{figures['db_pct']:.0f}%{before}")
    ours, every = figures.get("db_us_per_msg"), figures.get("db_all_us_per_msg")
    if ours is not None:
        shown = f"{ours:.1f}" + (f" (all its processes {every:.1f})" if every != ours else "")
        report.add(f"DB server CPU per {unit} (µs)", shown)
    if figures.get("msgs_per_commit") is not None:
        report.add(
            "DB commits / messages per commit",
            f"{figures['db_commits']:,.0f} / {figures['msgs_per_commit']:.1f}",
        )


def floor_after(
    args: Any, db: RunDatabase | None, batch: float | None = None
) -> list[dict[str, float]] | None:
    """With ``--floor`` on a server: :func:`benchmarks.dbfloor.run_floor` in the run's
    database at its usual batch sizes and at ``batch`` (the messages per commit the
    run's writer reached, where known), printed; else ``None``."""
    if db is None or not getattr(args, "floor", False):
        return None
    from benchmarks import dbfloor

    sizes = set(dbfloor.BATCHES)
    if batch is not None and batch >= 1:
        sizes.add(round(batch))
    harness.console.print("[dim]database floor ...[/dim]")
    idle = idle_rate(DatabaseMeter(db))
    rows = dbfloor.run_floor(db, sorted(sizes))
    for row in rows:
        row["db_idle_pct"] = idle if idle is not None else float("nan")
    dbfloor.print_floor(db, rows)
    return rows


__all__ = [
    "DIALECTS",
    "DatabaseMeter",
    "RunDatabase",
    "add_arguments",
    "add_rows",
    "floor_after",
    "fresh_database",
    "idle_rate",
    "meter",
    "per_message",
    "server_processes",
    "serves_run",
    "settings",
]
