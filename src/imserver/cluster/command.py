"""``imserver cluster up|status|logs|down``: the local cluster from the command line.

Exit statuses: 0 done; 1 the cluster could not start or stop (the reason, and the
end of the failing process's log, on stderr); 2 a usage error, or no cluster in the
directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imserver.cluster.local import ClusterError, ClusterSpec, down, load_state, logs, status, up

DEFAULT_DIR = "cluster"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cluster`` and its actions to the ``imserver`` command line."""
    cluster = sub.add_parser(
        "cluster", help="a local cluster of the distributed mode (etcd, HAProxy, services)"
    )
    actions = cluster.add_subparsers(dest="action", required=True)
    start = actions.add_parser("up", help="start the cluster and print the URL clients use")
    spec = ClusterSpec()
    start.add_argument("--gateways", type=int, default=spec.gateways, help="gateway processes")
    for name, count in spec.instances.items():
        start.add_argument(
            f"--{name}", type=int, default=count, help=f"{name}-service instances ({count})"
        )
    start.add_argument("--database", default=spec.database, help="PostgreSQL/MariaDB URL")
    start.add_argument("--redis", default=spec.redis, help="Redis URL")
    start.add_argument("--rabbitmq", default=spec.rabbitmq, help="RabbitMQ URL")
    start.add_argument("--prefix", default=spec.prefix, help="etcd/Redis/RabbitMQ name prefix")
    start.add_argument("--http-port", type=int, default=0, help="clients' HTTP/WS port")
    start.add_argument("--tcp-port", type=int, default=0, help="clients' TCP port")
    show = actions.add_parser("status", help="every process's state")
    tail = actions.add_parser("logs", help="the end of the processes' logs")
    tail.add_argument("name", nargs="?", help="one process (e.g. gateway-1); all by default")
    tail.add_argument("-n", "--lines", type=int, default=40)
    stop = actions.add_parser("down", help="stop every process of the cluster")
    for p in (start, show, tail, stop):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (./{DEFAULT_DIR})")


def run(args: argparse.Namespace) -> int:
    """Carry out ``args.action``; returns the exit status."""
    root = Path(args.dir)
    try:
        if args.action == "up":
            instances = {name: getattr(args, name) for name in ClusterSpec().instances}
            if args.gateways < 1 or any(n < 1 for n in instances.values()):
                print("imserver cluster: every count must be at least 1", file=sys.stderr)
                return 2
            spec = ClusterSpec(
                gateways=args.gateways,
                instances=instances,
                database=args.database,
                redis=args.redis,
                rabbitmq=args.rabbitmq,
                prefix=args.prefix,
                http_port=args.http_port,
                tcp_port=args.tcp_port,
            )
            up(root, spec)
            return 0
        if args.action == "status":
            for name, condition, detail in status(root):
                print(f"{name:<16}{condition:<11}{detail}")
            return 0
        if args.action == "logs":
            print(logs(root, args.name, args.lines))
            return 0
        load_state(root)
        down(root)
        return 0
    except ClusterError as exc:
        print(f"imserver cluster: {exc}", file=sys.stderr)
        return 2 if "no cluster" in str(exc) or "no process" in str(exc) else 1
