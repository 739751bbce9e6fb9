"""``python -m benchmarks [suite options]`` -- run the whole suite;
``python -m benchmarks <scenario> [options]`` -- run one benchmark scenario.

With no sub-command (or ``suite``, or only options such as ``--quick``) the whole
suite runs (:mod:`benchmarks.suite`): every scenario below in turn, each with a fresh
server, then one results table against the targets and reference baselines, the
combined JSON and PNG plots in one folder.

Scenarios (one sub-command each):

- ``dm`` -- persisted direct messages between pairs of users (:mod:`benchmarks.dm`).
- ``room`` -- senders into a room whose members are all connected (:mod:`benchmarks.room`).
- ``files`` -- upload and download throughput of a 10 MiB file (:mod:`benchmarks.files`).
- ``connections``, ``auth-storm``, ``mixed`` -- idle connections and RSS each, token
  reconnects, a realistic blend (:mod:`benchmarks.connections`,
  :mod:`benchmarks.authstorm`, :mod:`benchmarks.mixed`).
- ``broadcast`` -- an admin's ``notice.broadcast`` to 10,000 users (:mod:`benchmarks.broadcast`).
- ``push`` -- offline push, from a message to a signed webhook request (:mod:`benchmarks.push`).
- ``rpc`` -- a call between services over gRPC against the same call in process
  (:mod:`benchmarks.rpc`).
- ``baselines`` -- the reference echo/fan-out server, nats-server and a bare SQLite
  group-commit loop (:mod:`benchmarks.baselines`).

Options every scenario takes come from :func:`add_common_arguments`; each scenario
adds its own. To add a scenario, write a module with ``add_arguments(parser)`` and
``run(args) -> int`` that writes its results with :func:`harness.write_results`, and
list it in :data:`SCENARIOS`. ``--results-file`` and ``--plots`` then work for it
without more code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Final

from benchmarks import (
    authstorm,
    baselines,
    broadcast,
    connections,
    dm,
    files,
    harness,
    mixed,
    push,
    room,
    rpc,
    suite,
)

SCENARIOS: Final[dict[str, tuple[ModuleType, str]]] = {
    "dm": (dm, "persisted direct messages between pairs of users"),
    "room": (room, "one or more senders into a room whose members are all connected"),
    "files": (files, "upload and download MB/s of one file over HTTP"),
    "connections": (connections, "N idle authenticated WebSocket connections: RSS each"),
    "auth-storm": (authstorm, "connections reconnecting with tokens: token auths/s"),
    "baselines": (baselines, "reference echo/fan-out server, nats-server, SQLite commits"),
    "mixed": (mixed, "a blend of DMs, room messages, typing, read receipts, history"),
    "broadcast": (broadcast, "an admin's notice.broadcast to every user: seconds, notices/s"),
    "push": (push, "offline push, message to signed webhook request: pushes/s, latency"),
    "rpc": (rpc, "a call between services over gRPC against a local call: CPU, p50/p99"),
}


def add_common_arguments(parser: argparse.ArgumentParser, *, default_procs: int) -> None:
    """Options shared by every scenario: load generator, wire, timing, server, output."""
    load = parser.add_argument_group("load generator")
    load.add_argument(
        "--procs",
        type=int,
        default=default_procs,
        help=f"client worker processes (default here: {default_procs})",
    )
    load.add_argument("--transport", choices=("ws", "tcp"), default="ws", help="default ws")
    load.add_argument("--codec", choices=("json", "msgpack"), default="json", help="default json")
    load.add_argument("--no-uvloop", action="store_true", help="plain asyncio loops in the workers")
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds (default 10)"
    )
    timing.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)"
    )
    timing.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        help="seconds to wait for outstanding acks/deliveries at the end (default 15)",
    )
    srv = parser.add_argument_group("server")
    srv.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server setting, TOML value, e.g. --set storage.batch_max=1024 (repeatable)",
    )
    srv.add_argument(
        "--keep-data", action="store_true", help="keep the server's temporary directory"
    )
    srv.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during the measured interval and summarise the profile",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true", help="no live progress display")
    out.add_argument(
        "--results-file",
        type=Path,
        metavar="PATH",
        help="write the results JSON here instead of benchmarks/results/<scenario>-<stamp>"
        f".json (also ${harness.RESULTS_FILE_ENV})",
    )
    out.add_argument(
        "--plots",
        action="store_true",
        help="draw PNG plots (throughput over time, latency percentiles) next to the JSON",
    )


def parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per scenario."""
    top = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="End-to-end benchmarks of IMServer against a real server process.",
        epilog="Without a SCENARIO (or with only suite options, e.g. --quick) the whole "
        "suite runs: see 'suite --help'.",
    )
    sub = top.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    scenario_parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (module, help_text) in SCENARIOS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).split("\n\n")[0],
        )
        module.add_arguments(p)
        add_common_arguments(p, default_procs=getattr(module, "default_procs", lambda: 1)())
        runner: Callable[[argparse.Namespace], int] = module.run
        p.set_defaults(func=runner)
        scenario_parsers[name] = p
    p = sub.add_parser(
        "suite",
        help="the whole suite (the default): every scenario, one table, JSON and plots",
        description=(suite.__doc__ or "").split("\n\n")[0],
    )
    suite.add_arguments(p)
    p.set_defaults(func=lambda args: suite.run(args, scenario_parsers))
    return top


def _default_to_suite(argv: list[str]) -> list[str]:
    # No sub-command (nothing, or only options such as --quick): the suite.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return ["suite", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the scenario; returns the exit status."""
    args = parser().parse_args(_default_to_suite(sys.argv[1:] if argv is None else argv))
    results_file: Path | None = getattr(args, "results_file", None)
    if results_file is not None:
        os.environ[harness.RESULTS_FILE_ENV] = str(results_file.resolve())
    try:
        status: int = args.func(args)
        if getattr(args, "plots", False) and harness.last_results_path is not None:
            from benchmarks import plots

            for png in plots.plot_results_file(harness.last_results_path):
                harness.console.print(f"plot: {png}")
    except KeyboardInterrupt:
        harness.console.print("[red]interrupted[/red]")
        return 130
    except (harness.ServerError, RuntimeError, TimeoutError) as exc:
        harness.console.print(f"[bold red]benchmark failed:[/bold red] {exc}")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
