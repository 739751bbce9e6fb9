"""The local cluster: every part of the distributed mode as processes on this machine.

``imserver cluster up`` starts, in this order, each step waiting for the one before
to be ready:

1. etcd (:class:`~imserver.cluster.etcd.LocalEtcd`, free ports, data in the cluster
   directory): the registry and the config centre;
2. the cluster's database on the machine's PostgreSQL (or MariaDB) server, created
   if missing, and every service's migrations, applied once here so that the
   instances never race each other to migrate;
3. the service processes, ``imserver serve --services NAME``, N instances of each,
   each with its own HTTP port (``/readyz``, ``/metrics``) and gRPC port, waited for
   on ``/readyz``;
4. the gateways (``--services gateway``);
5. HAProxy in front of the gateways (:mod:`imserver.cluster.haproxy`), waited for
   until every gateway is UP.

Redis and RabbitMQ are the machine's, named by URL; the cluster's keys, channels,
exchanges and queues carry the cluster's prefix, so clusters can share them.

Every process runs detached, in a session of its own, so ``up`` returns and the
cluster keeps running; ``cluster.json`` in the cluster directory records what runs
where, and ``status``, ``logs`` and ``down`` read it. ``down`` stops the gateways
first (their clients reconnect nowhere: the cluster is going away), then the
services, HAProxy and etcd, each group with SIGTERM to all of its processes at once,
a bounded wait, then SIGKILL.

:func:`add_gateways` starts more gateways for a running cluster, with settings of
their own (the end-to-end suite's gateways with a test's configuration).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from imserver.cluster import haproxy
from imserver.cluster.etcd import EtcdServer
from imserver.cluster.haproxy import Backend, Frontend, Haproxy
from imserver.cluster.ports import free_ports
from imserver.utils.config import merge_settings

SERVICES = ("user", "room", "file", "notification", "message")
"""The services behind the gateways, in the order they are started."""

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """A cluster that cannot start, or a directory that holds no cluster."""


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What ``cluster up`` starts: instances per service and the backing servers."""

    gateways: int = 2
    instances: dict[str, int] = msgspec.field(
        default_factory=lambda: {"message": 2, "user": 1, "room": 1, "file": 1, "notification": 1}
    )
    database: str = "postgresql://postgres@127.0.0.1:5432/imserver_cluster"
    redis: str = "redis://127.0.0.1:6379/0"
    rabbitmq: str = "amqp://guest:guest@127.0.0.1:5672/"
    prefix: str = "imserver"
    host: str = "127.0.0.1"
    http_port: int = 0
    """The port clients use for HTTP and WebSocket (0: a free one)."""
    tcp_port: int = 0
    """The port clients use for TCP (0: a free one)."""
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    """Further configuration of every process (``{"limits": {"hello_timeout": 5}}``),
    beside the cluster's own storage, etcd, Redis and RabbitMQ settings."""


class Member(msgspec.Struct, kw_only=True):
    """One service process of the cluster."""

    name: str
    services: list[str]
    pid: int
    http_port: int
    tcp_port: int
    rpc_port: int
    root: str

    @property
    def log(self) -> Path:
        """Its stdout and stderr."""
        return Path(self.root) / "imserver.log"


class ClusterState(msgspec.Struct, kw_only=True):
    """What runs where: written by ``up``, read by ``status``, ``logs`` and ``down``."""

    spec: ClusterSpec
    etcd_url: str
    etcd_pid: int
    haproxy_pid: int
    frontend_http: int
    frontend_tcp: int
    stats_socket: str
    members: list[Member] = msgspec.field(default_factory=list)

    @property
    def client_url(self) -> str:
        """The one URL clients use (WebSocket; the same port serves the HTTP API)."""
        return f"ws://{self.spec.host}:{self.frontend_http}/ws"


def load_state(root: Path) -> ClusterState:
    """The state of the cluster in ``root``; :class:`ClusterError` when there is none."""
    path = root / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=ClusterState)
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {root} (no {STATE_FILE})") from None


def _save_state(root: Path, state: ClusterState) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state)))
    tmp.replace(root / STATE_FILE)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _ready(host: str, port: int) -> bool:
    """Whether ``/readyz`` on ``port`` answers 200; anything else there (nothing, or a
    process that took the port first and speaks another protocol) is not ready."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, http.client.HTTPException):
        return False


def _wait(what: str, check: Callable[[], bool], failed: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not check():
        reason = failed()
        if reason is not None:
            raise ClusterError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.1)


def _toml_value(value: object) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and lists are valid TOML


def _toml_lines(table: Mapping[str, Any], path: str = "") -> list[str]:
    """``table`` as TOML dotted keys (``"limits"."rate_per_s" = 5``), one line each."""
    lines = []
    for key, value in table.items():
        name = f"{path}.{json.dumps(key)}" if path else json.dumps(key)
        if isinstance(value, Mapping):
            lines += _toml_lines(value, name)
        elif value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return lines


def config_text(spec: ClusterSpec, etcd_url: str) -> str:
    """The TOML every process of the cluster shares (its ports come as flags): the
    spec's ``settings`` under the cluster's own (storage, etcd, Redis, RabbitMQ)."""
    own = {
        "live": "redis",
        "storage": {"url": spec.database},
        "etcd": {"endpoints": [etcd_url], "prefix": "/" + spec.prefix.strip("/")},
        "redis": {"url": spec.redis, "prefix": spec.prefix + ":"},
        "events": {"backend": "rabbitmq", "url": spec.rabbitmq, "prefix": spec.prefix},
    }
    return "\n".join(_toml_lines(merge_settings(spec.settings, own))) + "\n"


def _spawn_member(
    root: Path,
    name: str,
    services: Sequence[str],
    config: Path,
    host: str,
    ports: tuple[int, int, int] | None = None,
) -> Member:
    member_root = root / name
    (member_root / "data").mkdir(parents=True, exist_ok=True)
    http_port, tcp_port, rpc_port = ports if ports is not None else free_ports(3, host)
    command = [
        sys.executable,
        "-m",
        "imserver",
        "serve",
        "--services",
        ",".join(services),
        "--config",
        str(config),
        "--data-dir",
        str(member_root / "data"),
        "--host",
        host,
        "--http-port",
        str(http_port),
        "--tcp-port",
        str(tcp_port),
        "--rpc-port",
        str(rpc_port),
    ]
    log = member_root / "imserver.log"
    with open(log, "ab") as out:
        out.write(f"== {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    return Member(
        name=name,
        services=list(services),
        pid=proc.pid,
        http_port=http_port,
        tcp_port=tcp_port,
        rpc_port=rpc_port,
        root=str(member_root),
    )


def _wait_members(members: Sequence[Member], host: str) -> None:
    for member in members:

        def failed(member: Member = member) -> str | None:
            if alive(member.pid):
                return None
            return f"exited; the end of {member.log}:\n{tail(member.log, 3000)}"

        def ready(member: Member = member) -> bool:
            return _ready(host, member.http_port)

        _wait(member.name, ready, failed)


def tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of the file at ``path`` as text ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


async def _prepare_database(spec: ClusterSpec, root: Path) -> None:
    """Create the cluster's database when missing, and apply every migration."""
    from sqlalchemy.engine import make_url

    from imserver.core.server import migrate
    from imserver.storage.servers import admin, create_statement
    from imserver.utils.config import load_config

    url = make_url(spec.database)
    name = url.database
    if not name:
        raise ClusterError(f"the database URL names no database: {spec.database}")
    dialect = "postgresql" if url.get_backend_name() == "postgresql" else "mariadb"
    server = url.set(database="postgres" if dialect == "postgresql" else None)
    try:
        await admin(server.render_as_string(hide_password=False), [create_statement(dialect, name)])
    except Exception as exc:
        if "exist" not in str(exc).lower():
            raise ClusterError(f"cannot create the database {name}: {exc}") from exc
    await migrate(load_config(None, overrides={"data_dir": str(root / "data")}), spec.database)


def up(root: Path, spec: ClusterSpec, progress: Callable[[str], None] = print) -> ClusterState:
    """Start the cluster described by ``spec`` in directory ``root``."""
    import asyncio

    root.mkdir(parents=True, exist_ok=True)
    if (root / STATE_FILE).exists():
        raise ClusterError(f"a cluster is already up in {root} (imserver cluster down first)")
    etcd = EtcdServer(root / "etcd", host=spec.host)
    etcd.start()
    assert etcd.pid is not None
    progress(f"etcd        {etcd.url}")
    state = ClusterState(
        spec=spec,
        etcd_url=etcd.url,
        etcd_pid=etcd.pid,
        haproxy_pid=0,
        frontend_http=0,
        frontend_tcp=0,
        stats_socket=str(root / "haproxy.sock"),
    )
    _save_state(root, state)  # from here on, `down` can clean up whatever started
    try:
        asyncio.run(_prepare_database(spec, root))
        progress(f"database    {spec.database} (migrated)")
        config = root / "imserver.toml"
        config.write_text(config_text(spec, etcd.url))
        services = [
            _spawn_member(root, f"{name}-{i}", [name], config, spec.host)
            for name in SERVICES
            for i in range(1, spec.instances.get(name, 1) + 1)
        ]
        state.members = services
        _save_state(root, state)
        _wait_members(services, spec.host)
        for member in services:
            progress(f"{member.name:<12}rpc {spec.host}:{member.rpc_port}  pid {member.pid}")
        gateways = [
            _spawn_member(root, f"gateway-{i}", ["gateway"], config, spec.host)
            for i in range(1, spec.gateways + 1)
        ]
        state.members = services + gateways
        _save_state(root, state)
        _wait_members(gateways, spec.host)
        for member in gateways:
            progress(f"{member.name:<12}http {spec.host}:{member.http_port}  pid {member.pid}")
        _start_haproxy(root, spec, state, gateways)
        _save_state(root, state)
    except BaseException:
        down(root, progress=lambda _line: None)
        raise
    progress(f"haproxy     pid {state.haproxy_pid}")
    progress(f"clients:    {state.client_url}  (TCP {spec.host}:{state.frontend_tcp})")
    return state


def restart(root: Path, name: str) -> Member:
    """Start the member ``name`` again after its process ended (a crash, ``kill -9``),
    on the ports it had, so that HAProxy's checks and the registry find it where it
    was; returns it once it answers ``/readyz``."""
    state = load_state(root)
    found = [m for m in state.members if m.name == name]
    if not found:
        raise ClusterError(f"no member {name!r} in the cluster in {root}")
    old = found[0]
    if alive(old.pid):
        raise ClusterError(f"{name} is still running (pid {old.pid})")
    member = _spawn_member(
        root,
        name,
        old.services,
        root / "imserver.toml",
        state.spec.host,
        ports=(old.http_port, old.tcp_port, old.rpc_port),
    )
    state.members = [member if m.name == name else m for m in state.members]
    _save_state(root, state)
    _wait_members([member], state.spec.host)
    return member


def _start_haproxy(
    root: Path, spec: ClusterSpec, state: ClusterState, gateways: Sequence[Member]
) -> None:
    import asyncio

    http_port, tcp_port = spec.http_port, spec.tcp_port
    if not http_port or not tcp_port:
        free = free_ports(2, spec.host)
        http_port, tcp_port = http_port or free[0], tcp_port or free[1]
    frontend = Frontend(spec.host, http_port, tcp_port, Path(state.stats_socket))
    backends = [Backend(g.name, spec.host, g.http_port, g.tcp_port) for g in gateways]
    config = root / "haproxy.cfg"
    config.write_text(haproxy.render(frontend, backends))
    proxy = Haproxy(config, root / "haproxy.log")
    proxy.start(frontend.stats_socket)
    assert proxy.pid is not None
    state.haproxy_pid = proxy.pid
    state.frontend_http, state.frontend_tcp = http_port, tcp_port

    def all_up() -> bool:
        states = asyncio.run(haproxy.server_states(frontend.stats_socket))
        return bool(states) and all(status == "UP" for status in states.values())

    _wait("haproxy", all_up, lambda: None if alive(state.haproxy_pid) else "exited")


def add_gateways(
    state: ClusterState, directory: Path, count: int, settings: Mapping[str, Any]
) -> list[Member]:
    """Start ``count`` more gateways for the running cluster ``state`` describes, in
    ``directory``, each with ``settings`` laid over the cluster's configuration, and
    wait until they are ready.

    They find the cluster's services through its etcd like its own gateways, but the
    cluster's state does not list them and HAProxy does not send them clients: whoever
    starts them connects to them and stops them (:func:`stop_members`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    spec = msgspec.structs.replace(
        state.spec, settings=merge_settings(state.spec.settings, settings)
    )
    config = directory / "imserver.toml"
    config.write_text(config_text(spec, state.etcd_url))
    members = [
        _spawn_member(directory, f"gateway-{i}", ["gateway"], config, spec.host)
        for i in range(1, count + 1)
    ]
    try:
        _wait_members(members, spec.host)
    except BaseException:
        stop_members(members)
        raise
    return members


def stop_members(members: Sequence[Member]) -> None:
    """Stop ``members`` together: SIGTERM to each, then a bounded wait, then SIGKILL."""
    for member in members:
        if alive(member.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(member.pid, signal.SIGTERM)
    for member in members:
        _stop_pid(member.pid)


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    if pid <= 0 or not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def down(root: Path, progress: Callable[[str], None] = print) -> None:
    """Stop every process of the cluster in ``root`` and forget it (the logs, the
    data directories and the database stay)."""
    state = load_state(root)
    gateways = [m for m in state.members if "gateway" in m.services]
    others = [m for m in state.members if "gateway" not in m.services]
    for group in (gateways, others):
        stop_members(group)
        for member in group:
            progress(f"stopped {member.name}")
    _stop_pid(state.haproxy_pid)
    _stop_pid(state.etcd_pid)
    progress("stopped haproxy and etcd")
    (root / STATE_FILE).unlink()


def status(root: Path) -> list[tuple[str, str, str]]:
    """``(process, state, detail)`` for every process of the cluster."""
    import asyncio

    state = load_state(root)
    host = state.spec.host
    rows = [
        ("etcd", "up" if alive(state.etcd_pid) else "down", state.etcd_url),
    ]
    for member in state.members:
        if not alive(member.pid):
            condition = "down"
        else:
            condition = "ready" if _ready(host, member.http_port) else "not ready"
        detail = f"pid {member.pid}, http {member.http_port}, rpc {member.rpc_port}"
        rows.append((member.name, condition, detail))
    proxied = "down"
    if alive(state.haproxy_pid):
        try:
            states = asyncio.run(haproxy.server_states(Path(state.stats_socket)))
        except OSError:
            states = {}
        ups = sorted({name for (_b, name), s in states.items() if s == "UP"})
        proxied = "up"
        rows.append(("haproxy", proxied, f"gateways UP: {', '.join(ups) or 'none'}"))
    else:
        rows.append(("haproxy", proxied, ""))
    rows.append(("clients", "", f"{state.client_url} (TCP {host}:{state.frontend_tcp})"))
    return rows


def logs(root: Path, name: str | None, lines: int) -> str:
    """The last ``lines`` lines of one process's log, or of each one's."""
    state = load_state(root)
    paths = {m.name: m.log for m in state.members}
    paths["etcd"] = root / "etcd" / "etcd.log"
    paths["haproxy"] = root / "haproxy.log"
    if name is not None and name not in paths:
        raise ClusterError(f"no process {name!r}; there are: {', '.join(sorted(paths))}")
    chosen = [name] if name is not None else list(paths)
    out = []
    for key in chosen:
        text = tail(paths[key], 200 * lines).splitlines()[-lines:]
        out.append(f"== {key} ({paths[key]})")
        out.extend(text)
    return "\n".join(out)
