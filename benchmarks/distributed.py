"""``dm --cluster`` and ``room --cluster``: the same load against the embedded server and
against the local cluster, in one invocation, side by side.

The cluster (:class:`benchmarks.deployment.Cluster`: two gateways, two message
instances, one of each other service, on PostgreSQL, the machine's Redis and
RabbitMQ, etcd and HAProxy) starts once, with the scenario's settings, and stays up
for the ``--rounds`` rounds; each round runs the scenario on a fresh embedded server
(on ``--db``), then against the cluster, with users of its own each time. Then one
table prints the median of each side's figures:

- throughput (messages acked per second; for ``room`` also deliveries per second);
- latency p50 / p99 (``dm``: the ack; ``room``: the delivery);
- CPU per operation (a message for ``dm``, a delivery for ``room``) summed over every
  IMServer process, that of the gateway processes alone (the embedded server is its
  own gateway) and of each service;
- the CPU per operation of PostgreSQL (the run's database's processes), of the
  machine's Redis and of its RabbitMQ node.

The machine's load average is printed with the table: the figures of a busy machine
are lower, on both sides alike since the rounds alternate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from benchmarks import deployment, harness

TARGETS: Final = {
    "dm": ("imserver_us", 3.0, "summed IMServer CPU per message"),
    "room": ("gateway_us", 1.5, "gateway CPU per delivery"),
}
"""Issue 14's targets: (figure, at most this many times the embedded one, label)."""

Runner = Callable[
    [argparse.Namespace, contextlib.AbstractContextManager[deployment.Target], Any],
    tuple[int, dict[str, Any]],
]
"""A scenario's run against the target its second argument opens (third: the run's
database for ``--floor``, ``None`` here)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cluster`` and ``--rounds``."""
    group = parser.add_argument_group("distributed mode")
    group.add_argument(
        "--cluster",
        action="store_true",
        help="run against an embedded server and against the local cluster (2 gateways, "
        "2 message instances, one of each other service; PostgreSQL, Redis, RabbitMQ, "
        "etcd, HAProxy), alternating, and print the medians side by side",
    )
    group.add_argument(
        "--rounds", type=int, default=3, help="with --cluster: runs on each side (default 3)"
    )


def figures(scenario: str, out: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run of ``scenario`` compared here, from its results JSON."""
    if scenario == "dm":
        res = out["results"]
        lat = res["ack_latency"]
        return {
            "msgs_per_s": res["acked_per_s"],
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
            "per_op": res["cpu"].get("per_op", {}),
            "backing_idle_pct": res["cpu"].get("backing_idle_pct"),
        }
    run = out["runs"][0]
    lat = run["delivery_latency"]
    return {
        "msgs_per_s": run["acked_per_s"],
        "deliveries_per_s": run["delivered_per_s"],
        "p50_ms": lat.get("p50_ms"),
        "p99_ms": lat.get("p99_ms"),
        "per_op": run.get("per_op", {}),
        "backing_idle_pct": run.get("backing_idle_pct"),
    }


def compare(
    args: argparse.Namespace,
    scenario: str,
    config: Mapping[str, Any],
    run_embedded: Callable[[argparse.Namespace], tuple[int, dict[str, Any]]],
    run_on: Runner,
) -> int:
    """Alternate ``run_embedded`` and ``run_on`` the cluster ``--rounds`` times; print
    the medians. ``config`` is the scenario's server settings (the cluster's too)."""
    if args.rounds < 1:
        raise SystemExit("--rounds must be positive")
    sides: dict[str, list[dict[str, Any]]] = {"embedded": [], "cluster": []}
    status = 0
    load_before = os.getloadavg()
    harness.console.print("[bold]starting the local cluster ...[/bold]")
    with deployment.Cluster(config) as cluster:
        for round_no in range(1, args.rounds + 1):
            for side in ("embedded", "cluster"):
                harness.console.print(f"[bold]{scenario}: round {round_no}, {side}[/bold]")
                if side == "embedded":
                    code, out = run_embedded(args)
                else:
                    code, out = run_on(args, cluster.run(), None)
                status = status or code
                sides[side].append(figures(scenario, out))
    load_after = os.getloadavg()
    _print(args, scenario, sides, (load_before, load_after))
    stamp = harness.timestamp()
    path = harness.write_results(
        f"{scenario}-cluster",
        {
            "scenario": f"{scenario} --cluster",
            "timestamp": stamp,
            "environment": harness.environment(),
            "options": {k: v for k, v in vars(args).items() if k != "func"},
            "load_average": {"before": load_before, "after": load_after},
            "runs": sides,
        },
        stamp,
    )
    harness.console.print(f"results: {path}")
    return status


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The median of each figure over ``runs``, flattened (``per_op.services_us.user``...)."""
    keys: dict[str, None] = {}
    flat_runs = [_flatten(r) for r in runs]
    for flat in flat_runs:
        keys.update(dict.fromkeys(flat))
    return {k: _median([f.get(k) for f in flat_runs]) for k in keys}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, int | float):
            out[f"{prefix}{k}"] = None if v is None else float(v)
    return out


def _print(
    args: argparse.Namespace,
    scenario: str,
    sides: Mapping[str, Sequence[Mapping[str, Any]]],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    emb, clu = medians(sides["embedded"]), medians(sides["cluster"])
    op = "message" if scenario == "dm" else "delivery"
    latency = "ack" if scenario == "dm" else "delivery"
    rows: list[tuple[str, str, str]] = [("msgs/s (acked)", "msgs_per_s", "{:,.0f}")]
    if scenario == "room":
        rows.append(("deliveries/s", "deliveries_per_s", "{:,.0f}"))
    rows += [
        (f"{latency} latency p50 (ms)", "p50_ms", "{:.2f}"),
        (f"{latency} latency p99 (ms)", "p99_ms", "{:.2f}"),
        (f"IMServer CPU per {op}, all processes (µs)", "per_op.imserver_us", "{:.1f}"),
        (f"gateway CPU per {op} (µs)", "per_op.gateway_us", "{:.1f}"),
    ]
    services = sorted(
        {k.rsplit(".", 1)[1] for k in clu if k.startswith("per_op.services_us.")}
        - {"gateway", "server"}
    )
    rows += [(f"  {s} service (µs)", f"per_op.services_us.{s}", "{:.1f}") for s in services]
    rows += [
        (f"{name} CPU per {op} (µs)", f"per_op.backing_us.{key}", "{:.1f}")
        for name, key in (
            ("PostgreSQL", "postgresql"),
            ("Redis", "redis"),
            ("RabbitMQ", "rabbitmq"),
        )
    ]

    def cell(fig: Mapping[str, float | None], key: str, fmt: str) -> str:
        v = fig.get(key)
        return "—" if v is None else fmt.format(v)

    n = len(sides["cluster"])
    harness.console.print(
        f"\n[bold]{scenario}: embedded ({'database ' + args.db}) vs the local cluster, "
        f"median of {n} each[/bold]"
    )
    print("| | embedded | cluster | cluster / embedded |")
    print("|---|---:|---:|---:|")
    for label, key, fmt in rows:
        e, c = emb.get(key), clu.get(key)
        ratio = f"{c / e:.2f}" if e and c is not None else "—"
        print(f"| {label} | {cell(emb, key, fmt)} | {cell(clu, key, fmt)} | {ratio} |")
    key, limit, label = TARGETS[scenario]
    e, c = emb.get(f"per_op.{key}"), clu.get(f"per_op.{key}")
    if e and c is not None:
        verdict = "met" if c / e <= limit else "MISSED"
        print(f"target: {label} ≤ {limit:g}× embedded: {c / e:.2f}× ({verdict})")
    for side, runs in sides.items():
        each = ", ".join(
            f"{r['msgs_per_s']:,.0f} msgs/s {r['per_op'].get('imserver_us', float('nan')):.1f} µs"
            for r in runs
        )
        print(f"runs, {side}: {each}")
    (b1, b5, _), (a1, a5, _) = load
    print(
        f"load average (1 / 5 min) before: {b1:.2f} / {b5:.2f}, after: {a1:.2f} / {a5:.2f} "
        f"on {os.cpu_count()} cores"
    )
    for side, runs in sides.items():
        idle: list[Mapping[str, float]] = [
            r["backing_idle_pct"] for r in runs if r.get("backing_idle_pct")
        ]
        if idle:
            print(
                f"CPU at rest before each {side} run (% of a core): "
                + "; ".join(", ".join(f"{k} {v:.1f}" for k, v in i.items()) for i in idle)
            )


__all__ = ["TARGETS", "add_arguments", "compare", "figures", "medians"]
