"""``python -m benchmarks`` (or ``python -m benchmarks suite``) -- the whole suite.

Runs, in order, each as ``python -m benchmarks <scenario> ...`` in a process of its
own with a fresh server: ``dm`` at full speed; ``dm`` at a fixed rate (``--dm-rate``,
15,000 msgs/s: latency under load); ``room`` at 100, 1,000 and 10,000 members;
``connections``; ``auth-storm``; ``mixed``; ``broadcast`` (10,000 users); ``push``
at full speed and at 1,000 messages/s; ``baselines`` (the reference echo and
fan-out server, NATS, SQLite group commit). A scenario whose module is not installed
is reported as skipped. Each writes its JSON to ``--out`` (through
``--results-file``) and its output to ``<step>.log`` there; its printed tables are
shown as it runs, under one progress bar for the whole suite.

At the end: one table of every headline figure against the issue's targets and the
reference baselines (``ours / reference``), printed and written with every
scenario's results to ``suite.json`` (and ``table.md``), and PNG plots (throughput
over time, latency percentiles) in the same folder.

``--quick`` skips the 10,000-member room and shortens the measured intervals;
``--smoke`` runs every scenario tiny (for the test suite: it checks the machinery,
not the numbers). The exit status is 0 when every scenario that ran succeeded
(verification included); targets missed do not change it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import harness

ROOT: Final = Path(__file__).resolve().parent.parent
"""The repository (the directory holding the ``benchmarks`` package)."""
ROOM_SIZES: Final = (100, 1_000, 10_000)
DM_RATE: Final = 15_000.0
CONNECTIONS: Final = 15_000
STOP_GRACE_S: Final = 60.0
"""How long an interrupted scenario gets to stop its server and workers."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``suite`` sub-command's options."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="skip the 10,000-member room (about 3 minutes of setup) and measure 5 s instead of 10",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="every scenario tiny and short (checks the machinery, not the numbers)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default benchmarks/results/suite-<timestamp>/)",
    )
    parser.add_argument(
        "--dm-rate",
        type=float,
        default=DM_RATE,
        metavar="MSGS_PER_S",
        help=f"the fixed rate of the dm latency-under-load run (default {DM_RATE:,.0f})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help=f"idle connections of the connections scenario (default {CONNECTIONS:,})",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="run only these steps or scenarios, comma-separated (e.g. dm,room-1000)",
    )
    parser.add_argument("--skip", default="", metavar="NAMES", help="skip these steps or scenarios")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server setting passed to every scenario (repeatable)",
    )
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.add_argument(
        "--copy-plots",
        type=Path,
        metavar="DIR",
        help="also copy the PNGs there (e.g. docs/performance)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="run nothing: print the table and redraw table.md and the plots of the suite "
        "run in DIR (with --copy-plots, copy them too)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.add_argument(
        "--quiet", action="store_true", help="do not echo the scenarios' output (logs only)"
    )


# --- the steps --------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One scenario run of the suite."""

    key: str
    """Unique name of the run (``dm-rate``, ``room-1000``): file names, ``--only``."""
    scenario: str
    """The sub-command of ``python -m benchmarks``."""
    label: str
    """How plots and the table name it."""
    options: tuple[tuple[str, str | None], ...]
    """``(--option, value or None for a flag)``, dropped where the scenario lacks it."""
    estimate_s: float
    """Expected wall time, for the progress bar."""


def build_steps(args: argparse.Namespace) -> list[Step]:
    """The suite's runs for the mode (full, ``--quick`` or ``--smoke``)."""
    smoke, quick = args.smoke, args.quick
    if smoke:
        timing: tuple[tuple[str, str | None], ...] = (
            ("--duration", "1"),
            ("--warmup", "0.5"),
            ("--drain-timeout", "10"),
            ("--procs", "1"),
        )
        measured = 1.5
    elif quick:
        timing, measured = (("--duration", "5"), ("--warmup", "1")), 6.0
    else:
        timing, measured = (), 12.0
    sets = tuple(("--set", s) for s in args.set)
    rate = args.dm_rate if not smoke else min(args.dm_rate, 1000.0)
    dm_size = (("--pairs", "2"),) if smoke else ()
    push_rate = 20 if smoke else 1_000
    steps = [
        Step("dm", "dm", "dm", dm_size + timing + sets, measured + 6),
        Step(
            "dm-rate",
            "dm",
            f"dm @{rate:,.0f}/s",
            (("--rate", f"{rate:g}"), *dm_size, *timing, *sets),
            measured + 6,
        ),
    ]
    sizes = (20,) if smoke else ROOM_SIZES[:2] if quick else ROOM_SIZES
    for n in sizes:
        steps.append(
            Step(
                f"room-{n}",
                "room",
                "room",
                (("--members", str(n)), *timing, *sets),
                measured + 6 + n * 0.02,
            )
        )
    conns = 50 if smoke else args.connections
    steps += [
        Step(
            "connections",
            "connections",
            "connections",
            (("--connections", str(conns)), *timing, *sets),
            10 if smoke else 20 + conns / 200,
        ),
        Step(
            "auth-storm",
            "auth-storm",
            "auth-storm",
            ((("--users", "10"), ("--clients", "4")) if smoke else ()) + timing + sets,
            8 if smoke else measured + 10,
        ),
        Step(
            "mixed",
            "mixed",
            "mixed",
            (
                (("--users", "20"), ("--rooms", "2"), ("--room-size", "5-10"), ("--rate", "200"))
                if smoke
                else ()
            )
            + timing
            + sets,
            8 if smoke else measured + 15,
        ),
        Step(
            "broadcast",
            "broadcast",
            "broadcast",
            ((("--users", "200"), ("--live", "5"), ("--repeat", "2")) if smoke else ()) + sets,
            6 if smoke else 25,
        ),
        Step(
            "push",
            "push",
            "push",
            timing
            + sets
            + (
                (
                    ("--recipients", "5"),
                    ("--senders", "1"),
                    ("--window", "2"),
                    # the queue trails the senders (docs/performance.md): a few
                    # messages, so that it drains within the timeout
                    ("--max-messages", "60"),
                    ("--drain-timeout", "30"),
                )
                if smoke
                else ()
            ),
            8 if smoke else measured + 20,
        ),
        Step(
            "push-rate",
            "push",
            f"push @{push_rate:,}/s",
            (("--rate", str(push_rate)),)
            + ((("--recipients", "5"), ("--senders", "1")) if smoke else ())
            + timing
            + sets,
            8 if smoke else measured + 20,
        ),
        Step(
            "baselines",
            "baselines",
            "baselines",
            (
                ("--members", ",".join(str(n) for n in sizes)),
                ("--nats-subscribers", "20" if smoke else "1000"),
                *((("--echo-connections", "2"),) if smoke else ()),
                *timing,
            ),
            12 if smoke else 4 * measured + 30 + sum(sizes) * 0.004,
        ),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return [
        s
        for s in steps
        if (not only or s.key in only or s.scenario in only)
        and s.key not in skip
        and s.scenario not in skip
    ]


def command_line(
    step: Step, scenario_parser: argparse.ArgumentParser
) -> tuple[list[str], list[str]]:
    """The scenario's arguments, and the options it does not take (left out)."""
    known = {opt for action in scenario_parser._actions for opt in action.option_strings}
    argv: list[str] = [step.scenario]
    dropped: list[str] = []
    for opt, value in step.options:
        if opt not in known:
            dropped.append(opt)
            continue
        argv.append(opt)
        if value is not None:
            argv.append(value)
    return argv, sorted(set(dropped))


@dataclass
class StepResult:
    """What one run produced."""

    step: Step
    status: str
    """``ok``, ``failed`` (exit status not 0, no results file, or one whose
    ``verification.ok`` is false), ``skipped`` or ``interrupted``."""
    exit_code: int | None = None
    seconds: float = 0.0
    argv: list[str] = field(default_factory=list)
    dropped_options: list[str] = field(default_factory=list)
    results_file: Path | None = None
    log_file: Path | None = None
    data: dict[str, Any] | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        """The entry of ``suite.json``'s ``"scenarios"``."""
        return {
            "scenario": self.step.scenario,
            "label": self.step.label,
            "status": self.status,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 1),
            "command": ["python", "-m", "benchmarks", *self.argv] if self.argv else None,
            "dropped_options": self.dropped_options,
            "results_file": self.results_file.name if self.results_file else None,
            "log_file": self.log_file.name if self.log_file else None,
            "note": self.note,
            "data": self.data,
        }


# --- progress ---------------------------------------------------------------------------


class SuiteProgress:
    """Two bars on a terminal: the whole suite (by expected time) and the running
    scenario (its own progress line); plain lines on stderr otherwise."""

    def __init__(self, steps: Sequence[Step], *, enabled: bool) -> None:
        """``steps``: what will run (their estimates make the suite bar's total)."""
        self.total = sum(s.estimate_s for s in steps) or 1.0
        self.count = len(steps)
        self.enabled = enabled
        self.fancy = enabled and sys.stderr.isatty()
        self.done_s = 0.0
        self.index = 0
        self.progress: Progress | None = None
        self.suite_task: TaskID | None = None
        self.step_task: TaskID | None = None
        self.step: Step | None = None
        self.started = 0.0

    def __enter__(self) -> SuiteProgress:
        if self.fancy:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[name]:<12}"),
                BarColumn(bar_width=30),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                refresh_per_second=4,
            )
            self.progress.start()
            self.suite_task = self.progress.add_task("", total=self.total, name="suite")
            self.step_task = self.progress.add_task("", total=1.0, name="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def begin(self, step: Step) -> None:
        """A step starts."""
        self.index += 1
        self.step = step
        self.started = time.monotonic()
        text = f"{self.index}/{self.count}: {step.key}"
        if self.progress is not None and self.step_task is not None:
            assert self.suite_task is not None
            self.progress.update(self.suite_task, description=text)
            self.progress.reset(
                self.step_task, total=step.estimate_s, name=step.key, description="starting"
            )
        elif self.enabled:
            print(f"[suite {self.index}/{self.count}] {step.key} ...", file=sys.stderr, flush=True)

    def tick(self, line: str | None = None) -> None:
        """Time passes; ``line`` is the scenario's latest progress line, if any."""
        if self.progress is None or self.step is None:
            return
        assert self.suite_task is not None and self.step_task is not None
        elapsed = time.monotonic() - self.started
        est = self.step.estimate_s
        share = min(elapsed, 0.95 * est)
        self.progress.update(self.suite_task, completed=self.done_s + share)
        kwargs: dict[str, Any] = {"completed": min(elapsed, est)}
        if line is not None:
            kwargs["description"] = escape(line[:110])
        self.progress.update(self.step_task, **kwargs)

    def end(self, result: StepResult) -> None:
        """A step ended (or was skipped)."""
        self.done_s += result.step.estimate_s
        if self.progress is not None and self.suite_task is not None:
            self.progress.update(self.suite_task, completed=self.done_s)
        elif self.enabled and result.status != "skipped":
            print(
                f"[suite {self.index}/{self.count}] {result.step.key}: {result.status} "
                f"in {result.seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )


# --- running one step -------------------------------------------------------------------


def _pump(stream: IO[str], name: str, out: queue.Queue[tuple[str, str | None]]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            out.put((name, line.rstrip("\n")))
    out.put((name, None))


def run_step(
    step: Step,
    scenario_parser: argparse.ArgumentParser | None,
    out_dir: Path,
    progress: SuiteProgress,
    *,
    echo: bool,
) -> StepResult:
    """Run one scenario in a child process; its JSON goes to ``out_dir/<key>.json``."""
    if scenario_parser is None:
        return StepResult(step, "skipped", note=f"scenario {step.scenario!r} is not installed")
    argv, dropped = command_line(step, scenario_parser)
    results_file = out_dir / f"{step.key}.json"
    log_file = out_dir / f"{step.key}.log"
    results_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[harness.RESULTS_FILE_ENV] = str(results_file)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = StepResult(
        step, "failed", argv=argv, dropped_options=dropped, results_file=results_file
    )
    result.log_file = log_file
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    started = time.monotonic()
    interrupted = False
    with open(log_file, "w") as log:
        log.write("$ python -m benchmarks " + " ".join(argv) + "\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
            cwd=ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, "out", lines), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, "err", lines), daemon=True),
        ]
        for t in pumps:
            t.start()
        open_streams = 2
        try:
            while open_streams:
                try:
                    name, line = lines.get(timeout=0.25)
                except queue.Empty:
                    progress.tick()
                    continue
                if line is None:
                    open_streams -= 1
                    continue
                log.write(line + "\n")
                if name == "err" and line.startswith("["):
                    progress.tick(line)  # the scenario's own progress line
                elif echo:
                    harness.console.out(line, highlight=False)
            proc.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached the child too: let it stop its server.
            interrupted = True
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result.seconds = time.monotonic() - started
    result.exit_code = proc.returncode
    if results_file.exists():
        try:
            result.data = json.loads(results_file.read_text())
        except ValueError as exc:
            result.note = f"unreadable results file: {exc}"
    result.status = step_status(proc.returncode, result.data, interrupted=interrupted)
    if result.status == "failed":
        if proc.returncode == 0 and result.data is not None:
            why = "its results file says verification failed"
        else:
            why = f"exit status {proc.returncode}" + (
                "" if result.data is not None else ", no results file"
            )
        result.note = result.note or f"{why}; see {log_file.name}"
    return result


def step_status(exit_code: int | None, data: Mapping[str, Any] | None, *, interrupted: bool) -> str:
    """A finished run's :attr:`StepResult.status`: ``ok`` only when the scenario exited
    0 and wrote results that do not report a failed verification."""
    if interrupted:
        return "interrupted"
    if exit_code == 0 and data is not None and dig(data, "verification", "ok") is not False:
        return "ok"
    return "failed"


# --- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``op`` is ``">="`` or ``"<="``."""

    op: str
    value: float

    def __str__(self) -> str:
        v = float(self.value)
        shown = f"{v:,.0f}" if v.is_integer() else f"{v:g}"
        return f"{'≥' if self.op == '>=' else '≤'} {shown}"

    def met(self, ours: float) -> bool:
        """Whether ``ours`` meets it."""
        return ours >= self.value if self.op == ">=" else ours <= self.value

    def shortfall(self, ours: float) -> str:
        """How far ``ours`` is from it, in words."""
        if self.value == 0:
            return ""
        if self.op == "<=" and ours >= 2 * self.value:
            return f"{ours / self.value:.1f}× the target"
        off = abs(ours - self.value) / self.value * 100
        return f"{off:.0f}% short" if self.op == ">=" else f"{off:.0f}% over"


@dataclass(frozen=True)
class Row:
    """One line of the results table.

    ``status`` is that of the run the figure comes from (:attr:`StepResult.status`):
    a figure of a run that failed its own checks is shown, marked, and never meets
    its target.
    """

    scenario: str
    metric: str
    unit: str
    ours: float | None
    target: Target | None = None
    reference: float | None = None
    reference_name: str = ""
    status: str = "ok"

    def as_json(self) -> dict[str, Any]:
        """The row with its verdict and ratio, for ``suite.json``."""
        return {
            "scenario": self.scenario,
            "status": self.status,
            "metric": self.metric,
            "unit": self.unit,
            "ours": self.ours,
            "target": None if self.target is None else str(self.target),
            "met": self.met,
            "reference": self.reference,
            "reference_name": self.reference_name or None,
            "ours_per_reference": self.ratio,
        }

    @property
    def met(self) -> bool | None:
        """Target met: never by a run that did not succeed (None when there is no
        target, or no figure from a run that succeeded)."""
        if self.target is None:
            return None
        if self.status != "ok":
            return False
        if self.ours is None:
            return None
        return self.target.met(self.ours)

    @property
    def ratio(self) -> float | None:
        """ours / reference."""
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    def cells(self) -> list[str]:
        """scenario | status | metric | ours | target | met? | reference | ours/reference."""
        met = self.met
        if met is None:
            verdict = ""
        elif met:
            verdict = "yes"
        elif self.status != "ok":
            verdict = f"NO (run {self.status})"
        elif self.target is not None and self.ours is not None:
            verdict = f"NO ({self.target.shortfall(self.ours)})"
        else:
            verdict = "NO"
        target = "" if self.target is None else str(self.target)
        ref = ""
        if self.reference is not None:
            ref = fmt(self.reference, self.unit)
            if self.reference_name:
                ref += f" ({self.reference_name})"
        ratio = self.ratio
        return [
            self.scenario,
            self.status,
            self.metric,
            fmt(self.ours, self.unit),
            target,
            verdict,
            ref,
            "" if ratio is None else f"{ratio:.2f}×",
        ]


HEADERS: Final = (
    "scenario",
    "status",
    "metric",
    "ours",
    "target",
    "met?",
    "reference",
    "ours/reference",
)
STATUS_CELL: Final = HEADERS.index("status")
VERDICT_CELL: Final = HEADERS.index("met?")


def fmt(value: float | None, unit: str) -> str:
    """A figure for the table, with the precision its unit deserves."""
    if value is None:
        return "-"
    if unit in ("µs", "ms"):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if unit in ("KiB", "MiB"):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def dig(data: Any, *path: str | int) -> Any:
    """``data[path[0]][path[1]]...``, or None where a step is missing."""
    for key in path:
        if isinstance(data, Mapping):
            data = data.get(key) if key in data else data.get(str(key))
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def num(data: Any, *path: str | int) -> float | None:
    """A number at ``path`` (None when absent or not a number)."""
    v = dig(data, *path)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class References:
    """The reference figures of the ``baselines`` run (None where it has none).

    Keys read (``results`` of :mod:`benchmarks.baselines`): ``echo.server_us_per_msg``;
    ``fanout.<members>.deliveries_per_s`` and ``.server_us_per_delivery``;
    ``nats.deliveries_per_s`` and ``.server_us_per_delivery`` (at ``nats.subscribers``);
    ``sqlite.msgs_per_s``.
    """

    def __init__(self, baselines: Mapping[str, Any] | None) -> None:
        """``baselines``: the baselines scenario's results file, if it ran."""
        self.r = dig(baselines, "results") if baselines else None

    def echo_us(self) -> float | None:
        """Server CPU µs per echoed message of the reference echo server."""
        return num(self.r, "echo", "server_us_per_msg")

    def sqlite_msgs(self) -> float | None:
        """Messages/s of the minimal SQLite group-commit path."""
        return num(self.r, "sqlite", "msgs_per_s")

    def fanout(self, members: int, key: str) -> float | None:
        """A figure of the reference fan-out server at ``members`` receivers."""
        return num(self.r, "fanout", str(members), key)

    def nats(self, members: int, key: str) -> float | None:
        """A figure of nats-server fan-out, if it ran with ``members`` subscribers."""
        if num(self.r, "nats", "subscribers") != members:
            return None
        return num(self.r, "nats", key)


def build_table(results: Mapping[str, StepResult]) -> list[Row]:
    """Every headline figure against its target and reference, in run order.

    Each row carries the status of its run, whose figures are shown whatever that
    status (a failed run's figures help find out why) but never meet a target. A run
    without figures (skipped, failed before writing any, the baselines) still gets a
    row, so the table shows every run's status.
    """
    base = results.get("baselines")
    # Reference figures come only from a baselines run that succeeded.
    ref = References(base.data if base is not None and base.status == "ok" else None)
    rows: list[Row] = []
    for key, res in results.items():
        own = _figures(key, res, ref) if res.data is not None else []
        if not own:
            metric = "(reference figures)" if key == "baselines" else "(no results)"
            own = [Row(key, metric, "", None)]
        rows += [replace(row, status=res.status) for row in own]
    return rows


def _figures(key: str, res: StepResult, ref: References) -> list[Row]:
    """The headline rows of one run that wrote a results file."""
    d: Mapping[str, Any] = res.data or {}
    r = d.get("results", {})
    if key == "dm":
        return [
            Row(
                "dm",
                "acked msgs/s",
                "msgs/s",
                num(r, "acked_per_s"),
                Target(">=", 30_000),
                ref.sqlite_msgs(),
                "SQLite",
            ),
            Row(
                "dm", "delivered msgs/s", "msgs/s", num(r, "delivered_per_s"), Target(">=", 30_000)
            ),
            Row(
                "dm",
                "server CPU µs/msg",
                "µs",
                num(r, "cpu", "server_us_per_msg"),
                Target("<=", 30),
                ref.echo_us(),
                "echo",
            ),
            Row("dm", "ack p99 ms", "ms", num(r, "ack_latency", "p99_ms")),
            Row("dm", "client CPU %", "%", num(r, "cpu", "clients_pct")),
            Row("dm", "host steal %", "%", num(r, "cpu", "steal_pct")),
        ]
    if key == "dm-rate":
        rate = num(d, "options", "rate") or 0.0
        label = res.step.label
        return [
            Row(label, "acked msgs/s", "msgs/s", num(r, "acked_per_s"), Target(">=", 0.98 * rate)),
            Row(label, "ack p99 ms", "ms", num(r, "ack_latency", "p99_ms"), Target("<=", 20)),
            Row(label, "delivery p99 ms", "ms", num(r, "delivery_latency", "p99_ms")),
            Row(label, "server CPU µs/msg", "µs", num(r, "cpu", "server_us_per_msg")),
        ]
    if key.startswith("room-"):
        return _room_figures(key, d, ref)
    if key == "connections":
        return [
            Row(
                "connections",
                "idle auth. WS conns",
                "",
                num(r, "connections"),
                Target(">=", 15_000),
            ),
            Row(
                "connections",
                "server RSS KiB/conn",
                "KiB",
                num(r, "rss_per_conn_kib"),
                Target("<=", 24),
            ),
        ]
    if key == "auth-storm":
        return [
            Row("auth-storm", "token auths/s", "/s", num(r, "auths_per_s"), Target(">=", 5_000)),
            Row("auth-storm", "server CPU µs/auth", "µs", num(r, "server_us_per_auth")),
            Row("auth-storm", "connect→auth p99 ms", "ms", num(r, "cycle_latency", "p99_ms")),
            Row("auth-storm", "host steal %", "%", num(r, "steal_pct")),
        ]
    if key == "mixed":
        return [
            Row("mixed", "ops/s (ok replies)", "/s", num(r, "ops_per_s")),
            Row("mixed", "error replies/s", "/s", num(r, "error_replies_per_s")),
            Row("mixed", "events delivered/s", "/s", num(r, "events_per_s")),
            Row("mixed", "server CPU µs/op", "µs", num(r, "server_us_per_op")),
            Row("mixed", "DM send p99 ms", "ms", num(r, "by_op", "dm", "p99_ms")),
        ]
    if key == "broadcast":
        users = int(num(r, "users") or 0)
        target = Target("<=", 5_000) if users >= 10_000 else None
        ms = num(r, "broadcast_s")
        return [
            Row(
                "broadcast",
                f"notice to {users:,} users ms",
                "ms",
                None if ms is None else 1000 * ms,
                target,
            ),
            Row("broadcast", "notices/s", "/s", num(r, "notices_per_s")),
            Row("broadcast", "server CPU % of a core", "%", num(r, "server_cpu_pct")),
        ]
    if key == "push":
        return [
            Row("push", "pushes/s", "/s", num(r, "pushes_per_s"), Target(">=", 2_000)),
            Row("push", "server CPU µs/push", "µs", num(r, "server_us_per_push")),
            Row("push", "repeats", "", num(r, "repeats")),
        ]
    if key == "push-rate":
        rate = num(d, "options", "rate") or 0.0
        label = res.step.label
        return [
            Row(label, "pushes/s", "/s", num(r, "pushes_per_s")),
            Row(
                label,
                "send→request p99 ms",
                "ms",
                num(r, "latency", "p99_ms"),
                Target("<=", 500) if rate >= 1_000 else None,
            ),
            Row(label, "send→request p50 ms", "ms", num(r, "latency", "p50_ms")),
        ]
    return []


def _room_figures(key: str, d: Mapping[str, Any], ref: References) -> list[Row]:
    run = dig(d, "runs", 0) or {}
    n = int(run.get("members", _size_of(key)))
    name = f"room {n:,}"
    dps = num(run, "delivered_per_s")
    rows = [
        Row(name, "deliveries/s", "/s", dps, None, ref.fanout(n, "deliveries_per_s"), "fan-out")
    ]
    if (nats := ref.nats(n, "deliveries_per_s")) is not None:
        rows.append(Row(name, "deliveries/s", "/s", dps, None, nats, "NATS"))
    per = num(run, "server_us_per_delivery")
    target = Target("<=", 3.3) if n == 1_000 else None
    rows.append(
        Row(
            name,
            "server CPU µs/delivery",
            "µs",
            per,
            target,
            ref.fanout(n, "server_us_per_delivery"),
            "fan-out",
        )
    )
    if (nats := ref.nats(n, "server_us_per_delivery")) is not None:
        rows.append(Row(name, "server CPU µs/delivery", "µs", per, target, nats, "NATS"))
    return [
        *rows,
        Row(name, "delivery p99 ms", "ms", num(run, "delivery_latency", "p99_ms")),
        Row(name, "client CPU %", "%", num(run, "clients_pct")),
        Row(name, "host steal %", "%", num(run, "steal_pct")),
    ]


def _size_of(key: str) -> int:
    try:
        return int(key.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def render_table(rows: Sequence[Row], title: str) -> Table:
    """The rich table printed at the end."""
    table = Table(title=title, title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("ours", "ours/reference") else "left")
    for row in rows:
        cells = [escape(c) for c in row.cells()]
        if row.met is False:
            cells[VERDICT_CELL] = f"[red]{cells[VERDICT_CELL]}[/red]"
        elif row.met:
            cells[VERDICT_CELL] = f"[green]{cells[VERDICT_CELL]}[/green]"
        if row.status != "ok":
            cells[STATUS_CELL] = f"[bold red]{cells[STATUS_CELL]}[/bold red]"
        table.add_row(*cells)
    return table


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table in Markdown (for docs/performance.md)."""
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in row.cells()]
        verdict = cells[VERDICT_CELL]
        cells[VERDICT_CELL] = (
            verdict.replace("NO", "**no**", 1) if verdict.startswith("NO") else verdict
        )
        if row.status != "ok":
            cells[STATUS_CELL] = f"**{row.status}**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --- the machine ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores usable here, RAM: for the report."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "cpu_model": model,
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_online": os.cpu_count(),
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
    }


# --- the command ------------------------------------------------------------------------


def run(args: argparse.Namespace, scenarios: Mapping[str, argparse.ArgumentParser]) -> int:
    """Run the suite; ``scenarios`` maps each installed scenario to its parser."""
    if args.render is not None:
        return rerender(args)
    stamp = harness.timestamp()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out_dir: Path = (args.out or harness.RESULTS_DIR / f"suite-{stamp}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = build_steps(args)
    results: dict[str, StepResult] = {}
    started = time.time()
    status = 0
    harness.console.print(f"[bold]benchmark suite[/bold] ({mode}, {len(steps)} runs) -> {out_dir}")
    try:
        with SuiteProgress(steps, enabled=not args.no_progress) as progress:
            for step in steps:
                progress.begin(step)
                if step.scenario in scenarios:
                    harness.console.rule(f"{step.key}", style="dim")
                result = run_step(
                    step, scenarios.get(step.scenario), out_dir, progress, echo=not args.quiet
                )
                results[step.key] = result
                progress.end(result)
                if result.status == "interrupted":
                    raise KeyboardInterrupt
                if result.status == "skipped":
                    harness.console.print(f"[yellow]skipped {step.key}:[/yellow] {result.note}")
                elif result.status != "ok":
                    harness.console.print(f"[bold red]{step.key} failed:[/bold red] {result.note}")
                    status = 1
    except KeyboardInterrupt:
        harness.console.print("[red]interrupted: writing what ran so far[/red]")
        status = 130

    meta: dict[str, Any] = {
        "mode": mode,
        "timestamp": stamp,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "argv": sys.argv[1:],
        "environment": harness.environment(),
        "machine": machine(),
        "status": status,
    }
    not_run = [s for s in steps if s.key not in results]  # interrupted before them
    report(results, meta, out_dir, args, not_run=not_run)
    return status


def report(
    results: Mapping[str, StepResult],
    meta: Mapping[str, Any],
    out_dir: Path,
    args: argparse.Namespace,
    *,
    not_run: Sequence[Step] = (),
) -> None:
    """Write ``suite.json`` and ``table.md``, draw the plots, print the table."""
    rows = build_table(results)
    summary: dict[str, Any] = {
        "suite": dict(meta),
        "table": [row.as_json() for row in rows],
        "scenarios": {key: res.as_json() for key, res in results.items()},
    }
    for step in not_run:
        summary["scenarios"][step.key] = {"scenario": step.scenario, "status": "not run"}
    (out_dir / "suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "table.md").write_text(markdown_table(rows))
    pngs: list[Path] = []
    if not args.no_plots:
        from benchmarks import plots

        pngs = plots.plot_suite(
            [
                (res.step.label, res.data)
                for res in results.values()
                if res.data is not None and res.step.scenario != "baselines"
            ],
            out_dir,
        )
        if args.copy_plots is not None and pngs:
            copied = copy_plots(out_dir, args.copy_plots)
            harness.console.print(f"plots copied to {args.copy_plots} ({len(copied)} files)")
    harness.console.rule("suite results", style="bold")
    # Not on a terminal (a log, CI) the table gets the width it needs.
    wide = harness.console if sys.stdout.isatty() else Console(width=150)
    wide.print(render_table(rows, f"benchmark suite ({meta['mode']}, {meta['timestamp']})"))
    for key, res in results.items():
        if res.status != "ok":
            harness.console.print(f"{key}: [bold]{res.status}[/bold] {escape(res.note)}")
        elif res.dropped_options:
            harness.console.print(
                f"[dim]{key}: options it does not take were left out: "
                f"{', '.join(res.dropped_options)}[/dim]"
            )
    harness.console.print(f"results: {out_dir / 'suite.json'} (+ table.md, per-scenario JSON/logs)")
    if pngs:
        harness.console.print(f"plots: {', '.join(p.name for p in pngs)}")


def rerender(args: argparse.Namespace) -> int:
    """``--render DIR``: the table, ``table.md`` and plots again from a suite folder's
    ``suite.json`` (after a change to them, or with ``--copy-plots``); runs nothing."""
    out_dir: Path = args.render.resolve()
    summary = json.loads((out_dir / "suite.json").read_text())
    results: dict[str, StepResult] = {}
    for key, entry in summary.get("scenarios", {}).items():
        if "label" not in entry:
            continue  # never ran
        step = Step(key, entry["scenario"], entry["label"], (), 0.0)
        res = StepResult(step, entry["status"], entry.get("exit_code"), entry.get("seconds", 0))
        res.data, res.note = entry.get("data"), entry.get("note", "")
        res.dropped_options = entry.get("dropped_options") or []
        results[key] = res
    report(results, summary["suite"], out_dir, args)
    return int(summary["suite"].get("status", 0))


def copy_plots(src: Path, dest: Path) -> list[Path]:
    """Copy a suite's PNGs into ``dest`` (e.g. ``docs/performance/``)."""
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, dest / p.name)) for p in sorted(src.glob("*.png"))]


__all__ = [
    "Row",
    "Step",
    "StepResult",
    "Target",
    "add_arguments",
    "build_steps",
    "build_table",
    "markdown_table",
    "run",
    "step_status",
]
