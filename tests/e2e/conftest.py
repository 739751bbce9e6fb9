"""End-to-end harness: a real ``imserver serve`` process on free ports, driven by the
project's own client over real sockets.

The process itself is :class:`imserver.testing.process.ServerProcess` (shared with
the benchmarks); this module adds pytest to it: fixtures, a failure to start or stop
as a test failure, the log check and the logs in failure reports.

Fixtures:

- ``server_factory(config=None, *, start=True) -> ServerProcess``: a fresh server with
  its own data directory; ``config`` is written to its TOML file (``{"limits":
  {"rate_per_s": 1000}}``). Every process it started is killed at teardown.
- ``server``: a fresh server with the default configuration.
- ``shared_server``: one server for the whole session, for tests that only need
  users of their own (every helper here makes unique usernames).
- ``wire``: parametrizes a test over the four (transport, codec) pairs.
- ``make_client(server, transport=..., codec=..., *, login_as=None, **connect_kw)``:
  a connected :class:`~imserver.client.Client`, closed at teardown.
- ``register_user(server, name=None, ...) -> Account``: a new account (not logged in).
- ``user_factory(server, name=None, *, transport=..., codec=..., ...) -> Client``: a
  new account, logged in on a new connection. Transport and codec default to the
  test's ``wire`` when it uses that fixture, else WebSocket + JSON.

When a test fails, the tail of each of its servers' stdout/stderr is added to the
report. ``IMSERVER_E2E_SERVE_ARGS`` adds arguments to every ``imserver serve`` (for
running the suite against other deployments' settings). ``IMS_E2E_DATABASE``
(``postgresql`` or ``mariadb``; ``sqlite`` by default) puts every server's data on that
database server, a fresh database per server (``tests/databases.py``); tests marked
``sqlite_only`` (they read the SQLite files) are then deselected, as are those
marked ``sqlite_source`` (they start from a SQLite data directory and choose their
servers' databases themselves: one run is enough) or ``own_database`` (they choose
their database server themselves whatever the run: one run is enough).

``IMS_E2E_DEPLOYMENT=cluster`` (``embedded`` by default) runs the suite against the
distributed mode instead (``cluster_process.py``): a local cluster of etcd, HAProxy,
two gateways, two message-service instances and one of each other service, on
PostgreSQL, Redis and RabbitMQ. The fixtures then give :class:`ClusterProcess`
objects, whose addresses name gateway 1 and gateway 2 in turn at each read, so the
clients of a test are spread over both and every live event between two of them
crosses from one gateway to the other. ``shared_server`` is one cluster for the
session; ``server`` is two gateways of the test's own on it; ``server_factory(config)``
starts two gateways of their own on it when ``config`` holds only gateway settings
(``limits``, ``ws``, ``listen_backlog``, ``shutdown_grace``), else a fresh cluster
with ``config`` in every process's file (so a ``server_factory()`` without one is a
cluster with empty stores). Tests marked ``embedded_only(reason)`` (they restart or
signal the one server process, or read its files) are deselected, as are those
marked ``sqlite_only``, ``sqlite_source`` or ``own_database``. ``/metrics`` of a
deployment are the sums over its gateways (``metrics.scrape_server``).

Server logs are checked after every test: a traceback or an ``ERROR``/``CRITICAL``
record that any server (the session's shared one included), or any member of a
cluster, wrote while the test ran fails the test at teardown, with the entries in the
message (see ``serverlog.py``). A test that provokes such an entry on purpose says so with
``@pytest.mark.server_errors(pattern, ...)``: entries matching one of the regular
expressions are allowed. A server that outlives its tests (module and session
fixtures) is stopped with :meth:`ServerProcess.close`, which checks what it logged
while stopping.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shlex
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cluster_process as cp
import databases as dbs
import pytest
import serverlog

from imserver.client import Client, CodecName, TransportName
from imserver.testing import process

PASSWORD = "correct-horse-battery"
"""The password of every account the helpers create unless told otherwise."""

_servers: list[ServerProcess | ClusterProcess] = []
"""Every server whose logs are still to be checked (see :func:`_server_logs_are_clean`)."""
_session_cluster: list[ClusterProcess] = []
"""The cluster of ``shared_server`` while it runs (``IMS_E2E_DEPLOYMENT=cluster``)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "server_errors(*patterns): the test makes the server log tracebacks or ERROR "
        "records matching these regular expressions; the log check allows them",
    )
    config.addinivalue_line(
        "markers",
        "embedded_only(reason): the test needs the one-process deployment (its data "
        "directory, its process, its restart); deselected against a cluster",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests here ``e2e``; on a database server (``IMS_E2E_DATABASE``) or a
    cluster (``IMS_E2E_DEPLOYMENT``), deselect those the module docstring names."""
    here = Path(__file__).parent
    on_sqlite = dbs.e2e_database() == "sqlite"
    on_cluster = cp.deployment() == "cluster"
    one_run = ("sqlite_only", "sqlite_source", "own_database")
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            if (not on_sqlite or on_cluster) and any(
                item.get_closest_marker(name) for name in one_run
            ):
                dropped.append(item)
                continue
            if on_cluster and item.get_closest_marker("embedded_only"):
                dropped.append(item)
                continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# --- the server process ---------------------------------------------------------------


class ServerProcess(process.ServerProcess):
    """:class:`imserver.testing.process.ServerProcess` under pytest: a server that
    does not start or stop fails the test, and what it logs is checked after every
    test (module docstring)."""

    def __init__(self, root: Path, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(
            root,
            config,
            serve_args=shlex.split(os.environ.get("IMSERVER_E2E_SERVE_ARGS", "")),
        )
        self.log_read: dict[Path, int] = {}
        """How far :meth:`log_problems` has read each log file."""
        _servers.append(self)

    def start(
        self, config: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> None:
        """Start and wait for /readyz; a server that does not get there fails the test."""
        try:
            super().start(config, timeout=timeout)
        except process.ServerError as exc:
            pytest.fail(str(exc), pytrace=False)

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float | None = None) -> int | None:
        """Send ``sig`` and wait for the exit; returns the exit code (None if not started).

        A process still alive after ``timeout`` is killed and the test fails.
        """
        try:
            return super().stop(sig, timeout=timeout)
        except process.ServerError as exc:
            pytest.fail(str(exc), pytrace=False)

    def close(self) -> None:
        """:meth:`teardown`, then fail if the server logged a problem while it stopped.

        For servers that outlive a test (module and session fixtures): the check after
        each test covers their life, this their shutdown, which belongs to no test.
        """
        self.teardown()
        found = self.log_problems()
        if self in _servers:
            _servers.remove(self)
        if found:
            pytest.fail(_log_report("its shutdown", self, found), pytrace=False)

    @property
    def metrics_urls(self) -> list[str]:
        """Where its ``/metrics`` are (``metrics.scrape_server``)."""
        return [self.http_url]

    def log_problems(self) -> list[tuple[Path, serverlog.Problem]]:
        """The problems logged since the previous call (complete lines only)."""
        return serverlog.read_new((self.stdout_path, self.stderr_path), self.log_read)


class ClusterProcess(cp.ClusterProcess):
    """:class:`cluster_process.ClusterProcess` under the log check, like
    :class:`ServerProcess`. A configuration only the gateways read gets two gateways
    of its own on the session's cluster (``shared_server``, running by then)."""

    def __init__(
        self,
        root: Path,
        config: Mapping[str, Any] | None = None,
        *,
        base: cp.ClusterProcess | None = None,
    ) -> None:
        if base is None and config and cp.gateway_only(config):
            base = _session_cluster[0]
        super().__init__(root, config, base=base)
        _servers.append(self)

    def close(self) -> None:
        """:meth:`teardown`, then fail if a member logged a problem while it stopped."""
        self.teardown()
        found = self.log_problems()
        if self in _servers:
            _servers.remove(self)
        if found:
            pytest.fail(_log_report("its shutdown", self, found), pytrace=False)


class ServerFactory:
    """Creates :class:`ServerProcess` es under one temporary directory; against a
    cluster (``IMS_E2E_DEPLOYMENT=cluster``), the session's cluster or a fresh one
    (module docstring)."""

    def __init__(self, base: Path, request: pytest.FixtureRequest | None = None) -> None:
        self.base = base
        self.request = request
        self.servers: list[ServerProcess | ClusterProcess] = []
        self.databases: list[dbs.ServerDatabase] = []
        """The server databases of its servers (``IMS_E2E_DATABASE``)."""

    def __call__(
        self, config: Mapping[str, Any] | None = None, *, start: bool = True
    ) -> ServerProcess:
        root = self.base / f"server{len(self.servers)}"
        settings = dict(config or {})
        if cp.deployment() == "cluster":
            return self._cluster(root, settings, start)  # type: ignore[return-value]
        root.mkdir(parents=True)
        dialect = dbs.e2e_database()
        if dialect != "sqlite":  # a database of its own on the server, for its whole life
            database = dbs.create_database(dialect, "e2e")
            self.databases.append(database)
            settings = process.merge_settings({"storage": {"url": database.url}}, settings)
        server = ServerProcess(root=root, config=settings)
        self.servers.append(server)
        if start:
            server.start()
        return server

    def _cluster(self, root: Path, settings: dict[str, Any], start: bool) -> ClusterProcess:
        if settings and cp.gateway_only(settings) and self.request is not None:
            self.request.getfixturevalue("shared_server")  # the cluster its gateways join
        root.mkdir(parents=True)
        cluster = ClusterProcess(root, settings)
        self.servers.append(cluster)
        if start:
            cluster.start()
        return cluster

    def teardown(self) -> None:
        for server in self.servers:
            server.teardown()
        self.drop_databases()

    def drop_databases(self) -> None:
        """Drop the server databases of the servers (once they are stopped)."""
        while self.databases:
            dbs.drop_database(self.databases.pop())


@pytest.fixture
def server_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path, request)
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture
def server(server_factory: ServerFactory, tmp_path: Path) -> Iterator[ServerProcess]:
    if cp.deployment() != "cluster":
        yield server_factory()
        return
    server_factory.request.getfixturevalue("shared_server")  # type: ignore[union-attr]
    gateways = ClusterProcess(tmp_path / "gateways", base=_session_cluster[0])
    try:
        gateways.start()
        yield gateways  # type: ignore[misc]
    finally:
        gateways.teardown()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if cp.deployment() == "cluster":
        cluster = ClusterProcess(tmp_path_factory.mktemp("shared"))
        try:
            cluster.start()
            _session_cluster.append(cluster)
            yield cluster  # type: ignore[misc]
        finally:
            _session_cluster.clear()
            cluster.close()
        return
    factory = ServerFactory(tmp_path_factory.mktemp("shared"))
    server = factory(start=False)
    try:
        server.start()
        yield server
    finally:
        server.close()
        factory.drop_databases()


def _log_report(
    what: str, server: ServerProcess | ClusterProcess, found: list[tuple[Path, serverlog.Problem]]
) -> str:
    parts = [f"{server!r} logged {len(found)} problem(s) during {what}:"]
    for path, problem in found:
        parts.append(f"--- {path}\n{problem.shown()}")
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _server_logs_are_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when a server logged a problem while it ran (module docstring).

    Autouse, so it is set up before the test's server fixtures and torn down after
    them: what a server logs while it stops is checked too. A shared server's log is
    read from where the previous test's check stopped, so each entry is charged to
    the test during which it was written.
    """
    for server in _servers:
        if server.running:
            server.mark_logs(f"test {request.node.nodeid}")
    yield
    allowed = [p for mark in request.node.iter_markers("server_errors") for p in mark.args]
    reports = []
    for server in list(_servers):
        found = [
            (path, problem)
            for path, problem in server.log_problems()
            if serverlog.unexpected([problem], allowed)
        ]
        if found:
            reports.append(_log_report(request.node.nodeid, server, found))
        if not server.running:
            _servers.remove(server)  # stopped (or never started) and read to the end
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        seen: set[int] = set()
        for value in funcargs.values():
            servers = (
                value.servers
                if isinstance(value, ServerFactory)
                else [value]
                if isinstance(value, ServerProcess | ClusterProcess)
                else []
            )
            for s in servers:
                if id(s) not in seen:
                    seen.add(id(s))
                    report.sections.append((f"imserver logs ({s.root.name})", s.logs()))
    return report


# --- clients and users ----------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """A (transport, codec) pair."""

    transport: TransportName
    codec: CodecName

    def __str__(self) -> str:
        return f"{self.transport}-{self.codec}"


WIRES = [Wire("ws", "json"), Wire("ws", "msgpack"), Wire("tcp", "json"), Wire("tcp", "msgpack")]


@pytest.fixture(params=WIRES, ids=str)
def wire(request: pytest.FixtureRequest) -> Wire:
    """Runs the test once per transport and codec."""
    w: Wire = request.param
    return w


@dataclass
class Account:
    """A registered user and its password."""

    username: str
    password: str
    user: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.user["id"])


_names = itertools.count(1)


def unique_username(hint: str = "u") -> str:
    """A fresh valid username (3-32 of ``[a-z0-9_.-]``) starting with ``hint``."""
    hint = "".join(ch for ch in hint.lower() if ch.isalnum() or ch in "_.-")[:14] or "u"
    return f"{hint}_{next(_names)}_{secrets.token_hex(4)}"


class Clients:
    """Opens clients and users for one test; closes every client at teardown."""

    def __init__(self, default: Wire) -> None:
        self.default = default
        self.opened: list[Client] = []

    async def connect(
        self,
        server: ServerProcess,
        transport: TransportName | None = None,
        codec: CodecName | None = None,
        *,
        login_as: Account | None = None,
        **connect_kw: Any,
    ) -> Client:
        """A connected client (``hello`` done unless ``hello=False``), logged in as
        ``login_as`` when given."""
        transport = transport or self.default.transport
        codec = codec or self.default.codec
        client = await Client.connect(
            server.target(transport), transport=transport, codec=codec, **connect_kw
        )
        self.opened.append(client)
        if login_as is not None:
            await client.login(login_as.username, login_as.password)
        return client

    async def register(
        self,
        server: ServerProcess,
        name: str | None = None,
        *,
        password: str = PASSWORD,
        display_name: str | None = None,
    ) -> Account:
        """Register a new account with a unique username (over a short WebSocket)."""
        username = unique_username(name or "u")
        async with await Client.connect(server.ws_url) as c:
            user = await c.register(username, password, display_name)
        return Account(username, password, user)

    async def user(
        self,
        server: ServerProcess,
        name: str | None = None,
        *,
        transport: TransportName | None = None,
        codec: CodecName | None = None,
        password: str = PASSWORD,
        display_name: str | None = None,
        device: str | None = None,
        **connect_kw: Any,
    ) -> Client:
        """Register a unique user and log in on a new connection of ``transport``/``codec``.

        The client's ``user``, ``token`` and ``refresh_token`` are set; the account's
        password is ``password``.
        """
        client = await self.connect(server, transport, codec, device=device, **connect_kw)
        username = unique_username(name or "u")
        await client.register(username, password, display_name)
        await client.login(username, password, device=device)
        return client

    async def close_all(self) -> None:
        clients, self.opened = self.opened, []
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.fixture
async def clients(request: pytest.FixtureRequest) -> AsyncIterator[Clients]:
    default = request.getfixturevalue("wire") if "wire" in request.fixturenames else WIRES[0]
    registry = Clients(default)
    try:
        yield registry
    finally:
        await registry.close_all()


@pytest.fixture
def make_client(clients: Clients) -> Any:
    """``await make_client(server, transport, codec, *, login_as=None, **connect_kw)``."""
    return clients.connect


@pytest.fixture
def register_user(clients: Clients) -> Any:
    """``await register_user(server, name=None, *, password=PASSWORD) -> Account``."""
    return clients.register


@pytest.fixture
def user_factory(clients: Clients) -> Any:
    """``await user_factory(server, name=None, *, transport=None, codec=None) -> Client``."""
    return clients.user
