"""``python -m benchmarks dm --db postgresql|mariadb --floor``, tiny: the machinery.

The run's server stores its data in a fresh database on the local server, the
results carry the database server's CPU per message and the floor's rows, and the
database is gone afterwards. No timing assertions. A database server that does not
answer skips its run (fails under ``CI=true``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from benchmarks import databases

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150.0


def _reachable(dialect: str) -> None:
    try:
        databases.run_blocking(databases.admin(dialect, ["SELECT 1"]))
    except (OSError, TimeoutError, ImportError) as exc:
        reason = f"{dialect} server not reachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: every database must be tested)")
        pytest.skip(reason)


def _exists(dialect: str, name: str) -> bool:
    async def query() -> bool:
        url = make_url(databases.SERVERS[dialect])
        if dialect == "postgresql":
            import asyncpg

            pg = await asyncpg.connect(
                host=url.host, port=url.port, user=url.username, database=url.database
            )
            try:
                found = await pg.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            finally:
                await pg.close()
            return found is not None
        import asyncmy

        my = await asyncmy.connect(host=url.host, port=url.port, user=url.username)
        try:
            async with my.cursor() as cur:
                await cur.execute("SHOW DATABASES LIKE %s", (name,))
                return bool(await cur.fetchall())
        finally:
            my.close()

    return bool(databases.run_blocking(query()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmarks read /proc")
@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_dm_on_a_database_server(server: str, tmp_path: Path) -> None:
    dialect = server
    _reachable(dialect)
    results = tmp_path / "dm.json"
    cmd = [
        sys.executable, "-m", "benchmarks", "dm", "--db", dialect, "--floor",
        "--pairs", "2", "--window", "4", "--warmup", "0.5", "--duration", "1",
        "--no-progress", "--results-file", str(results),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    doc = json.loads(results.read_text())
    url = make_url(doc["server"]["config"]["storage"]["url"])
    assert url.get_backend_name() == ("postgresql" if dialect == "postgresql" else "mysql")
    assert url.database and url.database.startswith("imserver_bench_")
    assert not _exists(dialect, url.database), "the run's database was not dropped"

    cpu = doc["results"]["cpu"]
    assert doc["results"]["totals"]["acked"] > 0
    assert cpu["db_us_per_msg"] > 0
    assert cpu["db_all_us_per_msg"] >= cpu["db_us_per_msg"]
    if dialect == "postgresql":
        assert cpu["db_commits"] > 0
    floor = doc["database"]["floor"]
    assert {row["batch"] for row in floor} >= {16, 64, 256}
    for row in floor:
        assert row["rows"] > 0 and row["rows_per_s"] > 0
        assert row["client_us_per_row"] > 0 and row["db_us_per_row"] > 0
    assert "DB server CPU per message" in output
    assert "database floor on" in output


def test_sqlite_run_has_no_database_figures() -> None:
    with databases.fresh_database("sqlite") as db:
        assert db is None
    assert databases.settings(None) == {}
    assert databases.meter(None) is None


def test_postgres_processes_of_the_run() -> None:
    name = "imserver_bench_1_ab"
    assert databases.serves_run("postgres: 15/main: walwriter ", name)
    assert databases.serves_run("postgres: checkpointer", name)
    assert databases.serves_run(f"postgres: 15/main: postgres {name} 127.0.0.1(5050) idle", name)
    assert not databases.serves_run("postgres: 15/main: postgres test 127.0.0.1(5051) idle", name)
    assert not databases.serves_run(f"postgres: postgres {name}x [local] idle", name)
