"""Load-generator process bodies of the reference baselines (run by
:class:`benchmarks.harness.WorkerPool`).

Every worker speaks the harness protocol over its pipe: ``("ready", info)``, then it
waits for ``("go", Timeline)``, reports ``("progress", (delivered, floor))`` every
:data:`PROGRESS_S` and ends with ``("result", data)``.

- :func:`echo_main` -- connections to the echo server, each keeping ``window`` frames
  in flight; a frame is counted when its echo has fully arrived.
- :func:`tcp_subscriber_main` / :func:`nats_subscriber_main` -- fan-out receivers that
  only count what arrives (every frame has the same size, so counting bytes counts
  frames; NATS ``MSG`` lines are counted by their prefix). After the publisher has
  stopped, the parent sends ``("expect", published)`` and they wait for it all.
- :func:`publisher_main` -- one publisher keeping a window of messages in flight, like
  the ``room`` scenario's sender: on the reference server un-acked frames (it acks
  each flush), on NATS the messages published since the last flush (PING/PONG). It
  is never more than :data:`MAX_LAG` messages ahead of the slowest subscriber
  (``("floor", n)`` from the parent), so no server buffers without bound
  (nats-server would drop a slow consumer).
- :func:`sqlite_main` -- the SQLite group-commit loop (no network).

Counting is cheap on purpose: the receivers must cost less than the server, or the
figure measures them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from benchmarks import harness

PROGRESS_S: Final = 0.1
MAX_LAG: Final = 1000
"""Messages the publisher may be ahead of the slowest subscriber."""
CONNECT_CONCURRENCY: Final = 64
SUBJECT: Final = "bench.fanout"


@dataclass(frozen=True)
class EchoSpec:
    worker: int
    host: str
    port: int
    connections: int
    window: int
    payload: bytes
    drain_timeout: float


@dataclass(frozen=True)
class SubscriberSpec:
    worker: int
    host: str
    port: int
    connections: int
    subs_per_connection: int
    """NATS only: subscriptions to the subject on each connection."""
    frame_size: int
    """TCP only: bytes per frame (length prefix included)."""
    client: str
    """``tcp``, ``nats-raw`` or ``nats-py``."""
    drain_timeout: float


@dataclass(frozen=True)
class PublisherSpec:
    worker: int
    host: str
    port: int
    kind: str
    """``tcp`` or ``nats``."""
    payload: bytes
    batch: int
    """Messages in flight: un-acked (TCP) or between flushes (NATS)."""
    drain_timeout: float


def make_payload(size: int) -> bytes:
    """A JSON ``msg`` event of about ``size`` bytes, like IMServer's (no ``MSG `` or
    ``PING`` inside, so NATS receivers can count by prefix)."""
    head = (
        b'{"op":"msg","conv":"r:r0123456789abcdef","seq":1234567,"from":"u0123456789abcdef",'
        b'"ts":1764241234567,"type":"text","cid":"b1.23.4567890","body":"'
    )
    tail = b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length prefix."""
    return len(payload).to_bytes(4, "big") + payload


class _Stats:
    __slots__ = ("delivered", "end", "measure", "window")

    def __init__(self) -> None:
        self.delivered = 0
        self.window = 0
        self.measure = 0
        self.end = 0

    def add(self, n: int) -> None:
        self.delivered += n
        now = time.monotonic_ns()
        if self.measure <= now < self.end:
            self.window += n


async def _recv(conn: Connection) -> tuple[str, Any]:
    msg: tuple[str, Any] = await asyncio.to_thread(conn.recv)
    return msg


async def _sleep_until(ns: int) -> None:
    delay = (ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _report(conn: Connection, counters: Any) -> None:
    while True:
        await asyncio.sleep(PROGRESS_S)
        with contextlib.suppress(OSError):
            conn.send(("progress", counters()))


# --- echo -------------------------------------------------------------------------------


class _EchoConn(asyncio.Protocol):
    def __init__(self, stats: _Stats, frame_bytes: bytes, window: int) -> None:
        self.stats = stats
        self.frame = frame_bytes
        self.size = len(frame_bytes)
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.received_bytes = 0
        self.done = 0
        self.sent = 0
        self.sending = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        assert self.transport is not None
        self.sending = True
        self.transport.write(self.frame * self.window)
        self.sent += self.window

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        done = self.received_bytes // self.size
        k = done - self.done
        if not k:
            return
        self.done = done
        self.stats.add(k)
        if self.sending and self.transport is not None:
            self.transport.write(self.frame * k)
            self.sent += k

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def echo_main(conn: Connection, spec: EchoSpec) -> None:
    """Echo clients: ``connections`` sockets, ``window`` frames in flight on each."""
    harness.run_async(_echo(conn, spec))


async def _echo(conn: Connection, spec: EchoSpec) -> None:
    loop = asyncio.get_running_loop()
    stats = _Stats()
    frame_bytes = frame(spec.payload)
    conns: list[_EchoConn] = []
    for _ in range(spec.connections):
        _, proto = await loop.create_connection(
            lambda: _EchoConn(stats, frame_bytes, spec.window), spec.host, spec.port
        )
        conns.append(proto)
    conn.send(("ready", {"pid": os.getpid(), "connections": len(conns)}))
    what, timeline = await _recv(conn)
    if what != "go":
        return
    stats.measure, stats.end = timeline.measure, timeline.end
    reporter = asyncio.create_task(_report(conn, lambda: (stats.delivered, 0)))
    try:
        await _sleep_until(timeline.start)
        for c in conns:
            c.start()
        await _sleep_until(timeline.end)
        for c in conns:
            c.sending = False
        deadline = time.monotonic() + spec.drain_timeout
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            c.done < c.sent and not c.lost for c in conns
        ):
            await asyncio.sleep(0.01)
    finally:
        reporter.cancel()
    problems = [
        f"connection {i}: sent {c.sent}, echoed {c.done}" + (" (lost)" if c.lost else "")
        for i, c in enumerate(conns)
        if c.done != c.sent or c.received_bytes % c.size or c.lost
    ]
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    conn.send(
        (
            "result",
            {
                "worker": spec.worker,
                "pid": os.getpid(),
                "delivered": stats.delivered,
                "delivered_window": stats.window,
                "sent": sum(c.sent for c in conns),
                "problems": problems,
            },
        )
    )


# --- fan-out subscribers ----------------------------------------------------------------


class _TcpSub(asyncio.Protocol):
    """Counts fixed-size frames by their bytes."""

    def __init__(self, stats: _Stats, frame_size: int) -> None:
        self.stats = stats
        self.size = frame_size
        self.received_bytes = 0
        self.done = 0
        self.lost = False
        self.transport: asyncio.BaseTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        done = self.received_bytes // self.size
        k = done - self.done
        if k:
            self.done = done
            self.stats.add(k)

    @property
    def per_sub(self) -> int:
        return self.done

    def complete(self, published: int) -> bool:
        return self.done == published and self.received_bytes == published * self.size

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _NatsSub(asyncio.Protocol):
    """A raw NATS subscriber: CONNECT, ``subs`` SUBs on the subject, then counts
    ``MSG `` lines (and answers the server's PINGs)."""

    def __init__(self, stats: _Stats, subs: int, first_sid: int) -> None:
        self.stats = stats
        self.subs = subs
        self.first_sid = first_sid
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = b""
        self.tail = b""
        self.done = 0
        self.errors: list[str] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        lines = [b'CONNECT {"verbose":false,"pedantic":false,"lang":"python-raw","protocol":1}\r\n']
        lines += [f"SUB {SUBJECT} {self.first_sid + i}\r\n".encode() for i in range(self.subs)]
        lines.append(b"PING\r\n")
        transport.write(b"".join(lines))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            i = self.head.find(b"PONG\r\n")
            if b"-ERR" in self.head:
                self.ready.set_exception(RuntimeError(self.head.decode(errors="replace")))
                return
            if i < 0:
                return
            self.ready.set_result(None)
            data, self.head = self.head[i + 6 :], b""
        s = self.tail + data
        k = s.count(b"MSG ")
        if k:
            self.done += k
            self.stats.add(k)
        if b"PING\r\n" in s and self.transport is not None:
            self.transport.write(b"PONG\r\n")
        if b"-ERR" in s:
            self.errors.append(s[s.find(b"-ERR") :][:200].decode(errors="replace"))
        self.tail = s[-3:]

    @property
    def per_sub(self) -> int:
        return self.done // self.subs

    def complete(self, published: int) -> bool:
        return self.done == published * self.subs

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _NatsPySubs:
    """``subs`` nats-py subscriptions on one nats-py connection, counted in callbacks."""

    def __init__(self, stats: _Stats, subs: int) -> None:
        self.stats = stats
        self.subs = subs
        self.counts = [0] * subs
        self.nc: Any = None
        self.errors: list[str] = []
        self.lost = False

    async def open(self, url: str) -> None:
        import nats

        async def error_cb(exc: Exception) -> None:
            self.errors.append(repr(exc))

        async def disconnected_cb() -> None:
            self.lost = True

        self.nc = await nats.connect(
            url,
            allow_reconnect=False,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            pending_size=64 * 1024 * 1024,
        )
        for i in range(self.subs):
            await self.nc.subscribe(SUBJECT, cb=self._counter(i), pending_msgs_limit=-1)
        await self.nc.flush()

    def _counter(self, i: int) -> Any:
        counts, stats = self.counts, self.stats

        async def cb(msg: Any) -> None:
            counts[i] += 1
            stats.add(1)

        return cb

    @property
    def done(self) -> int:
        return sum(self.counts)

    @property
    def per_sub(self) -> int:
        return min(self.counts)

    def complete(self, published: int) -> bool:
        return all(c == published for c in self.counts)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


def tcp_subscriber_main(conn: Connection, spec: SubscriberSpec) -> None:
    """Fan-out receivers on the reference TCP server."""
    harness.run_async(_subscribers(conn, spec))


nats_subscriber_main = tcp_subscriber_main
"""NATS subscribers (``spec.client`` is ``nats-raw`` or ``nats-py``)."""


async def _subscribers(conn: Connection, spec: SubscriberSpec) -> None:
    loop = asyncio.get_running_loop()
    stats = _Stats()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    n = spec.subs_per_connection
    url = f"nats://{spec.host}:{spec.port}"

    async def one(i: int) -> Any:
        async with sem:
            if spec.client == "nats-py":
                subs = _NatsPySubs(stats, n)
                await subs.open(url)
                return subs
            proto: _TcpSub | _NatsSub
            if spec.client == "tcp":
                _, proto = await loop.create_connection(
                    lambda: _TcpSub(stats, spec.frame_size), spec.host, spec.port
                )
            else:
                _, proto = await loop.create_connection(
                    lambda: _NatsSub(stats, n, 1 + i * n), spec.host, spec.port
                )
            async with asyncio.timeout(30):
                await proto.ready
            return proto

    subs = list(await asyncio.gather(*(one(i) for i in range(spec.connections))))
    total_subs = spec.connections * (1 if spec.client == "tcp" else n)
    conn.send(("ready", {"pid": os.getpid(), "connections": len(subs), "subs": total_subs}))
    what, timeline = await _recv(conn)
    if what != "go":
        return
    stats.measure, stats.end = timeline.measure, timeline.end
    reporter = asyncio.create_task(
        _report(conn, lambda: (stats.delivered, min(s.per_sub for s in subs)))
    )
    try:
        what, published = await _recv(conn)
        deadline = time.monotonic() + spec.drain_timeout
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            s.per_sub < published and not s.lost for s in subs
        ):
            await asyncio.sleep(0.02)
    finally:
        reporter.cancel()
    per = [s.per_sub for s in subs]
    problems: list[str] = []
    short = sum(1 for s in subs if not s.complete(published))
    if short:
        problems.append(
            f"{short} of {len(subs)} connections did not get all {published:,} messages "
            f"(min {min(per):,}, max {max(per):,})"
        )
    lost = sum(1 for s in subs if s.lost)
    if lost:
        problems.append(f"{lost} connections lost")
    errors = [e for s in subs for e in getattr(s, "errors", [])]
    if errors:
        problems.append(f"errors: {errors[:3]}")
    for s in subs:
        if isinstance(s, _NatsPySubs):
            await s.close()
        elif s.transport is not None:
            s.transport.close()
    conn.send(
        (
            "result",
            {
                "worker": spec.worker,
                "pid": os.getpid(),
                "delivered": stats.delivered,
                "delivered_window": stats.window,
                "subs": total_subs,
                "problems": problems,
            },
        )
    )


# --- the publisher ----------------------------------------------------------------------


def publisher_main(conn: Connection, spec: PublisherSpec) -> None:
    """One publisher: raw TCP frames, or NATS through nats-py."""
    harness.run_async(_publisher(conn, spec))


class _TcpPub(asyncio.Protocol):
    """The reference server's publisher: keeps ``window`` frames un-acked (the server
    acks each flush with an 8-byte frame: length 4, then the count of frames)."""

    def __init__(self, payload: bytes, window: int) -> None:
        self.frame = frame(payload)
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.published = 0
        self.acked = 0
        self.floor = 0
        self.sending = False
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def refill(self) -> None:
        if not self.sending or self.transport is None:
            return
        k = min(
            self.window - (self.published - self.acked),
            self.floor + MAX_LAG - self.published,
        )
        if k > 0:
            self.transport.write(self.frame * k)
            self.published += k

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = len(buf) - len(buf) % 8
        for i in range(0, n, 8):
            self.acked += int.from_bytes(buf[i + 4 : i + 8], "big")
        self.buf = buf[n:]
        if self.sending:
            self.refill()
        elif self.acked >= self.published and not self.settled.done():
            self.settled.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.settled.done():
            self.settled.set_exception(ConnectionError(f"publisher connection lost: {exc}"))


async def _publisher(conn: Connection, spec: PublisherSpec) -> None:
    nc: Any = None
    pub: _TcpPub | None = None
    if spec.kind == "nats":
        import nats

        nc = await nats.connect(
            f"nats://{spec.host}:{spec.port}", allow_reconnect=False, no_echo=True
        )
    else:
        loop = asyncio.get_running_loop()
        _, pub = await loop.create_connection(
            lambda: _TcpPub(spec.payload, spec.batch), spec.host, spec.port
        )
    conn.send(("ready", {"pid": os.getpid(), "connections": 1}))
    what, timeline = await _recv(conn)
    if what != "go":
        return
    floor = 0
    stop = False
    published = 0

    async def listen() -> None:
        nonlocal floor, stop
        while True:
            what, data = await _recv(conn)
            if what == "floor":
                floor = max(floor, int(data))
                if pub is not None:
                    pub.floor = floor
                    pub.refill()
            elif what == "stop":
                stop = True
                return

    def counters() -> tuple[int, int]:
        return (pub.published if pub is not None else published, floor)

    listener = asyncio.create_task(listen())
    reporter = asyncio.create_task(_report(conn, counters))
    try:
        await _sleep_until(timeline.start)
        if pub is not None:
            pub.sending = True
            pub.refill()
            await _sleep_until(timeline.end)
            pub.sending = False
            if pub.acked < pub.published:
                async with asyncio.timeout(spec.drain_timeout):
                    await pub.settled
            published = pub.published
            assert pub.transport is not None
            pub.transport.close()
        else:
            # nats: publish a window, then PING/PONG (flush) -- a window in flight.
            while not stop and time.monotonic_ns() < timeline.end:
                if floor + MAX_LAG - published < spec.batch:
                    await asyncio.sleep(0.001)
                    continue
                for _ in range(spec.batch):
                    await nc.publish(SUBJECT, spec.payload)
                await nc.flush(timeout=30)
                published += spec.batch
            await nc.close()
    finally:
        reporter.cancel()
    conn.send(("result", {"worker": spec.worker, "pid": os.getpid(), "published": published}))
    with contextlib.suppress(asyncio.CancelledError):
        listener.cancel()
        await listener


# --- SQLite group commit ----------------------------------------------------------------


@dataclass(frozen=True)
class SqliteSpec:
    batch: int
    convs: int
    body: str
    warmup: float
    duration: float
    keep_dir: bool


def sqlite_main(conn: Connection, spec: SqliteSpec) -> None:
    """Insert message rows in batches, one commit (one fsync) per batch, WAL +
    ``synchronous=FULL``; measure rows/s and CPU per row over ``duration``."""
    root = Path(tempfile.mkdtemp(prefix="imserver-bench-sqlite-"))
    try:
        conn.send(("result", _sqlite(spec, root / "messages.db")))
    finally:
        if not spec.keep_dir:
            shutil.rmtree(root, ignore_errors=True)


def _sqlite(spec: SqliteSpec, path: Path) -> dict[str, Any]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,"
        " ts INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (conv, seq))"
    )
    convs = [f"d:u{i:06d}a:u{i:06d}b" for i in range(spec.convs)]
    seqs = [0] * spec.convs
    sql = "INSERT INTO messages (conv, seq, sender, ts, body) VALUES (?, ?, ?, ?, ?)"
    n = 0

    def one_batch() -> None:
        nonlocal n
        rows = []
        ts = time.time_ns() // 1_000_000
        for _ in range(spec.batch):
            c = n % spec.convs
            seqs[c] += 1
            rows.append((convs[c], seqs[c], convs[c][2:10], ts, spec.body))
            n += 1
        db.execute("BEGIN")
        db.executemany(sql, rows)
        db.execute("COMMIT")

    end = time.monotonic() + spec.warmup
    while time.monotonic() < end:
        one_batch()
    n0, wall0, cpu0 = n, time.monotonic(), time.process_time()
    end = wall0 + spec.duration
    commits = 0
    while time.monotonic() < end:
        one_batch()
        commits += 1
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    rows = n - n0
    count = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    db.close()
    return {
        "pid": os.getpid(),
        "rows": rows,
        "commits": commits,
        "seconds": wall,
        "cpu_s": cpu,
        "msgs_per_s": rows / wall,
        "us_per_msg": 1e6 * cpu / rows if rows else None,
        "wall_us_per_msg": 1e6 * wall / rows if rows else None,
        "stored": count,
        "expected": n,
    }
