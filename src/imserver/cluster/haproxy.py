"""HAProxy in front of the gateways: the one address clients use.

A gateway serves two ports: HTTP (the HTTP API and the WebSocket upgrade of ``/ws``)
and TCP (length-prefixed frames). HAProxy listens on one port of each kind and
balances every new connection over the gateways in TCP mode: a connection is a
session that lives for hours, so ``leastconn`` spreads them by the connections each
gateway holds, and HAProxy never parses a frame (TLS, when there is TLS, ends at the
gateway or at a balancer before this one).

Health: each gateway's ``GET /readyz`` on its HTTP port, checked every second, for
both of its ports (``check port``). A gateway that begins a graceful shutdown answers
503 at once and is taken out after two failed checks, so new connections go to the
others while it drains its own; a killed gateway fails the TCP connect of the check
the same way. A client whose connection died reconnects through HAProxy and lands on
a live gateway, where it recovers with ``convs`` and ``history``.

:func:`render` writes the configuration, :class:`Haproxy` runs HAProxy in the
foreground as a child process, and :func:`server_states` reads each gateway's state
from HAProxy's stats socket (``show stat``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHECK_INTERVAL_MS = 1000
"""How often each gateway's /readyz is asked."""

FALL = 2
"""Failed checks that take a gateway out."""

RISE = 2
"""Passed checks that put it back."""

SESSION_TIMEOUT = "1h"
"""Idle time after which HAProxy drops a connection; the protocol's heartbeats keep a
live session well inside it."""


class HaproxyError(RuntimeError):
    """HAProxy is missing, refused the configuration, or did not start."""


@dataclass(frozen=True)
class Backend:
    """One gateway as HAProxy reaches it."""

    name: str
    host: str
    http_port: int
    tcp_port: int


@dataclass(frozen=True)
class Frontend:
    """The addresses clients use, and HAProxy's stats socket."""

    host: str
    http_port: int
    tcp_port: int
    stats_socket: Path


def binary() -> str | None:
    """The haproxy executable, or None when it is not installed (Debian: ``haproxy``,
    in /usr/sbin, which is not on every user's PATH)."""
    found = shutil.which("haproxy")
    if found is not None:
        return found
    candidate = Path("/usr/sbin/haproxy")
    return str(candidate) if candidate.exists() else None


def default_maxconn() -> int:
    """Connections HAProxy may hold: each takes two descriptors (client and gateway),
    within this process's descriptor limit, which HAProxy refuses to start beyond."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, (soft - 100) // 2)


def render(frontend: Frontend, gateways: Sequence[Backend], maxconn: int | None = None) -> str:
    """The HAProxy configuration for ``gateways`` behind ``frontend``; ``maxconn``
    defaults to what the descriptor limit allows (:func:`default_maxconn`)."""
    if not gateways:
        raise ValueError("at least one gateway")
    check = f"check inter {CHECK_INTERVAL_MS} fall {FALL} rise {RISE}"
    lines = [
        "global",
        f"    maxconn {maxconn or default_maxconn()}",
        f"    stats socket {frontend.stats_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode tcp",
        "    balance leastconn",
        "    option redispatch",
        "    retries 2",
        "    timeout connect 5s",
        f"    timeout client {SESSION_TIMEOUT}",
        f"    timeout server {SESSION_TIMEOUT}",
        "    timeout check 2s",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        "",
        "frontend http_ws",
        f"    bind {frontend.host}:{frontend.http_port}",
        "    default_backend gateways_http",
        "",
        "frontend tcp_frames",
        f"    bind {frontend.host}:{frontend.tcp_port}",
        "    default_backend gateways_tcp",
        "",
        "backend gateways_http",
    ]
    lines += [f"    server {g.name} {g.host}:{g.http_port} {check}" for g in gateways]
    lines += ["", "backend gateways_tcp"]
    lines += [
        f"    server {g.name} {g.host}:{g.tcp_port} {check} port {g.http_port}" for g in gateways
    ]
    return "\n".join(lines) + "\n"


def check_config(path: Path) -> None:
    """Have HAProxy validate the file (``haproxy -c``); :class:`HaproxyError` with its
    message when it refuses it."""
    exe = binary()
    if exe is None:
        raise HaproxyError("haproxy is not installed (Debian: apt-get install haproxy)")
    done = subprocess.run([exe, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise HaproxyError(f"haproxy refused {path}: {done.stderr.strip() or done.stdout}")


class Haproxy:
    """HAProxy as a child process in the foreground, on one configuration file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, stats_socket: Path, timeout: float = 10.0) -> None:
        """Validate the configuration, start HAProxy (``-db``: foreground, no daemon)
        and wait until its ``stats_socket`` exists; :class:`HaproxyError` with the
        end of its log if it exits first or does not get there in ``timeout``."""
        check_config(self.config_path)
        exe = binary()
        assert exe is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not stats_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise HaproxyError(f"haproxy did not start:\n{tail}")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def server_states(stats_socket: Path) -> dict[tuple[str, str], str]:
    """``(backend, server) -> status`` (``UP``, ``DOWN``, ``MAINT``, ``no check``, and
    HAProxy's transitional ``UP 1/2``-style states) from the stats socket."""
    reader, writer = await asyncio.open_unix_connection(str(stats_socket))
    try:
        writer.write(b"show stat\n")
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    text = raw.decode().lstrip("# ")
    states: dict[tuple[str, str], str] = {}
    for row in csv.DictReader(io.StringIO(text)):
        server = row.get("svname", "")
        if server in ("FRONTEND", "BACKEND", ""):
            continue
        states[(row["pxname"], server)] = row.get("status", "")
    return states
