"""HAProxy in front of two real gateways (``imserver.cluster.haproxy``): connections
spread over both, a gateway killed with SIGKILL is taken out by the /readyz check,
and every new connection then lands on the other; both frontends (HTTP/WebSocket
and TCP) work."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imserver.client import Client
from imserver.cluster.haproxy import Backend, Frontend, Haproxy, binary, render, server_states
from imserver.testing.process import ServerProcess, free_ports


def _require_haproxy() -> None:
    """Install Debian's haproxy when it is missing and this user may; otherwise skip,
    or fail under CI=true, where every part of the cluster must be exercised."""
    if binary() is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "haproxy"], capture_output=True)
    if binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is required under CI=true (apt-get install haproxy)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(tmp_path / f"g{i}") for i in (1, 2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.teardown()


@pytest.fixture
def balancer(tmp_path: Path, gateways: list[ServerProcess]) -> Iterator[Frontend]:
    _require_haproxy()
    http_port, tcp_port = free_ports(2)
    frontend = Frontend("127.0.0.1", http_port, tcp_port, tmp_path / "haproxy.sock")
    backends = [
        Backend(f"g{i}", "127.0.0.1", g.http_port, g.tcp_port) for i, g in enumerate(gateways, 1)
    ]
    config = tmp_path / "haproxy.cfg"
    config.write_text(render(frontend, backends))
    haproxy = Haproxy(config, tmp_path / "haproxy.log")
    haproxy.start(frontend.stats_socket)
    try:
        yield frontend
    finally:
        haproxy.stop()


async def _wait_states(frontend: Frontend, want: dict[str, str]) -> None:
    """Until every backend's server ``name`` has the status ``want[name]``."""
    deadline = time.monotonic() + 15
    states: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        if frontend.stats_socket.exists():
            states = await server_states(frontend.stats_socket)
            if all(
                states.get((backend, name)) == status
                for name, status in want.items()
                for backend in ("gateways_http", "gateways_tcp")
            ):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"HAProxy states {states}, wanted {want}")


async def _hello_count(url: str | tuple[str, int], transport: str, n: int) -> list[Client]:
    clients = []
    for _ in range(n):
        client = await Client.connect(url, transport=transport)  # type: ignore[arg-type]
        await client.ping()
        clients.append(client)
    return clients


async def test_connections_spread_and_survive_a_killed_gateway(
    gateways: list[ServerProcess], balancer: Frontend
) -> None:
    await _wait_states(balancer, {"g1": "UP", "g2": "UP"})
    ws_url = f"ws://127.0.0.1:{balancer.http_port}/ws"
    held = await _hello_count(ws_url, "ws", 6)
    held += await _hello_count(("127.0.0.1", balancer.tcp_port), "tcp", 4)
    try:
        # leastconn: both gateways hold some of the live connections.
        per_gateway = [await _connections(g) for g in gateways]
        assert all(n >= 2 for n in per_gateway), per_gateway

        gateways[0].kill()
        await _wait_states(balancer, {"g1": "DOWN", "g2": "UP"})
        fresh = await _hello_count(ws_url, "ws", 5)
        fresh += await _hello_count(("127.0.0.1", balancer.tcp_port), "tcp", 5)
        held += fresh
        # Every connection made after the kill reached the live gateway and works.
        registered = await fresh[0].register("after_kill", "pw-after-kill-1")
        assert registered["username"] == "after_kill"
        assert await _connections(gateways[1]) >= 10
    finally:
        for client in held:
            await client.close()


async def _connections(server: ServerProcess) -> int:
    """The gateway's live connections, from its /metrics."""

    def read() -> str:
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(read)
    total = 0
    for line in text.splitlines():
        if line.startswith("imserver_connections{") or line.startswith("imserver_connections "):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total
