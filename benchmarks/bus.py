"""What the live bus costs per publication and per delivery: memory against Redis.

One publisher puts ``--publications`` stored-message publications (a ``msg`` event
with its position, as the message writer publishes them) round-robin on
``--channels`` room channels, as fast as ``publish`` takes them. Each of
``--subscribers`` subscriber processes follows every channel and counts what its
handler gets (a delivery: one publication handed to one process's hub).

* ``memory``: publisher and handler in one process (:class:`MemoryLiveBus` calls the
  handler inside ``publish``): the CPU per publication covers both.
* ``redis``: the publisher in this process, each subscriber in a process of its own,
  on a ``redis-server`` started for the run (so that its CPU is the run's alone,
  read from ``/proc/<pid>/stat``). The publisher's CPU runs from the first
  ``publish`` until Redis has answered the last ``PUBLISH``; a subscriber's from
  its ready signal until its last delivery.

It prints one table (CPU in microseconds, user + system, of each process; wall
throughput of the whole run)::

    .venv/bin/python -m benchmarks.bus
    .venv/bin/python -m benchmarks.bus --publications 50000 --subscribers 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from benchmarks.harness import run_async
from imserver.protocol.events import Msg
from imserver.storage.bus import MemoryLiveBus, Publication, room_channel
from imserver.storage.bus_redis import RedisLiveBus
from imserver.testing.redis import RedisServer

PREFIX = "bench:"


def _channels(n: int) -> list[str]:
    return [room_channel(f"r:room{i}") for i in range(n)]


def _publications(n: int, channels: list[str]) -> list[tuple[str, Publication]]:
    """``n`` positioned publications, round-robin over ``channels`` (made before the
    clock starts: building them is the writer's cost, not the bus's)."""
    out: list[tuple[str, Publication]] = []
    for i in range(n):
        channel = channels[i % len(channels)]
        seq = i // len(channels) + 1
        event = Msg(
            conv=channel,
            seq=seq,
            from_="u1x2y3z4a5b6c7d8",
            ts=1_700_000_000_000 + i,
            type="text",
            body="a message of a typical length, some forty to sixty characters",
            cid=f"c{i}",
        )
        out.append((channel, Publication(event=event, conv=channel, seq=seq)))
    return out


@dataclass
class Row:
    bus: str
    publications: int
    subscribers: int
    publisher_us: float
    """Publisher CPU per publication (memory: with the handler's work)."""
    subscriber_us: float | None
    """Subscriber CPU per delivery (the mean over the subscriber processes)."""
    redis_us: float | None
    """Redis server CPU per publication."""
    per_s: float
    """Publications per second of wall time, until the last delivery."""


async def _memory(publications: int, channels: int) -> Row:
    bus = MemoryLiveBus()
    got = 0

    def handler(channel: str, publication: Publication) -> None:
        nonlocal got
        got += 1

    names = _channels(channels)
    for name in names:
        bus.subscribe(name, handler)
    pubs = _publications(publications, names)
    wall, cpu = time.perf_counter(), time.process_time()
    for channel, publication in pubs:
        await bus.publish(channel, publication)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    assert got == publications
    return Row("memory", publications, 1, cpu / publications * 1e6, None, None, publications / wall)


def _subscriber(url: str, channels: int, expected: int, pipe: Connection) -> None:
    """A subscriber process: subscribe, signal ready, count ``expected`` deliveries,
    send back its CPU seconds."""

    async def main() -> float:
        bus = RedisLiveBus(url, prefix=PREFIX)
        await bus.start()
        done = asyncio.Event()
        got = 0

        def handler(channel: str, publication: Publication) -> None:
            nonlocal got
            got += 1
            if got == expected:
                done.set()

        for name in _channels(channels):
            bus.subscribe(name, handler)
        await bus.settle()
        cpu = time.process_time()
        pipe.send("ready")
        await done.wait()
        cpu = time.process_time() - cpu
        await bus.close()
        return cpu

    pipe.send(run_async(main()))


async def _redis(url: str, server: RedisServer, publications: int, channels: int, subs: int) -> Row:
    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for _ in range(subs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_subscriber, args=(url, channels, publications, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        assert await asyncio.to_thread(pipe.recv) == "ready"
    bus = RedisLiveBus(url, prefix=PREFIX)
    await bus.start()
    pubs = _publications(publications, _channels(channels))
    redis_cpu = server.cpu_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    for i, (channel, publication) in enumerate(pubs):
        await bus.publish(channel, publication)
        if i % 256 == 255:
            await asyncio.sleep(0)  # the publisher task sends while publishing goes on
    await bus.drained()
    cpu = time.process_time() - cpu
    sub_cpu = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    wall = time.perf_counter() - wall
    redis_cpu = server.cpu_seconds() - redis_cpu
    assert bus.dropped == 0, f"{bus.dropped} publications dropped"
    await bus.close()
    for proc in procs:
        proc.join()
    return Row(
        "redis",
        publications,
        subs,
        cpu / publications * 1e6,
        sum(sub_cpu) / len(sub_cpu) / publications * 1e6,
        redis_cpu / publications * 1e6,
        publications / wall,
    )


def _table(rows: list[Row]) -> str:
    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}"

    lines = [
        "| bus | publications | subscriber processes | publisher CPU µs/publication "
        "| subscriber CPU µs/delivery | Redis CPU µs/publication | publications/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.bus} | {r.publications:,} | {r.subscribers} | {fmt(r.publisher_us)} "
            f"| {fmt(r.subscriber_us)} | {fmt(r.redis_us)} | {r.per_s:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bus", description=__doc__)
    parser.add_argument("--publications", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=2)
    args = parser.parse_args(argv)
    rows = [run_async(_memory(args.publications, args.channels))]
    server = RedisServer()
    server.start()
    try:
        rows.append(
            run_async(
                _redis(server.url, server, args.publications, args.channels, args.subscribers)
            )
        )
    finally:
        server.stop()
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
