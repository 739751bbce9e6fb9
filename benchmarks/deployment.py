"""Where a scenario's load goes: one embedded server, or the local cluster.

A :class:`Target` is what the ``dm`` and ``room`` scenarios need of a deployment:
the HTTP URL to register users at, the gateways clients connect to, every IMServer
process (to sum their CPU), and a :class:`Backing` meter of the servers behind it.

- :func:`embedded` starts one ``imserver serve`` (:class:`harness.ServerProcess`):
  one process, one gateway.
- :class:`Cluster` starts :func:`imserver.cluster.local.up` with two gateways, two
  message-service instances and one of each other service, on a fresh PostgreSQL
  database, the machine's Redis and RabbitMQ under a prefix of its own, etcd and
  HAProxy of its own; :meth:`Cluster.close` stops it, drops the database and deletes
  the prefix's Redis keys and RabbitMQ exchange and queues. Its
  :meth:`~Cluster.target` is one measured run against it: clients connect to the
  gateways directly (HAProxy is not in the measured path), spread over both, so
  that events cross from one gateway to the other through Redis as in a real
  deployment.

A scenario's settings (rate limits, cheap password hashes for thousands of set-up
accounts...) reach the cluster's processes as ``IMSERVER_*`` variables: the cluster
shares one TOML file for its own wiring, and the environment overrides a file
(:mod:`imserver.utils.config`).

:class:`Backing` samples, with each :func:`harness.take_snapshot`, the CPU seconds of
the run's PostgreSQL processes (:class:`benchmarks.databases.DatabaseMeter`, when
the target stores there), of the machine's ``redis-server`` and of the RabbitMQ
node (``beam.smp``), each found by the port it listens on. Redis and RabbitMQ are
shared with whatever else runs on the machine: :func:`idle_rates` measures their CPU
before the load, which the run's figures include.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import databases, harness

REDIS_URL: Final = os.environ.get("IMS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
RABBITMQ_URL: Final = os.environ.get("IMS_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_PORT: Final = 6379
RABBITMQ_PORT: Final = 5672
GATEWAYS: Final = 2
INSTANCES: Final = {"message": 2, "user": 1, "room": 1, "file": 1, "notification": 1}
"""The cluster the benchmarks run against: issue 14's two gateways, two message
instances and one of each other service."""


# --- the servers behind IMServer ---------------------------------------------------------


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (``ss``), if visible."""
    try:
        found = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    start = found.find("pid=")
    if start < 0:
        return None
    digits = found[start + 4 :].split(",", 1)[0]
    return int(digits) if digits.isdigit() else None


@dataclass
class Backing:
    """CPU counters of the servers behind IMServer (a :class:`harness.DatabaseSampler`):
    the run's PostgreSQL (``ours``, ``all``, ``commits``, as
    :class:`~benchmarks.databases.DatabaseMeter`), ``redis`` and ``rabbitmq``."""

    database: databases.DatabaseMeter | None
    redis_pid: int | None = field(default_factory=lambda: listener_pid(REDIS_PORT))
    rabbitmq_pid: int | None = field(default_factory=lambda: listener_pid(RABBITMQ_PORT))

    def sample(self) -> dict[str, float]:
        """The counters now (a server that is not visible is left out)."""
        out = self.database.sample() if self.database is not None else {}
        for key, pid in (("redis", self.redis_pid), ("rabbitmq", self.rabbitmq_pid)):
            if pid is not None:
                with contextlib.suppress(OSError):
                    out[key] = harness.proc_cpu_seconds(pid)
        return out


BACKING_KEYS: Final = {"postgresql": "ours", "redis": "redis", "rabbitmq": "rabbitmq"}
"""Each backing server's counter in :meth:`Backing.sample`."""


def idle_rates(target: Target, seconds: float = 2.0) -> dict[str, float]:
    """CPU (% of one core) over ``seconds`` before the load: of each backing server
    (the work of others on this machine, which the run's figures include) and of
    the IMServer processes together (``imserver``: what the deployment costs at rest,
    its heartbeats, leases and polls)."""
    import time

    a, cpu_a = target.backing.sample(), target.cpu_seconds()
    t0 = time.monotonic()
    time.sleep(seconds)
    b, cpu_b = target.backing.sample(), target.cpu_seconds()
    wall = time.monotonic() - t0
    out = {
        name: 100.0 * (b[key] - a[key]) / wall
        for name, key in BACKING_KEYS.items()
        if key in a and key in b
    }
    out["imserver"] = 100.0 * (cpu_b - cpu_a) / wall
    return out


# --- targets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    """Where clients of one gateway connect."""

    http_port: int
    tcp_port: int
    host: str = harness.HOST

    @property
    def ws_url(self) -> str:
        """Its WebSocket URL."""
        return f"ws://{self.host}:{self.http_port}/ws"

    @property
    def tcp_addr(self) -> tuple[str, int]:
        """Its TCP address."""
        return (self.host, self.tcp_port)


@dataclass
class Target:
    """One deployment under load: see the module docstring."""

    kind: str
    """``embedded`` or ``cluster``."""
    http_url: str
    gateways: list[Gateway]
    processes: dict[str, int]
    """Every IMServer process: name (``server``; ``gateway-1``, ``message-2`` ...) -> pid."""
    backing: Backing
    config: dict[str, Any] = field(default_factory=dict)
    """The settings its processes run with, beyond their defaults (the cluster's own
    wiring of etcd, Redis and RabbitMQ left out)."""
    server: harness.ServerProcess | None = None
    """The embedded server (``None`` for the cluster)."""

    @property
    def pids(self) -> list[int]:
        """Every IMServer process's pid."""
        return list(self.processes.values())

    @property
    def main_pid(self) -> int:
        """The process whose threads the report lists: the embedded server, or the
        first gateway."""
        return next(iter(self.processes.values()))

    def target_of(self, gateway: int, transport: str) -> str | tuple[str, int]:
        """What a client of gateway ``gateway`` (modulo their number) connects to."""
        g = self.gateways[gateway % len(self.gateways)]
        return g.ws_url if transport == "ws" else g.tcp_addr

    def memory(self) -> dict[str, float]:
        """RSS and peak RSS (MiB) summed over the IMServer processes."""
        out = {"rss_mib": 0.0, "peak_rss_mib": 0.0}
        for pid in self.pids:
            with contextlib.suppress(OSError):
                for key, value in harness.memory_of(pid).items():
                    out[key] += value
        return out

    def finish(self) -> list[str]:
        """Stop the embedded server (its exit code must be 0), or check that every
        process of the cluster still runs; what went wrong."""
        if self.server is not None:
            code = self.server.stop()
            return (
                [] if code == 0 else [f"the server exited with code {code}\n{self.server.logs()}"]
            )
        gone = [name for name, pid in self.processes.items() if not _alive(pid)]
        return [f"cluster processes exited during the run: {', '.join(gone)}"] if gone else []

    def cpu_seconds(self) -> float:
        """CPU seconds of every IMServer process so far (for the progress line)."""
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += harness.proc_cpu_seconds(pid)
        return total


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def embedded(
    config: Mapping[str, Any], db: databases.RunDatabase | None, *, keep_dir: bool = False
) -> Iterator[Target]:
    """One embedded server with ``config``, on ``db`` (SQLite when ``None``)."""
    settings = harness.merge_config(config, databases.settings(db))
    with harness.ServerProcess(settings, keep_dir=keep_dir, database=databases.meter(db)) as server:
        harness.console.print(
            f"[dim]embedded: server pid {server.pid} on {server.http_url}, "
            f"data in {server.data_dir}[/dim]"
        )
        yield Target(
            kind="embedded",
            http_url=server.http_url,
            gateways=[Gateway(server.http_port, server.tcp_port)],
            processes={"server": server.pid},
            backing=Backing(databases.meter(db)),
            config=settings,
            server=server,
        )


def service_of(process: str) -> str:
    """``gateway-2`` -> ``gateway``; the embedded ``server`` is itself."""
    return process.rsplit("-", 1)[0]


def environment_of(config: Mapping[str, Any], prefix: str = "IMSERVER_") -> dict[str, str]:
    """``{"limits": {"rate_per_s": 1e9}}`` -> ``{"IMSERVER_LIMITS__RATE_PER_S": "1e9"}``
    (values as JSON, which reads as the same TOML value)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping):
            out.update(environment_of(value, name + "__"))
        else:
            out[name] = json.dumps(value)
    return out


class Cluster:
    """The local cluster for a scenario's runs: see the module docstring."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Start it with the scenario's ``config`` (settings beyond the cluster's own)."""
        from imserver.cluster import local

        self.config = dict(config)
        self.prefix = f"imsbench{secrets.token_hex(4)}"
        self.root = Path(tempfile.mkdtemp(prefix="imserver-bench-cluster-"))
        self._db_context = databases.fresh_database("postgresql", "cluster")
        self.db = self._db_context.__enter__()
        assert self.db is not None
        spec = local.ClusterSpec(
            gateways=GATEWAYS,
            instances=dict(INSTANCES),
            database=self.db.url,
            redis=REDIS_URL,
            rabbitmq=RABBITMQ_URL,
            prefix=self.prefix,
        )
        env = environment_of(config)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.state = local.up(
                self.root / "c",
                spec,
                progress=lambda line: harness.console.print(f"[dim]{line}[/dim]"),
            )
        except BaseException:
            self._cleanup()
            raise
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def target(self) -> Target:
        """The cluster as a :class:`Target` (clients go to the gateways directly)."""
        members = sorted(self.state.members, key=lambda m: ("gateway" not in m.services, m.name))
        gateways = [
            Gateway(m.http_port, m.tcp_port, self.state.spec.host)
            for m in members
            if "gateway" in m.services
        ]
        return Target(
            kind="cluster",
            http_url=f"http://{self.state.spec.host}:{gateways[0].http_port}",
            gateways=gateways,
            processes={m.name: m.pid for m in members},
            backing=Backing(databases.meter(self.db)),
            config=harness.merge_config(self.config, self.db.settings()),
        )

    @contextlib.contextmanager
    def run(self) -> Iterator[Target]:
        """One run against it (the cluster stays up for the next)."""
        target = self.target()
        harness.console.print(
            f"[dim]cluster: gateways {', '.join(g.ws_url for g in target.gateways)}; "
            f"{len(target.processes)} IMServer processes[/dim]"
        )
        yield target

    def close(self, *, keep_logs: bool = False) -> None:
        """Stop the cluster and delete what it left: database, Redis keys, topology,
        and its directory unless ``keep_logs`` (each process's log is in it)."""
        from imserver.cluster import local

        with contextlib.suppress(local.ClusterError):
            local.down(self.root / "c", progress=lambda _line: None)
        if keep_logs:
            harness.console.print(f"[dim]the cluster's logs are kept in {self.root / 'c'}[/dim]")
        self._cleanup(keep_dir=keep_logs)

    def _cleanup(self, *, keep_dir: bool = False) -> None:
        from imserver.testing import redis as redis_testing

        with contextlib.suppress(Exception):
            redis_testing.delete_prefix(REDIS_URL, self.prefix + ":")
        with contextlib.suppress(Exception):
            harness.run_async(delete_topology(self.prefix))
        self._db_context.__exit__(None, None, None)
        if not keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(keep_logs=exc_type is not None)


async def delete_topology(prefix: str) -> None:
    """Delete the RabbitMQ exchange and every consumer group's queues under ``prefix``."""
    from imserver.core.events import GROUPS
    from imserver.testing import rabbitmq
    from imserver.utils.config import EventsConfig

    await rabbitmq.delete_topology(RABBITMQ_URL, prefix, GROUPS, EventsConfig().backoff)


# --- CPU per operation ------------------------------------------------------------------


def cpu_per_op(
    a: harness.CpuSnapshot, b: harness.CpuSnapshot, target: Target, ops: int
) -> dict[str, Any]:
    """CPU per operation (µs) between two snapshots: every IMServer process summed
    (``imserver_us``), the gateways alone (``gateway_us``), per service
    (``services_us``), and each backing server (``backing_us``)."""
    if not ops:
        return {}

    def us(seconds: float) -> float:
        return 1e6 * seconds / ops

    services: dict[str, float] = {}
    for name, pid in target.processes.items():
        service = service_of(name)
        services[service] = (
            services.get(service, 0.0) + b.procs.get(pid, 0.0) - a.procs.get(pid, 0.0)
        )
    total = sum(services.values())
    gateway = services.get("gateway", services.get("server", 0.0))
    backing = {
        name: us(b.database[key] - a.database[key])
        for name, key in BACKING_KEYS.items()
        if key in a.database and key in b.database
    }
    return {
        "ops": ops,
        "imserver_us": us(total),
        "gateway_us": us(gateway),
        "services_us": {k: us(v) for k, v in services.items()},
        "backing_us": backing,
    }


def profiled(target: Target) -> dict[str, int]:
    """The processes ``--profile`` samples: the embedded server, or one instance of each
    service of the cluster."""
    seen: set[str] = set()
    out: dict[str, int] = {}
    for name, pid in target.processes.items():
        if service_of(name) not in seen:
            seen.add(service_of(name))
            out[name] = pid
    return out


def start_profiles(
    target: Target, seconds: float, out_dir: Path, stem: str
) -> dict[str, harness.PySpy]:
    """A :class:`harness.PySpy` of each of :func:`profiled`, started."""
    spies: dict[str, harness.PySpy] = {}
    for name, pid in profiled(target).items():
        spy = harness.PySpy(pid, seconds, out_dir / f"{stem}-{name}.speedscope.json")
        spy.start()
        spies[name] = spy
    return spies


def finish_profiles(spies: Mapping[str, harness.PySpy]) -> dict[str, dict[str, Any]]:
    """Each profile's summary (or its error), by process name."""
    return {name: spy.summary() for name, spy in spies.items()}


def print_profiles(profiles: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Print each process's profile summary."""
    for name, prof in (profiles or {}).items():
        if prof.get("samples"):
            harness.print_profile(prof, of=name)
        else:
            harness.console.print(f"py-spy of {name} failed: {prof.get('error')}")


__all__ = [
    "Backing",
    "Cluster",
    "Gateway",
    "Target",
    "cpu_per_op",
    "embedded",
    "environment_of",
    "finish_profiles",
    "idle_rates",
    "listener_pid",
    "print_profiles",
    "profiled",
    "service_of",
    "start_profiles",
]
