"""Scenario ``broadcast``: an admin's ``notice.broadcast`` to every user.

A fresh server's data directory is given ``--users`` accounts and one admin before the
server starts (:func:`imserver.testing.accounts.bulk_register`: one transaction, one
shared password hash; registering 10,000 accounts over the wire would measure
argon2, not broadcasts). ``--live`` of them log in over WebSocket and stay connected.
The admin then sends ``--repeat`` broadcasts with ``to: "all"``, one after another,
each with its own ``cid``, and waits for each reply: the reply comes once every
notice is committed and published, so its round trip is the broadcast's time.

Measured per broadcast: seconds from request to reply, notices/s (users reached over
those seconds), and server CPU seconds over the same interval (and as % of one core,
beside the throughput). Verified: each reply reached every user (the admin too), each
live session got each notice exactly once, and after the server stops, ``message.db``
holds exactly ``--repeat`` notices in every user's ``s:`` conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any, Final

from benchmarks import harness
from imserver.client import Client
from imserver.testing.accounts import bulk_register
from imserver.utils.config import AuthConfig

SCENARIO: Final = "broadcast"
ADMIN: Final = "bench_admin"
AUTH: Final = AuthConfig(argon2_memory_kib=1024, argon2_time_cost=1)
SERVER_CONFIG: Final[dict[str, Any]] = {
    "admins": [ADMIN],
    "limits": {"rate_per_s": 1e9, "rate_burst": 1_000_000},
    # The live sessions log in with the bulk accounts' password: cheap hashes.
    "auth": {
        "argon2_memory_kib": AUTH.argon2_memory_kib,
        "argon2_time_cost": AUTH.argon2_time_cost,
    },
}
REPLY_TIMEOUT_S: Final = 300.0


def default_procs() -> int:
    """One client process: the admin and the live sessions run in the parent."""
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``broadcast`` sub-command's options."""
    parser.add_argument("--users", type=int, default=10_000, help="users (default 10,000)")
    parser.add_argument(
        "--live", type=int, default=100, help="users connected over WebSocket (default 100)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="broadcasts sent (default 3)")


async def _measure(
    server: harness.ServerProcess, names: list[str], live: int, repeat: int, drain: float
) -> dict[str, Any]:
    admin = await Client.connect(server.ws_url)
    await admin.login(ADMIN, harness.PASSWORD)
    sessions = []
    for name in names[:live]:
        c = await Client.connect(server.ws_url)
        await c.login(name, harness.PASSWORD)
        sessions.append(c)
    runs: list[dict[str, Any]] = []
    try:
        for n in range(repeat):
            body = f"notice {n}: maintenance at 02:00 UTC"
            cpu0, t0 = harness.proc_cpu_seconds(server.pid), time.perf_counter()
            reply = await admin.request(
                "notice.broadcast",
                {"body": body, "to": "all", "cid": f"bench-{n}"},
                timeout=REPLY_TIMEOUT_S,
            )
            seconds = time.perf_counter() - t0
            cpu = harness.proc_cpu_seconds(server.pid) - cpu0
            runs.append(
                {
                    "seconds": seconds,
                    "reached": reply["reached"],
                    "dup": reply["dup"],
                    "notices_per_s": reply["reached"] / seconds,
                    "server_cpu_s": cpu,
                    "server_cpu_pct": 100 * cpu / seconds,
                }
            )
        received = [0] * len(sessions)
        for i, c in enumerate(sessions):
            for _ in range(repeat):
                with_notice = await c.next_event(
                    "msg", match=lambda e: e.get("from") == "system", timeout=drain
                )
                received[i] += with_notice.get("type") == "system"
    finally:
        await asyncio.gather(admin.close(), *(c.close() for c in sessions))
    return {"runs": runs, "live_received": received}


def _stored(data_dir: Path) -> dict[str, int]:
    """``s:`` conversation -> notices it holds, read from the stopped server's message.db."""
    with sqlite3.connect(data_dir / "message.db") as db:
        rows = db.execute(
            "SELECT conv, count(*) FROM messages WHERE conv LIKE 's:%' GROUP BY conv"
        ).fetchall()
    return {conv: n for conv, n in rows}


def run(args: argparse.Namespace) -> int:
    """Run the scenario; returns the exit status (0 = ran and verified)."""
    if args.users < 1 or args.repeat < 1 or not 0 <= args.live <= args.users:
        raise SystemExit("--users and --repeat must be positive, --live within 0..users")
    config = harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))
    stamp = harness.timestamp()
    report = harness.Report(title=f"broadcast: notice.broadcast to {args.users:,} users ({stamp})")
    names = [f"bench_{n:06d}" for n in range(args.users)]
    server = harness.ServerProcess(config, keep_dir=args.keep_data)
    try:
        server.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        created = asyncio.run(
            bulk_register(server.data_dir, [ADMIN, *names], harness.PASSWORD, AUTH)
        )
        setup_s = time.perf_counter() - t0
        with server:
            harness.console.print(f"[dim]server pid {server.pid} on {server.http_url}[/dim]")
            result = harness.run_async(
                _measure(server, names, args.live, args.repeat, args.drain_timeout),
                uvloop=not args.no_uvloop,
            )
            code = server.stop()
            stored = _stored(server.data_dir)
    finally:
        server.cleanup()
    if code != 0:
        report.failures.append(f"server exited with code {code}")
    runs = result["runs"]
    everyone = args.users + 1
    if any(r["reached"] != everyone or r["dup"] for r in runs):
        report.failures.append(f"a broadcast did not reach all {everyone:,} users once")
    if result["live_received"] != [args.repeat] * args.live:
        report.failures.append("a live session missed a notice or got one twice")
    if stored != {f"s:{u.id}": args.repeat for u in created}:
        report.failures.append("message.db does not hold one notice per user and broadcast")
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    cpu = statistics.median(r["server_cpu_s"] for r in runs)
    report.add("broadcast s (median)", f"{median:.2f} (best {min(seconds):.2f})")
    report.add("notices/s (median)", f"{everyone / median:,.0f}")
    report.add("server CPU s per broadcast", f"{cpu:.2f} ({100 * cpu / median:.0f}% of a core)")
    report.add("live sessions", f"{args.live} (each got {args.repeat} notices)")
    report.config.append(("users", f"{args.users:,} + 1 admin (bulk, {setup_s:.1f} s)"))
    report.config.append(("broadcasts", str(args.repeat)))
    out = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "results": {
            "users": everyone,
            "broadcast_s": median,
            "best_s": min(seconds),
            "notices_per_s": everyone / median,
            "server_cpu_s": cpu,
            "server_cpu_pct": 100 * cpu / median,
            "runs": runs,
            "live": args.live,
            "setup_s": setup_s,
        },
    }
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report)
    harness.console.print(f"[dim]results: {path}[/dim]")
    return 1 if report.failures else 0
