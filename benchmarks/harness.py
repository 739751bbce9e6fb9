"""What every benchmark scenario shares.

- :class:`ServerProcess` -- a real ``imserver serve`` on free ports in a temporary
  directory: started with a TOML config, awaited on ``GET /readyz``, stopped with
  SIGTERM (its exit code is checked by the caller), directory removed afterwards. The
  process itself is :class:`imserver.testing.process.ServerProcess`, which the
  end-to-end tests run too.
- :func:`provision_users` -- registers and logs in accounts over HTTP, concurrently.
- :class:`WorkerPool` -- load-generator processes (``spawn``), each running its own
  asyncio loop (uvloop when installed, see :func:`run_async`), talking to the parent
  over a pipe: ``("ready", info)``, ``("progress", counters)``, ``("result", data)``
  or ``("error", traceback)``.
- CPU and memory from ``/proc``: :func:`take_snapshot` / :func:`cpu_percent` for
  processes, threads and the whole machine over an interval, :func:`memory_of`.
- :func:`latency_summary` -- exact percentiles of latency samples (nanoseconds).
- :class:`PySpy` and :func:`summarize_speedscope` -- an optional profile of the server
  during the measured interval, summarised by self and total time.
- :class:`LiveStatus` -- a rich progress bar on a terminal, a plain line otherwise.
- :func:`print_report` and :func:`write_results` -- the results table and the JSON
  file under ``benchmarks/results/`` (or ``--results-file``).
- :class:`Timeseries` -- counters sampled every ~0.25 s while a scenario runs, for
  the throughput-over-time plots (:mod:`benchmarks.plots`).

Linux only: CPU and memory come from ``/proc``, and latency compares
``time.monotonic_ns()`` across processes (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from imserver.client import ClientError, HttpClient
from imserver.testing import process
from imserver.testing.process import HOST as HOST
from imserver.testing.process import ServerError as ServerError
from imserver.testing.process import free_ports as free_ports
from imserver.utils.config import merge_settings as merge_config

T = TypeVar("T")

PASSWORD: Final = "bench-password-123"
"""The password of every benchmark account."""
RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
READY_TIMEOUT: Final = 30.0
PROVISION_TRIES: Final = 5
"""Tries of each request of :func:`provision_users` answered ``unavailable``."""
STOP_TIMEOUT: Final = 30.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

console = Console(width=None if sys.stdout.isatty() else 120)
"""Where tables and messages go (stdout)."""


# --- configuration ----------------------------------------------------------------------


def parse_settings(items: Iterable[str]) -> dict[str, Any]:
    """``["storage.batch_max=1024", "log_level=warning"]`` as a nested config mapping.

    Values are read as TOML (``1024``, ``1e9``, ``true``, ``"x"``); anything that is
    not valid TOML is taken as a plain string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            val: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            val = raw
        node: dict[str, Any] = {}
        leaf = node
        *parents, last = key.strip().split(".")
        for part in parents:
            leaf[part] = {}
            leaf = leaf[part]
        leaf[last] = val
        out = merge_config(out, node)
    return out


# --- the server process -----------------------------------------------------------------


class DatabaseSampler(Protocol):
    """Counters of the database server a benchmark's server uses (CPU seconds...),
    read with each :func:`take_snapshot` (:class:`benchmarks.databases.DatabaseMeter`)."""

    def sample(self) -> dict[str, float]:
        """The counters now."""
        ...


class ServerProcess(process.ServerProcess):
    """:class:`imserver.testing.process.ServerProcess` in a temporary directory of its own.

    Use it as a context manager: it starts on enter (and waits for ``/readyz``); on
    exit a still-running server is stopped (killed if it ignores SIGTERM) and the
    directory is removed. Call :meth:`stop` yourself to get the exit code.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        host: str = HOST,
        keep_dir: bool = False,
        database: DatabaseSampler | None = None,
    ) -> None:
        """``config`` is written to the server's TOML file; ``keep_dir`` keeps the data;
        ``database`` meters the database server it uses, if not SQLite."""
        super().__init__(
            Path(tempfile.mkdtemp(prefix="imserver-bench-")),
            config,
            host=host,
            ready_timeout=READY_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        )
        self.keep_dir = keep_dir
        self.database = database

    def cleanup(self) -> None:
        """Kill the server if it still runs and remove its directory (unless kept)."""
        self.kill()
        if not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown(timeout=10)
        self.cleanup()


# --- the shared timeline ---------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """When to start, when measuring begins and when sending stops (monotonic ns,
    comparable across the processes of one machine)."""

    start: int
    measure: int
    end: int


# --- users ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A registered, logged-in benchmark user."""

    username: str
    user_id: str
    token: str


async def provision_users(
    http_url: str,
    count: int,
    *,
    prefix: str = "bench",
    concurrency: int = 8,
    password: str = PASSWORD,
) -> list[Account]:
    """Register ``count`` users over HTTP and log each in; returns them in order.

    Usernames are ``<prefix>_<run>_<n>`` (unique per run). Both ``register`` and
    ``login`` hash with argon2 on the server, so this costs about 2 x 30 ms of server
    CPU per user; ``concurrency`` requests run at once. A request answered
    ``unavailable`` (a database or a service that did not answer in time, on a busy
    machine) is tried again, up to :data:`PROVISION_TRIES` times in all; a repeated
    ``register`` that finds the user made by the try before is taken as done.
    """
    run = os.urandom(3).hex()
    sem = asyncio.Semaphore(concurrency)
    async with HttpClient(http_url) as http:

        async def call(op: str, **params: Any) -> dict[str, Any]:
            for attempt in range(1, PROVISION_TRIES + 1):
                try:
                    return await http.request(op, **params)
                except ClientError as exc:
                    if op == "register" and exc.code == "conflict" and attempt > 1:
                        return {}
                    if exc.code != "unavailable" or attempt == PROVISION_TRIES:
                        raise
                await asyncio.sleep(0.5 * attempt)
            raise AssertionError("unreachable")

        async def one(n: int) -> Account:
            username = f"{prefix}_{run}_{n}"
            async with sem:
                await call("register", username=username, password=password)
                data = await call(
                    "login", username=username, password=password, device=f"bench-{n}"
                )
            return Account(username, str(data["user"]["id"]), str(data["token"]))

        return list(await asyncio.gather(*(one(n) for n in range(count))))


# --- event loops and worker processes ---------------------------------------------------


def uvloop_available() -> bool:
    """True when uvloop can be imported."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_async(main: Coroutine[Any, Any, T], *, uvloop: bool = True) -> T:
    """Run ``main`` on a fresh event loop: uvloop's when installed (and ``uvloop``)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if uvloop:
        try:
            import uvloop as uv
        except ImportError:
            pass
        else:
            factory = uv.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


WorkerTarget = Callable[[Connection, Any], None]
"""A worker process's body: ``(pipe to the parent, its spec)``; module-level, so that
``spawn`` can import it."""


def _worker_entry(target: WorkerTarget, conn: Connection, spec: Any) -> None:
    # Ctrl-C goes to the whole foreground process group: the parent handles it and
    # tells the workers to stop, so they ignore SIGINT themselves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        target(conn, spec)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


class WorkerPool:
    """Load-generator processes started with ``spawn``, one duplex pipe each."""

    def __init__(self, target: WorkerTarget, specs: Sequence[Any]) -> None:
        """One process per item of ``specs``, running ``target(conn, spec)``."""
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self._child_ends: list[Connection] = []
        self._ended: set[int] = set()
        for i, spec in enumerate(specs):
            parent, child = ctx.Pipe(duplex=True)
            self.procs.append(
                ctx.Process(
                    target=_worker_entry,
                    args=(target, child, spec),
                    name=f"bench-worker-{i}",
                    daemon=True,
                )
            )
            self.conns.append(parent)
            self._child_ends.append(child)

    def start(self) -> None:
        """Start every process."""
        for proc in self.procs:
            proc.start()
        for child in self._child_ends:
            child.close()  # the parent keeps only its ends, so a dead worker reads as EOF
        self._child_ends = []

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [p.pid for p in self.procs if p.pid is not None]

    def send_all(self, message: Any) -> None:
        """Send ``message`` to every worker still connected."""
        for i, conn in enumerate(self.conns):
            if i not in self._ended:
                with contextlib.suppress(OSError):
                    conn.send(message)

    def poll(self, timeout: float) -> list[tuple[int, tuple[str, Any]]]:
        """Messages from workers within ``timeout`` s, as ``(worker index, message)``.

        A worker whose pipe ends reports ``("exit", exitcode)`` once.
        """
        live = [c for i, c in enumerate(self.conns) if i not in self._ended]
        if not live:
            time.sleep(timeout)
            return []
        out: list[tuple[int, tuple[str, Any]]] = []
        for conn in wait_connections(live, timeout):
            assert isinstance(conn, Connection)
            i = self.conns.index(conn)
            try:
                while conn.poll():
                    out.append((i, conn.recv()))
            except (EOFError, OSError):
                self._ended.add(i)
                self.procs[i].join(1)
                out.append((i, ("exit", self.procs[i].exitcode)))
        return out

    def gather(self, kind: str, timeout: float) -> list[Any]:
        """Wait for one ``kind`` message from every worker; raises on errors/timeouts."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers did not report {kind!r} within {timeout} s")
            for i, (what, data) in self.poll(min(left, 0.5)):
                if what == kind:
                    got[i] = data
                elif what == "error" or (what == "exit" and i not in got):
                    # A worker may exit right after its last message.
                    raise RuntimeError(f"worker {i} failed before {kind!r}:\n{data}")
        return [got[i] for i in range(len(self.procs))]

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit; terminate those that do not."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        for conn in self.conns:
            conn.close()


# --- CPU and memory ---------------------------------------------------------------------


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    user, system = proc_cpu_times(pid)
    return user + system


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``"<name>[<tid>]"``; the main thread
    (where an asyncio server runs its event loop) is ``"<name>[main]"``."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                    raw = fh.read()
            except OSError:
                continue  # the thread just ended
            head, tail = raw.rsplit(b")", 1)
            name = head.split(b"(", 1)[1].decode(errors="replace")
            fields = tail.split()
            label = "main" if tid == str(pid) else tid
            out[f"{name}[{label}]"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_cpu() -> tuple[float, float, float]:
    """``(busy, total, steal)`` CPU seconds of the whole machine since boot, over all
    cores. *Steal* is time a virtual machine's cores were runnable but the host ran
    something else; it counts as busy."""
    with open("/proc/stat", "rb") as fh:
        first = fh.readline().split()
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / CLK_TCK, total / CLK_TCK, values[7] / CLK_TCK


def memory_of(pid: int) -> dict[str, float]:
    """``rss_mib`` (now) and ``peak_rss_mib`` (high-water mark) of ``pid``."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    return out


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU counters of some processes, one process's threads, and the machine."""

    wall: float
    """``time.monotonic()`` when taken."""
    procs: dict[int, float]
    """User + system CPU seconds per process."""
    system: dict[int, float]
    """System (kernel) CPU seconds per process."""
    threads: dict[str, float]
    machine_busy: float
    machine_total: float
    machine_steal: float
    database: dict[str, float] = field(default_factory=dict)
    """The database server's counters (:class:`DatabaseSampler`); empty on SQLite."""


def take_snapshot(
    pids: Iterable[int],
    threads_of: int | None = None,
    database: DatabaseSampler | None = None,
) -> CpuSnapshot:
    """CPU seconds of ``pids`` (0.0 for a process that is gone) and of the threads of
    ``threads_of``, with the machine's counters and those of ``database``."""
    procs: dict[int, float] = {}
    system: dict[int, float] = {}
    for pid in pids:
        try:
            user, sys_s = proc_cpu_times(pid)
        except OSError:
            user = sys_s = 0.0
        procs[pid] = user + sys_s
        system[pid] = sys_s
    threads = thread_cpu_seconds(threads_of) if threads_of is not None else {}
    busy, total, steal = machine_cpu()
    db = database.sample() if database is not None else {}
    return CpuSnapshot(time.monotonic(), procs, system, threads, busy, total, steal, db)


def cpu_percent(a: CpuSnapshot, b: CpuSnapshot, pids: Iterable[int]) -> float:
    """CPU used by ``pids`` between two snapshots, in % of one core."""
    wall = b.wall - a.wall
    if wall <= 0:
        return 0.0
    used = sum(b.procs.get(p, 0.0) - a.procs.get(p, 0.0) for p in pids)
    return 100.0 * used / wall


def system_percent(a: CpuSnapshot, b: CpuSnapshot, pid: int) -> float:
    """Kernel CPU of ``pid`` between two snapshots, in % of one core."""
    wall = b.wall - a.wall
    return 100.0 * (b.system.get(pid, 0.0) - a.system.get(pid, 0.0)) / wall if wall > 0 else 0.0


def thread_percents(a: CpuSnapshot, b: CpuSnapshot, top: int = 6) -> list[tuple[str, float]]:
    """The busiest threads between two snapshots: ``(thread, % of one core)``."""
    wall = b.wall - a.wall
    if wall <= 0:
        return []
    usage = Counter(
        {name: 100.0 * (sec - a.threads.get(name, 0.0)) / wall for name, sec in b.threads.items()}
    )
    return [(name, pct) for name, pct in usage.most_common(top) if pct >= 0.5]


def machine_percent(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """The whole machine's busy CPU between two snapshots, in % of all cores."""
    total = b.machine_total - a.machine_total
    return 100.0 * (b.machine_busy - a.machine_busy) / total if total > 0 else 0.0


def steal_percent(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """CPU time the host took from this virtual machine between two snapshots, in % of
    all cores: a share above a few % means other tenants slowed every process here."""
    total = b.machine_total - a.machine_total
    return 100.0 * (b.machine_steal - a.machine_steal) / total if total > 0 else 0.0


# --- latency ----------------------------------------------------------------------------


PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of sorted samples, in milliseconds."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ns)))
    return sorted_ns[min(rank, len(sorted_ns)) - 1] / 1e6


def latency_summary(samples_ns: Iterable[int]) -> dict[str, float]:
    """Count, mean, p50/p90/p99/p99.9 and max of latency samples, in milliseconds."""
    data = sorted(samples_ns)
    out: dict[str, float] = {"count": float(len(data))}
    if not data:
        return out
    out["mean_ms"] = sum(data) / len(data) / 1e6
    for q in PERCENTILES:
        out[f"p{q:g}_ms"] = percentile(data, q)
    out["max_ms"] = data[-1] / 1e6
    return out


# --- time series ------------------------------------------------------------------------


class Timeseries:
    """Cumulative counters sampled while a scenario runs, for throughput over time.

    Each sample is ``[t_s, acked, delivered, server_cpu_s]``: seconds since ``origin``
    (the parent's "go"), the workers' acked and delivered counters summed, and the
    server's CPU seconds so far. :meth:`as_dict` adds when sending started and the
    measured interval, in the same seconds.
    """

    COLUMNS: Final = ("t_s", "acked", "delivered", "server_cpu_s")

    def __init__(
        self,
        origin_ns: int,
        server_pid: int | Sequence[int],
        *,
        start_ns: int,
        measure_ns: int,
        end_ns: int,
        every: float = 0.25,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Samples at most every ``every`` s; the other times mark the timeline.
        ``labels`` names what the counters count where it is not messages, e.g.
        ``{"acked": "auths"}`` (the plots use it). ``server_pid`` is one process, or
        several whose CPU is summed (a cluster's)."""
        self.labels = dict(labels or {})
        self.origin_ns = origin_ns
        self.server_pids = [server_pid] if isinstance(server_pid, int) else list(server_pid)
        self.start_ns = start_ns
        self.measure_ns = measure_ns
        self.end_ns = end_ns
        self.every_ns = round(every * 1e9)
        self.samples: list[list[float]] = []
        self._last = -self.every_ns

    def sample(self, now_ns: int, acked: int, delivered: int, *, force: bool = False) -> None:
        """Record the counters if ``every`` has passed since the last sample (or ``force``)."""
        if not force and now_ns - self._last < self.every_ns:
            return
        self._last = now_ns
        try:
            cpu = sum(proc_cpu_seconds(pid) for pid in self.server_pids)
        except OSError:
            cpu = self.samples[-1][3] if self.samples else 0.0
        self.samples.append([round((now_ns - self.origin_ns) / 1e9, 3), acked, delivered, cpu])

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored under ``"timeseries"``."""

        def rel(ns: int) -> float:
            return round((ns - self.origin_ns) / 1e9, 3)

        return {
            "columns": list(self.COLUMNS),
            "every_s": self.every_ns / 1e9,
            "start_s": rel(self.start_ns),
            "measure_s": [rel(self.measure_ns), rel(self.end_ns)],
            "labels": self.labels,
            "samples": self.samples,
        }


# --- profiling --------------------------------------------------------------------------


def py_spy_path() -> str | None:
    """The ``py-spy`` executable (next to this Python, or on PATH), if installed."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class PySpy:
    """``py-spy record`` of one process for a fixed time, in speedscope format.

    Sampling is non-blocking (the target is not paused), at ``rate`` Hz; py-spy itself
    costs CPU, so a profiled run's numbers are lower. (``--native`` is not offered: it
    pauses the process per sample and counts threads blocked in C as busy.)
    """

    def __init__(self, pid: int, seconds: float, out: Path, *, rate: int = 100) -> None:
        """Profile ``pid`` for ``seconds`` into the speedscope file ``out``."""
        self.pid = pid
        self.seconds = max(1, round(seconds))
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")

    def start(self) -> None:
        """Start py-spy in the background."""
        exe = py_spy_path()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--duration",
            str(self.seconds),
            "--rate",
            str(self.rate),
            "--format",
            "speedscope",
            "--output",
            str(self.out),
            "--nonblocking",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait for py-spy to finish; True if it wrote its profile."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        ok = self.proc.returncode == 0 and self.out.exists()
        if ok:
            self.log.unlink(missing_ok=True)
        return ok

    def error(self) -> str:
        """py-spy's output, when it failed."""
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def summary(self) -> dict[str, Any]:
        """Wait for the profile: its :func:`summarize_speedscope` (with ``file``), or
        ``{"error": py-spy's output}`` when it failed."""
        if not self.wait():
            return {"error": self.error()}
        out = summarize_speedscope(self.out)
        out["file"] = str(self.out)
        return out


_PLUMBING: Final = (
    "(<frozen runpy>)",
    "(threading.py)",
    "(concurrent/futures/thread.py)",
    "(asyncio/runners.py)",
    "(asyncio/events.py)",
    "(asyncio/base_events.py)",
    "(imserver/__main__.py)",
    "(imserver/cli.py)",
)
"""Frames that every stack of a thread goes through: left out of the inclusive list."""


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and total (inclusive) time per function of a py-spy speedscope profile.

    Functions are keyed ``name (file)`` (py-spy's frames carry the line being run,
    so lines are merged). Percentages are of all samples of all threads: one sample
    is one thread seen running (idle threads are not sampled). Time spent in C code
    (socket writes, SQLite, uvloop's own loop) counts as self time of the Python
    function that called it -- ``Runner.run`` stands for uvloop's C event loop.
    Stacks can be truncated (py-spy reads them without pausing the process), so the
    inclusive percentages are lower bounds.
    """
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    keys = [f"{fr.get('name', '?')} ({_short_path(str(fr.get('file', '?')))})" for fr in frames]
    self_w: Counter[str] = Counter()
    total_w: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    all_w = 0.0
    samples = 0
    for prof in doc["profiles"]:
        weights = prof.get("weights") or [1] * len(prof["samples"])
        name = str(prof.get("name", "?"))
        for stack, w in zip(prof["samples"], weights, strict=False):
            samples += 1
            all_w += w
            threads[name] += w
            if not stack:
                continue
            self_w[keys[stack[-1]]] += w  # speedscope stacks run root -> leaf
            for k in {keys[i] for i in stack}:
                total_w[k] += w
    for k in list(total_w):
        if k.endswith(_PLUMBING):
            del total_w[k]
    if all_w == 0:
        return {"samples": 0, "threads": [], "self": [], "total": []}

    def pct(c: Counter[str], floor: float = 0.0) -> list[tuple[str, float]]:
        rows = [(k, round(100.0 * v / all_w, 2)) for k, v in c.most_common(top)]
        return [(k, p) for k, p in rows if p >= floor]

    return {
        "samples": samples,
        "threads": pct(threads, floor=1.0),
        "self": pct(self_w),
        "total": pct(total_w),
    }


def _short_path(path: str) -> str:
    # ".../site-packages/aiohttp/web_ws.py" -> "aiohttp/web_ws.py",
    # ".../src/imserver/services/gateway/hub.py" -> "imserver/services/gateway/hub.py",
    # ".../lib/python3.11/asyncio/events.py" -> "asyncio/events.py".
    for marker in ("/site-packages/", "/src/", "/lib/python3."):
        i = path.rfind(marker)
        if i >= 0:
            rest = path[i + len(marker) :]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    return path


# --- progress ---------------------------------------------------------------------------


class LiveStatus:
    """A progress bar with a status line (rich, on a terminal) or a plain line per
    second on stderr otherwise."""

    def __init__(self, total: float, *, enabled: bool = True) -> None:
        """``total``: the expected length of the run in seconds."""
        self.total = total
        self.enabled = enabled
        self.fancy = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = 0.0

    def __enter__(self) -> LiveStatus:
        if self.fancy:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[phase]:<8}"),
                BarColumn(bar_width=30),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                transient=True,
                refresh_per_second=8,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, phase="start")
        return self

    def update(self, phase: str, elapsed: float, text: str) -> None:
        """Show ``phase`` (warmup, measure, drain ...), the seconds done, and ``text``."""
        if not self.enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=min(elapsed, self.total), description=text, phase=phase
            )
            return
        now = time.monotonic()
        if now - self._last_line >= 1.0:
            self._last_line = now
            print(f"[{phase:<7} {elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


# --- output -----------------------------------------------------------------------------


@dataclass
class Report:
    """What a scenario prints: result rows, config rows, notes and failures."""

    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    config: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        """A result row."""
        self.rows.append((name, value))


def print_report(report: Report, profile: Mapping[str, Any] | None = None) -> None:
    """Print the results and config tables, the profile summary, notes and failures."""
    results = Table(title=report.title, title_justify="left", show_header=True)
    results.add_column("metric")
    results.add_column("value", justify="right")
    for name, value in report.rows:
        results.add_row(escape(name), escape(value))
    cfg = Table(title="config", title_justify="left")
    cfg.add_column("setting")
    cfg.add_column("value")
    for name, value in report.config:
        cfg.add_row(escape(name), escape(value))
    console.print(results)
    console.print(cfg)
    if profile:
        print_profile(profile)
    for note in report.notes:
        console.print(f"[dim]note:[/dim] {escape(note)}")
    for failure in report.failures:
        console.print(f"[bold red]FAILED:[/bold red] {escape(failure)}", style="red")


def print_profile(profile: Mapping[str, Any], of: str = "server") -> None:
    """Print a :func:`summarize_speedscope` summary of process ``of``, if it has samples."""
    if profile.get("samples"):
        prof = Table(
            title=f"{of} profile (py-spy, {profile['samples']} samples, % of all samples)",
            title_justify="left",
        )
        prof.add_column("self %", justify="right")
        prof.add_column("function (self time)")
        prof.add_column("total %", justify="right")
        prof.add_column("function (inclusive)")
        selfs, totals = profile["self"], profile["total"]
        for i in range(max(len(selfs), len(totals))):
            s = selfs[i] if i < len(selfs) else ("", "")
            t = totals[i] if i < len(totals) else ("", "")
            prof.add_row(
                f"{s[1]}" if s[0] else "", escape(s[0]), f"{t[1]}" if t[0] else "", escape(t[0])
            )
        console.print(prof)
        console.print("threads: " + ", ".join(f"{name} {pct}%" for name, pct in profile["threads"]))


def environment() -> dict[str, Any]:
    """Where the benchmark ran: machine, Python, versions, git commit (if any)."""
    from imserver import __version__

    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "imserver": __version__,
        "uvloop": uvloop_available(),
        "git_commit": commit or None,
    }


def timestamp() -> str:
    """The local time as ``YYYYmmdd-HHMMSS``, for file names."""
    return time.strftime("%Y%m%d-%H%M%S")


RESULTS_FILE_ENV: Final = "BENCHMARKS_RESULTS_FILE"
"""When set, :func:`write_results` writes to this path instead (``--results-file``)."""

last_results_path: Path | None = None
"""The file :func:`write_results` wrote last in this process (``--plots`` reads it)."""


def write_results(scenario: str, data: Mapping[str, Any], stamp: str | None = None) -> Path:
    """Write ``data`` to ``benchmarks/results/<scenario>-<timestamp>.json``, or to the
    path in ``$BENCHMARKS_RESULTS_FILE`` when set (``--results-file``, and how
    ``python -m benchmarks suite`` learns where each scenario wrote). Returns the path."""
    global last_results_path
    override = os.environ.get(RESULTS_FILE_ENV)
    path = Path(override) if override else RESULTS_DIR / f"{scenario}-{stamp or timestamp()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    last_results_path = path
    return path
