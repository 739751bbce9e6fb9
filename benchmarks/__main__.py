"""``python -m benchmarks <scenario> [options]`` -- run one benchmark scenario.

Scenarios (one sub-command each):

- ``dm`` -- persisted direct messages between pairs of users (:mod:`benchmarks.dm`).
- ``files`` -- upload and download throughput of a 10 MiB file (:mod:`benchmarks.files`).

Options every scenario takes come from :func:`add_common_arguments`; each scenario
adds its own. To add a scenario, write a module with ``add_arguments(parser)`` and
``run(args) -> int`` and list it in :data:`SCENARIOS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Final

from benchmarks import dm, files, harness, room

SCENARIOS: Final[dict[str, tuple[ModuleType, str]]] = {
    "dm": (dm, "persisted direct messages between pairs of users"),
    "room": (room, "one or more senders into a room whose members are all connected"),
    "files": (files, "upload and download MB/s of one file over HTTP"),
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


def parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per scenario."""
    top = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="End-to-end benchmarks of IMServer against a real server process.",
    )
    sub = top.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
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
    return top


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the scenario; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        harness.console.print("[red]interrupted[/red]")
        return 130
    except (harness.ServerError, RuntimeError, TimeoutError) as exc:
        harness.console.print(f"[bold red]benchmark failed:[/bold red] {exc}")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
