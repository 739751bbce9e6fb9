"""End-to-end harness: a real ``imserver serve`` process on free ports, driven by the
project's own client over real sockets.

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
running the suite against other deployments' settings).

Server logs are checked after every test: a traceback or an ``ERROR``/``CRITICAL``
record that any server (the session's shared one included) wrote while the test ran
fails the test at teardown, with the entries in the message (see ``serverlog.py``).
A test that provokes such an entry on purpose says so with
``@pytest.mark.server_errors(pattern, ...)``: entries matching one of the regular
expressions are allowed. A server that outlives its tests (module and session
fixtures) is stopped with :meth:`ServerProcess.close`, which checks what it logged
while stopping.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import serverlog

from imserver.client import Client, CodecName, TransportName
from imserver.utils.config import merge_settings

HOST = "127.0.0.1"
PASSWORD = "correct-horse-battery"
"""The password of every account the helpers create unless told otherwise."""
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
LOG_TAIL = 8000

_live: set[subprocess.Popen[bytes]] = set()
"""Every server process still running, killed at interpreter exit whatever happens."""
_servers: list[ServerProcess] = []
"""Every server whose logs are still to be checked (see :func:`_server_logs_are_clean`)."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _live.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        _kill_group(proc)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "server_errors(*patterns): the test makes the server log tracebacks or ERROR "
        "records matching these regular expressions; the log check allows them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


# --- the server process ---------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now on HOST (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A small TOML writer for configuration: scalars, lists and nested tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # JSON string escapes are valid TOML basic strings
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(prefix: str, d: Mapping[str, Any], out: list[str]) -> None:
        subtables = []
        if prefix:
            out.append(f"\n[{prefix}]")
        for k, v in d.items():
            if v is None:
                continue
            if isinstance(v, Mapping):
                subtables.append((k, v))
            else:
                out.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in subtables:
            table(f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k), v, out)

    lines: list[str] = []
    table("", data, lines)
    return "\n".join(lines).lstrip("\n") + "\n"


@dataclass(repr=False)
class ServerProcess:
    """One ``imserver serve`` process and its directory (config, data, logs).

    ``stop()`` then ``start()`` restarts it on the same data directory; the ports may
    change, so read the addresses again after a restart.
    """

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    host: str = HOST
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = 0
    tcp_port: int = 0
    starts: int = 0
    log_read: dict[Path, int] = field(default_factory=dict)
    """How far :meth:`log_problems` has read each log file."""

    def __post_init__(self) -> None:
        _servers.append(self)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "imserver.toml"

    @property
    def stdout_path(self) -> Path:
        return self.root / "server.stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.root / "server.stderr.log"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.http_port}/ws"

    @property
    def tcp_addr(self) -> tuple[str, int]:
        return (self.host, self.tcp_port)

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "stopped"
        return f"<ServerProcess {self.root.name} {self.http_url} tcp:{self.tcp_port} {state}>"

    def target(self, transport: TransportName) -> str | tuple[str, int]:
        """What :meth:`Client.connect` takes for ``transport``."""
        return self.ws_url if transport == "ws" else self.tcp_addr

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(
        self, config: Mapping[str, Any] | None = None, *, timeout: float = READY_TIMEOUT
    ) -> None:
        """Start the process (merging ``config`` into the overrides) and wait for /readyz."""
        if self.running:
            raise RuntimeError("server already running")
        if config:
            self.config = merge_settings(self.config, config)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_dumps(self.config))
        for attempt in range(3):
            self.http_port, self.tcp_port = free_ports(2)
            self._spawn()
            failure = self._wait_ready(timeout)
            if failure is None:
                return
            # Another process may have taken a port between picking and binding it.
            if attempt < 2 and "in use" in self._tail(self.stderr_path).lower():
                continue
            pytest.fail(f"imserver did not become ready: {failure}\n{self.logs()}", pytrace=False)

    def _spawn(self) -> None:
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "imserver",
            "serve",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--http-port",
            str(self.http_port),
            "--tcp-port",
            str(self.tcp_port),
            *shlex.split(os.environ.get("IMSERVER_E2E_SERVE_ARGS", "")),
        ]
        marker = f"\n===== start #{self.starts}: {shlex.join(cmd)}\n".encode()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            out.write(marker)
            err.write(marker)
            out.flush()
            err.flush()
            # Its own process group, so teardown can kill anything it spawned.
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, cwd=self.root, start_new_session=True
            )
        _live.add(self.proc)

    def _wait_ready(self, timeout: float) -> str | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = self.http_url + "/readyz"
        last = "no answer"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                _live.discard(self.proc)
                return f"the process exited with code {code}"
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return None
                    last = f"/readyz answered {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"/readyz answered {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        _kill_group(self.proc)
        return f"not ready after {timeout} s ({last})"

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send ``sig`` and wait for the exit; returns the exit code (None if not started).

        A process still alive after ``timeout`` is killed and the test fails.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                pytest.fail(
                    f"imserver ignored signal {sig} for {timeout} s\n{self.logs()}", pytrace=False
                )
        _live.discard(proc)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group at once (a crash); returns the exit code."""
        if self.proc is None:
            return None
        _kill_group(self.proc)
        return self.proc.returncode

    async def astart(self, config: Mapping[str, Any] | None = None) -> None:
        """:meth:`start` without blocking the event loop."""
        await asyncio.to_thread(self.start, config)

    async def astop(
        self,
        sig: int = signal.SIGTERM,
        *,
        timeout: float = STOP_TIMEOUT,  # noqa: ASYNC109 - passed on to stop()
    ) -> int | None:
        """:meth:`stop` without blocking the event loop (clients keep reading meanwhile)."""
        return await asyncio.to_thread(self.stop, sig, timeout=timeout)

    def teardown(self) -> None:
        """Stop gracefully if possible, kill otherwise; never fails."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                _live.discard(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
        _kill_group(proc)

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

    @staticmethod
    def _tail(path: Path, size: int = LOG_TAIL) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - size))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def mark_logs(self, text: str) -> None:
        """Write a marker line into both logs (the server appends to them too)."""
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                with open(path, "ab") as fh:
                    fh.write(f"{serverlog.MARKER}{text}\n".encode())

    def log_problems(self) -> list[tuple[Path, serverlog.Problem]]:
        """The problems logged since the previous call (complete lines only)."""
        found = []
        for path in (self.stdout_path, self.stderr_path):
            start = self.log_read.get(path, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            self.log_read[path] = start + end
            found += [(path, p) for p in serverlog.problems(data[:end].decode(errors="replace"))]
        return found

    def logs(self) -> str:
        """The tails of stdout and stderr."""
        return (
            f"--- {self.stdout_path} (tail) ---\n{self._tail(self.stdout_path)}\n"
            f"--- {self.stderr_path} (tail) ---\n{self._tail(self.stderr_path)}"
        )


class ServerFactory:
    """Creates :class:`ServerProcess` es under one temporary directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[ServerProcess] = []

    def __call__(
        self, config: Mapping[str, Any] | None = None, *, start: bool = True
    ) -> ServerProcess:
        root = self.base / f"server{len(self.servers)}"
        root.mkdir(parents=True)
        server = ServerProcess(root=root, config=dict(config or {}))
        self.servers.append(server)
        if start:
            server.start()
        return server

    def teardown(self) -> None:
        for server in self.servers:
            server.teardown()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    factory = ServerFactory(tmp_path_factory.mktemp("shared"))
    server = factory(start=False)
    try:
        server.start()
        yield server
    finally:
        server.close()


def _log_report(
    what: str, server: ServerProcess, found: list[tuple[Path, serverlog.Problem]]
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
                if isinstance(value, ServerProcess)
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
