"""Which connections the server takes, and when (docs/protocol.md §1.4, README):

- the listen backlog of both ports is the system's maximum, or ``listen_backlog``;
- a connection that does not say ``hello`` within ``limits.hello_timeout`` is closed;
- ``limits.max_connections_per_ip`` caps one address's open connections;
- near the process's descriptor limit the server stops accepting, keeps serving the
  sessions it has (their databases need descriptors too), and takes the waiting
  connections once descriptors are free again.

Waits are on events the server exposes (a closed socket, a log line, a metric),
never on elapsed time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from metrics import Samples, metric, scrape

from imserver.client import Client, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory, ServerProcess

SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port`` (``ss``'s Send-Q for listeners)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])


async def closed_by_server(reader: asyncio.StreamReader, within: float = 20) -> bool:
    """True once the server closes the connection (EOF or reset), within ``within`` s."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    return True


async def wait_for_log(server: ServerProcess, text: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while text not in server.stderr_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in the server's log"
        await asyncio.sleep(0.05)


async def scrape_server(server: ServerProcess) -> Samples:
    """``/metrics`` of ``server``, asked again while the connection asking is refused:
    the per-address cap counts a closed client's connection until the server has seen
    it close."""
    async with asyncio.timeout(10):
        while True:
            try:
                async with HttpClient(server.http_url) as http:
                    return await scrape(http)
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/usr/bin/ss").exists(), reason="needs ss (iproute2)")
async def test_listen_backlog_is_the_system_maximum_or_the_setting(
    server_factory: ServerFactory,
) -> None:
    default = server_factory()
    assert listen_backlog(default.http_port) == SOMAXCONN
    assert listen_backlog(default.tcp_port) == SOMAXCONN
    set_ = server_factory({"listen_backlog": 77})
    assert listen_backlog(set_.http_port) == 77
    assert listen_backlog(set_.tcp_port) == 77


async def test_connections_that_do_not_say_hello_in_time_are_closed(
    server_factory: ServerFactory, clients: Clients
) -> None:
    server = server_factory({"limits": {"hello_timeout": 0.5}})
    greeted = await clients.connect(server, "tcp", "json")  # hello done
    silent_tcp = await asyncio.open_connection(*server.tcp_addr)
    partial_tcp = await asyncio.open_connection(*server.tcp_addr)
    partial_tcp[1].write(b"\x00\x00\x00\x20{")  # a frame that never completes
    no_head = await asyncio.open_connection(server.host, server.http_port)
    no_head[1].write(b"GET /ws HTTP/1.1\r\nHost: local")
    ws_no_hello = await Client.connect(server.ws_url, hello=False)
    for reader, writer in (silent_tcp, partial_tcp, no_head):
        assert await closed_by_server(reader)
        writer.close()
    await asyncio.wait_for(ws_no_hello.wait_closed(), 20)
    assert await greeted.ping() == {}  # past the timeout, a greeted connection is served


@pytest.mark.embedded_only("the cap counts one process's connections; each gateway counts its own")
async def test_connections_per_address_are_capped(
    server_factory: ServerFactory, clients: Clients
) -> None:
    server = server_factory({"limits": {"max_connections_per_ip": 3, "hello_timeout": 60}})
    a = await clients.connect(server, "tcp", "json")
    b = await clients.connect(server, "ws", "msgpack")
    c = await clients.connect(server, "tcp", "msgpack")
    reader, writer = await asyncio.open_connection(*server.tcp_addr)
    assert await closed_by_server(reader)  # closed on accept, long before hello_timeout
    writer.close()
    reader, writer = await asyncio.open_connection(server.host, server.http_port)
    assert await closed_by_server(reader)
    writer.close()
    for client in (a, b, c):
        assert await client.ping() == {}
    await c.close()
    samples = await scrape_server(server)
    assert metric(samples, "imserver_connections_refused_per_address_total") >= 2
    d = await clients.connect(server, "ws", "json")
    assert await d.ping() == {}


@pytest.mark.embedded_only("lowers the descriptor limit of the one server process")
async def test_at_the_descriptor_limit_sessions_keep_working_and_new_ones_wait(
    server_factory: ServerFactory, clients: Clients
) -> None:
    """Idle connections that never send a byte take the server to its descriptor
    limit: accepting pauses with the reserve intact, the logged-in users keep
    sending, reading history and creating rooms (which opens database connections),
    and a connection that waited in the backlog is served once the idle ones leave."""
    server = server_factory({"limits": {"hello_timeout": 300, "rate_per_s": 1000}})
    assert server.proc is not None
    pid = server.proc.pid
    a = await clients.user(server, "a", transport="ws", codec="json")
    b = await clients.user(server, "b", transport="tcp", codec="msgpack")
    conv = Client.direct_conv(a.user_id, b.user_id)
    await a.send_message(conv, "before")
    await b.next_event("msg")
    reserved = 256
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = open_fds(pid) + reserved + 40
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(server.tcp_addr))
        await wait_for_log(server, "accepting paused")
        assert open_fds(pid) <= limit - reserved // 2
        waiting = asyncio.ensure_future(Client.connect(server.ws_url, timeout=120))

        for i in range(30):
            await a.send_message(conv, f"m{i}")
        got = [(await b.next_event("msg"))["body"] for _ in range(30)]
        assert got == [f"m{i}" for i in range(30)]
        page = await b.history(conv, after=0, limit=100)
        assert [m["body"] for m in page["messages"]] == ["before", *got]
        room = await a.request("room.create", name="at the limit", members=[b.user_id])
        assert room["room"]["name"] == "at the limit"
        assert {e["conv"] for e in await b.convs()} >= {conv, room["room"]["conv"]}
        assert not waiting.done()  # waits in the backlog, neither refused nor served
        assert open_fds(pid) < limit
    finally:
        for sock in idle:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    late = await asyncio.wait_for(waiting, 60)
    clients.opened.append(late)
    await wait_for_log(server, "accepting resumed")
    await late.login(a.user["username"], "correct-horse-battery")
    assert (await late.send_message(conv, "after"))["seq"] == 32
    after = await b.next_event("msg", match=lambda e: e["conv"] == conv)
    assert after["body"] == "after"
    samples = await scrape_server(server)
    assert metric(samples, "imserver_accept_pauses_total") >= 1
    assert ("imserver_accept_paused", frozenset()) in samples
    assert metric(samples, "imserver_accept_paused") == 0
