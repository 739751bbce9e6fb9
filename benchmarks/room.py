"""Scenario ``room``: senders into one room whose members are all connected.

For each size in ``--members`` (e.g. ``100,1000,10000``) a fresh server is started,
that many users are registered and put in one public room (the first creates it
with up to 999 others as initial members, the rest ``room.join`` over HTTP — all
before any WebSocket connects, so setup fans out to nobody), then every member except
the senders connects over WebSocket from ``--procs`` receiver processes. The senders
(``--senders``, in a process of their own) keep ``--window`` sends each in flight, or
send at a fixed total ``--rate``; each message carries its send time in ``meta.t``.

Receivers are :class:`benchmarks.wsrecv.Receiver` protocols, a few microseconds of
client CPU per event, so the generator stays cheaper than the server as long as it
can. Where it cannot (two cores shared by server and generator), the figure that
still holds is the **server CPU per delivery**: server CPU seconds over deliveries.

Measured over the interval: deliveries/s (by arrival), delivery latency (from
``meta.t``), acks/s, ack latency, server CPU (and per delivery), client CPU, server
RSS. Verified over the whole run: every send acked with a unique, contiguous seq, and
every receiver got every acked message exactly once, in seq order.

The JSON holds one entry per size under ``"runs"`` (``delivered_per_s``,
``server_us_per_delivery``, ``delivery_latency``, ``clients_pct``, ``memory`` ...),
each with its counters sampled every 0.25 s under ``"timeseries"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks import databases, deployment, distributed, harness
from benchmarks.harness import Timeline
from benchmarks.wsrecv import Event, Receiver, connect_receiver
from imserver.client import Client, Frame, HttpClient, IMClientError

SCENARIO: Final = "room"
MIB: Final = 1024 * 1024
CREATE_MAX_MEMBERS: Final = 999
"""Initial members ``room.create`` takes here (its ``members`` list holds up to 1,000)."""
CONNECT_CONCURRENCY: Final = 64
"""Connections each receiver process opens at once (the listen backlog is finite)."""

SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {
        "rate_per_s": 1e9,
        "rate_burst": 1_000_000,
        "send_queue_bytes": 64 * MIB,
        # Setup of 10,000 members takes minutes; receivers only listen.
        "heartbeat": 3600,
    },
    # Thousands of accounts are registered and logged in before the run: cheap hashes
    # keep setup short. The measured part (messages) hashes nothing.
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1},
}


def default_procs() -> int:
    """Receiver processes: one per core (they only parse frames)."""
    return max(2, os.cpu_count() or 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``room`` sub-command's options (with ``--db`` and ``--floor``)."""
    databases.add_arguments(parser)
    distributed.add_arguments(parser)
    parser.add_argument(
        "--members",
        default="1000",
        help="room sizes to run, comma-separated, one fresh server each (default 1000)",
    )
    parser.add_argument("--senders", type=int, default=1, help="members who send (default 1)")
    parser.add_argument(
        "--window", type=int, default=8, help="sends each sender keeps in flight (default 8)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="total msgs/s into the room, paced; 0 = as fast as acks allow (default)",
    )
    parser.add_argument(
        "--body-size", type=int, default=32, help="characters per message body (default 32)"
    )


# --- specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    user_id: str
    token: str


@dataclass(frozen=True)
class ReceiverSpec:
    worker: int
    host: str
    ports: tuple[int, ...]
    """The gateways' HTTP ports: member ``i`` of this process connects to ``ports[i % n]``."""
    conv: str
    members: tuple[Member, ...]
    progress_every: float
    drain_timeout: float


@dataclass(frozen=True)
class SenderSpec:
    worker: int
    target: str
    conv: str
    senders: tuple[Member, ...]
    window: int
    rate_per_sender: float
    body: str
    progress_every: float
    drain_timeout: float


# --- receiver processes -----------------------------------------------------------------


def receiver_main(conn: Connection, spec: ReceiverSpec) -> None:
    harness.run_async(_Receivers(conn, spec).run())


class _Receivers:
    def __init__(self, conn: Connection, spec: ReceiverSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.measure = 0
        self.end = 0
        self.delivered = 0
        self.delivered_window = 0
        self.lat_ns = array("q")
        self.expect: dict[int, int] = {}
        self.counts: dict[int, int] = {}
        self.order_errors = 0
        self.stray = 0
        self.receivers: list[Receiver] = []

    def on_event(self, rec: Receiver, ev: Event, now: int) -> None:
        if ev.op != "msg":
            return
        if ev.conv != self.spec.conv or ev.seq is None:
            self.stray += 1
            return
        key = id(rec)
        expect = self.expect.get(key)
        if expect is not None and ev.seq != expect:
            self.order_errors += 1
        self.expect[key] = ev.seq + 1
        self.counts[key] = self.counts.get(key, 0) + 1
        self.delivered += 1
        if self.measure <= now < self.end:
            self.delivered_window += 1
        t = ev.meta.t if ev.meta is not None else None
        if t is not None and self.measure <= t < self.end:
            self.lat_ns.append(now - t)

    async def run(self) -> None:
        spec = self.spec
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(i: int, m: Member) -> Receiver:
            port = spec.ports[i % len(spec.ports)]
            async with sem:
                return await connect_receiver(spec.host, port, m.token, self.on_event)

        self.receivers = list(
            await asyncio.gather(*(one(i, m) for i, m in enumerate(spec.members)))
        )
        self.conn.send(("ready", {"pid": os.getpid(), "connections": len(self.receivers)}))
        what, data = await asyncio.to_thread(self.conn.recv)
        if what != "go":
            return
        timeline: Timeline = data
        self.measure, self.end = timeline.measure, timeline.end
        reporter = asyncio.create_task(self._progress())
        try:
            # Run until the parent says how many messages were acked, then drain.
            what, acked = await asyncio.to_thread(self.conn.recv)
            deadline = time.monotonic() + spec.drain_timeout
            while time.monotonic() < deadline:
                if all(self.counts.get(id(r), 0) >= acked or r.lost for r in self.receivers):
                    break
                await asyncio.sleep(0.05)
        finally:
            reporter.cancel()
        short = sum(1 for r in self.receivers if self.counts.get(id(r), 0) != acked)
        lost = sum(1 for r in self.receivers if r.lost)
        closed = sorted({r.closed_reason for r in self.receivers if r.closed_reason})
        for r in self.receivers:
            r.close()
        self.conn.send(
            (
                "result",
                {
                    "worker": spec.worker,
                    "pid": os.getpid(),
                    "delivered": self.delivered,
                    "delivered_window": self.delivered_window,
                    "lat_ns": self.lat_ns,
                    "receivers": len(self.receivers),
                    "short": short,
                    "lost": lost,
                    "closed": closed,
                    "order_errors": self.order_errors,
                    "stray": self.stray,
                },
            )
        )

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            with contextlib.suppress(OSError):
                self.conn.send(("progress", (0, 0, self.delivered, 0)))


# --- the sender process -----------------------------------------------------------------


def sender_main(conn: Connection, spec: SenderSpec) -> None:
    harness.run_async(_Senders(conn, spec).run())


class _Senders:
    def __init__(self, conn: Connection, spec: SenderSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.clients: list[Client] = []
        self.measure = 0
        self.end = 0
        self.sending = False
        self.sent = 0
        self.acked = 0
        self.acked_window = 0
        self.failed: dict[str, int] = {}
        self.seqs: set[int] = set()
        self.dup = 0
        self.inflight = [0] * len(spec.senders)
        self.n = [0] * len(spec.senders)
        self.next_due = [0] * len(spec.senders)
        self.ack_ns = array("q")
        self.interval = round(1e9 / spec.rate_per_sender) if spec.rate_per_sender > 0 else 0

    async def run(self) -> None:
        spec = self.spec
        for m in spec.senders:
            client = await Client.connect(spec.target, client_name="imserver-bench")
            await client.auth(m.token)
            self.clients.append(client)
        self.conn.send(("ready", {"pid": os.getpid(), "connections": len(self.clients)}))
        what, data = await asyncio.to_thread(self.conn.recv)
        if what != "go":
            return
        timeline: Timeline = data
        self.measure, self.end = timeline.measure, timeline.end
        reporter = asyncio.create_task(self._progress())
        try:
            await _sleep_until(timeline.start)
            self.sending = True
            for i in range(len(self.clients)):
                self.next_due[i] = timeline.start + round(self.interval * i / len(self.clients))
                self._refill(i, time.monotonic_ns())
            ticker = asyncio.create_task(self._tick()) if self.interval else None
            await _sleep_until(timeline.end)
            self.sending = False
            if ticker is not None:
                ticker.cancel()
            deadline = time.monotonic() + spec.drain_timeout
            while any(self.inflight) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        finally:
            reporter.cancel()
        for client in self.clients:
            with contextlib.suppress(IMClientError, OSError):
                await client.close()
        top = max(self.seqs, default=0)
        low = min(self.seqs, default=1)
        self.conn.send(
            (
                "result",
                {
                    "worker": spec.worker,
                    "pid": os.getpid(),
                    "sent": self.sent,
                    "acked": self.acked,
                    "acked_window": self.acked_window,
                    "ack_ns": self.ack_ns,
                    "failed": self.failed,
                    "dup": self.dup,
                    "contiguous": len(self.seqs) == top - low + 1,
                    "inflight": sum(self.inflight),
                },
            )
        )

    def _refill(self, i: int, now: int) -> None:
        window = self.spec.window
        if self.interval:
            while self.sending and self.inflight[i] < window and self.next_due[i] <= now:
                due = self.next_due[i]
                self.next_due[i] = due + self.interval
                self._send(i, due)
        else:
            while self.sending and self.inflight[i] < window:
                self._send(i, time.monotonic_ns())

    def _send(self, i: int, t: int) -> None:
        self.n[i] += 1
        try:
            fut = self.clients[i].request_nowait(
                "send",
                {
                    "conv": self.spec.conv,
                    "cid": f"r{i}.{self.n[i]}",
                    "type": "text",
                    "body": self.spec.body,
                    "meta": {"t": t},
                },
            )
        except IMClientError as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            self.failed[code] = self.failed.get(code, 0) + 1
            return
        self.inflight[i] += 1
        self.sent += 1
        fut.add_done_callback(partial(self._acked, i, t))

    def _acked(self, i: int, t: int, fut: asyncio.Future[Frame]) -> None:
        now = time.monotonic_ns()
        self.inflight[i] -= 1
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            code = getattr(exc, "code", None) or type(exc).__name__
            self.failed[code] = self.failed.get(code, 0) + 1
        else:
            seq = fut.result().get("seq")
            if not isinstance(seq, int) or seq in self.seqs:
                self.dup += 1
            else:
                self.seqs.add(seq)
            self.acked += 1
            if self.measure <= now < self.end:
                self.acked_window += 1
            if self.measure <= t < self.end:
                self.ack_ns.append(now - t)
        if self.sending:
            self._refill(i, now)

    async def _tick(self) -> None:
        while True:
            now = time.monotonic_ns()
            for i in range(len(self.clients)):
                self._refill(i, now)
            await asyncio.sleep(0.001)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            with contextlib.suppress(OSError):
                self.conn.send(("progress", (self.sent, self.acked, 0, 0)))


async def _sleep_until(ns: int) -> None:
    delay = (ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


# --- the parent -------------------------------------------------------------------------


async def _setup_room(http_url: str, accounts: Sequence[harness.Account]) -> str:
    """A public room holding every account; returns its conversation id."""
    owner = accounts[0]
    first = [a.user_id for a in accounts[1 : 1 + CREATE_MAX_MEMBERS]]
    async with HttpClient(http_url) as http:
        room = (
            await http.request(
                "room.create", token=owner.token, name="bench room", public=True, members=first
            )
        )["room"]
        sem = asyncio.Semaphore(16)

        async def join(a: harness.Account) -> None:
            async with sem:
                await http.request("room.join", token=a.token, room=room["id"])

        await asyncio.gather(*(join(a) for a in accounts[1 + CREATE_MAX_MEMBERS :]))
        info = (await http.request("room.get", token=owner.token, room=room["id"]))["room"]
    if info["members"] != len(accounts):
        raise RuntimeError(f"room has {info['members']} members, expected {len(accounts)}")
    return str(room["conv"])


def _server_config(args: argparse.Namespace, size: int) -> dict[str, Any]:
    return harness.merge_config(
        harness.merge_config(SERVER_CONFIG, {"rooms": {"max_size": max(10_000, size)}}),
        harness.parse_settings(args.set),
    )


def _run_size(args: argparse.Namespace, size: int, stamp: str) -> dict[str, Any]:
    """One size on a fresh embedded server and database."""
    with databases.fresh_database(args.db) as db:
        deployed = deployment.embedded(_server_config(args, size), db, keep_dir=args.keep_data)
        return _run_size_on(args, size, stamp, deployed, db)


def _run_size_on(
    args: argparse.Namespace,
    size: int,
    stamp: str,
    deployed: contextlib.AbstractContextManager[deployment.Target],
    db: databases.RunDatabase | None,
) -> dict[str, Any]:
    failures: list[str] = []
    with deployed as target:
        harness.console.print(
            f"[dim]{size} members: registering {size} users and filling the room ...[/dim]"
        )
        t0 = time.monotonic()
        accounts = harness.run_async(harness.provision_users(target.http_url, size, concurrency=16))
        conv = harness.run_async(_setup_room(target.http_url, accounts))
        setup_s = time.monotonic() - t0
        members = [Member(a.user_id, a.token) for a in accounts]
        senders, listeners = members[: args.senders], members[args.senders :]
        procs = max(1, min(args.procs, len(listeners)))
        ports = tuple(g.http_port for g in target.gateways)
        rspecs = [
            ReceiverSpec(
                worker=w + 1,
                host=target.gateways[0].host,
                # Each process starts on another gateway, so members alternate over
                # the gateways whatever the number of processes.
                ports=ports[w % len(ports) :] + ports[: w % len(ports)],
                conv=conv,
                members=tuple(listeners[w::procs]),
                progress_every=0.25,
                drain_timeout=args.drain_timeout,
            )
            for w in range(procs)
        ]
        sspec = SenderSpec(
            worker=0,
            target=target.gateways[0].ws_url,
            conv=conv,
            senders=tuple(senders),
            window=args.window,
            rate_per_sender=args.rate / args.senders if args.rate > 0 else 0.0,
            body="x" * args.body_size,
            progress_every=0.25,
            drain_timeout=args.drain_timeout,
        )
        db_idle = databases.idle_rate(target.backing.database)
        backing_idle = deployment.idle_rates(target, 1.0)
        rpool = harness.WorkerPool(receiver_main, rspecs)
        spool = harness.WorkerPool(sender_main, [sspec])
        rpool.start()
        try:
            rpool.gather("ready", timeout=max(60.0, size / 50))
            spool.start()
            spool.gather("ready", timeout=60)
            measured = _drive(args, target, rpool, spool, stamp, size)
        except BaseException:
            rpool.send_all(("stop", None))
            spool.send_all(("stop", None))
            rpool.join(5)
            spool.join(5)
            raise
        rpool.join()
        spool.join()
        memory = target.memory()
        stop_failures = target.finish()
        failures.extend(stop_failures)
        exit_code = 1 if stop_failures else 0

    sres: dict[str, Any] = measured["sender"]
    rres: list[dict[str, Any]] = measured["receivers"]
    a, b = measured["snapshots"]
    window_s = args.duration
    delivered_w = sum(r["delivered_window"] for r in rres)
    server_cpu_s = sum(b.procs[p] - a.procs[p] for p in target.pids)
    client_pids = [r["pid"] for r in rres] + [sres["pid"]]
    acked = sres["acked"]
    listeners_n = sum(r["receivers"] for r in rres)
    if sres["failed"]:
        failures.append(f"sends failed: {sres['failed']}")
    if sres["dup"] or not sres["contiguous"]:
        failures.append("acked seqs are not unique and contiguous")
    if sres["inflight"]:
        failures.append(f"{sres['inflight']} sends never answered")
    for r in rres:
        if r["short"] or r["order_errors"] or r["stray"] or r["lost"]:
            failures.append(
                f"receiver process {r['worker']}: {r['short']} receivers missed messages, "
                f"{r['order_errors']} out of order, {r['stray']} stray, {r['lost']} lost"
                + (f", closed: {r['closed']}" if r["closed"] else "")
            )
    expected = acked * listeners_n
    db_figures = databases.per_message(a, b, sres["acked_window"])
    if db_figures:
        db_figures["db_idle_pct"] = db_idle
    floor = databases.floor_after(args, db, db_figures.get("msgs_per_commit"))
    delivered = sum(r["delivered"] for r in rres)
    if delivered != expected:
        failures.append(f"delivered {delivered:,} != acked x receivers {expected:,}")
    return {
        "members": size,
        "receivers": listeners_n,
        "senders": len(senders),
        "setup_s": setup_s,
        "acked_per_s": sres["acked_window"] / window_s,
        "delivered_per_s": delivered_w / window_s,
        "ack_latency": harness.latency_summary(sres["ack_ns"]),
        "delivery_latency": harness.latency_summary(x for r in rres for x in r["lat_ns"]),
        "server_pct": harness.cpu_percent(a, b, target.pids),
        "server_us_per_delivery": 1e6 * server_cpu_s / delivered_w if delivered_w else None,
        "per_op": deployment.cpu_per_op(a, b, target, delivered_w),
        "backing_idle_pct": backing_idle,
        "deployment": {"kind": target.kind, "processes": target.processes},
        "clients_pct": harness.cpu_percent(a, b, client_pids),
        "machine_pct": harness.machine_percent(a, b),
        "steal_pct": harness.steal_percent(a, b),
        "database": {"dialect": args.db, **db_figures, "floor": floor},
        "memory": memory,
        "totals": {"acked": acked, "delivered": delivered, "expected": expected},
        "exit_code": exit_code,
        "failures": failures,
        "config": target.config,
        "profile": measured["profile"],
        "timeseries": measured["timeseries"],
    }


def _drive(
    args: argparse.Namespace,
    target: deployment.Target,
    rpool: harness.WorkerPool,
    spool: harness.WorkerPool,
    stamp: str,
    size: int,
) -> dict[str, Any]:
    now = time.monotonic_ns()
    profilers: dict[str, harness.PySpy] = {}
    start = now + 300_000_000
    measure = start + round(args.warmup * 1e9)
    end = measure + round(args.duration * 1e9)
    timeline = Timeline(start, measure, end)
    rpool.send_all(("go", timeline))
    spool.send_all(("go", timeline))
    pids = [*target.pids, *rpool.pids, *spool.pids]
    snap_a: harness.CpuSnapshot | None = None
    snap_b: harness.CpuSnapshot | None = None
    sender: dict[str, Any] | None = None
    receivers: dict[int, dict[str, Any]] = {}
    acked_now = 0
    delivered_now: dict[int, int] = {}
    deadline = end / 1e9 + args.drain_timeout + 60.0
    series = harness.Timeseries(now, target.pids, start_ns=start, measure_ns=measure, end_ns=end)
    with harness.LiveStatus((end - now) / 1e9 + 1.0, enabled=not args.no_progress) as status:
        while sender is None or len(receivers) < len(rpool.procs):
            t = time.monotonic_ns()
            if t / 1e9 > deadline:
                raise TimeoutError("workers did not report their results")
            edge = measure if snap_a is None else end if snap_b is None else None
            timeout = 0.1 if edge is None else max(0.0, min(0.1, (edge - t) / 1e9))
            for pool, is_sender in ((spool, True), (rpool, False)):
                for i, (what, data) in pool.poll(timeout / 2):
                    if what == "progress":
                        if is_sender:
                            acked_now = data[1]
                        else:
                            delivered_now[i] = data[2]
                    elif what == "result":
                        if is_sender:
                            sender = data
                            acked_now = data["acked"]
                            rpool.send_all(("acked", data["acked"]))
                        else:
                            receivers[i] = data
                            delivered_now[i] = data["delivered"]
                    elif (
                        what == "error" or (what == "exit" and (is_sender or i not in receivers))
                    ) and not (is_sender and sender is not None):
                        raise RuntimeError(f"worker failed:\n{data}")
            t = time.monotonic_ns()
            series.sample(t, acked_now, sum(delivered_now.values()))
            if snap_a is None and t >= measure:
                snap_a = harness.take_snapshot(
                    pids, threads_of=target.main_pid, database=target.backing
                )
                if args.profile:
                    profilers = deployment.start_profiles(
                        target, args.duration, harness.RESULTS_DIR, f"{SCENARIO}-{stamp}-{size}"
                    )
            # Not elif: one slow turn of this loop can pass both marks.
            if snap_a is not None and snap_b is None and t >= end:
                snap_b = harness.take_snapshot(
                    pids, threads_of=target.main_pid, database=target.backing
                )
            phase = "warmup" if t < measure else "measure" if t < end else "drain"
            status.update(
                phase,
                (t - now) / 1e9,
                f"acked {acked_now:,}  delivered {sum(delivered_now.values()):,}",
            )
    assert snap_a is not None and snap_b is not None
    series.sample(time.monotonic_ns(), acked_now, sum(delivered_now.values()), force=True)
    profile = deployment.finish_profiles(profilers) if profilers else None
    return {
        "profile": profile,
        "sender": sender,
        "receivers": [receivers[i] for i in sorted(receivers)],
        "snapshots": (snap_a, snap_b),
        "timeseries": series.as_dict(),
    }


def run(args: argparse.Namespace) -> int:
    """Run every size; returns the exit status (0 = ran and verified)."""
    try:
        sizes = [int(s) for s in str(args.members).split(",") if s.strip()]
    except ValueError:
        raise SystemExit("--members takes comma-separated integers") from None
    if not sizes or min(sizes) < args.senders + 1 or args.senders < 1 or args.window < 1:
        raise SystemExit("--members must exceed --senders; --senders and --window positive")
    stamp = harness.timestamp()
    if getattr(args, "cluster", False):
        if len(sizes) != 1:
            raise SystemExit("--cluster takes one --members size")
        size = sizes[0]

        def on_embedded(a: argparse.Namespace) -> tuple[int, dict[str, Any]]:
            return _report(a, [_run_size(a, size, stamp)], stamp)

        def on_cluster(
            a: argparse.Namespace,
            deployed: contextlib.AbstractContextManager[deployment.Target],
            db: databases.RunDatabase | None,
        ) -> tuple[int, dict[str, Any]]:
            return _report(a, [_run_size_on(a, size, stamp, deployed, db)], stamp)

        config = _server_config(args, size)
        return distributed.compare(args, SCENARIO, config, on_embedded, on_cluster)
    return _report(args, [_run_size(args, size, stamp) for size in sizes], stamp)[0]


def _report(
    args: argparse.Namespace, runs: list[dict[str, Any]], stamp: str
) -> tuple[int, dict[str, Any]]:
    """Print the runs' table and write their JSON: the exit status and the JSON."""
    out: dict[str, Any] = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "runs": runs,
    }

    def ms(summary: dict[str, float], key: str) -> str:
        v = summary.get(key)
        return f"{v:.1f}" if v is not None else "-"

    report = harness.Report(title=f"room: fan-out to connected members ({stamp})")
    for res in runs:
        n = res["members"]
        dl, al = res["delivery_latency"], res["ack_latency"]
        per = res["server_us_per_delivery"]
        report.add(
            f"{n:,} members: deliveries/s",
            f"{res['delivered_per_s']:,.0f} ({res['acked_per_s']:,.0f} msgs/s acked)",
        )
        report.add(
            f"{n:,} members: delivery p50 / p99 / p99.9 (ms)",
            " / ".join(ms(dl, k) for k in ("p50_ms", "p99_ms", "p99.9_ms")),
        )
        report.add(f"{n:,} members: ack p50 / p99 (ms)", f"{ms(al, 'p50_ms')} / {ms(al, 'p99_ms')}")
        report.add(
            f"{n:,} members: server CPU, per delivery",
            f"{res['server_pct']:.0f}% of a core, " + (f"{per:.2f} µs" if per else "-"),
        )
        sub = harness.Report(title="")
        databases.add_rows(sub, res["database"])
        report.rows.extend((f"{n:,} members: {name}", value) for name, value in sub.rows)
        report.add(
            f"{n:,} members: client CPU / machine busy",
            f"{res['clients_pct']:.0f}% of a core / {res['machine_pct']:.0f}% of "
            f"{os.cpu_count()} cores (host steal {res['steal_pct']:.1f}%)",
        )
        report.add(
            f"{n:,} members: server RSS (MiB), setup",
            f"{res['memory']['rss_mib']:.0f}, {res['setup_s']:.0f} s",
        )
        report.add(
            f"{n:,} members: verification",
            "OK" if not res["failures"] else f"FAILED ({len(res['failures'])})",
        )
        report.failures.extend(f"{n} members: {f}" for f in res["failures"])
    report.config = [
        ("database", args.db),
        ("senders / window", f"{args.senders} / {args.window}"),
        ("rate", f"{args.rate:,.0f} msgs/s (paced)" if args.rate > 0 else "full speed"),
        ("receiver procs", str(args.procs)),
        ("warmup / measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("body", f"{args.body_size} chars"),
        ("transport / codec", "ws / json (receivers: benchmarks.wsrecv)"),
    ]
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report)
    for res in runs:
        deployment.print_profiles(res["profile"])
    harness.console.print(f"results: {path}")
    return (1 if report.failures else 0), out


__all__ = ["add_arguments", "default_procs", "receiver_main", "run", "sender_main"]
