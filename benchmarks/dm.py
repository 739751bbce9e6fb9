"""Scenario ``dm``: persisted direct messages between pairs of users.

Each pair is a sender and a receiver in their direct conversation. The sender keeps
``--window`` sends in flight on one connection (pipelined with
:meth:`~imserver.client.Client.request_nowait`, one unique ``cid`` each) and times
each ack; the receiver, on a connection of its own, counts the ``msg`` events through
:attr:`~imserver.client.Client.on_event` and times each delivery from the send time
the sender put in ``meta.t`` (``time.monotonic_ns()``, comparable across processes).
With ``--rate`` the senders are paced (open loop, still capped by the window) and
latency is measured from each message's *scheduled* send time, so a sender that falls
behind shows it in its latency instead of hiding it.

The pairs are spread over ``--procs`` worker processes (``spawn``, one asyncio loop
each, uvloop when installed), so the load generator is not one Python process.
Timeline, on the shared monotonic clock: all workers start sending together, the
first ``--warmup`` seconds are not measured, then ``--duration`` seconds are; then
sending stops and the workers wait (at most ``--drain-timeout`` s) for every
outstanding ack and delivery before they check and report.

What is measured over the measured interval: acks and deliveries per second (counted
by arrival time), ack and delivery latency of the messages sent in it, the server's
CPU time (user + sys, all threads), the workers' CPU, the whole machine's CPU, and
the server's RSS at the end.

What is verified over the whole run, per conversation: every acked ``seq`` is unique
and they are exactly 1..n (no gap, no duplicate, no ``dup: true``), no send failed,
the receiver got every acked message, once, in ``seq`` order. Any violation is
printed and makes the exit status 1.

The JSON (:func:`harness.write_results`) holds the figures under ``"results"``
(``acked_per_s``, ``delivered_per_s``, ``ack_latency`` and ``delivery_latency``
summaries, ``cpu.server_us_per_msg``, ``cpu.clients_pct``, ``cpu.steal_pct``,
``memory``) and the
workers' counters sampled every 0.25 s under ``"timeseries"``
(:class:`harness.Timeseries`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks import databases, deployment, distributed, harness, outbox
from benchmarks.harness import Timeline
from imserver.client import (
    Client,
    CodecName,
    ConnectionClosed,
    Frame,
    IMClientError,
    TransportName,
)

SCENARIO: Final = "dm"
MIB: Final = 1024 * 1024

TICK_MIN_S: Final = 0.001
TICK_MAX_S: Final = 0.005
"""Bounds of the paced senders' sleep: latency is measured from the scheduled send
time, so a late wake-up (up to about a millisecond with uvloop's timers) counts."""

SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {
        # One connection here sends thousands of ops per second: lift the per-connection
        # rate limit, and let a receiver that falls behind for a moment stay connected.
        "rate_per_s": 1e9,
        "rate_burst": 1_000_000,
        "send_queue_bytes": 256 * MIB,
    },
}
"""The server configuration of this scenario (``--set`` adds to it)."""


def default_procs() -> int:
    """Worker processes by default: a quarter of the cores, at least 2.

    The load generator costs about half as much CPU per message as the server (both
    sides of every message: send, ack, delivery), so two processes stay far from
    saturation on a 2-core machine while leaving the server a core of its own.
    """
    return max(2, (os.cpu_count() or 2) // 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dm`` sub-command's options (with ``--db``, ``--floor`` and ``--outbox-ab``)."""
    databases.add_arguments(parser)
    outbox.add_arguments(parser)
    distributed.add_arguments(parser)
    parser.add_argument(
        "--pairs",
        type=int,
        default=16,
        help="sender/receiver pairs, one direct conversation each (default 16)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="sends each sender keeps in flight (default 16; 256 in flight in all, so the "
        "ack latency measures the server rather than a deep client-side queue)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="total msgs/s over all senders, paced; 0 = as fast as acks allow (default)",
    )
    parser.add_argument(
        "--body-size", type=int, default=32, help="characters per message body (default 32)"
    )


# --- what the parent hands to each worker -----------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """One conversation: its sender and receiver, logged in (tokens)."""

    index: int
    conv: str
    sender_id: str
    sender_token: str
    receiver_id: str
    receiver_token: str
    sender_gateway: int = 0
    receiver_gateway: int = 0
    """The gateways (indexes into :attr:`WorkerSpec.targets`) the two sides connect to."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (pickled to it by ``spawn``)."""

    worker: int
    targets: tuple[str | tuple[str, int], ...]
    """Where each gateway's clients connect (one for the embedded server)."""
    transport: TransportName
    codec: CodecName
    window: int
    rate_per_pair: float
    """Messages per second for each sender; 0 = full speed."""
    total_pairs: int
    """Pairs over all workers (to spread the paced senders' phases)."""
    body: str
    drain_timeout: float
    progress_every: float
    uvloop: bool
    pairs: tuple[PairSpec, ...]


# --- the worker process -----------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """The body of a worker process: connect, report ready, run the timeline, report."""
    harness.run_async(_Worker(conn, spec).run(), uvloop=spec.uvloop)


class _Stats:
    """Counters and latency samples of one worker, shared by its pairs."""

    __slots__ = (
        "ack_ns",
        "acked",
        "acked_window",
        "delivered",
        "delivered_window",
        "dlv_ns",
        "end",
        "failed",
        "measure",
        "sent",
        "sent_window",
    )

    def __init__(self) -> None:
        self.measure = 0
        self.end = 0
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self.failed = 0
        self.sent_window = 0
        self.acked_window = 0
        self.delivered_window = 0
        self.ack_ns = array("q")
        """Ack latencies (ns) of the messages sent in the measured interval."""
        self.dlv_ns = array("q")
        """Delivery latencies (ns) of the messages sent in the measured interval."""


class _Pair:
    """The sending and the receiving side of one conversation, and their checks."""

    def __init__(self, spec: PairSpec, wspec: WorkerSpec, stats: _Stats) -> None:
        self.spec = spec
        self.conv = spec.conv
        self.stats = stats
        self.window = wspec.window
        self.body = wspec.body
        self.cid_prefix = f"b{wspec.worker}.{spec.index}."
        self.interval_ns = round(1e9 / wspec.rate_per_pair) if wspec.rate_per_pair > 0 else 0
        self.next_due = 0
        self.sender: Client | None = None
        self.receiver: Client | None = None
        self.sending = False
        self.n = 0
        self.inflight = 0
        # sender-side checks
        self.acked = 0
        self.seqs: set[int] = set()
        self.dup_seqs = 0
        self.dup_flags = 0
        self.errors: Counter[str] = Counter()
        # receiver-side checks
        self.delivered = 0
        self.expect = 1
        self.order_errors = 0
        self.stray = 0
        self.closed: list[str] = []

    async def open(self, wspec: WorkerSpec) -> None:
        """Connect both sides and authenticate them with their tokens."""
        spec = self.spec
        sender, receiver = await asyncio.gather(
            self._connect(wspec, spec.sender_gateway, spec.sender_token, spec.sender_id),
            self._connect(wspec, spec.receiver_gateway, spec.receiver_token, spec.receiver_id),
        )
        sender.on_event = self._sender_event
        receiver.on_event = self._receiver_event
        self.sender, self.receiver = sender, receiver

    @staticmethod
    async def _connect(wspec: WorkerSpec, gateway: int, token: str, user_id: str) -> Client:
        client = await Client.connect(
            wspec.targets[gateway % len(wspec.targets)],
            transport=wspec.transport,
            codec=wspec.codec,
            client_name="imserver-bench",
        )
        data = await client.auth(token)
        if data.get("user", {}).get("id") != user_id:
            raise RuntimeError(f"auth as {user_id} answered {data!r}")
        return client

    # --- sending

    def start(self, start_ns: int, offset: float) -> None:
        """Start sending: fill the window, or, when paced, schedule the first send at
        ``offset`` (0..1) of an interval after the start, so pairs do not send in step."""
        self.sending = True
        self.next_due = start_ns + round(self.interval_ns * offset)
        self.refill(time.monotonic_ns())

    def refill(self, now: int) -> None:
        """Send until the window is full (and, when paced, until nothing is due)."""
        if self.interval_ns:
            while self.sending and self.inflight < self.window and self.next_due <= now:
                due = self.next_due
                self.next_due = due + self.interval_ns
                self._send(due)
        else:
            while self.sending and self.inflight < self.window:
                self._send(time.monotonic_ns())

    def _send(self, t: int) -> None:
        assert self.sender is not None
        self.n += 1
        try:
            fut = self.sender.request_nowait(
                "send",
                {
                    "conv": self.conv,
                    "cid": f"{self.cid_prefix}{self.n}",
                    "type": "text",
                    "body": self.body,
                    "meta": {"t": t},
                },
            )
        except IMClientError as exc:
            self._failed(exc)
            return
        self.inflight += 1
        stats = self.stats
        stats.sent += 1
        if stats.measure <= t < stats.end:
            stats.sent_window += 1
        fut.add_done_callback(partial(self._acked, t))

    def _acked(self, t: int, fut: asyncio.Future[Frame]) -> None:
        now = time.monotonic_ns()
        self.inflight -= 1
        if fut.cancelled():
            self._failed(None)
        elif (exc := fut.exception()) is not None:
            self._failed(exc)
        else:
            data = fut.result()
            seq = data.get("seq")
            if seq in self.seqs or type(seq) is not int:
                self.dup_seqs += 1
            else:
                self.seqs.add(seq)
            if data.get("dup"):
                self.dup_flags += 1
            self.acked += 1
            stats = self.stats
            stats.acked += 1
            if stats.measure <= now < stats.end:
                stats.acked_window += 1
            if stats.measure <= t < stats.end:
                stats.ack_ns.append(now - t)
        if self.sending:
            self.refill(now)

    def _failed(self, exc: BaseException | None) -> None:
        self.stats.failed += 1
        if exc is None:
            self.errors["cancelled"] += 1
        else:
            self.errors[getattr(exc, "code", None) or type(exc).__name__] += 1
        if isinstance(exc, ConnectionClosed):
            self.sending = False  # nothing more can be sent on this connection

    # --- events

    def _sender_event(self, ev: Frame) -> None:
        if ev.get("op") == "closed":
            self.closed.append(f"sender: {ev.get('reason')}")

    def _receiver_event(self, ev: Frame) -> None:
        op = ev.get("op")
        if op != "msg":
            if op == "closed":
                self.closed.append(f"receiver: {ev.get('reason')}")
            return
        now = time.monotonic_ns()
        if ev.get("conv") != self.conv:
            self.stray += 1
            return
        seq = ev.get("seq")
        if seq == self.expect:
            self.expect += 1
        else:
            self.order_errors += 1
            if type(seq) is int:
                self.expect = max(self.expect, seq + 1)
        self.delivered += 1
        stats = self.stats
        stats.delivered += 1
        if stats.measure <= now < stats.end:
            stats.delivered_window += 1
        meta = ev.get("meta")
        t = meta.get("t") if type(meta) is dict else None
        if type(t) is int and stats.measure <= t < stats.end:
            stats.dlv_ns.append(now - t)

    # --- the end

    @property
    def settled(self) -> bool:
        """No send outstanding, and every acked message delivered (or a side is gone)."""
        gone = (self.sender is None or self.sender.closed) or (
            self.receiver is None or self.receiver.closed
        )
        return self.inflight == 0 and (self.delivered >= self.acked or gone)

    def check(self) -> dict[str, Any]:
        """This conversation's counters and what is wrong with them (``problems``)."""
        problems: list[str] = []
        top = max(self.seqs, default=0)
        if self.errors:
            problems.append(f"sends failed: {dict(self.errors)}")
        if self.dup_seqs:
            problems.append(f"{self.dup_seqs} acks repeated a seq (or had none)")
        if self.dup_flags:
            problems.append(f"{self.dup_flags} acks said dup: true for a new cid")
        if len(self.seqs) != top:
            problems.append(f"acked seqs are not 1..n: {len(self.seqs)} unique, max {top}")
        if self.inflight:
            problems.append(f"{self.inflight} sends never answered")
        if self.delivered != self.acked:
            problems.append(f"delivered {self.delivered} != acked {self.acked}")
        if self.order_errors:
            problems.append(f"{self.order_errors} msg events out of seq order")
        if self.stray:
            problems.append(f"{self.stray} msg events of another conversation")
        if self.closed:
            problems.append(f"closed by the server: {self.closed}")
        return {
            "pair": self.spec.index,
            "conv": self.conv,
            "sent": self.n,
            "acked": self.acked,
            "delivered": self.delivered,
            "max_seq": top,
            "problems": problems,
        }

    async def close(self) -> None:
        """Close both connections."""
        for client in (self.sender, self.receiver):
            if client is not None:
                with contextlib.suppress(IMClientError, OSError):
                    await client.close()


class _Worker:
    """One load-generator process: its pairs, the timeline, progress and the result."""

    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.stats = _Stats()
        self.pairs = [_Pair(p, spec, self.stats) for p in spec.pairs]
        self.stop_early = asyncio.Event()

    async def run(self) -> None:
        spec = self.spec
        await asyncio.gather(*(p.open(spec) for p in self.pairs))
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
        self.conn.send(("ready", {"pid": os.getpid(), "loop": loop_name}))
        what, data = await asyncio.to_thread(self.conn.recv)
        if what != "go":
            await self._close()
            return
        timeline: Timeline = data
        stats = self.stats
        stats.measure, stats.end = timeline.measure, timeline.end
        reporter = asyncio.create_task(self._report_progress())
        ticker: asyncio.Task[None] | None = None
        try:
            await self._sleep_until(timeline.start)
            for pair in self.pairs:
                pair.start(timeline.start, pair.spec.index / spec.total_pairs)
            if spec.rate_per_pair > 0:
                ticker = asyncio.create_task(self._tick())
            await self._sleep_until(timeline.end)
            for pair in self.pairs:
                pair.sending = False
            if ticker is not None:
                ticker.cancel()
            drain_started = time.monotonic()
            deadline = drain_started + spec.drain_timeout
            while time.monotonic() < deadline:
                if all(p.settled for p in self.pairs):
                    break
                await asyncio.sleep(0.02)
            drain_s = time.monotonic() - drain_started
        finally:
            reporter.cancel()
            if ticker is not None:
                ticker.cancel()
        self._send_progress()
        checks = [p.check() for p in self.pairs]
        await self._close()
        self.conn.send(
            (
                "result",
                {
                    "worker": spec.worker,
                    "pid": os.getpid(),
                    "sent": stats.sent,
                    "acked": stats.acked,
                    "delivered": stats.delivered,
                    "failed": stats.failed,
                    "sent_window": stats.sent_window,
                    "acked_window": stats.acked_window,
                    "delivered_window": stats.delivered_window,
                    "drain_s": drain_s,
                    "ack_ns": stats.ack_ns,
                    "dlv_ns": stats.dlv_ns,
                    "pairs": checks,
                },
            )
        )

    async def _sleep_until(self, ns: int) -> None:
        delay = (ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_early.wait(), delay)

    async def _tick(self) -> None:
        # Paced mode: send what has become due, then sleep until the next send is due
        # (at least TICK_MIN_S, to bound the wake-ups); a sender whose window is full
        # is refilled by its acks instead.
        pairs = self.pairs
        while True:
            now = time.monotonic_ns()
            nearest: int | None = None
            for pair in pairs:
                if pair.sending:
                    pair.refill(now)
                    if pair.inflight < pair.window and (nearest is None or pair.next_due < nearest):
                        nearest = pair.next_due
            delay = TICK_MAX_S if nearest is None else (nearest - time.monotonic_ns()) / 1e9
            await asyncio.sleep(min(TICK_MAX_S, max(TICK_MIN_S, delay)))

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            self._send_progress()
            if self.conn.poll():
                what, _ = self.conn.recv()
                if what == "stop":
                    self.stop_early.set()

    def _send_progress(self) -> None:
        s = self.stats
        with contextlib.suppress(OSError):
            self.conn.send(("progress", (s.sent, s.acked, s.delivered, s.failed)))

    async def _close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pairs))


# --- the parent -------------------------------------------------------------------------


def _split(pairs: Sequence[PairSpec], procs: int) -> list[tuple[PairSpec, ...]]:
    # Round-robin, so every worker gets a share even when pairs % procs != 0.
    return [tuple(pairs[i::procs]) for i in range(procs) if pairs[i::procs]]


class _Live:
    """Rolling rates for the progress line, from the workers' counters."""

    def __init__(self, workers: int, target: deployment.Target) -> None:
        self.counters: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * workers
        self.history: deque[tuple[float, int, int, float]] = deque()
        self.target = target

    def update(self, worker: int, counters: tuple[int, int, int, int]) -> None:
        self.counters[worker] = counters

    @property
    def acked(self) -> int:
        """Acks so far, over all workers."""
        return sum(c[1] for c in self.counters)

    @property
    def delivered(self) -> int:
        """Deliveries so far, over all workers."""
        return sum(c[2] for c in self.counters)

    def text(self) -> str:
        now = time.monotonic()
        acked = sum(c[1] for c in self.counters)
        delivered = sum(c[2] for c in self.counters)
        failed = sum(c[3] for c in self.counters)
        cpu = self.target.cpu_seconds()
        history = self.history
        history.append((now, acked, delivered, cpu))
        while len(history) > 2 and now - history[1][0] >= 1.0:
            history.popleft()  # rates over the last second or a little more
        t0, a0, d0, c0 = history[0]
        dt = now - t0
        if dt <= 0:
            return f"acked {acked:,}  delivered {delivered:,}"
        return (
            f"acked {acked:,} ({(acked - a0) / dt:,.0f}/s)  "
            f"delivered {delivered:,} ({(delivered - d0) / dt:,.0f}/s)  "
            f"server CPU {100 * (cpu - c0) / dt:.0f}%" + (f"  FAILED {failed:,}" if failed else "")
        )


def run(args: argparse.Namespace) -> int:
    """Run the scenario; returns the exit status (0 = ran and verified)."""
    if args.pairs < 1 or args.window < 1 or args.procs < 1 or args.duration <= 0:
        raise SystemExit("--pairs, --window, --procs and --duration must be positive")
    if getattr(args, "outbox_ab", 0) > 0:
        return outbox.compare(args, _run_fresh)
    if getattr(args, "cluster", False):
        return distributed.compare(args, SCENARIO, _server_config(args), _run_fresh, _run)
    return _run_fresh(args)[0]


def _server_config(args: argparse.Namespace) -> dict[str, Any]:
    return harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))


def _run_fresh(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """One run on a fresh embedded server and database: the exit status and the results."""
    with databases.fresh_database(args.db) as db:
        return _run(
            args, deployment.embedded(_server_config(args), db, keep_dir=args.keep_data), db
        )


def _run(
    args: argparse.Namespace,
    deployed: contextlib.AbstractContextManager[deployment.Target],
    db: databases.RunDatabase | None,
) -> tuple[int, dict[str, Any]]:
    """One run against the target ``deployed`` opens; ``db`` for ``--floor``."""
    procs = min(args.procs, args.pairs)
    config = _server_config(args)
    stamp = harness.timestamp()
    report = harness.Report(title=f"dm: persisted direct messages ({stamp})")
    failures = report.failures
    out: dict[str, Any] = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
    }
    profile: dict[str, dict[str, Any]] | None = None

    with deployed as target:
        harness.console.print(f"[dim]registering {2 * args.pairs} users ...[/dim]")
        t_users = time.monotonic()
        accounts = harness.run_async(harness.provision_users(target.http_url, 2 * args.pairs))
        users_s = time.monotonic() - t_users
        gateways = len(target.gateways)
        # Over several gateways, as a balancer spreading connections evenly would put
        # them: both sides of a pair on one gateway for half the pairs, on two for the rest.
        pairs = [
            PairSpec(
                index=i,
                conv=Client.direct_conv(s.user_id, r.user_id),
                sender_id=s.user_id,
                sender_token=s.token,
                receiver_id=r.user_id,
                receiver_token=r.token,
                sender_gateway=i % gateways,
                receiver_gateway=(i // gateways) % gateways,
            )
            for i, (s, r) in enumerate(zip(accounts[0::2], accounts[1::2], strict=True))
        ]
        rate_per_pair = args.rate / args.pairs if args.rate > 0 else 0.0
        use_uvloop = not args.no_uvloop
        specs = [
            WorkerSpec(
                worker=w,
                targets=tuple(target.target_of(g, args.transport) for g in range(gateways)),
                transport=args.transport,
                codec=args.codec,
                window=args.window,
                rate_per_pair=rate_per_pair,
                total_pairs=args.pairs,
                body="x" * args.body_size,
                drain_timeout=args.drain_timeout,
                progress_every=0.25,
                uvloop=use_uvloop,
                pairs=chunk,
            )
            for w, chunk in enumerate(_split(pairs, procs))
        ]
        db_idle = databases.idle_rate(target.backing.database)
        backing_idle = deployment.idle_rates(target, 1.0)
        pool = harness.WorkerPool(worker_main, specs)
        pool.start()
        try:
            ready = pool.gather("ready", timeout=60)
            measured = _drive(args, target, pool, stamp)
        except BaseException:
            pool.send_all(("stop", None))
            pool.join(5)
            raise
        pool.join()
        memory = target.memory()
        if args.profile:
            profile = deployment.finish_profiles(measured.pop("profilers"))
        failures.extend(stop_failures := target.finish())
        server_info = {
            "kind": target.kind,
            "processes": target.processes,
            "config": target.config,
            "command": target.server.command if target.server is not None else None,
            "exit_code": 1 if stop_failures else 0,
        }

    results: list[dict[str, Any]] = measured["results"]
    snaps: tuple[harness.CpuSnapshot, harness.CpuSnapshot] | None = measured["snapshots"]
    window_s = args.duration
    acked_w = sum(r["acked_window"] for r in results)
    delivered_w = sum(r["delivered_window"] for r in results)
    sent_w = sum(r["sent_window"] for r in results)
    totals = {k: sum(r[k] for r in results) for k in ("sent", "acked", "delivered", "failed")}
    ack = harness.latency_summary(x for r in results for x in r["ack_ns"])
    dlv = harness.latency_summary(x for r in results for x in r["dlv_ns"])
    worker_pids = [r["pid"] for r in results]
    cpu: dict[str, Any] = {}
    if snaps is not None:
        a, b = snaps
        server_pct = harness.cpu_percent(a, b, target.pids)
        server_cpu_s = sum(b.procs[p] - a.procs[p] for p in target.pids)
        cpu = {
            "interval_s": b.wall - a.wall,
            "server_pct": server_pct,
            "server_sys_pct": sum(harness.system_percent(a, b, p) for p in target.pids),
            "server_us_per_msg": 1e6 * server_cpu_s / acked_w if acked_w else None,
            "server_threads_pct": harness.thread_percents(a, b),
            "clients_pct": harness.cpu_percent(a, b, worker_pids),
            "clients_pct_each": [harness.cpu_percent(a, b, [p]) for p in worker_pids],
            "machine_pct": harness.machine_percent(a, b),
            "steal_pct": harness.steal_percent(a, b),
            **databases.per_message(a, b, acked_w),
            "per_op": deployment.cpu_per_op(a, b, target, acked_w),
            "backing_idle_pct": backing_idle,
        }
        if db_idle is not None:
            cpu["db_idle_pct"] = db_idle
    floor = databases.floor_after(args, db, cpu.get("msgs_per_commit"))

    # verification
    pair_checks = [c for r in results for c in r["pairs"]]
    bad = [c for c in pair_checks if c["problems"]]
    for c in bad[:10]:
        failures.append(f"pair {c['pair']} ({c['conv']}): " + "; ".join(c["problems"]))
    if len(bad) > 10:
        failures.append(f"... and {len(bad) - 10} more conversations with problems")
    if len(results) != len(specs):
        failures.append(f"only {len(results)} of {len(specs)} workers reported")

    def ms(summary: dict[str, float], key: str) -> str:
        v = summary.get(key)
        return f"{v:.2f}" if v is not None else "-"

    r = report
    if args.rate > 0:
        r.add("target rate (msgs/s)", f"{args.rate:,.0f}")
        r.add("sent (msgs/s)", f"{sent_w / window_s:,.0f}")
    r.add("acked (msgs/s)", f"{acked_w / window_s:,.0f}")
    r.add("delivered (msgs/s)", f"{delivered_w / window_s:,.0f}")
    r.add("ack latency p50 / p99 / p99.9 (ms)", " / ".join(ms(ack, k) for k in _PCTS))
    r.add("ack latency mean / max (ms)", f"{ms(ack, 'mean_ms')} / {ms(ack, 'max_ms')}")
    r.add("delivery latency p50 / p99 (ms)", f"{ms(dlv, 'p50_ms')} / {ms(dlv, 'p99_ms')}")
    r.add("delivery latency p99.9 / max (ms)", f"{ms(dlv, 'p99.9_ms')} / {ms(dlv, 'max_ms')}")
    if cpu:
        total_pct, sys_pct = cpu["server_pct"], cpu["server_sys_pct"]
        r.add(
            "server CPU (% of one core)",
            f"{total_pct:.0f}% (user {total_pct - sys_pct:.0f} + sys {sys_pct:.0f})",
        )
        per_msg = cpu["server_us_per_msg"]
        r.add("server CPU per message (µs)", f"{per_msg:.1f}" if per_msg else "-")
        databases.add_rows(r, cpu)
        r.add(
            "server busiest threads",
            ", ".join(f"{name} {pct:.0f}%" for name, pct in cpu["server_threads_pct"][:3]),
        )
        r.add(
            f"client CPU ({len(worker_pids)} procs, % of one core)",
            f"{cpu['clients_pct']:.0f}% ("
            + " + ".join(f"{p:.0f}" for p in cpu["clients_pct_each"])
            + ")",
        )
        r.add(
            f"machine CPU busy ({os.cpu_count()} cores)",
            f"{cpu['machine_pct']:.0f}% (host steal {cpu['steal_pct']:.1f}%)",
        )
    r.add("server RSS / peak (MiB)", f"{memory['rss_mib']:.0f} / {memory['peak_rss_mib']:.0f}")
    r.add(
        "whole run: sent / acked / delivered",
        f"{totals['sent']:,} / {totals['acked']:,} / {totals['delivered']:,}",
    )
    r.add(
        "verification (every conversation)",
        "OK" if not bad else f"FAILED in {len(bad)} of {len(pair_checks)} conversations",
    )
    r.add("server exit code (SIGTERM)", str(server_info["exit_code"]))

    loops = sorted({info["loop"] for info in ready})
    r.config = [
        (
            "deployment",
            "embedded" if target.server is not None else ", ".join(target.processes),
        ),
        ("database", args.db if target.server is not None else "postgresql"),
        ("transport / codec", f"{args.transport} / {args.codec}"),
        ("pairs / window", f"{args.pairs} / {args.window} ({args.pairs * args.window} in flight)"),
        ("rate", f"{args.rate:,.0f} msgs/s (paced)" if args.rate > 0 else "full speed"),
        ("client procs / loop", f"{len(specs)} / {', '.join(loops)}"),
        ("warmup / measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("body", f"{args.body_size} chars"),
        ("server limits", _flat(config.get("limits", {}))),
        ("other server settings", _flat({k: v for k, v in config.items() if k != "limits"})),
        ("users registered in", f"{users_s:.1f} s"),
    ]
    if args.profile:
        r.notes.append("py-spy sampled the server during the measured interval (costs some CPU)")

    out["server"] = server_info
    out["results"] = {
        "measured_s": window_s,
        "acked_per_s": acked_w / window_s,
        "delivered_per_s": delivered_w / window_s,
        "sent_per_s": sent_w / window_s,
        "ack_latency": ack,
        "delivery_latency": dlv,
        "cpu": cpu,
        "memory": memory,
        "totals": totals,
    }
    out["database"] = {"dialect": args.db, "floor": floor}
    out["verification"] = {"ok": not failures, "failures": failures, "pairs": pair_checks}
    out["workers"] = [
        {k: v for k, v in res.items() if k not in ("ack_ns", "dlv_ns", "pairs")} for res in results
    ]
    out["profile"] = profile
    out["timeseries"] = measured["timeseries"]
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report)
    deployment.print_profiles(profile)
    harness.console.print(f"results: {path}")
    return (1 if failures else 0), out


_PCTS: Final = ("p50_ms", "p99_ms", "p99.9_ms")


def _flat(d: dict[str, Any], prefix: str = "") -> str:
    parts: list[str] = []
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(_flat(v, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}={v:g}" if isinstance(v, float) else f"{prefix}{k}={v}")
    return ", ".join(p for p in parts if p) or "-"


def _drive(
    args: argparse.Namespace,
    target: deployment.Target,
    pool: harness.WorkerPool,
    stamp: str,
) -> dict[str, Any]:
    """Start the workers together, sample CPU at the interval's edges, collect results."""
    now = time.monotonic_ns()
    start = now + 300_000_000  # every worker gets the go before the start
    measure = start + round(args.warmup * 1e9)
    end = measure + round(args.duration * 1e9)
    pool.send_all(("go", Timeline(start, measure, end)))
    live = _Live(len(pool.procs), target)
    series = harness.Timeseries(now, target.pids, start_ns=start, measure_ns=measure, end_ns=end)
    results: dict[int, dict[str, Any]] = {}
    snap_a: harness.CpuSnapshot | None = None
    snap_b: harness.CpuSnapshot | None = None
    profilers: dict[str, harness.PySpy] = {}
    pids = [*target.pids, *pool.pids]
    total_s = (end - now) / 1e9 + 1.0
    deadline = end / 1e9 + args.drain_timeout + 30.0
    with harness.LiveStatus(total_s, enabled=not args.no_progress) as status:
        while len(results) < len(pool.procs):
            t = time.monotonic_ns()
            if t / 1e9 > deadline:
                raise TimeoutError("workers did not report their results")
            # Wake at the interval's edges to take the CPU snapshots there.
            edge = measure if snap_a is None else end if snap_b is None else None
            timeout = 0.1 if edge is None else max(0.0, min(0.1, (edge - t) / 1e9))
            for i, (what, data) in pool.poll(timeout):
                if what == "progress":
                    live.update(i, data)
                elif what == "result":
                    results[i] = data
                elif what == "error" or (what == "exit" and i not in results):
                    raise RuntimeError(f"worker {i} failed:\n{data}")
            t = time.monotonic_ns()
            series.sample(t, live.acked, live.delivered)
            if snap_a is None and t >= measure:
                snap_a = harness.take_snapshot(
                    pids, threads_of=target.main_pid, database=target.backing
                )
                if args.profile:
                    profilers = deployment.start_profiles(
                        target, args.duration, harness.RESULTS_DIR, f"{SCENARIO}-{stamp}"
                    )
            # Not elif: one slow turn of this loop can pass both marks.
            if snap_a is not None and snap_b is None and t >= end:
                snap_b = harness.take_snapshot(
                    pids, threads_of=target.main_pid, database=target.backing
                )
            phase = (
                "start"
                if t < start
                else "warmup"
                if t < measure
                else "measure"
                if t < end
                else "drain"
            )
            status.update(phase, (t - now) / 1e9, live.text())
    series.sample(time.monotonic_ns(), live.acked, live.delivered, force=True)
    snapshots = (snap_a, snap_b) if snap_a is not None and snap_b is not None else None
    return {
        "results": [results[i] for i in sorted(results)],
        "snapshots": snapshots,
        "profilers": profilers,
        "timeseries": series.as_dict(),
    }


__all__ = ["PairSpec", "WorkerSpec", "add_arguments", "run", "worker_main"]
