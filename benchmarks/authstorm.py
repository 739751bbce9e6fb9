"""Scenario ``auth-storm``: connections reconnecting with tokens, as fast as they can.

A fresh server is started and ``--users`` accounts (default 200) are registered and
logged in over HTTP (cheap argon2 parameters: only token auths are measured, and a
token check is a SHA-256 lookup, no argon2). Then ``--clients`` coroutines spread
over ``--procs`` worker processes each loop, for ``--warmup`` + ``--duration``
seconds, over one cycle:

    connect → HTTP upgrade → ``hello`` + ``auth(token)`` (one write) → auth reply →
    close frame → the server answers it and closes the TCP connection

as fast as the replies come, or paced to a total of ``--rate`` cycles/s. Each
coroutine takes its worker's users in turn. The clients are the raw-socket
:class:`benchmarks.wsrecv.AuthProbe` (a few tens of µs of client CPU per cycle).
Because the server closes first, the TIME_WAIT states land on the server's side;
the clients also rotate over ``--source-addrs`` loopback source addresses
(127.0.0.2 …), so no source-port range runs out either way.

By default every cycle is a user's only connection, so each one makes the user
``online`` and then ``offline`` (a ``last_seen`` write) — what a reconnect storm after
a restart does. ``--keep-online`` holds one idle connection per user for the whole
run, which takes the presence transitions out and leaves the token auth itself.

Measured over the interval: token auths/s (completed ``ok`` auth replies), latency of
the whole connect → auth-reply cycle, of the auth alone (auth written → reply) and
of connect + upgrade, the server's CPU (and per auth), its busiest threads, client
CPU and server RSS. Verified: every cycle of the whole run authenticated (failures
counted by error code) and the server exits cleanly.

JSON (``benchmarks/results/auth-storm-<stamp>.json``), under ``"results"`` — the keys
the suite reads:

- ``auths_per_s`` — completed token auths per second over the interval;
- ``latency_ms`` — ``{"p50", "p99", "p99.9"}`` of the connect → auth-reply cycle (ms);
- ``auth_latency_ms`` — the same of the auth alone;
- ``burst_latency_ms`` — ``{"p50", "p99", "p99.9", "max"}`` of the connect → auth-reply
  cycle of every client's *first* cycle, when all ``--clients`` connect at once (before
  the measured interval): what a reconnect storm after a restart meets at the listen
  backlog;
- ``server_us_per_auth`` — server CPU µs per completed auth;
- ``server_pct`` / ``clients_pct`` — CPU in % of one core over the interval;
- ``steal_pct`` — CPU the host took from this virtual machine, in % of all cores;
- ``rss_mib`` — server RSS at the end; ``failures`` — failed cycles by error code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks import harness
from benchmarks.harness import Timeline
from benchmarks.wsrecv import (
    CycleResult,
    Event,
    Receiver,
    auth_cycle,
    auth_greeting,
    connect_receiver,
    upgrade_request,
)

SCENARIO: Final = "auth-storm"
MIB: Final = 1024 * 1024
TARGET_PER_S: Final = 5000.0
"""The issue's target: token auths per second."""
HOLD_CONCURRENCY: Final = 32
"""``--keep-online`` connections each worker opens at once."""

SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {"rate_per_s": 1e9, "rate_burst": 1_000_000, "heartbeat": 3600},
    # Setup registers and logs in --users accounts; the storm itself hashes no password.
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1},
}


def default_procs() -> int:
    """Generator processes: one per core."""
    return max(2, os.cpu_count() or 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``auth-storm`` sub-command's options."""
    parser.add_argument(
        "--users", type=int, default=200, help="distinct users/tokens (default 200)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=64,
        help="reconnecting coroutines in all, split over --procs (default 64)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="total cycles/s, paced; 0 = each client starts its next cycle at once (default)",
    )
    parser.add_argument(
        "--source-addrs",
        type=int,
        default=40,
        help="loopback source addresses 127.0.0.2 … to rotate over (default 40)",
    )
    parser.add_argument(
        "--keep-online",
        action="store_true",
        help="hold one idle connection per user during the run (no presence changes)",
    )
    parser.add_argument(
        "--cycle-timeout",
        type=float,
        default=10.0,
        help="seconds one cycle may take before it counts as a timeout (default 10)",
    )


# --- specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    host: str
    port: int
    tokens: tuple[str, ...]
    clients: int
    rate: float
    """This worker's cycles/s; 0 = unpaced."""
    addrs: tuple[str, ...]
    keep_online: bool
    cycle_timeout: float
    uvloop: bool
    progress_every: float


# --- worker processes -------------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    _raise_nofile()
    harness.run_async(_Worker(conn, spec).run(), uvloop=spec.uvloop)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.request = upgrade_request(spec.host, spec.port)
        self.greetings = [auth_greeting(t) for t in spec.tokens]
        self.measure = 0
        self.end = 0
        self.running = False
        self.next_token = 0
        self.next_addr = 0
        self.next_due = 0
        self.interval = round(1e9 / spec.rate) if spec.rate > 0 else 0
        self.ok = 0
        self.ok_window = 0
        self.failed = 0
        self.failed_window = 0
        self.errors: Counter[str] = Counter()
        self.client_closed = 0
        self.cycle_ns = array("q")
        self.auth_ns = array("q")
        self.connect_ns = array("q")
        self.close_ns = array("q")
        self.first_ns = array("q")
        self.held: list[Receiver] = []
        self.held_events = 0

    async def run(self) -> None:
        spec = self.spec
        if spec.keep_online:
            await self._hold()
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        self.conn.send(("ready", {"pid": os.getpid(), "held": len(self.held), "loop": loop}))
        what, data = await asyncio.to_thread(self.conn.recv)
        if what != "go":
            return
        timeline: Timeline = data
        self.measure, self.end = timeline.measure, timeline.end
        reporter = asyncio.create_task(self._progress())
        try:
            await _sleep_until(timeline.start)
            self.running = True
            self.next_due = time.monotonic_ns()
            clients = [asyncio.create_task(self._client()) for _ in range(spec.clients)]
            await _sleep_until(timeline.end)
            self.running = False
            await asyncio.gather(*clients)
        finally:
            reporter.cancel()
        held_lost = sum(1 for r in self.held if r.lost)
        for r in self.held:
            r.close()
        self.conn.send(
            (
                "result",
                {
                    "worker": spec.worker,
                    "pid": os.getpid(),
                    "ok": self.ok,
                    "ok_window": self.ok_window,
                    "failed": self.failed,
                    "failed_window": self.failed_window,
                    "errors": dict(self.errors),
                    "client_closed": self.client_closed,
                    "cycle_ns": self.cycle_ns,
                    "auth_ns": self.auth_ns,
                    "connect_ns": self.connect_ns,
                    "close_ns": self.close_ns,
                    "first_ns": self.first_ns,
                    "held": len(self.held),
                    "held_lost": held_lost,
                    "held_events": self.held_events,
                },
            )
        )

    async def _hold(self) -> None:
        spec = self.spec
        sem = asyncio.Semaphore(HOLD_CONCURRENCY)

        def on_event(rec: Receiver, ev: Event, now: int) -> None:
            self.held_events += 1

        async def one(i: int, token: str) -> Receiver:
            async with sem:
                addr = spec.addrs[i % len(spec.addrs)]
                return await connect_receiver(
                    spec.host, spec.port, token, on_event, local_addr=(addr, 0)
                )

        self.held = list(await asyncio.gather(*(one(i, t) for i, t in enumerate(spec.tokens))))

    async def _client(self) -> None:
        spec = self.spec
        n_tokens = len(self.greetings)
        n_addrs = len(spec.addrs)
        first = True
        while self.running:
            if self.interval:
                due = self.next_due
                self.next_due = due + self.interval
                delay = due - time.monotonic_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                    if not self.running:
                        break
            greeting = self.greetings[self.next_token]
            self.next_token = (self.next_token + 1) % n_tokens
            addr = spec.addrs[self.next_addr]
            self.next_addr = (self.next_addr + 1) % n_addrs
            res = await auth_cycle(
                spec.host,
                spec.port,
                self.request,
                greeting,
                local_addr=(addr, 0),
                wait_s=spec.cycle_timeout,
            )
            if first and res.error is None:
                self.first_ns.append(res.reply_ns - res.start_ns)
            first = False
            self._record(res)

    def _record(self, res: CycleResult) -> None:
        t = res.reply_ns or res.end_ns
        in_window = self.measure <= t < self.end
        if not res.server_closed:
            self.client_closed += 1
        if res.error is not None:
            self.failed += 1
            self.errors[res.error] += 1
            if in_window:
                self.failed_window += 1
            return
        self.ok += 1
        if in_window:
            self.ok_window += 1
            self.cycle_ns.append(res.reply_ns - res.start_ns)
            self.auth_ns.append(res.reply_ns - res.auth_ns)
            self.connect_ns.append(res.auth_ns - res.start_ns)
            self.close_ns.append(res.end_ns - res.reply_ns)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            with contextlib.suppress(OSError):
                self.conn.send(("progress", (self.ok, self.failed)))


async def _sleep_until(ns: int) -> None:
    delay = (ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


# --- the parent -------------------------------------------------------------------------


def source_addrs(count: int, first: int = 2) -> list[str]:
    """``count`` loopback addresses from ``127.0.0.<first>`` on (all of 127/8 is local)."""
    out = []
    for i in range(first, first + count):
        out.append(f"127.0.{i // 256}.{i % 256}" if i < 65536 else f"127.{i // 65536}.0.1")
    return out


def tcp_sockstat() -> dict[str, int]:
    """``/proc/net/sockstat``'s TCP line: inuse, orphan, tw, alloc, mem (pages)."""
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return {}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the scenario and return everything it measured (the JSON document, unwritten).

    ``out["results"]`` holds the stable keys listed in the module docstring;
    ``out["verification"]["failures"]`` is empty when everything checked out.
    """
    if args.users < 1 or args.clients < 1 or args.procs < 1 or args.duration <= 0:
        raise SystemExit("--users, --clients, --procs and --duration must be positive")
    if args.source_addrs < 1:
        raise SystemExit("--source-addrs must be positive")
    procs = max(1, min(args.procs, args.clients, args.users))
    config = harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))
    stamp = getattr(args, "stamp", None) or harness.timestamp()
    failures: list[str] = []
    out: dict[str, Any] = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
    }
    addrs = source_addrs(args.source_addrs)
    with harness.ServerProcess(config, keep_dir=args.keep_data) as server:
        harness.console.print(
            f"[dim]server pid {server.pid} on {server.http_url}; "
            f"registering {args.users} users ...[/dim]"
        )
        t0 = time.monotonic()
        accounts = harness.run_async(
            harness.provision_users(server.http_url, args.users, concurrency=16)
        )
        users_s = time.monotonic() - t0
        tokens = [a.token for a in accounts]
        base, extra = divmod(args.clients, procs)
        specs = [
            WorkerSpec(
                worker=w,
                host=harness.HOST,
                port=server.http_port,
                tokens=tuple(tokens[w::procs]),
                clients=base + (1 if w < extra else 0),
                rate=args.rate * (base + (1 if w < extra else 0)) / args.clients,
                addrs=tuple(addrs[w::procs] or addrs),
                keep_online=args.keep_online,
                cycle_timeout=args.cycle_timeout,
                uvloop=not args.no_uvloop,
                progress_every=0.25,
            )
            for w in range(procs)
        ]
        pool = harness.WorkerPool(worker_main, specs)
        pool.start()
        try:
            ready = pool.gather("ready", timeout=120)
            measured = _drive(args, server, pool, stamp)
        except BaseException:
            pool.send_all(("stop", None))
            pool.join(5)
            raise
        pool.join()
        memory = harness.memory_of(server.pid)
        sockstat = tcp_sockstat()
        profiler = measured["profiler"]
        profile = profiler.summary() if profiler is not None else None
        alive = server.proc is not None and server.proc.poll() is None
        if not alive:
            failures.append(f"the server died during the run\n{server.logs()}")
        exit_code = server.stop()
        if exit_code != 0 and alive:
            failures.append(f"the server exited with code {exit_code}\n{server.logs()}")

    results: list[dict[str, Any]] = measured["results"]
    a, b = measured["snapshots"]
    window_s = args.duration
    ok_w = sum(r["ok_window"] for r in results)
    failed_w = sum(r["failed_window"] for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    cycle = harness.latency_summary(x for r in results for x in r["cycle_ns"])
    auth = harness.latency_summary(x for r in results for x in r["auth_ns"])
    connect = harness.latency_summary(x for r in results for x in r["connect_ns"])
    close = harness.latency_summary(x for r in results for x in r["close_ns"])
    burst = harness.latency_summary(x for r in results for x in r["first_ns"])
    worker_pids = [r["pid"] for r in results]
    server_cpu_s = b.procs[server.pid] - a.procs[server.pid]
    server_pct = harness.cpu_percent(a, b, [server.pid])
    held = sum(r["held"] for r in results)
    if errors:
        failures.append(
            "cycles failed: " + ", ".join(f"{k} x{v:,}" for k, v in errors.most_common())
        )
    if sum(r["ok"] for r in results) == 0:
        failures.append("no auth succeeded")
    if args.keep_online:
        if held != len(tokens):
            failures.append(f"held {held} of {len(tokens)} keep-online connections")
        lost = sum(r["held_lost"] for r in results)
        if lost:
            failures.append(f"{lost} keep-online connections were lost during the run")
    if len(results) != len(specs):
        failures.append(f"only {len(results)} of {len(specs)} workers reported")

    def pcts(s: dict[str, float]) -> dict[str, float | None]:
        return {f"p{k}": s.get(f"p{k}_ms") for k in ("50", "99", "99.9")}

    out["server"] = {"config": config, "command": server.command, "exit_code": exit_code}
    out["results"] = {
        "measured_s": window_s,
        "auths_per_s": ok_w / window_s,
        "failed_per_s": failed_w / window_s,
        "latency_ms": pcts(cycle),
        "auth_latency_ms": pcts(auth),
        "connect_latency_ms": pcts(connect),
        "cycle_latency": cycle,
        "auth_latency": auth,
        "connect_latency": connect,
        "close_latency": close,
        "burst_latency_ms": {**pcts(burst), "max": burst.get("max_ms")},
        "burst_latency": burst,
        "server_us_per_auth": 1e6 * server_cpu_s / ok_w if ok_w else None,
        "server_pct": server_pct,
        "server_sys_pct": harness.system_percent(a, b, server.pid),
        "server_threads_pct": harness.thread_percents(a, b),
        "clients_pct": harness.cpu_percent(a, b, worker_pids),
        "clients_pct_each": [harness.cpu_percent(a, b, [p]) for p in worker_pids],
        "machine_pct": harness.machine_percent(a, b),
        "steal_pct": harness.steal_percent(a, b),
        "rss_mib": memory.get("rss_mib"),
        "peak_rss_mib": memory.get("peak_rss_mib"),
        "failures": dict(errors),
        "totals": {
            "ok": sum(r["ok"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "client_closed": sum(r["client_closed"] for r in results),
        },
        "tcp_sockstat_end": sockstat,
        "users_s": users_s,
        "users": len(tokens),
        "clients": args.clients,
        "procs": len(specs),
        "keep_online": args.keep_online,
        "held": held,
        "loops": sorted({str(info["loop"]) for info in ready}),
    }
    out["verification"] = {"ok": not failures, "failures": failures}
    out["profile"] = profile
    out["timeseries"] = measured["timeseries"]
    return out


def _drive(
    args: argparse.Namespace,
    server: harness.ServerProcess,
    pool: harness.WorkerPool,
    stamp: str,
) -> dict[str, Any]:
    """Start the workers together, sample CPU at the interval's edges, collect results."""
    now = time.monotonic_ns()
    start = now + 300_000_000
    measure_at = start + round(args.warmup * 1e9)
    end = measure_at + round(args.duration * 1e9)
    pool.send_all(("go", Timeline(start, measure_at, end)))
    pids = [server.pid, *pool.pids]
    series = harness.Timeseries(now, server.pid, start_ns=start, measure_ns=measure_at, end_ns=end)
    results: dict[int, dict[str, Any]] = {}
    counts: dict[int, tuple[int, int]] = {}
    snap_a: harness.CpuSnapshot | None = None
    snap_b: harness.CpuSnapshot | None = None
    profiler: harness.PySpy | None = None
    rate_from: tuple[float, int] = (time.monotonic(), 0)
    rate = 0.0
    deadline = end / 1e9 + args.cycle_timeout + 60.0
    with harness.LiveStatus((end - now) / 1e9 + 1.0, enabled=not args.no_progress) as status:
        while len(results) < len(pool.procs):
            t = time.monotonic_ns()
            if t / 1e9 > deadline:
                raise TimeoutError("workers did not report their results")
            edge = measure_at if snap_a is None else end if snap_b is None else None
            timeout = 0.1 if edge is None else max(0.0, min(0.1, (edge - t) / 1e9))
            for i, (what, data) in pool.poll(timeout):
                if what == "progress":
                    counts[i] = data
                elif what == "result":
                    results[i] = data
                elif what == "error" or (what == "exit" and i not in results):
                    raise RuntimeError(f"worker {i} failed:\n{data}")
            t = time.monotonic_ns()
            ok = sum(c[0] for c in counts.values())
            failed = sum(c[1] for c in counts.values())
            series.sample(t, ok, 0)
            if t / 1e9 - rate_from[0] >= 1.0:
                rate = (ok - rate_from[1]) / (t / 1e9 - rate_from[0])
                rate_from = (t / 1e9, ok)
            if snap_a is None and t >= measure_at:
                snap_a = harness.take_snapshot(pids, threads_of=server.pid)
                if args.profile:
                    path = harness.RESULTS_DIR / f"{SCENARIO}-{stamp}-server.speedscope.json"
                    profiler = harness.PySpy(server.pid, args.duration, path)
                    profiler.start()
            # Not elif: one slow turn of this loop can pass both marks.
            if snap_a is not None and snap_b is None and t >= end:
                snap_b = harness.take_snapshot(pids, threads_of=server.pid)
            phase = "start" if t < start else "warmup" if t < measure_at else "measure"
            if t >= end:
                phase = "drain"
            status.update(
                phase,
                (t - now) / 1e9,
                f"auths {ok:,} ({rate:,.0f}/s)" + (f"  FAILED {failed:,}" if failed else ""),
            )
    assert snap_a is not None and snap_b is not None
    series.sample(time.monotonic_ns(), sum(c[0] for c in counts.values()), 0, force=True)
    return {
        "results": [results[i] for i in sorted(results)],
        "snapshots": (snap_a, snap_b),
        "profiler": profiler,
        "timeseries": series.as_dict(),
    }


def run(args: argparse.Namespace) -> int:
    """Run the scenario, print the table, write the JSON; 0 = ran and verified."""
    out = measure(args)
    res = out["results"]
    failures: list[str] = out["verification"]["failures"]
    report = harness.Report(title=f"auth-storm: token reconnects ({out['timestamp']})")
    report.failures.extend(failures)

    def ms(summary: dict[str, float], key: str) -> str:
        v = summary.get(key)
        return f"{v:.2f}" if v is not None else "-"

    def trio(summary: dict[str, float]) -> str:
        return " / ".join(ms(summary, k) for k in ("p50_ms", "p99_ms", "p99.9_ms"))

    r = report
    per_s = res["auths_per_s"]
    r.add(
        "token auths/s (completed)",
        f"{per_s:,.0f} ({100 * per_s / TARGET_PER_S:.0f}% of the {TARGET_PER_S:,.0f}/s target)",
    )
    if args.rate > 0:
        r.add("target rate (cycles/s)", f"{args.rate:,.0f}")
    r.add("connect → auth reply p50 / p99 / p99.9 (ms)", trio(res["cycle_latency"]))
    r.add(
        f"first cycles, {args.clients:,} connects at once: p50 / p99 / max (ms)",
        " / ".join(ms(res["burst_latency"], k) for k in ("p50_ms", "p99_ms", "max_ms")),
    )
    r.add("auth alone p50 / p99 / p99.9 (ms)", trio(res["auth_latency"]))
    r.add(
        "connect + upgrade p50 / p99 (ms)",
        " / ".join(trio(res["connect_latency"]).split(" / ")[:2]),
    )
    r.add(
        "close (reply → TCP gone) p50 / p99 (ms)",
        " / ".join(trio(res["close_latency"]).split(" / ")[:2]),
    )
    total_pct, sys_pct = res["server_pct"], res["server_sys_pct"]
    r.add(
        "server CPU (% of one core)",
        f"{total_pct:.0f}% (user {total_pct - sys_pct:.0f} + sys {sys_pct:.0f})",
    )
    per = res["server_us_per_auth"]
    r.add("server CPU per auth (µs)", f"{per:.0f}" if per else "-")
    r.add(
        "server busiest threads",
        ", ".join(f"{name} {pct:.0f}%" for name, pct in res["server_threads_pct"][:3]) or "-",
    )
    r.add(
        f"client CPU ({res['procs']} procs, % of one core)",
        f"{res['clients_pct']:.0f}% ("
        + " + ".join(f"{p:.0f}" for p in res["clients_pct_each"])
        + ")",
    )
    r.add(
        f"machine CPU busy ({os.cpu_count()} cores)",
        f"{res['machine_pct']:.0f}% (host steal {res['steal_pct']:.1f}%)",
    )
    r.add("server RSS / peak (MiB)", f"{res['rss_mib']:.0f} / {res['peak_rss_mib']:.0f}")
    tot = res["totals"]
    r.add(
        "whole run: ok / failed cycles",
        f"{tot['ok']:,} / {tot['failed']:,}"
        + (f" ({tot['client_closed']:,} closed by the client)" if tot["client_closed"] else ""),
    )
    tw = res["tcp_sockstat_end"].get("tw")
    if tw is not None:
        r.add("TCP sockets in TIME_WAIT at the end (machine)", f"{tw:,}")
    r.add("verification (every auth ok, server exits 0)", "OK" if not failures else "FAILED")
    r.add("server exit code (SIGTERM)", str(out["server"]["exit_code"]))
    r.config = [
        ("users / clients / procs", f"{res['users']} / {res['clients']} / {res['procs']}"),
        ("rate", f"{args.rate:,.0f} cycles/s (paced)" if args.rate > 0 else "unpaced"),
        (
            "presence",
            "one idle connection per user held (--keep-online)"
            if args.keep_online
            else "every cycle is the user's only connection",
        ),
        ("source addresses", f"{args.source_addrs} (127.0.0.2 …)"),
        ("warmup / measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("users registered in", f"{res['users_s']:.1f} s"),
    ]
    if args.profile:
        r.notes.append("py-spy sampled the server during the measured interval (costs some CPU)")
    path = harness.write_results(SCENARIO, out, out["timestamp"])
    profile = out.get("profile")
    harness.print_report(report, profile if profile and profile.get("samples") else None)
    if profile and profile.get("error"):
        harness.console.print(f"py-spy failed: {profile['error']}")
    harness.console.print(f"results: {path}")
    return 1 if failures else 0


__all__ = [
    "SCENARIO",
    "add_arguments",
    "default_procs",
    "measure",
    "run",
    "source_addrs",
    "worker_main",
]
