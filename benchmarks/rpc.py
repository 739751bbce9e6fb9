"""``python -m benchmarks rpc`` -- the cost of a call between services over gRPC.

Two calls, each answered by real services over SQLite:

- ``UserService.get_user`` of a cached user (the call's own work is a dict
  look-up, so what is measured is the crossing: one unary RPC);
- ``MessageService.send`` of a direct message (the message service checks the
  sender's blocks through the user service and stores the message; the call
  crosses on the ordered writes stream, many sends in one stream message).

Over ``grpc`` both services run in a server process of their own, served by
:func:`imserver.rpc.server.make_server`, and this process calls them through
:func:`imserver.rpc.client.grpc_client`; over ``local`` this process calls the same
services directly (the embedded mode's baseline).

Each cell runs ``--duration`` seconds with ``--concurrency`` callers (and again with
one) and reports calls/s, p50 and p99 latency, and the CPU per call of the client
process and of the server process (``getrusage`` of each, every thread included).
``--runs`` repeats every cell and reports the median of each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import harness
from imserver.protocol import ops
from imserver.protocol.convs import direct_conv
from imserver.services.caller import Caller
from imserver.services.message.api import MessageService
from imserver.services.message.service import open_message_service
from imserver.services.user.api import UserService
from imserver.services.user.service import open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.utils.errors import Conflict
from imserver.utils.ids import LoginId, UserId

USERNAMES = ("rpcbench-a", "rpcbench-b")


def default_procs() -> int:
    """One client process (this one)."""
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rpc`` sub-command's options."""
    parser.add_argument(
        "--concurrency", type=int, default=64, help="callers at once (default 64; 1 also runs)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each cell (default 3)")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _open(data_dir: Path) -> tuple[Any, Any]:
    """The user and message services on ``data_dir`` (the message service asks the
    user service for blocks and names)."""
    users = await open_user_service(
        sqlite_url(data_dir, "user"), argon2_memory_kib=8, argon2_time_cost=1
    )
    messages = await open_message_service(
        sqlite_url(data_dir, "message"), bus=MemoryLiveBus(), users=users
    )
    return users, messages


async def _accounts(users: Any) -> tuple[UserId, UserId]:
    made = []
    for name in USERNAMES:
        try:
            made.append(UserId((await users.register(name, "password-of-the-bench", None)).id))
        except Conflict:
            made.append(UserId((await users.get_user_by_name(name)).id))
    return made[0], made[1]


def _serve(data_dir: str, conn: Connection) -> None:
    """The server process: the user service behind gRPC; answers ``cpu`` and ``stop``."""

    async def main() -> None:
        from imserver.rpc.server import make_server

        users, messages = await _open(Path(data_dir))
        server = make_server((UserService, users), (MessageService, messages))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "cpu":
                conn.send(_cpu())
            else:
                break
        await server.stop(None)
        await messages.close()
        await users.close()

    asyncio.run(main())


def _calls(users: Any, messages: Any, a: UserId, b: UserId) -> dict[str, Callable[[], Any]]:
    """Each measured call, ready to make (a fresh ``cid`` per send)."""
    caller = Caller(a, LoginId("bench-login"))
    conv = direct_conv(a, b)
    cids = itertools.count()
    return {
        "get_user": lambda: users.get_user(b),
        "send": lambda: messages.send(
            caller, ops.Send(conv=conv, cid=f"c{next(cids)}", type="text", body="hello")
        ),
    }


async def _cell(
    call: Callable[[], Any], concurrency: int, duration: float
) -> tuple[int, list[int], float]:
    """Calls made, their latencies (ns) and this process's CPU seconds."""
    latencies: list[int] = []
    stop = time.monotonic() + duration

    async def caller() -> None:
        while time.monotonic() < stop:
            start = time.perf_counter_ns()
            await call()
            latencies.append(time.perf_counter_ns() - start)

    for _ in range(200):  # warm the path (the first calls open connections, fill caches)
        await call()
    cpu = _cpu()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies, _cpu() - cpu


def _row(
    name: str,
    transport: str,
    concurrency: int,
    duration: float,
    calls: int,
    lat: list[int],
    client: float,
    server: float | None,
) -> dict[str, Any]:
    lat.sort()
    return {
        "call": name,
        "transport": transport,
        "concurrency": concurrency,
        "calls_per_s": calls / duration,
        "p50_us": harness.percentile(lat, 50) * 1000,
        "p99_us": harness.percentile(lat, 99) * 1000,
        "client_cpu_us": client / calls * 1e6,
        "server_cpu_us": None if server is None else server / calls * 1e6,
    }


async def _measure(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    from imserver.rpc.client import grpc_client
    from imserver.rpc.upstream import StaticUpstream

    local_dir, remote_dir = data_dir / "local", data_dir / "remote"
    local_dir.mkdir()
    remote_dir.mkdir()
    users, messages = await _open(local_dir)
    a, b = await _accounts(users)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(str(remote_dir), child), daemon=True)
    process.start()
    port = parent.recv()
    upstream = StaticUpstream(f"127.0.0.1:{port}")
    remote_users = grpc_client(UserService, upstream)
    ra, rb = await _accounts(remote_users)
    local_calls = _calls(users, messages, a, b)
    remote_calls = _calls(remote_users, grpc_client(MessageService, upstream), ra, rb)
    rows: list[dict[str, Any]] = []
    for _ in range(args.runs):
        for name in local_calls:
            for concurrency in sorted({1, args.concurrency}):
                calls, lat, cpu = await _cell(local_calls[name], concurrency, args.duration)
                rows.append(_row(name, "local", concurrency, args.duration, calls, lat, cpu, None))
                parent.send("cpu")
                before = parent.recv()
                calls, lat, cpu = await _cell(remote_calls[name], concurrency, args.duration)
                parent.send("cpu")
                server = parent.recv() - before
                rows.append(_row(name, "grpc", concurrency, args.duration, calls, lat, cpu, server))
    parent.send("stop")
    process.join(10)
    await upstream.close()
    await messages.close()
    await users.close()
    return rows


def _median(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (call, callers, transport): the median of each figure over the runs."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["call"], row["concurrency"], row["transport"]), []).append(row)
    out = []
    for (name, concurrency, transport), runs in cells.items():
        merged: dict[str, Any] = {"call": name, "transport": transport, "concurrency": concurrency}
        for key in ("calls_per_s", "p50_us", "p99_us", "client_cpu_us", "server_cpu_us"):
            values = [r[key] for r in runs if r[key] is not None]
            merged[key] = statistics.median(values) if values else None
        out.append(merged)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| call | transport | callers | calls/s | p50 µs | p99 µs "
        "| client CPU µs/call | server CPU µs/call |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        server = "—" if r["server_cpu_us"] is None else f"{r['server_cpu_us']:.0f}"
        lines.append(
            f"| {r['call']} | {r['transport']} | {r['concurrency']} | {r['calls_per_s']:,.0f} | "
            f"{r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['client_cpu_us']:.1f} | {server} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the scenario; prints the table (medians of ``--runs``)."""
    if args.concurrency < 1 or args.runs < 1:
        raise SystemExit("--concurrency and --runs must be positive")
    with tempfile.TemporaryDirectory(prefix="imserver-rpc-bench-") as tmp:
        rows = asyncio.run(_measure(args, Path(tmp)))
    medians = _median(rows)
    title = (
        f"UserService.get_user and MessageService.send (a DM), {args.duration:g} s per "
        f"cell, median of {args.runs} (local: the CPU of the one process)"
    )
    print(title)
    print(_table(medians))
    path = harness.write_results(
        "rpc", {"environment": harness.environment(), "runs": rows, "medians": medians}
    )
    print(f"results: {path}")
    return 0
