"""Throughput of the message write path: sends persisted per second.

Pushes ``--messages`` sends through :class:`LocalMessageService` (group commit on a
real SQLite file, WAL, ``synchronous=FULL``) from ``--callers`` concurrent callers,
each awaiting its previous ack before sending the next message, like a client that
keeps one message in flight. Callers pair up in direct conversations (both sides
send); a live-bus subscriber counts the deliveries, and the totals are checked.

No network, sessions or codecs are in the way: the CPU per message it prints (the
whole process's, over the timed part, callers included) is what the message service
and its store cost on their own.

    .venv/bin/python benchmarks/bench_message_store.py --messages 50000 --callers 200
    .venv/bin/python benchmarks/bench_message_store.py --callers 50 200 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from imserver.protocol import ops
from imserver.protocol.convs import direct_conv
from imserver.protocol.models import User
from imserver.services.caller import Caller
from imserver.services.message.service import open_message_service
from imserver.storage.bus import MemoryLiveBus, Publication, user_channel
from imserver.storage.sql import sqlite_url
from imserver.utils.ids import LoginId, SessionId, UserId


class Users:
    """A user directory that knows every benchmark user and no blocks."""

    def __init__(self, ids: Iterable[str]) -> None:
        self._users = {UserId(u): User(id=u, username=u, display_name=u, created=0) for u in ids}

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]:
        return {u: self._users[u] for u in users if u in self._users}

    async def is_blocked(self, blocker: UserId, blocked: UserId) -> bool:
        return False


class Result:
    def __init__(self, messages: int, seconds: float, cpu_s: float, latencies: list[float]) -> None:
        latencies.sort()
        self.messages = messages
        self.seconds = seconds
        self.rate = messages / seconds
        self.cpu_us = 1e6 * cpu_s / messages
        self.p50_ms = latencies[len(latencies) // 2] * 1000
        self.p99_ms = latencies[int(len(latencies) * 0.99)] * 1000


async def run(messages: int, callers: int, batch_max: int, data_dir: Path, name: str) -> Result:
    """Open a fresh database ``name`` in ``data_dir``, push the sends, close it."""
    ids = [f"u{i:05d}" for i in range(callers)]
    bus = MemoryLiveBus()
    delivered = 0

    def count(_: str, __: Publication) -> None:
        nonlocal delivered
        delivered += 1

    for user in ids:  # a direct message is published on both users' channels
        bus.subscribe(user_channel(user), count)
    svc = await open_message_service(
        sqlite_url(data_dir, name), bus=bus, users=Users(ids), batch_max=batch_max
    )
    per_caller = messages // callers
    latencies: list[float] = []

    async def caller(i: int, rounds: range, timed: bool) -> None:
        me = ids[i]
        peer = ids[i ^ 1] if (i ^ 1) < callers else ids[0]
        who = Caller(user=UserId(me), login=LoginId("l"), session=SessionId(f"s{i}"))
        conv = direct_conv(me, peer)
        for n in rounds:
            req = ops.Send(conv=conv, cid=f"{me}-{n}", type="text", body=f"message {n} from {me}")
            t0 = time.perf_counter()
            await svc.send(who, req)
            if timed:
                latencies.append(time.perf_counter() - t0)

    # One untimed round first, so the figure is the steady state (caches warm).
    await asyncio.gather(*(caller(i, range(-1, 0), False) for i in range(callers)))
    start, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(i, range(per_caller), True) for i in range(callers)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    await svc.close()
    total = per_caller * callers
    assert delivered == 2 * (total + callers), (delivered, total)
    return Result(total, elapsed, cpu, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description="Message write-path throughput.")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--callers", type=int, nargs="+", default=[200])
    parser.add_argument("--batch-max", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None, help="data directory (default: temp)")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop and sys.platform != "win32":
        import uvloop

        uvloop.install()
    print(
        f"{'callers':>8} {'messages':>9} {'seconds':>8} {'msgs/s':>9} {'CPU µs/msg':>10}"
        f" {'p50 ms':>7} {'p99 ms':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.dir or Path(tmp)
        for n, callers in enumerate(args.callers):
            name = f"bench-message-{time.time_ns()}-{n}"
            r = asyncio.run(run(args.messages, callers, args.batch_max, data_dir, name))
            print(
                f"{callers:>8} {r.messages:>9} {r.seconds:>8.2f} {r.rate:>9.0f} "
                f"{r.cpu_us:>10.1f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}"
            )


if __name__ == "__main__":
    main()
