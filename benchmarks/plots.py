"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- Throughput over time: from a scenario's ``"timeseries"`` (see
  :class:`benchmarks.harness.Timeseries`) -- acked and delivered per second, with the
  measured interval shaded, and the server's CPU (% of one core) below.
- Latency percentiles: p50 / p90 / p99 / p99.9 / max of every latency summary
  (:func:`benchmarks.harness.latency_summary`) found in a results file, as grouped
  bars on a log scale.

:func:`plot_results_file` draws both for one scenario's JSON (``--plots``);
:func:`plot_suite` draws them for a whole suite run.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

PERCENTILE_KEYS: Final = (
    ("p50_ms", "p50"),
    ("p90_ms", "p90"),
    ("p99_ms", "p99"),
    ("p99.9_ms", "p99.9"),
    ("max_ms", "max"),
)

ALIASES: Final = {"p99.9_ms": "p999_ms"}
"""Other spellings of a percentile key that some scenarios use."""
MESSAGE_SCENARIOS: Final = ("dm", "room")
"""Labels whose latencies go to ``latency.png`` (the others to ``latency-other.png``)."""

Series = Mapping[str, Any]
"""A ``"timeseries"`` object of a results file."""
Summary = Mapping[str, Any]
"""A latency summary: ``count``, ``p50_ms`` ... ``max_ms``."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """``"room 1,000 members"`` -> ``"room-1000-members"`` (for file names)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower().replace(",", "")).strip("-")


# --- what a results file holds ----------------------------------------------------------


def rates(series: Series) -> dict[str, list[float]]:
    """Per-second rates between consecutive samples: ``t_s`` (interval midpoints),
    ``acked``, ``delivered`` (per second) and ``server_cpu_pct`` (% of one core)."""
    cols = list(series.get("columns", ["t_s", "acked", "delivered", "server_cpu_s"]))
    rows: list[Sequence[float]] = series.get("samples", [])
    it, ia, idl = cols.index("t_s"), cols.index("acked"), cols.index("delivered")
    ic = cols.index("server_cpu_s") if "server_cpu_s" in cols else None
    out: dict[str, list[float]] = {"t_s": [], "acked": [], "delivered": [], "server_cpu_pct": []}
    for prev, cur in itertools.pairwise(rows):
        dt = cur[it] - prev[it]
        if dt <= 0:
            continue
        out["t_s"].append((cur[it] + prev[it]) / 2)
        out["acked"].append((cur[ia] - prev[ia]) / dt)
        out["delivered"].append((cur[idl] - prev[idl]) / dt)
        if ic is not None:
            out["server_cpu_pct"].append(100.0 * (cur[ic] - prev[ic]) / dt)
    return out


def find_timeseries(data: Mapping[str, Any], label: str) -> list[tuple[str, Series]]:
    """Every time series of one scenario's results: top-level ``"timeseries"`` (dm),
    each of ``"runs"`` (room: one per size), or anywhere under ``"results"``."""
    found: list[tuple[str, Series]] = []
    if _is_series(data.get("timeseries")):
        found.append((label, data["timeseries"]))
    for run in data.get("runs", []) or []:
        if isinstance(run, Mapping) and _is_series(run.get("timeseries")):
            name = f"{label} {run['members']:,} members" if "members" in run else label
            found.append((name, run["timeseries"]))
    results = data.get("results")
    if isinstance(results, Mapping):
        for path, node in _walk(results):
            if _is_series(node.get("timeseries")):
                found.append((" ".join([label, *path]), node["timeseries"]))
    return found


def find_latencies(data: Mapping[str, Any], label: str) -> list[tuple[str, Summary]]:
    """Every latency summary (a mapping with ``p50_ms``) under ``"results"`` or in
    ``"runs"``, labelled from its place: ``"dm ack"``, ``"room 1,000 members delivery"``."""
    found: list[tuple[str, Summary]] = []
    roots: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(data.get("results"), Mapping):
        roots.append((label, data["results"]))
    for run in data.get("runs", []) or []:
        if isinstance(run, Mapping):
            roots.append((f"{label} {run['members']:,}" if "members" in run else label, run))
    for prefix, root in roots:
        for path, node in _walk(root):
            if "p50_ms" in node and node.get("count", 1):
                words = [_latency_word(p) for p in path]
                found.append((" ".join([prefix, *(w for w in words if w)]), node))
    return found


def _is_series(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("samples"), list)


def _walk(
    node: Mapping[str, Any], path: tuple[str, ...] = (), depth: int = 0
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    yield path, node
    if depth >= 4:
        return
    for k, v in node.items():
        if isinstance(v, Mapping) and k not in ("timeseries", "config", "profile"):
            yield from _walk(v, (*path, str(k)), depth + 1)


def _latency_word(key: str) -> str:
    if key == "by_op":
        return ""
    for suffix in ("_latency_ms", "_latency"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return "" if key == "latency" else key


# --- drawing ----------------------------------------------------------------------------


def plot_throughput(label: str, series: Series, path: Path) -> Path:
    """Acked and delivered per second over time (and server CPU below), one PNG."""
    plt = _pyplot()
    r = rates(series)
    fig, (ax, ax_cpu) = plt.subplots(
        2, 1, sharex=True, figsize=(9, 5.5), gridspec_kw={"height_ratios": [3, 1]}
    )
    measure = series.get("measure_s")
    for a in (ax, ax_cpu):
        if measure:
            a.axvspan(measure[0], measure[1], color="tab:green", alpha=0.08, lw=0)
        a.grid(True, alpha=0.3)
    delivered, acked = r["delivered"], r["acked"]
    names = series.get("labels") or {}
    acked_name = str(names.get("acked", "acked msgs"))
    delivered_name = str(names.get("delivered", "deliveries"))
    fan_out = sum(delivered) > 1.5 * sum(acked) > 0  # a room: deliveries = acks x members
    if not any(delivered):  # the scenario counts one thing only (auths, connections)
        ax.plot(r["t_s"], acked, color="tab:orange", lw=1.4, label=f"{acked_name} / s")
        ax.set_ylabel(f"{acked_name} / s")
        handles = ax.get_lines()
    elif fan_out:
        ax.plot(r["t_s"], delivered, color="tab:blue", lw=1.4, label=f"{delivered_name} / s")
        ax.set_ylabel(f"{delivered_name} / s")
        twin = ax.twinx()
        twin.plot(r["t_s"], acked, color="tab:orange", lw=1.0, alpha=0.8, label=f"{acked_name} / s")
        twin.set_ylabel(f"{acked_name} / s")
        twin.set_ylim(bottom=0)
        handles = ax.get_lines() + twin.get_lines()
    else:
        ax.plot(r["t_s"], delivered, color="tab:blue", lw=1.4, label=f"{delivered_name} / s")
        ax.plot(r["t_s"], acked, color="tab:orange", lw=1.0, ls="--", label=f"{acked_name} / s")
        ax.set_ylabel("per second")
        handles = ax.get_lines()
    ax.set_ylim(bottom=0)
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="lower center", fontsize=8)
    ax.set_title(f"{label}: throughput over time (shaded: measured interval)")
    if r["server_cpu_pct"]:
        ax_cpu.plot(r["t_s"], r["server_cpu_pct"], color="tab:red", lw=1.0)
    ax_cpu.set_ylabel("server CPU %")
    ax_cpu.set_ylim(bottom=0)
    ax_cpu.set_xlabel("seconds since start")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(groups: Sequence[tuple[str, Summary]], path: Path, title: str) -> Path:
    """p50 / p90 / p99 / p99.9 / max of each latency summary as grouped bars (log ms)."""
    plt = _pyplot()
    groups = [(name, s) for name, s in groups if any(k in s for k, _ in PERCENTILE_KEYS)]
    width = 0.8 / len(PERCENTILE_KEYS)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2.5), 5))
    xs = range(len(groups))
    for j, (key, name) in enumerate(PERCENTILE_KEYS):
        values = [float(s.get(key, s.get(ALIASES.get(key, key), float("nan")))) for _, s in groups]
        ax.bar([x + (j - 2) * width for x in xs], values, width, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([name for name, _ in groups], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    _, top = ax.get_ylim()
    ax.set_ylim(top=top * 6)  # room for the legend above the bars
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(PERCENTILE_KEYS))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- entry points -----------------------------------------------------------------------


def plot_results_file(path: Path) -> list[Path]:
    """Plots of one scenario's results JSON, next to it: ``<stem>-throughput*.png`` and
    ``<stem>-latency.png`` (each only when the file has what it needs)."""
    data = json.loads(path.read_text())
    label = str(data.get("scenario", path.stem))
    out: list[Path] = []
    series = find_timeseries(data, label)
    for name, s in series:
        suffix = "" if len(series) == 1 else "-" + slug(name.removeprefix(label))
        out.append(plot_throughput(name, s, path.with_name(f"{path.stem}-throughput{suffix}.png")))
    latencies = find_latencies(data, label)
    if latencies:
        out.append(
            plot_latency(latencies, path.with_name(f"{path.stem}-latency.png"), f"{label}: latency")
        )
    return out


def plot_suite(scenarios: Sequence[tuple[str, Mapping[str, Any]]], out_dir: Path) -> list[Path]:
    """The suite's plots in ``out_dir`` from ``(label, results)`` pairs:
    ``throughput-<run>.png`` for each time series (dm, dm at the fixed rate, each room
    size, auth-storm ...), ``latency.png`` with the latency percentiles of dm and room,
    and ``latency-other.png`` with those of the other scenarios."""
    out: list[Path] = []
    latencies: list[tuple[str, Summary]] = []
    for key, data in scenarios:
        for name, s in find_timeseries(data, key):
            out.append(plot_throughput(name, s, out_dir / f"throughput-{slug(name)}.png"))
        latencies.extend(find_latencies(data, key))
    messages = [(n, s) for n, s in latencies if n.startswith(MESSAGE_SCENARIOS)]
    others = [(n, s) for n, s in latencies if not n.startswith(MESSAGE_SCENARIOS)]
    if messages:
        title = "latency percentiles: direct messages and rooms"
        out.append(plot_latency(messages, out_dir / "latency.png", title))
    if others:
        title = "latency percentiles: connections, auth-storm, mixed"
        out.append(plot_latency(others, out_dir / "latency-other.png", title))
    return out


__all__ = [
    "find_latencies",
    "find_timeseries",
    "plot_latency",
    "plot_results_file",
    "plot_suite",
    "plot_throughput",
    "rates",
]
