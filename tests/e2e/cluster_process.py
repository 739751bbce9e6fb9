"""The end-to-end suite's server as a local cluster (``IMS_E2E_DEPLOYMENT=cluster``).

:class:`ClusterProcess` has the interface the tests use of
:class:`conftest.ServerProcess` (addresses, ``start``/``close``, the log check) and
runs the distributed mode behind it with :func:`imserver.cluster.local.up`: etcd,
two gateways, two message-service instances and one of each other service, on a
fresh PostgreSQL database, with the machine's Redis and RabbitMQ under a prefix of
its own (deleted with the cluster), and HAProxy in front.

Clients are spread over the two gateways: every address read from it (``ws_url``,
``http_url``, ``target(transport)``, ``tcp_addr``, ``http_port``, ``tcp_port``)
names the next gateway in turn, directly rather than through HAProxy, so that the
two users of a test sit on different gateways and every live event between them
crosses Redis. (HAProxy's own path is the cluster tests' subject.)

A configuration is written to the TOML file of every process of a fresh cluster
(:attr:`~imserver.cluster.local.ClusterSpec.settings`), except one that only the
gateways read (:data:`GATEWAY_SETTINGS`: connection limits, WebSocket, shutdown):
that one is given to two gateways of the test's own, started on the running cluster
of another :class:`ClusterProcess` (its ``base``) with
:func:`imserver.cluster.local.add_gateways` and stopped after the test, which costs
two processes rather than a cluster.

``config_path`` is the TOML file its processes share; ``data_dir`` is the file
service's data directory, where the uploads are.

Every member's log is checked like a server's (``serverlog.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import databases as dbs
import pytest
import serverlog

from imserver.cluster.local import (
    ClusterSpec,
    ClusterState,
    Member,
    add_gateways,
    alive,
    down,
    stop_members,
    tail,
    up,
)
from imserver.core.events import GROUPS
from imserver.storage.servers import run_blocking
from imserver.testing import redis as redis_testing
from imserver.testing.process import MARKER
from imserver.utils.config import EventsConfig

if TYPE_CHECKING:
    from imserver.client import TransportName

DEPLOYMENT_ENV = "IMS_E2E_DEPLOYMENT"
START_TRIES = 3
"""Tries of a cluster start whose member found its port in use."""
LOG_TAIL = 3000
"""Bytes of each member's log in a failure report."""
GATEWAY_SETTINGS = frozenset({"limits", "ws", "listen_backlog", "shutdown_grace"})
"""The settings (top-level keys) that only the gateways read."""
T = TypeVar("T")

_running: set[ClusterProcess] = set()
"""Every cluster up and not yet torn down, stopped at interpreter exit whatever
happens: its processes run detached, they do not die with the tests."""


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_running):
        with contextlib.suppress(Exception):
            cluster.teardown()


def deployment() -> str:
    """``$IMS_E2E_DEPLOYMENT``: ``embedded`` (one ``imserver serve``, the default) or
    ``cluster``."""
    name = os.environ.get(DEPLOYMENT_ENV, "embedded")
    if name not in ("embedded", "cluster"):
        raise pytest.UsageError(f"{DEPLOYMENT_ENV}={name}: choose embedded or cluster")
    return name


def _helpers() -> tuple[Any, Any, Any]:
    """The tests' helpers for RabbitMQ, etcd and HAProxy (``rabbit``,
    ``require_etcd``, ``_require_haproxy``), imported when a cluster is first made."""
    tests = Path(__file__).resolve().parents[1]
    for directory in (tests, tests / "service", tests / "cluster"):
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
    import rabbit
    from etcd_server import require_etcd
    from test_haproxy import _require_haproxy

    return rabbit, require_etcd, _require_haproxy


def gateway_only(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` sets something, and only what the gateways read."""
    return bool(config) and all(key in GATEWAY_SETTINGS for key in config)


class ClusterProcess:
    """A local cluster with :class:`conftest.ServerProcess`'s interface (module docstring)."""

    def __init__(
        self,
        root: Path,
        config: Mapping[str, Any] | None = None,
        *,
        base: ClusterProcess | None = None,
    ) -> None:
        """A cluster of its own, or with ``base`` two gateways of its own on ``base``'s
        running cluster (module docstring)."""
        self.root = root
        self.base = base
        self.own: list[Member] = []
        """The gateways started on ``base``'s cluster."""
        self.config: dict[str, Any] = dict(config or {})
        self.host = "127.0.0.1"
        self.state: ClusterState | None = None
        self.database: dbs.ServerDatabase | None = None
        self.prefix = f"imse2e{secrets.token_hex(5)}"
        self.redis_url = redis_testing.shared_url()
        self.log_read: dict[Path, int] = {}
        """How far :meth:`log_problems` has read each member's log."""
        self._turn = itertools.count()

    # --- life ---------------------------------------------------------------------------

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    def start(self) -> None:
        """Bring the cluster (or the gateways) up; failing that, fail the test."""
        if self.base is not None:
            if self.base.state is None:
                raise RuntimeError("the base cluster is not running")
            self.state = self.base.state
            try:
                self.own = _in_thread(add_gateways, self.state, self.root, 2, self.config)
            except Exception as exc:
                pytest.fail(f"the gateways did not come up: {exc}", pytrace=False)
            return
        rabbit, require_etcd, require_haproxy = _helpers()
        require_etcd()
        require_haproxy()
        why = redis_testing.reachable(self.redis_url)
        if why is not None:
            dbs.unavailable(why)
        run_blocking(rabbit.reachable())
        self.database = dbs.create_database("postgresql", "e2ecluster")
        spec = ClusterSpec(
            database=self.database.url,
            redis=self.redis_url,
            rabbitmq=rabbit.URL,
            prefix=self.prefix,
            host=self.host,
            settings=self.config,
        )
        for attempt in range(START_TRIES):
            try:
                self.state = _in_thread(up, self.cluster_dir, spec, lambda _line: None)
                _running.add(self)
                return
            except Exception as exc:
                # Another process may have taken a port between picking and binding it.
                if attempt < START_TRIES - 1 and "in use" in str(exc).lower():
                    continue
                self.state = None
                self._clean()
                pytest.fail(f"the cluster did not come up: {exc}", pytrace=False)

    def teardown(self) -> None:
        """Stop every process and delete the cluster's database, keys and queues (or
        stop the gateways on the base cluster)."""
        if self.base is not None:
            _in_thread(stop_members, self.own)
            return
        if self.state is not None and (self.cluster_dir / "cluster.json").exists():
            _in_thread(down, self.cluster_dir, lambda _line: None)
        _running.discard(self)
        self._clean()

    def _clean(self) -> None:
        rabbit, _, _ = _helpers()
        if self.database is not None:
            dbs.drop_database(self.database)
            self.database = None
        redis_testing.delete_prefix(self.redis_url, self.prefix + ":")
        run_blocking(rabbit.delete_topology(self.prefix, GROUPS, EventsConfig().backoff))

    @property
    def members(self) -> list[Member]:
        """Its processes: the cluster's, or the gateways of its own on the base."""
        if self.base is not None:
            return list(self.own)
        return [] if self.state is None else list(self.state.members)

    @property
    def config_path(self) -> Path:
        """The TOML file its processes share."""
        return (self.root if self.base is not None else self.cluster_dir) / "imserver.toml"

    @property
    def data_dir(self) -> Path:
        """The file service's data directory (the uploads)."""
        cluster = self if self.base is None else self.base
        [member] = [m for m in cluster.members if "file" in m.services]
        return Path(member.root) / "data"

    @property
    def gateways(self) -> list[Member]:
        return [m for m in self.members if "gateway" in m.services]

    @property
    def running(self) -> bool:
        """Whether every member is alive."""
        return bool(self.members) and all(alive(m.pid) for m in self.members)

    def __repr__(self) -> str:
        names = ", ".join(f"{g.name} :{g.http_port}" for g in self.gateways)
        return f"<ClusterProcess {self.root.name} {names or 'down'}>"

    # --- addresses: the next gateway at each read ---------------------------------------

    def _gateway(self) -> Member:
        gateways = self.gateways
        if not gateways:
            raise RuntimeError("cluster not started")
        return gateways[next(self._turn) % len(gateways)]

    @property
    def http_port(self) -> int:
        return self._gateway().http_port

    @property
    def tcp_port(self) -> int:
        return self._gateway().tcp_port

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.http_port}/ws"

    @property
    def tcp_addr(self) -> tuple[str, int]:
        return (self.host, self.tcp_port)

    def target(self, transport: TransportName) -> str | tuple[str, int]:
        """What :meth:`imserver.client.Client.connect` takes for ``transport``."""
        return self.ws_url if transport == "ws" else self.tcp_addr

    @property
    def metrics_urls(self) -> list[str]:
        """Where its gateways' ``/metrics`` are (``metrics.scrape_server``): the
        counters of clients' connections and ops are theirs."""
        return [f"http://{self.host}:{g.http_port}" for g in self.gateways]

    # --- logs ---------------------------------------------------------------------------

    def log_paths(self) -> list[Path]:
        return [m.log for m in self.members]

    def log_problems(self) -> list[tuple[Path, serverlog.Problem]]:
        """The problems every member logged since the previous call."""
        return serverlog.read_new(self.log_paths(), self.log_read)

    def mark_logs(self, text: str) -> None:
        """Write a marker line into every member's log."""
        for path in self.log_paths():
            if path.exists():
                with open(path, "ab") as fh:
                    fh.write(f"{MARKER}{text}\n".encode())

    def logs(self) -> str:
        """The tail of every member's log."""
        return "\n".join(
            f"--- {path} (tail) ---\n{tail(path, LOG_TAIL)}" for path in self.log_paths()
        )


def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a thread of its own: :func:`up` and :func:`down` run
    event loops of their own, which cannot start inside a test's running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()
