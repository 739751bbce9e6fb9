"""Scenario ``baselines``: what this machine does without IMServer, for ours/reference ratios.

Four references, each measured like the scenarios (load from separate ``spawn``
processes, server CPU from ``/proc`` over the measured interval):

- **echo** -- :mod:`benchmarks.reference.echo_server` ``--mode echo`` (asyncio + uvloop,
  4-byte length-prefixed TCP, as IMServer's TCP transport): ``--echo-connections``
  sockets spread over ``--procs`` processes, each keeping ``--echo-window`` frames of
  ``--payload-size`` bytes (a JSON ``msg`` event) in flight. Echoed msgs/s and server
  CPU per echoed message. Compare with ``dm``'s server CPU per message.
- **fanout** -- the same server in ``--mode fanout``: one publisher process, and for
  each size in ``--members`` that many subscriber sockets over ``--procs`` processes;
  the server writes each frame to every other socket, coalesced per loop iteration.
  Deliveries/s and server CPU per delivery. Compare with ``room``.
- **nats** -- nats-server fan-out: one publisher through nats-py, ``--nats-subscribers``
  subscriptions on one subject over ``--nats-connections`` connections in ``--procs``
  processes. nats-server on ``--nats-url`` (127.0.0.1:4222) is used when it answers;
  otherwise ``nats-server`` from PATH (or /usr/sbin) is started on a free port and
  stopped at the end. Its CPU comes from ``/proc`` (the process is found by name).
  Subscribers are raw NATS-protocol counters by default (``--nats-client nats-raw``):
  nats-py parses each message in Python (tens of µs), which on two shared cores would
  measure the client, not the server; ``--nats-client nats-py`` uses it anyway.
- **sqlite** -- a minimal group-commit loop through the ``sqlite3`` module: message rows
  (conv, seq, sender, ts, body) inserted ``--sqlite-batch`` at a time, one commit per
  batch, WAL + ``synchronous=FULL`` (an fsync per commit), in a process of its own.
  Compare with ``dm``'s acked msgs/s.

The publishers never run more than :data:`benchmarks.reference.clients.MAX_LAG`
messages ahead of the slowest subscriber, and every subscriber must get every
message (checked), so a figure never comes from messages dropped or buffered.

JSON (``benchmarks/results/baselines-<stamp>.json``), the keys the suite reads::

    "results": {
      "echo":   {"msgs_per_s", "server_us_per_msg", "server_pct", "clients_pct"},
      "fanout": {"<members>": {"deliveries_per_s", "server_us_per_delivery",
                               "server_pct", "clients_pct", "msgs_per_s"}},
      "nats":   {"deliveries_per_s", "server_us_per_delivery", "subscribers",
                 "connections", "client", "server_pct", "clients_pct", "msgs_per_s"},
      "sqlite": {"msgs_per_s", "us_per_msg", "wall_us_per_msg", "batch"}
    }

A reference that was skipped (``--only``) or could not run is absent (with the reason
under ``"skipped"``); CPU figures are in % of one core and µs of CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Final

from benchmarks import harness
from benchmarks.harness import Timeline
from benchmarks.reference import clients
from benchmarks.reference.clients import (
    EchoSpec,
    PublisherSpec,
    SqliteSpec,
    SubscriberSpec,
)

SCENARIO: Final = "baselines"
REFERENCES: Final = ("echo", "fanout", "nats", "sqlite")
REPO: Final = Path(__file__).resolve().parent.parent
NATS_SERVER_PATHS: Final = ("/usr/sbin/nats-server", "/usr/bin/nats-server")


def default_procs() -> int:
    """Client processes per reference: one per core, at least 2."""
    return max(2, os.cpu_count() or 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``baselines`` sub-command's options."""
    parser.add_argument(
        "--only",
        default=",".join(REFERENCES),
        help=f"references to run, comma-separated (default {','.join(REFERENCES)})",
    )
    parser.add_argument(
        "--payload-size", type=int, default=200, help="bytes per message (default 200)"
    )
    parser.add_argument("--echo-connections", type=int, default=16, help="default 16")
    parser.add_argument(
        "--echo-window", type=int, default=16, help="frames in flight per connection (default 16)"
    )
    parser.add_argument(
        "--members",
        default="1000",
        help="fan-out sizes (subscriber sockets), comma-separated, e.g. 100,1000,10000 "
        "(default 1000)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=8,
        help="messages the fan-out publishers keep in flight, like room's sender (default 8)",
    )
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="default :4222")
    parser.add_argument("--nats-subscribers", type=int, default=1000, help="default 1000")
    parser.add_argument(
        "--nats-connections",
        type=int,
        default=0,
        help="connections the subscriptions are spread over (default: one each)",
    )
    parser.add_argument(
        "--nats-client",
        choices=("nats-raw", "nats-py"),
        default="nats-raw",
        help="subscriber implementation (default nats-raw; the publisher is always nats-py)",
    )
    parser.add_argument(
        "--sqlite-batch", type=int, default=256, help="rows per commit (default 256)"
    )
    parser.add_argument(
        "--sqlite-convs", type=int, default=16, help="conversations the rows go to (default 16)"
    )


# --- processes --------------------------------------------------------------------------


class RefServer:
    """``python -m benchmarks.reference.echo_server`` on a free port."""

    def __init__(self, mode: str, uvloop: bool) -> None:
        self.mode = mode
        self.uvloop = uvloop
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> RefServer:
        (self.port,) = harness.free_ports(1)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.reference.echo_server",
            "--port",
            str(self.port),
            "--mode",
            self.mode,
        ]
        if not self.uvloop:
            cmd.append("--no-uvloop")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True
        )
        _wait_port(harness.HOST, self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _find_nats_pid(port: int) -> int | None:
    """The pid of the nats-server process serving ``port`` (by name and command line)."""
    found: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm != "nats-server":
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        ports = [
            words[i + 1]
            for i, w in enumerate(words[:-1])
            if w in ("-p", "--port", "-port", "--addr_port")
        ] + [w.split("=", 1)[1] for w in words if w.startswith(("--port=", "-p="))]
        score = 2 if str(port) in ports else 1 if not ports and port == 4222 else 0
        found.append((score, int(entry)))
    found.sort(reverse=True)
    return found[0][1] if found and found[0][0] > 0 else (found[0][1] if len(found) == 1 else None)


class NatsServer:
    """The running nats-server at ``url`` or, when none answers, one started here."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlparse(url)
        self.host = parsed.hostname or harness.HOST
        self.port = parsed.port or 4222
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.started = False

    def __enter__(self) -> NatsServer:
        if _port_open(self.host, self.port):
            self.pid = _find_nats_pid(self.port)
            return self
        exe = shutil.which("nats-server") or next(
            (p for p in NATS_SERVER_PATHS if os.access(p, os.X_OK)), None
        )
        if exe is None:
            raise RuntimeError(f"no nats-server on {self.host}:{self.port} and none installed")
        self.host = harness.HOST
        (self.port,) = harness.free_ports(1)
        self.proc = subprocess.Popen(
            [exe, "-a", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started = True
        self.pid = self.proc.pid
        _wait_port(self.host, self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)


# --- the measured run -------------------------------------------------------------------


def _drive(
    args: argparse.Namespace,
    label: str,
    server_pid: int | None,
    subs: harness.WorkerPool,
    pub: harness.WorkerPool | None,
) -> dict[str, Any]:
    """Start the timeline, relay the slowest subscriber's count to the publisher, take
    CPU snapshots at the interval's edges and collect the results."""
    now = time.monotonic_ns()
    start = now + 300_000_000
    measure = start + round(args.warmup * 1e9)
    end = measure + round(args.duration * 1e9)
    timeline = Timeline(start, measure, end)
    pools = [subs] if pub is None else [subs, pub]
    for pool in pools:
        pool.send_all(("go", timeline))
    pids = ([server_pid] if server_pid else []) + [p for pool in pools for p in pool.pids]
    snap_a: harness.CpuSnapshot | None = None
    snap_b: harness.CpuSnapshot | None = None
    floors: dict[int, int] = {}
    delivered: dict[int, int] = {}
    sent_floor = -1
    published: dict[str, Any] | None = None
    results: dict[int, dict[str, Any]] = {}
    deadline = end / 1e9 + args.drain_timeout + 60.0
    with harness.LiveStatus((end - now) / 1e9 + 1.0, enabled=not args.no_progress) as status:
        while len(results) < len(subs.procs) or (pub is not None and published is None):
            t = time.monotonic_ns()
            if t / 1e9 > deadline:
                raise TimeoutError(f"{label}: workers did not report their results")
            edge = measure if snap_a is None else end if snap_b is None else None
            timeout = 0.05 if edge is None else max(0.0, min(0.05, (edge - t) / 1e9))
            for i, (what, data) in subs.poll(timeout if pub is None else timeout / 2):
                if what == "progress":
                    delivered[i], floors[i] = data
                elif what == "result":
                    results[i] = data
                elif what == "error" or (what == "exit" and i not in results):
                    raise RuntimeError(f"{label}: worker {i} failed:\n{data}")
            if pub is not None:
                if len(floors) == len(subs.procs):
                    floor = min(floors.values())
                    if floor != sent_floor:
                        sent_floor = floor
                        pub.send_all(("floor", floor))
                for _, (what, data) in pub.poll(timeout / 2):
                    if what == "result":
                        published = data
                        subs.send_all(("expect", data["published"]))
                    elif what == "error" or (what == "exit" and published is None):
                        raise RuntimeError(f"{label}: publisher failed:\n{data}")
            t = time.monotonic_ns()
            if snap_a is None and t >= measure:
                snap_a = harness.take_snapshot(pids)
            # Not elif: one slow turn of this loop can pass both marks.
            if snap_a is not None and snap_b is None and t >= end:
                snap_b = harness.take_snapshot(pids)
            phase = "warmup" if t < measure else "measure" if t < end else "drain"
            status.update(phase, (t - now) / 1e9, f"{label}: {sum(delivered.values()):,}")
    if pub is not None:
        pub.send_all(("stop", None))
    assert snap_a is not None and snap_b is not None
    res = [results[i] for i in sorted(results)]
    window_d = sum(r["delivered_window"] for r in res)
    client_pids = [p for pool in pools for p in pool.pids]
    out: dict[str, Any] = {
        "deliveries_per_s": window_d / args.duration,
        "clients_pct": harness.cpu_percent(snap_a, snap_b, client_pids),
        "machine_pct": harness.machine_percent(snap_a, snap_b),
        "steal_pct": harness.steal_percent(snap_a, snap_b),
        "delivered": sum(r["delivered"] for r in res),
        "problems": [p for r in res for p in r["problems"]],
    }
    if server_pid:
        cpu_s = snap_b.procs[server_pid] - snap_a.procs[server_pid]
        out["server_pct"] = harness.cpu_percent(snap_a, snap_b, [server_pid])
        out["server_us_per_delivery"] = 1e6 * cpu_s / window_d if window_d else None
        with contextlib.suppress(OSError):
            out["server_rss_mib"] = harness.memory_of(server_pid)["rss_mib"]
    if published is not None:
        out["published"] = published["published"]
    return out


def _run_pools(
    args: argparse.Namespace,
    label: str,
    server_pid: int | None,
    subs: harness.WorkerPool,
    pub: harness.WorkerPool | None,
) -> dict[str, Any]:
    pools = [subs] if pub is None else [subs, pub]
    subs.start()
    try:
        ready = subs.gather("ready", timeout=120)
        if pub is not None:
            pub.start()
            pub.gather("ready", timeout=30)
        out = _drive(args, label, server_pid, subs, pub)
    except BaseException:
        for pool in pools:
            with contextlib.suppress(Exception):
                pool.send_all(("stop", None))
                pool.join(5)
        raise
    for pool in pools:
        pool.join()
    out["connections"] = sum(r["connections"] for r in ready)
    out["subscribers"] = sum(r.get("subs", r["connections"]) for r in ready)
    return out


def _spread(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_echo(args: argparse.Namespace) -> dict[str, Any]:
    """Echo: msgs/s and server CPU per echoed message."""
    payload = clients.make_payload(args.payload_size)
    with RefServer("echo", not args.no_uvloop) as server:
        specs = [
            EchoSpec(w, harness.HOST, server.port, n, args.echo_window, payload, args.drain_timeout)
            for w, n in enumerate(_spread(args.echo_connections, args.procs))
        ]
        res = _run_pools(
            args, "echo", server.pid, harness.WorkerPool(clients.echo_main, specs), None
        )
    res["msgs_per_s"] = res.pop("deliveries_per_s")
    res["server_us_per_msg"] = res.pop("server_us_per_delivery")
    res["window"] = args.echo_window
    return res


def run_fanout(args: argparse.Namespace, members: int) -> dict[str, Any]:
    """Fan-out through the reference server to ``members`` sockets."""
    payload = clients.make_payload(args.payload_size)
    with RefServer("fanout", not args.no_uvloop) as server:
        specs = [
            SubscriberSpec(
                w, harness.HOST, server.port, n, 1, len(payload) + 4, "tcp", args.drain_timeout
            )
            for w, n in enumerate(_spread(members, args.procs))
        ]
        pspec = PublisherSpec(0, harness.HOST, server.port, "tcp", payload, args.window, 30.0)
        res = _run_pools(
            args,
            f"fanout {members:,}",
            server.pid,
            harness.WorkerPool(clients.tcp_subscriber_main, specs),
            harness.WorkerPool(clients.publisher_main, [pspec]),
        )
    res["msgs_per_s"] = res["deliveries_per_s"] / members
    return res


def run_nats(args: argparse.Namespace) -> dict[str, Any]:
    """nats-server fan-out: one publisher (nats-py), many subscriptions."""
    payload = clients.make_payload(args.payload_size)
    subs_n = args.nats_subscribers
    conns_n = min(subs_n, args.nats_connections or subs_n)
    if subs_n % conns_n:
        raise SystemExit("--nats-subscribers must be a multiple of --nats-connections")
    per_conn = subs_n // conns_n
    with NatsServer(args.nats_url) as nats_server:
        specs = [
            SubscriberSpec(
                w,
                nats_server.host,
                nats_server.port,
                n,
                per_conn,
                0,
                args.nats_client,
                args.drain_timeout,
            )
            for w, n in enumerate(_spread(conns_n, args.procs))
        ]
        pspec = PublisherSpec(
            0, nats_server.host, nats_server.port, "nats", payload, args.window, 30.0
        )
        res = _run_pools(
            args,
            "nats",
            nats_server.pid,
            harness.WorkerPool(clients.nats_subscriber_main, specs),
            harness.WorkerPool(clients.publisher_main, [pspec]),
        )
        res["server"] = {
            "address": f"{nats_server.host}:{nats_server.port}",
            "started_here": nats_server.started,
            "pid": nats_server.pid,
        }
    if nats_server.pid is None:
        res["problems"].append("nats-server's process not found: no server CPU")
    res["client"] = args.nats_client
    res["msgs_per_s"] = res["deliveries_per_s"] / subs_n
    return res


def run_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    """The SQLite group-commit loop, in a process of its own."""
    spec = SqliteSpec(
        batch=args.sqlite_batch,
        convs=args.sqlite_convs,
        body="x" * 32,
        warmup=min(args.warmup, 2.0),
        duration=args.duration,
        keep_dir=args.keep_data,
    )
    pool = harness.WorkerPool(clients.sqlite_main, [spec])
    pool.start()
    try:
        (res,) = pool.gather("result", timeout=args.warmup + args.duration + 60)
    finally:
        pool.join()
    res["batch"] = args.sqlite_batch
    res["problems"] = (
        [] if res["stored"] == res["expected"] else [f"stored {res['stored']} != {res['expected']}"]
    )
    return dict(res)


# --- the report -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the selected references; returns the exit status (0 = ran and verified)."""
    only = [s.strip() for s in str(args.only).split(",") if s.strip()]
    unknown = sorted(set(only) - set(REFERENCES))
    if unknown:
        raise SystemExit(f"--only: unknown reference(s) {unknown}; choose from {REFERENCES}")
    try:
        sizes = [int(s) for s in str(args.members).split(",") if s.strip()]
    except ValueError:
        raise SystemExit("--members takes comma-separated integers") from None
    if args.procs < 1 or args.duration <= 0 or min(sizes, default=1) < 1:
        raise SystemExit("--procs, --duration and --members must be positive")
    if args.set:
        harness.console.print("[dim]note: --set does not apply to the references[/dim]")
    stamp = harness.timestamp()
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    report = harness.Report(title=f"baselines: references on this machine ({stamp})")

    def pct(res: dict[str, Any]) -> str:
        return (
            f"server {res.get('server_pct', 0):.0f}% / clients {res['clients_pct']:.0f}% of a "
            f"core; machine {res['machine_pct']:.0f}% busy, host steal {res['steal_pct']:.1f}%"
        )

    if "echo" in only:
        harness.console.print("[dim]echo: reference server, echo mode ...[/dim]")
        e = results["echo"] = run_echo(args)
        report.add(
            f"echo ({e['connections']} conns x {e['window']}): msgs/s",
            f"{e['msgs_per_s']:,.0f}",
        )
        report.add("echo: server CPU per msg (µs)", _us(e.get("server_us_per_msg")))
        report.add("echo: CPU", pct(e))
    if "fanout" in only:
        fan: dict[str, Any] = {}
        results["fanout"] = fan
        for n in sizes:
            harness.console.print(f"[dim]fanout: reference server, {n:,} subscribers ...[/dim]")
            f = fan[str(n)] = run_fanout(args, n)
            report.add(
                f"fanout {n:,}: deliveries/s",
                f"{f['deliveries_per_s']:,.0f} ({f['msgs_per_s']:,.0f} msgs/s)",
            )
            report.add(
                f"fanout {n:,}: server CPU per delivery (µs)",
                _us(f.get("server_us_per_delivery"), 2),
            )
            report.add(f"fanout {n:,}: CPU", pct(f))
    if "nats" in only:
        harness.console.print("[dim]nats: nats-server fan-out ...[/dim]")
        try:
            nr = run_nats(args)
        except (RuntimeError, OSError) as exc:
            skipped["nats"] = str(exc)
            report.notes.append(f"nats skipped: {exc}")
        else:
            results["nats"] = nr
            label = f"nats {nr['subscribers']:,} subs / {nr['connections']:,} conns"
            report.add(
                f"{label}: deliveries/s",
                f"{nr['deliveries_per_s']:,.0f} ({nr['msgs_per_s']:,.0f} msgs/s)",
            )
            report.add(
                "nats: server CPU per delivery (µs)", _us(nr.get("server_us_per_delivery"), 2)
            )
            report.add("nats: CPU", pct(nr))
            report.notes.append(
                f"nats-server at {nr['server']['address']}"
                + (" (started for this run)" if nr["server"]["started_here"] else " (running)")
                + f"; subscribers: {nr['client']}, publisher: nats-py"
            )
    if "sqlite" in only:
        harness.console.print("[dim]sqlite: group-commit loop ...[/dim]")
        s = results["sqlite"] = run_sqlite(args)
        report.add(
            f"sqlite (batch {s['batch']}, WAL, synchronous=FULL): msgs/s",
            f"{s['msgs_per_s']:,.0f} ({s['commits'] / s['seconds']:,.0f} commits/s)",
        )
        report.add(
            "sqlite: CPU / wall per msg (µs)",
            f"{_us(s['us_per_msg'])} / {_us(s['wall_us_per_msg'])}",
        )
    for name, res in results.items():
        items = res.items() if name == "fanout" else [(name, res)]
        for key, r in items:
            report.failures.extend(f"{name} {key}: {p}" for p in r.get("problems", []))
    report.add("verification", "OK" if not report.failures else "FAILED")
    report.config = [
        ("client procs", str(args.procs)),
        ("warmup / measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("payload", f"{args.payload_size} bytes (+4 length prefix on TCP)"),
        ("publisher window / max lag", f"{args.window} / {clients.MAX_LAG} msgs"),
        ("loop", "uvloop" if not args.no_uvloop and harness.uvloop_available() else "asyncio"),
    ]
    out = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "results": results,
        "skipped": skipped,
        "verification": {"ok": not report.failures, "failures": report.failures},
    }
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report)
    harness.console.print(f"results: {path}")
    return 1 if report.failures else 0


def _us(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


__all__ = ["SCENARIO", "add_arguments", "default_procs", "run"]
