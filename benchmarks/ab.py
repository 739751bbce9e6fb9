"""Same-run A/B comparison of two commits: ``python -m benchmarks.ab BASE -- SCENARIO …``.

The host is shared and its speed varies from one hour to the next, so a figure from
another day says little. This runs one scenario against two checkouts in the same
sitting, interleaved (base, head, base, head, …) so that a slow minute hits both, and
prints the median and the spread of each side's key figures with the change in %.

``BASE`` is a commit (``02f08f1``, ``main~3``): it is checked out once into
``benchmarks/results/ab/<commit>`` (a git worktree) with its own ``.venv`` from
``scripts/bootstrap``. ``HEAD`` is this checkout as it is on disk. Everything after
``--`` is the scenario and its options, passed to ``python -m benchmarks`` on both
sides unchanged, e.g.::

    python -m benchmarks.ab 02f08f1 --runs 3 -- dm --duration 8
    python -m benchmarks.ab 02f08f1 --runs 3 -- room --members 1000
    python -m benchmarks.ab 02f08f1 --runs 1 -- dm --cluster --db postgresql

With ``--cluster`` the figures are those of the cluster side, each the median of the
run's ``--rounds`` cluster rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
AB_DIR = ROOT / "benchmarks" / "results" / "ab"

Figure = tuple[str, Callable[[dict[str, Any]], float | None], bool]
"""(label, extractor from the results JSON, higher is better)."""


def _get(doc: dict[str, Any], *path: str | int) -> float | None:
    node: Any = doc
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return float(node) if isinstance(node, int | float) else None


FIGURES: dict[str, list[Figure]] = {
    "dm": [
        ("acked msgs/s", lambda d: _get(d, "results", "acked_per_s"), True),
        ("server CPU µs/msg", lambda d: _get(d, "results", "cpu", "server_us_per_msg"), False),
        ("ack p99 ms", lambda d: _get(d, "results", "ack_latency", "p99_ms"), False),
    ],
    "room": [
        ("deliveries/s", lambda d: _get(d, "runs", 0, "delivered_per_s"), True),
        ("server CPU µs/delivery", lambda d: _get(d, "runs", 0, "server_us_per_delivery"), False),
        ("acked msgs/s", lambda d: _get(d, "runs", 0, "acked_per_s"), True),
        ("delivery p99 ms", lambda d: _get(d, "runs", 0, "delivery_latency", "p99_ms"), False),
    ],
}


def _cluster(doc: dict[str, Any], *path: str) -> float | None:
    """The median over the cluster runs of a ``--cluster`` results JSON."""
    runs = doc.get("runs", {})
    if not isinstance(runs, dict):
        return None
    values = [v for run in runs.get("cluster", []) if (v := _get(run, *path)) is not None]
    return statistics.median(values) if values else None


CLUSTER_FIGURES: dict[str, list[Figure]] = {
    "dm": [
        ("cluster msgs/s", lambda d: _cluster(d, "msgs_per_s"), True),
        ("cluster IMServer CPU µs/msg", lambda d: _cluster(d, "per_op", "imserver_us"), False),
        *(
            (
                f"  {name} µs/msg",
                lambda d, name=name: _cluster(d, "per_op", "services_us", name),
                False,
            )
            for name in ("gateway", "message", "user", "notification", "room", "file")
        ),
        *(
            (
                f"{name} µs/msg",
                lambda d, name=name: _cluster(d, "per_op", "backing_us", name),
                False,
            )
            for name in ("postgresql", "rabbitmq", "redis")
        ),
        ("cluster ack p99 ms", lambda d: _cluster(d, "p99_ms"), False),
        (
            "IMServer CPU at rest % of a core",
            lambda d: _cluster(d, "backing_idle_pct", "imserver"),
            False,
        ),
    ],
}
"""The figures of ``SCENARIO --cluster``: the medians of its cluster rounds."""


def checkout(rev: str) -> Path:
    """A worktree of ``rev`` with its own virtualenv (made on first use)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = AB_DIR / sha
    if not path.exists():
        AB_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True)
    if not (path / ".venv" / "bin" / "python").exists():
        subprocess.run([str(path / "scripts" / "bootstrap"), "dev"], cwd=path, check=True)
    return path


def run_once(tree: Path, scenario: list[str], out: Path) -> dict[str, Any]:
    """Run the scenario in ``tree``; its results JSON."""
    cmd = [str(tree / ".venv" / "bin" / "python"), "-m", "benchmarks", *scenario]
    cmd += ["--no-progress", "--results-file", str(out)]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{tree.name}: the benchmark failed (exit {proc.returncode})")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _cell(values: list[float]) -> str:
    med = statistics.median(values)
    digits = 2 if med < 10 else 1  # µs per delivery is around 2: one decimal hides changes
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    split = args_in.index("--") if "--" in args_in else len(args_in)
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    p.add_argument("base", help="the commit to compare against")
    p.add_argument("--runs", type=int, default=3, help="runs per side (default 3)")
    args = p.parse_args(args_in[:split])
    scenario = args_in[split + 1 :]
    if not scenario or scenario[0] not in FIGURES:
        p.error(f"after --, one of the scenarios {', '.join(FIGURES)} and its options")
    if "--cluster" in scenario:
        if scenario[0] not in CLUSTER_FIGURES:
            p.error(f"--cluster: one of the scenarios {', '.join(CLUSTER_FIGURES)}")
        figures = CLUSTER_FIGURES[scenario[0]]
    else:
        figures = FIGURES[scenario[0]]
    console = Console()
    sides = {"base": checkout(args.base), "head": ROOT}
    values: dict[str, list[list[float]]] = {s: [[] for _ in figures] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for side, tree in sides.items():
                console.print(f"run {i + 1}/{args.runs}: {side} ({tree})")
                doc = run_once(tree, scenario, Path(tmp) / f"{side}-{i}.json")
                for j, (_, get, _) in enumerate(figures):
                    v = get(doc)
                    if v is not None:
                        values[side][j].append(v)
    table = Table(title=f"A/B: {' '.join(scenario)} — median (min–max) of {args.runs}")
    table.add_column("figure")
    table.add_column(f"base {args.base}", justify="right")
    table.add_column("head", justify="right")
    table.add_column("change", justify="right")
    for j, (label, _, higher) in enumerate(figures):
        a, b = values["base"][j], values["head"][j]
        if not a or not b:
            table.add_row(label, "-", "-", "-")
            continue
        change = 100 * (statistics.median(b) / statistics.median(a) - 1)
        verdict = "better" if (change > 0) == higher else "worse"
        table.add_row(label, _cell(a), _cell(b), f"{change:+.1f}% {verdict}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
