"""``dm --outbox-ab N``: the cost of the durable event stream, off against on, in one run.

Runs the ``dm`` scenario ``2 N`` times, alternating ``[events] backend = "none"`` and
``"rabbitmq"`` (off, on, off, on, …; a fresh database each time), and prints the
median of each side's figures: acked messages per second, the server's CPU per
message (the relay's and the consumer's included: they run in the server process),
the ack latency, and the broker's CPU per message (the RabbitMQ node's ``beam.smp``
process, when this user can read its ``/proc`` entry). With the stream on, every
stored message is also an outbox row inserted in its batch's transaction, published
with a confirm, deleted, and consumed by the notification service.

Whether the relay keeps up: each "on" run's server logs, when it stops, the rows
still waiting in each outbox (``outbox …: N rows waiting at close``, after the load
and before the relay's last drain); the table prints their sum per run. A relay that
keeps up leaves at most a claim's worth; one that falls behind, the backlog of the
whole run.

Each "on" run has an exchange and queues of its own (a random prefix) on the broker
at ``$IMS_BENCH_RABBITMQ`` (``amqp://guest:guest@127.0.0.1:5672/``), deleted after.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from benchmarks import harness
from imserver.testing import rabbitmq

URL: Final = os.environ.get("IMS_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
BACKOFF: Final = [1.0, 5.0]
WAITING: Final = re.compile(r"outbox (\w+): (\d+) rows waiting at close")


def _server_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("imserver-bench-*"))


def _ours(root: Path, prefix: str) -> bool:
    """Whether the server directory ``root`` is the run's with event prefix ``prefix``."""
    try:
        return prefix in (root / "imserver.toml").read_text(errors="replace")
    except OSError:
        return False


def _rows_left(root: Path) -> int | None:
    """The rows the run's server found in its outboxes when it stopped (its log)."""
    text = ""
    for name in ("server.stderr.log", "server.stdout.log"):
        with_log = root / name
        if with_log.exists():
            text += with_log.read_text(errors="replace")
    found = WAITING.findall(text)
    return sum(int(n) for _, n in found) if found else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--outbox-ab`` option of ``dm``."""
    parser.add_argument(
        "--outbox-ab",
        type=int,
        default=0,
        metavar="N",
        help="run N times with the event stream off and N times on (RabbitMQ outbox, "
        "relay, consumer), alternating, and print the medians side by side",
    )


def _broker_pid() -> int | None:
    try:
        found = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True)
    except OSError:
        return None
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if len(pids) == 1 else None


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(
    args: argparse.Namespace, run_once: Callable[[argparse.Namespace], tuple[int, dict[str, Any]]]
) -> int:
    """Alternate ``run_once`` with the stream off and on; print the medians."""
    sides: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    status = 0
    broker = _broker_pid()
    base_set = list(args.set)
    for round_no in range(args.outbox_ab):
        for side in ("off", "on"):
            harness.console.print(f"[bold]outbox A/B: round {round_no + 1}, stream {side}[/bold]")
            prefix = f"imsbench{secrets.token_hex(4)}"
            extra = (
                [
                    'events.backend="rabbitmq"',
                    f'events.url="{URL}"',
                    f'events.prefix="{prefix}"',
                    f"events.backoff={BACKOFF}",
                ]
                if side == "on"
                else []
            )
            args.set = base_set + extra
            before = _cpu_seconds(broker)
            # An "on" server's directory is kept to read its log, then removed here.
            kept = args.keep_data
            args.keep_data = kept or side == "on"
            dirs = _server_dirs()
            try:
                code, out = run_once(args)
            finally:
                args.keep_data = kept
                if side == "on":
                    harness.run_async(
                        rabbitmq.delete_topology(URL, prefix, ["notification"], BACKOFF)
                    )
            after = _cpu_seconds(broker)
            left: int | None = None
            if side == "on":
                for root in _server_dirs() - dirs:
                    if not _ours(root, prefix):
                        continue  # another benchmark's, on this shared machine
                    left = _rows_left(root)
                    if not kept:
                        shutil.rmtree(root, ignore_errors=True)
            status = status or code
            res = out["results"]
            cpu = res["cpu"]
            acked = res["totals"]["acked"]
            sides[side].append(
                {
                    "acked_per_s": res["acked_per_s"],
                    "server_us": cpu.get("server_us_per_msg") or float("nan"),
                    "ack_p50": res["ack_latency"].get("p50_ms", float("nan")),
                    "ack_p99": res["ack_latency"].get("p99_ms", float("nan")),
                    # The broker's CPU over the whole run (its set-up and drain too),
                    # per message acked in the whole run.
                    "broker_us": (
                        1e6 * (after - before) / acked
                        if before is not None and after is not None and acked
                        else float("nan")
                    ),
                    "rows_left": float("nan") if left is None else float(left),
                }
            )
    args.set = base_set
    _print(args, sides)
    return status


def _print(args: argparse.Namespace, sides: dict[str, list[dict[str, float]]]) -> None:
    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in sides[side])

    rows = [
        ("acked msgs/s", "acked_per_s", "{:,.0f}"),
        ("server CPU per message (µs)", "server_us", "{:.1f}"),
        ("RabbitMQ CPU per message (µs)", "broker_us", "{:.1f}"),
        ("ack latency p50 (ms)", "ack_p50", "{:.2f}"),
        ("ack latency p99 (ms)", "ack_p99", "{:.2f}"),
    ]
    n = len(sides["off"])
    harness.console.print(
        f"\n[bold]dm, event stream off vs on (RabbitMQ outbox), median of {n} each, "
        f"database {args.db}[/bold]"
    )
    print("| | stream off | stream on | on / off |")
    print("|---|---:|---:|---:|")
    for label, key, fmt in rows:
        off, on = med("off", key), med("on", key)
        # The broker idles at about 1 µs per message's worth: no ratio to speak of.
        meaningful = off == off and on == on and off and key != "broker_us"
        ratio = f"{on / off:.2f}" if meaningful else "-"
        print(f"| {label} | {fmt.format(off)} | {fmt.format(on)} | {ratio} |")
    for side in ("off", "on"):
        each = ", ".join(f"{r['acked_per_s']:,.0f}/s {r['server_us']:.1f} µs" for r in sides[side])
        print(f"runs, stream {side}: {each}")
    left = ", ".join(
        f"{r['rows_left']:,.0f}" if r["rows_left"] == r["rows_left"] else "?" for r in sides["on"]
    )
    print(f"outbox rows waiting when the server stopped, each run with the stream on: {left}")
