"""Scenario ``connections``: N authenticated WebSocket connections held idle.

A fresh server (one process) is started and ``ceil(N / --conns-per-user)`` accounts
are registered and logged in over HTTP (cheap argon2 parameters). Its RSS is read
(*before*), then ``--connections`` N WebSocket connections are opened from
``--procs`` worker processes (at most ``--max-per-proc`` each: every process here
is capped at 20,000 open files), each from one of ``--addrs-per-proc`` loopback
source addresses of its own (127.0.0.2 …, so no ephemeral-port range runs out),
``--connect-concurrency`` at a time per process (the listen backlog is finite).
Each connection upgrades, sends ``hello`` and ``auth(token)``, and then only
listens: the clients are :class:`benchmarks.wsrecv.Receiver` protocols.

A user's connections share its one login (multi-device: one token, several
connections). ``--conns-per-user 1`` gives every connection a user of its own,
which is more realistic but makes setup register N users (~110 users/s here,
about 140 s for 15,000); the default of 2 keeps setup near a minute.

Once all are connected the connections sit idle: ``--warmup`` seconds to settle,
then ``--duration`` measured seconds, over which the server's CPU (should be ~0:
only heartbeat sweeps run) and at whose end its RSS (*after*) are read. RSS per
connection is (after − before) / established. Then every connection sends a
``ping`` and must get its reply (``--ping-concurrency`` in flight per process), and
must have received nothing else and still be open; the server must still be
running, and exit 0 on SIGTERM after the clients close.

The server's idle-connection heartbeat is raised to an hour (``limits.heartbeat``)
so that nothing is closed for silence while setup runs, and rate limits are lifted.

JSON (``benchmarks/results/connections-<stamp>.json``), under ``"results"`` — the
keys the suite reads:

- ``connections`` — connections established (and authenticated);
- ``rss_per_conn_kib`` — server RSS growth per connection, KiB;
- ``rss_mib`` — server RSS with all connected and idle, MiB (``rss_before_mib``:
  after provisioning, before connecting);
- ``setup_s`` — provisioning + connecting, s (``provision_s``, ``connect_s`` apart);
- ``connect_rate`` — connections opened and authenticated per second during setup;
- ``idle_server_pct`` — server CPU while idle, % of one core;
- ``ping_latency_ms`` — ``{"p50", "p99", "p99.9"}`` of the final ping burst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks import harness
from benchmarks.wsrecv import Event, Receiver, connect_receiver

SCENARIO: Final = "connections"
KIB: Final = 1024
TARGET_CONNECTIONS: Final = 15_000
TARGET_KIB_PER_CONN: Final = 24.0
CONNECT_TOTAL: Final = 96
"""Connections opened at once over all processes by default: aiohttp listens with a
backlog of 128, and SYNs past a full accept queue are dropped (retried after 1 s)."""
MAX_PER_PROC: Final = 6_000
"""Default most connections per worker (each process may hold 20,000 files here)."""

SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {
        "rate_per_s": 1e9,
        "rate_burst": 1_000_000,
        # Setup takes a minute or more and the connections then only listen: none may
        # be closed for silence meanwhile.
        "heartbeat": 3600,
    },
    # Thousands of accounts are registered and logged in before the run; the
    # connections themselves authenticate with tokens (no argon2).
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1},
}


def default_procs() -> int:
    """Client processes for the default 15,000 connections (at most 6,000 each)."""
    return math.ceil(TARGET_CONNECTIONS / MAX_PER_PROC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``connections`` sub-command's options."""
    parser.add_argument(
        "--connections",
        type=int,
        default=TARGET_CONNECTIONS,
        help=f"connections to open and hold (default {TARGET_CONNECTIONS:,})",
    )
    parser.add_argument(
        "--conns-per-user",
        type=int,
        default=2,
        help="connections sharing one user's login/token (default 2; 1 = one user each)",
    )
    parser.add_argument(
        "--max-per-proc",
        type=int,
        default=MAX_PER_PROC,
        help=f"most connections per client process; --procs is raised to fit "
        f"(default {MAX_PER_PROC:,})",
    )
    parser.add_argument(
        "--addrs-per-proc",
        type=int,
        default=4,
        help="loopback source addresses per client process (default 4)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=0,
        help=f"connections each process opens at once; 0 = {CONNECT_TOTAL} over all "
        "processes, within the server's listen backlog of 128 (default 0)",
    )
    parser.add_argument(
        "--ping-concurrency",
        type=int,
        default=256,
        help="pings in flight per process in the final check (default 256)",
    )
    parser.add_argument(
        "--provision-concurrency",
        type=int,
        default=32,
        help="register/login requests at once during setup (default 32)",
    )


# --- specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    host: str
    port: int
    tokens: tuple[str, ...]
    """One per connection (repeated when users have several)."""
    addrs: tuple[str, ...]
    connect_concurrency: int
    ping_concurrency: int
    uvloop: bool
    progress_every: float


# --- worker processes -------------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    harness.run_async(_Worker(conn, spec).run(), uvloop=spec.uvloop)


class _Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.receivers: list[Receiver] = []
        self.connected = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.connect_ns = array("q")

    def on_event(self, rec: Receiver, ev: Event, now: int) -> None:
        self.unexpected[ev.op or "?"] += 1

    async def run(self) -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        self.conn.send(("ready", {"pid": os.getpid(), "loop": loop}))
        what, _ = await asyncio.to_thread(self.conn.recv)
        if what != "connect":
            return
        reporter = asyncio.create_task(self._progress())
        t0 = time.monotonic_ns()
        try:
            await self._connect_all()
        finally:
            reporter.cancel()
        t1 = time.monotonic_ns()
        self.conn.send(
            (
                "connected",
                {
                    "connected": self.connected,
                    "failed": self.failed,
                    "errors": dict(self.errors),
                    "start_ns": t0,
                    "end_ns": t1,
                    "connect_ns": self.connect_ns,
                },
            )
        )
        what, _ = await asyncio.to_thread(self.conn.recv)
        if what != "check":
            self._close_all()
            return
        self.conn.send(("checked", await self._check()))
        what, _ = await asyncio.to_thread(self.conn.recv)
        self._close_all()
        await asyncio.sleep(0.5)  # let the close frames leave
        self.conn.send(("result", {"pid": os.getpid(), "closed": len(self.receivers)}))

    async def _connect_all(self) -> None:
        spec = self.spec
        sem = asyncio.Semaphore(spec.connect_concurrency)
        addrs = spec.addrs

        async def one(i: int, token: str) -> None:
            async with sem:
                t = time.monotonic_ns()
                try:
                    rec = await connect_receiver(
                        spec.host,
                        spec.port,
                        token,
                        self.on_event,
                        local_addr=(addrs[i % len(addrs)], 0),
                    )
                except (OSError, RuntimeError, TimeoutError) as exc:
                    self.failed += 1
                    self.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    return
                self.connect_ns.append(time.monotonic_ns() - t)
                self.receivers.append(rec)
                self.connected += 1

        await asyncio.gather(*(one(i, t) for i, t in enumerate(spec.tokens)))

    async def _check(self) -> dict[str, Any]:
        """Ping every connection; count what is open, answered, lost or unexpected."""
        sem = asyncio.Semaphore(self.spec.ping_concurrency)
        rtt = array("q")
        bad: Counter[str] = Counter()
        lost_before = sum(1 for r in self.receivers if r.lost)
        closed = Counter(r.closed_reason for r in self.receivers if r.closed_reason)

        async def ping(i: int, rec: Receiver) -> None:
            if rec.lost:
                return
            async with sem:
                t = time.monotonic_ns()
                try:
                    ev = await rec.request({"op": "ping", "rid": f"p{i}"}, wait_s=30.0)
                except (OSError, TimeoutError) as exc:
                    bad[type(exc).__name__] += 1
                    return
                if not ev.ok:
                    bad[str((ev.error or {}).get("code", "error"))] += 1
                    return
                rtt.append(time.monotonic_ns() - t)

        await asyncio.gather(*(ping(i, r) for i, r in enumerate(self.receivers)))
        return {
            "open": len(self.receivers) - lost_before,
            "lost": lost_before,
            "closed_reasons": dict(closed),
            "pinged": len(rtt),
            "ping_failed": dict(bad),
            "unexpected": dict(self.unexpected),
            "ping_ns": rtt,
        }

    def _close_all(self) -> None:
        for r in self.receivers:
            r.close()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            with contextlib.suppress(OSError):
                self.conn.send(("progress", (self.connected, self.failed)))


# --- memory of the server ---------------------------------------------------------------


def server_memory(pid: int) -> dict[str, float]:
    """RSS and its parts (anonymous, file-backed), peak, and the heap's VM size, in MiB."""
    want = {
        "VmRSS": "rss_mib",
        "VmHWM": "peak_rss_mib",
        "RssAnon": "anon_mib",
        "RssFile": "file_mib",
        "VmData": "data_mib",
    }
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in want:
                out[want[key]] = int(rest.split()[0]) / KIB
    return out


def tcp_sockstat() -> dict[str, int]:
    """``/proc/net/sockstat``'s TCP line: inuse, orphan, tw, alloc, mem (pages)."""
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return {}


def listen_overflows() -> int:
    """The machine's ``TcpExt ListenOverflows`` so far (SYNs dropped: accept queue full)."""
    with contextlib.suppress(OSError), open("/proc/net/netstat") as fh:
        lines = [line.split() for line in fh if line.startswith("TcpExt:")]
    with contextlib.suppress(NameError, IndexError, ValueError):
        keys, values = lines[0], lines[1]
        return int(values[keys.index("ListenOverflows")])
    return 0


def slab_kib() -> int:
    """The machine's kernel slab memory (``Slab`` of ``/proc/meminfo``), KiB."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def source_addrs(count: int, first: int = 2) -> list[str]:
    """``count`` loopback addresses from ``127.0.0.<first>`` on (all of 127/8 is local)."""
    return [f"127.0.{i // 256}.{i % 256}" for i in range(first, first + count)]


# --- the parent -------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the scenario and return everything it measured (the JSON document, unwritten).

    ``out["results"]`` holds the stable keys listed in the module docstring;
    ``out["verification"]["failures"]`` is empty when everything checked out.
    """
    n = args.connections
    if n < 1 or args.conns_per_user < 1 or args.max_per_proc < 1 or args.duration < 0:
        raise SystemExit("--connections, --conns-per-user and --max-per-proc must be positive")
    procs = max(1, min(n, max(args.procs, math.ceil(n / args.max_per_proc))))
    n_users = math.ceil(n / args.conns_per_user)
    config = harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))
    stamp = getattr(args, "stamp", None) or harness.timestamp()
    failures: list[str] = []
    out: dict[str, Any] = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
    }
    addrs = source_addrs(procs * args.addrs_per_proc)
    profile: dict[str, Any] | None = None
    with harness.ServerProcess(config, keep_dir=args.keep_data) as server:
        harness.console.print(
            f"[dim]server pid {server.pid} on {server.http_url}; registering {n_users:,} "
            f"users for {n:,} connections ({args.conns_per_user} per user) ...[/dim]"
        )
        t_setup = time.monotonic()
        accounts = harness.run_async(
            _provision(server.http_url, n_users, args.provision_concurrency, args.no_progress)
        )
        provision_s = time.monotonic() - t_setup
        tokens = [accounts[i % n_users].token for i in range(n)]
        specs = [
            WorkerSpec(
                worker=w,
                host=harness.HOST,
                port=server.http_port,
                tokens=tuple(tokens[w::procs]),
                addrs=tuple(addrs[w * args.addrs_per_proc : (w + 1) * args.addrs_per_proc]),
                connect_concurrency=args.connect_concurrency or max(1, CONNECT_TOTAL // procs),
                ping_concurrency=args.ping_concurrency,
                uvloop=not args.no_uvloop,
                progress_every=0.25,
            )
            for w in range(procs)
        ]
        pool = harness.WorkerPool(worker_main, specs)
        pool.start()
        try:
            ready = pool.gather("ready", timeout=60)
            time.sleep(1.0)  # the server settles after provisioning
            mem_before = server_memory(server.pid)
            sock_before = tcp_sockstat()
            slab_before = slab_kib()
            overflows_before = listen_overflows()
            measured = _drive(args, server, pool, stamp, n)
            mem_after: dict[str, float] = measured["mem_after"]
            alive = server.proc is not None and server.proc.poll() is None
            pool.send_all(("close", None))
            results = pool.gather("result", timeout=60)
        except BaseException:
            pool.send_all(("stop", None))
            pool.join(5)
            raise
        pool.join()
        if measured["profiler"] is not None:
            profile = measured["profiler"].summary()
        alive = alive and server.proc is not None and server.proc.poll() is None
        if not alive:
            failures.append(f"the server died during the run\n{server.logs()}")
        t_stop = time.monotonic()
        exit_code = server.stop(timeout=60)
        stop_s = time.monotonic() - t_stop
        if exit_code != 0 and alive:
            failures.append(f"the server exited with code {exit_code}\n{server.logs()}")

    conn_res: list[dict[str, Any]] = measured["connected"]
    checks: list[dict[str, Any]] = measured["checked"]
    established = sum(r["connected"] for r in conn_res)
    connect_s = (max(r["end_ns"] for r in conn_res) - min(r["start_ns"] for r in conn_res)) / 1e9
    errors: Counter[str] = Counter()
    for r in conn_res:
        errors.update(r["errors"])
    if established < n:
        failures.append(
            f"{n - established:,} of {n:,} connections failed: "
            + ", ".join(f"{k} x{v}" for k, v in errors.most_common(5))
        )
    open_n = sum(c["open"] for c in checks)
    pinged = sum(c["pinged"] for c in checks)
    lost = sum(c["lost"] for c in checks)
    closed: Counter[str] = Counter()
    ping_failed: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for c in checks:
        closed.update(c["closed_reasons"])
        ping_failed.update(c["ping_failed"])
        unexpected.update(c["unexpected"])
    if lost:
        failures.append(f"{lost:,} connections were closed while idle: {dict(closed)}")
    if pinged != established:
        failures.append(
            f"{pinged:,} of {established:,} answered the final ping {dict(ping_failed)}"
        )
    if unexpected:
        failures.append(f"idle connections received events: {dict(unexpected)}")
    a, b = measured["snapshots"]
    delta_mib = mem_after["rss_mib"] - mem_before["rss_mib"]
    per_conn_kib = delta_mib * KIB / established if established else None
    anon_kib = (
        (mem_after["anon_mib"] - mem_before["anon_mib"]) * KIB / established
        if established and "anon_mib" in mem_after
        else None
    )
    ping = harness.latency_summary(x for c in checks for x in c["ping_ns"])
    connect_lat = harness.latency_summary(x for r in conn_res for x in r["connect_ns"])
    kernel_kib = (measured["slab_after"] - slab_before) / established if established else None
    worker_pids = [info["pid"] for info in ready]
    out["server"] = {"config": config, "command": server.command, "exit_code": exit_code}
    out["results"] = {
        "connections": established,
        "requested": n,
        "users": n_users,
        "conns_per_user": args.conns_per_user,
        "procs": procs,
        "rss_per_conn_kib": per_conn_kib,
        "anon_per_conn_kib": anon_kib,
        "rss_mib": mem_after["rss_mib"],
        "rss_before_mib": mem_before["rss_mib"],
        "memory_before": mem_before,
        "memory_after": mem_after,
        "kernel_slab_kib_per_conn": kernel_kib,
        "listen_overflows": measured["overflows_after"] - overflows_before,
        "tcp_sockstat": {"before": sock_before, "after": measured["sock_after"]},
        "setup_s": provision_s + connect_s,
        "provision_s": provision_s,
        "connect_s": connect_s,
        "connect_rate": established / connect_s if connect_s > 0 else None,
        "connect_latency": connect_lat,
        "idle_s": b.wall - a.wall,
        "idle_server_pct": harness.cpu_percent(a, b, [server.pid]),
        "idle_server_threads_pct": harness.thread_percents(a, b),
        "idle_clients_pct": harness.cpu_percent(a, b, worker_pids),
        "ping_latency_ms": {f"p{k}": ping.get(f"p{k}_ms") for k in ("50", "99", "99.9")},
        "ping_latency": ping,
        "open_at_end": open_n,
        "pinged": pinged,
        "lost": lost,
        "closed_reasons": dict(closed),
        "unexpected_events": dict(unexpected),
        "connect_errors": dict(errors),
        "server_alive": alive,
        "stop_s": stop_s,
        "closed_by_clients": sum(r["closed"] for r in results),
    }
    out["verification"] = {"ok": not failures, "failures": failures}
    out["profile"] = profile
    out["timeseries"] = measured["timeseries"]
    return out


async def _provision(
    http_url: str, count: int, concurrency: int, quiet: bool
) -> list[harness.Account]:
    """harness.provision_users in slices, with a progress line per slice."""
    done: list[harness.Account] = []
    step = max(500, concurrency * 16)
    t0 = time.monotonic()
    with harness.LiveStatus(float(count), enabled=not quiet) as status:
        while len(done) < count:
            k = min(step, count - len(done))
            done.extend(
                await harness.provision_users(
                    http_url, k, prefix=f"c{len(done)}", concurrency=concurrency
                )
            )
            rate = len(done) / max(1e-9, time.monotonic() - t0)
            status.update("users", float(len(done)), f"{len(done):,} / {count:,} ({rate:,.0f}/s)")
    return done


def _drive(
    args: argparse.Namespace,
    server: harness.ServerProcess,
    pool: harness.WorkerPool,
    stamp: str,
    n: int,
) -> dict[str, Any]:
    """Connect everything, hold it idle (CPU snapshots, RSS), then run the check."""
    now = time.monotonic_ns()
    series = harness.Timeseries(now, server.pid, start_ns=now, measure_ns=now, end_ns=now)
    pool.send_all(("connect", None))
    counts: dict[int, tuple[int, int]] = {}
    connected: dict[int, dict[str, Any]] = {}
    rate = 0.0
    rate_from = (time.monotonic(), 0)
    deadline = time.monotonic() + max(120.0, n / 50)
    with harness.LiveStatus(float(n), enabled=not args.no_progress) as status:
        while len(connected) < len(pool.procs):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not finish connecting")
            for i, (what, data) in pool.poll(0.1):
                if what == "progress":
                    counts[i] = data
                elif what == "connected":
                    connected[i] = data
                    counts[i] = (data["connected"], data["failed"])
                elif what in ("error", "exit"):
                    raise RuntimeError(f"worker {i} failed:\n{data}")
            ok = sum(c[0] for c in counts.values())
            bad = sum(c[1] for c in counts.values())
            t = time.monotonic()
            series.sample(time.monotonic_ns(), ok, 0)
            if t - rate_from[0] >= 1.0:
                rate = (ok - rate_from[1]) / (t - rate_from[0])
                rate_from = (t, ok)
            status.update(
                "connect",
                float(ok + bad),
                f"connected {ok:,} / {n:,} ({rate:,.0f}/s)" + (f"  FAILED {bad:,}" if bad else ""),
            )
    established = sum(c["connected"] for c in connected.values())
    pids = [server.pid, *pool.pids]
    measure_at = time.monotonic_ns() + round(args.warmup * 1e9)
    end = measure_at + round(args.duration * 1e9)
    series.measure_ns, series.end_ns = measure_at, end
    snap_a: harness.CpuSnapshot | None = None
    profiler: harness.PySpy | None = None
    with harness.LiveStatus(
        (end - time.monotonic_ns()) / 1e9, enabled=not args.no_progress
    ) as status:
        t0 = time.monotonic_ns()
        while True:
            t = time.monotonic_ns()
            if snap_a is None and t >= measure_at:
                snap_a = harness.take_snapshot(pids, threads_of=server.pid)
                if args.profile and args.duration >= 1:
                    path = harness.RESULTS_DIR / f"{SCENARIO}-{stamp}-server.speedscope.json"
                    profiler = harness.PySpy(server.pid, args.duration, path)
                    profiler.start()
            if t >= end:
                break
            for i, (what, data) in pool.poll(min(0.25, max(0.0, (end - t) / 1e9))):
                if what in ("error", "exit"):
                    raise RuntimeError(f"worker {i} failed:\n{data}")
            series.sample(time.monotonic_ns(), established, 0)
            rss = server_memory(server.pid)["rss_mib"]
            status.update(
                "settle" if t < measure_at else "idle",
                (t - t0) / 1e9,
                f"{established:,} connections idle, server RSS {rss:,.0f} MiB",
            )
    snap_b = harness.take_snapshot(pids, threads_of=server.pid)
    if snap_a is None:
        snap_a = snap_b
    mem_after = server_memory(server.pid)
    sock_after = tcp_sockstat()
    slab_after = slab_kib()
    overflows_after = listen_overflows()
    series.sample(time.monotonic_ns(), established, 0, force=True)
    pool.send_all(("check", None))
    checked = pool.gather("checked", timeout=120)
    return {
        "connected": [connected[i] for i in sorted(connected)],
        "checked": checked,
        "snapshots": (snap_a, snap_b),
        "mem_after": mem_after,
        "sock_after": sock_after,
        "slab_after": slab_after,
        "overflows_after": overflows_after,
        "profiler": profiler,
        "timeseries": series.as_dict(),
    }


def run(args: argparse.Namespace) -> int:
    """Run the scenario, print the table, write the JSON; 0 = ran and verified."""
    out = measure(args)
    res = out["results"]
    failures: list[str] = out["verification"]["failures"]
    report = harness.Report(
        title=f"connections: idle authenticated WebSockets ({out['timestamp']})"
    )
    report.failures.extend(failures)
    r = report
    est = res["connections"]
    r.add(
        "connections established (authenticated)",
        f"{est:,} of {res['requested']:,} (target ≥ {TARGET_CONNECTIONS:,})",
    )
    per = res["rss_per_conn_kib"]
    r.add(
        "server RSS per connection (KiB)",
        f"{per:.1f} (target ≤ {TARGET_KIB_PER_CONN:g})" if per is not None else "-",
    )
    anon = res["anon_per_conn_kib"]
    if anon is not None:
        r.add("  of which anonymous (heap) (KiB)", f"{anon:.1f}")
    mb, ma = res["memory_before"], res["memory_after"]
    r.add(
        "server RSS before / after (MiB)",
        f"{mb['rss_mib']:,.0f} / {ma['rss_mib']:,.0f} (peak {ma.get('peak_rss_mib', 0):,.0f})",
    )
    k = res["kernel_slab_kib_per_conn"]
    if k is not None:
        r.add("kernel slab growth per connection, both ends (KiB, machine-wide)", f"{k:.1f}")
    r.add(
        "setup: users / connecting (s)",
        f"{res['provision_s']:.0f} / {res['connect_s']:.1f} ({res['setup_s']:.0f} in all)",
    )
    rate = res["connect_rate"]
    r.add(
        "connect + auth rate during setup (/s)",
        (f"{rate:,.0f}" if rate else "-") + f" (listen overflows {res['listen_overflows']:,})",
    )
    cl = res["connect_latency"]
    r.add(
        "connect + auth latency p50 / p99 / p99.9 (ms)",
        " / ".join(f"{cl.get(q, math.nan):.1f}" for q in ("p50_ms", "p99_ms", "p99.9_ms")),
    )
    r.add(
        f"server CPU idle, over {res['idle_s']:.0f} s (% of one core)",
        f"{res['idle_server_pct']:.2f}%",
    )
    r.add("client CPU idle (% of one core)", f"{res['idle_clients_pct']:.2f}%")
    pl = res["ping_latency"]
    r.add(
        "final ping, every connection: p50 / p99 / p99.9 (ms)",
        " / ".join(f"{pl.get(q, math.nan):.1f}" for q in ("p50_ms", "p99_ms", "p99.9_ms")),
    )
    r.add(
        "open / answered the ping / lost / unexpected events",
        f"{res['open_at_end']:,} / {res['pinged']:,} / {res['lost']:,} / "
        f"{sum(res['unexpected_events'].values()):,}",
    )
    r.add(
        "server alive at the end / exit code (SIGTERM)",
        f"{res['server_alive']} / {out['server']['exit_code']} (stopped in {res['stop_s']:.1f} s)",
    )
    r.add("verification", "OK" if not failures else f"FAILED ({len(failures)})")
    r.config = [
        (
            "users / connections per user",
            f"{res['users']:,} / {res['conns_per_user']} (one login, one token per user)",
        ),
        ("client procs / source addresses each", f"{res['procs']} / {args.addrs_per_proc}"),
        (
            "connect concurrency per proc",
            str(args.connect_concurrency or max(1, CONNECT_TOTAL // res["procs"])),
        ),
        ("settle / idle measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("server heartbeat", f"{out['server']['config']['limits']['heartbeat']} s"),
    ]
    r.notes.append(
        "RSS per connection = (RSS with all connected and idle - RSS after provisioning) / "
        "connections; the kernel's socket memory is not in RSS (shown apart: /proc/meminfo "
        "Slab growth over both ends of each connection, machine-wide, so noisy)"
    )
    path = harness.write_results(SCENARIO, out, out["timestamp"])
    profile = out.get("profile")
    harness.print_report(report, profile if profile and profile.get("samples") else None)
    harness.console.print(f"results: {path}")
    return 1 if failures else 0


__all__ = [
    "SCENARIO",
    "add_arguments",
    "default_procs",
    "measure",
    "run",
    "server_memory",
    "worker_main",
]
