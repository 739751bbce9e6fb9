"""Process lifecycle: graceful shutdown with clients connected and writes in flight,
restarts on the same data directory, a crash, and the ``unavailable`` answers of a
server that is draining."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from imserver.client import Client, ClientError, ConnectFailed, ConnectionClosed, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Account, Clients, ServerFactory

FAST = {"limits": {"rate_per_s": 100_000, "rate_burst": 100_000}}
"""No rate limit in the way of clients that write as fast as they can."""
WIRES = [("ws", "json"), ("ws", "msgpack"), ("tcp", "json"), ("tcp", "msgpack")]


async def full_history(c: Client, conv: str) -> list[dict[str, Any]]:
    """Every message of ``conv``, paging forward with ``after``."""
    out: list[dict[str, Any]] = []
    while True:
        page = await c.history(conv, after=out[-1]["seq"] if out else 0, limit=200)
        out.extend(page["messages"])
        if not page["has_more"]:
            return out


async def poll_until(probe: Callable[[], Awaitable[Any]], within: float = 5.0) -> Any:
    """Call ``probe`` until it returns something truthy (state the server exposes only
    by being asked: metrics, readiness, presence); returns its last result."""
    deadline = time.monotonic() + within
    result = await probe()
    for _ in itertools.count():
        if result or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
        result = await probe()
    return result


class Sender:
    """Keeps sending pipelined batches on one connection until it ends, recording the
    fate of every cid: acknowledged (with its seq), refused (with the code), or
    unanswered (the connection ended first)."""

    def __init__(self, client: Client, conv: str, tag: str, progress: asyncio.Event) -> None:
        self.client = client
        self.conv = conv
        self.tag = tag
        self.progress = progress
        self.acked: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self.unanswered: set[str] = set()
        self.sent = 0

    async def run(self) -> None:
        ended = False
        while not ended:
            cids: list[str] = []
            futs: list[asyncio.Future[dict[str, Any]]] = []
            for _ in range(10):
                cid = f"{self.tag}-{self.sent}"
                try:
                    fut = self.client.request_nowait(
                        "send", conv=self.conv, cid=cid, type="text", body=cid
                    )
                except ConnectionClosed:  # the transport may know before `closed` is set
                    ended = True
                    break
                self.sent += 1
                cids.append(cid)
                futs.append(fut)
            results = await asyncio.gather(*futs, return_exceptions=True)
            for cid, result in zip(cids, results, strict=True):
                if isinstance(result, dict):
                    self.acked[cid] = result["seq"]
                elif isinstance(result, ClientError):
                    self.refused[cid] = result.code
                elif isinstance(result, ConnectionClosed):
                    self.unanswered.add(cid)
                else:
                    raise AssertionError(f"{cid}: unexpected {result!r}")
            self.progress.set()
            ended = ended or self.client.closed


@pytest.mark.embedded_only("stops and restarts the one server process")
async def test_graceful_shutdown_loses_nothing_acknowledged(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    server = server_factory(FAST)
    accounts: list[Account] = [await register_user(server, f"gs{i}") for i in range(4)]
    conns = [
        await clients.connect(server, t, c, login_as=a)
        for (t, c), a in zip(WIRES, accounts, strict=True)
    ]
    # Each user writes to the next one: every connection sends and receives.
    convs = [Client.direct_conv(a.id, accounts[(i + 1) % 4].id) for i, a in enumerate(accounts)]
    progress = asyncio.Event()
    senders = [
        Sender(c, conv, f"s{i}", progress)
        for i, (c, conv) in enumerate(zip(conns, convs, strict=True))
    ]
    tasks = [asyncio.create_task(s.run()) for s in senders]
    while sum(len(s.acked) for s in senders) < 200:
        progress.clear()
        await asyncio.wait_for(progress.wait(), 10)

    code = await server.astop(signal.SIGTERM)  # the senders keep going meanwhile
    assert code == 0, server.logs()
    for c in conns:
        assert await c.wait_closed(5) == "shutdown"
        assert c.events_nowait("closed") == [{"op": "closed", "reason": "shutdown"}]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for s in senders:
        assert set(s.refused.values()) <= {"unavailable"}, s.refused
        assert len(s.acked) + len(s.refused) + len(s.unanswered) == s.sent, s.tag

    await server.astart()
    for i, (s, conv) in enumerate(zip(senders, convs, strict=True)):
        reader = await clients.connect(server, "ws", "json", login_as=accounts[(i + 1) % 4])
        stored = await full_history(reader, conv)
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1)), "gap in seqs"
        by_cid = {m["cid"]: m["seq"] for m in stored}
        lost = {cid: seq for cid, seq in s.acked.items() if by_cid.get(cid) != seq}
        assert lost == {}, f"{s.tag}: acknowledged but lost after restart"
        # A graceful shutdown commits *and acknowledges* every write it accepted
        # (architecture.md): what is stored is exactly what was acknowledged.
        assert set(by_cid) - set(s.acked) == set(), f"{s.tag}: stored but never acknowledged"
        assert all(m["body"] == m["cid"] for m in stored)


@pytest.mark.embedded_only("stops and restarts the one server process")
async def test_restart_keeps_accounts_tokens_and_presence(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    server = server_factory()
    alice: Account = await register_user(server, "alice")
    bob: Account = await register_user(server, "bob")
    a = await clients.connect(server, "ws", "msgpack", login_as=alice)
    b = await clients.connect(server, "tcp", "json", login_as=bob)
    token, refresh_token = a.token, a.refresh_token
    renamed = (await a.request("user.update", display_name="Alice Renamed"))["user"]
    conv = Client.direct_conv(alice.id, bob.id)
    acks = [await a.send_message(conv, f"before restart {i}") for i in range(3)]
    await a.request("block", user=bob.id)

    started = time.time_ns() // 1_000_000
    assert await server.astop(signal.SIGINT) == 0  # Ctrl-C is as graceful as SIGTERM
    for c in (a, b):
        assert await c.wait_closed(5) == "shutdown"
    await server.astart()

    # The access token of before still authenticates, the refresh token still refreshes.
    a2 = await clients.connect(server, "tcp", "msgpack")
    assert await a2.auth(token) == {"user": renamed}
    r = await clients.connect(server, "ws", "json")
    new = await r.refresh(refresh_token)
    assert new["expires_in"] == 900
    assert (await r.auth(new["token"]))["user"] == renamed
    b2 = await clients.connect(server, "ws", "json", login_as=bob)  # the password too
    # Usernames stay taken.
    try:
        await b2.register(alice.username, "another-password")
    except ClientError as exc:
        assert exc.code == "conflict"
    else:
        raise AssertionError("a username was free again after a restart")
    # Messages, blocks and last_seen are durable; nobody is online until they reconnect.
    history = (await b2.history(conv))["messages"]
    assert [(m["seq"], m["ts"]) for m in history] == [(x["seq"], x["ts"]) for x in acks]
    try:
        await b2.send_message(conv, "still blocked?")
    except ClientError as exc:
        assert exc.code == "forbidden"
    else:
        raise AssertionError("the block did not survive the restart")
    await a2.close()
    await r.close()
    presence = await b2.request("presence.get", users=[alice.id, bob.id])
    by_user = {p["user"]: p for p in presence["presence"]}
    assert by_user[bob.id]["status"] == "online"

    # Alice's connections are all closed again; her last_seen is a real, recent time.
    async def alice_offline() -> bool:
        got = await b2.request("presence.get", users=[alice.id])
        by_user[alice.id] = got["presence"][0]
        return bool(by_user[alice.id]["status"] == "offline")

    await poll_until(alice_offline)
    assert by_user[alice.id]["status"] == "offline"
    assert by_user[alice.id]["last_seen"] >= started


@pytest.mark.embedded_only("kills and restarts the one server process")
async def test_acknowledged_messages_survive_a_crash(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    server = server_factory(FAST)
    alice: Account = await register_user(server, "crash")
    bob: Account = await register_user(server, "crashb")
    a = await clients.connect(server, "tcp", "msgpack", login_as=alice)
    conv = Client.direct_conv(alice.id, bob.id)
    futs = [
        a.request_nowait("send", conv=conv, cid=f"k-{i}", type="text", body=f"k{i}")
        for i in range(300)
    ]
    acks = await asyncio.gather(*futs)
    server.kill()  # SIGKILL right after the last ack: no chance to flush anything
    await a.wait_closed(5)
    await server.astart()
    reader = await clients.connect(server, "ws", "json", login_as=bob)
    stored = await full_history(reader, conv)
    assert [(m["cid"], m["seq"]) for m in stored] == [(x["cid"], x["seq"]) for x in acks]
    assert [m["seq"] for m in stored] == list(range(1, 301))


@pytest.mark.embedded_only("drains the one server process with SIGTERM and restarts it")
async def test_draining_server_answers_unavailable(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    """While a shutdown waits (up to ``shutdown_grace``) for a client that stopped
    reading, the server is not ready and refuses writes and new connections with
    ``unavailable`` -- and what it refused is not stored."""
    server = server_factory(
        {"shutdown_grace": 2.0, "limits": {"send_queue_bytes": 256 * 1024 * 1024}}
    )
    alice: Account = await register_user(server, "drain")
    bob: Account = await register_user(server, "drainb")
    a = await clients.connect(server, "ws", "json", login_as=alice)
    conv = Client.direct_conv(alice.id, bob.id)
    big = "x" * 16000
    acks = await asyncio.gather(
        *(
            a.request_nowait("send", conv=conv, cid=f"d-{i}", type="text", body=big)
            for i in range(50)
        )
    )
    assert [x["seq"] for x in acks] == list(range(1, 51))

    # A TCP client that asks for ~25 MB of history and never reads any of it.
    _, writer = await asyncio.open_connection(*server.tcp_addr)

    def frame(d: dict[str, Any]) -> bytes:
        payload = json.dumps(d).encode()
        return struct.pack(">I", len(payload)) + payload

    writer.write(frame({"op": "hello", "v": 1}) + frame({"op": "auth", "token": a.token}))
    for i in range(30):
        writer.write(frame({"op": "history", "rid": f"h{i}", "conv": conv, "limit": 50}))
    await writer.drain()

    async with HttpClient(server.http_url, token=a.token) as http:

        async def history_ops() -> float:
            _, _, raw = await http.get("/metrics")
            for line in raw.decode().splitlines():
                if line.startswith('imserver_ops_total{op="history",result="ok"}'):
                    return float(line.split()[-1])
            return 0.0

        async def history_ops_done(n: int) -> bool:
            return await history_ops() == n

        assert await poll_until(lambda: history_ops_done(30), 10)

        stopping = asyncio.create_task(server.astop(signal.SIGTERM))

        async def not_ready() -> bool:
            return (await http.get("/readyz"))[0] == 503

        await poll_until(not_ready)
        status, _, body = await http.get("/readyz")
        assert (status, msgspec.json.decode(body)) == (503, {"status": "unavailable"})
        assert await a.wait_closed(5) == "shutdown"
        # Draining: reads still work, writes and new WebSocket connections do not.
        assert await http.call("ping") == (200, {})
        status, body = await http.call("send", conv=conv, cid="late", type="text", body="late")
        assert (status, body["error"]["code"]) == (503, "unavailable"), body
        try:
            await Client.connect(server.ws_url, timeout=2)
        except ConnectFailed as exc:
            assert exc.status == 503
        else:
            raise AssertionError("a draining server accepted a WebSocket")
        assert not stopping.done()  # still waiting for the stalled reader

        assert await stopping == 0
    writer.close()

    await server.astart()
    b = await clients.connect(server, "tcp", "msgpack", login_as=bob)
    stored = await full_history(b, conv)
    assert [m["cid"] for m in stored] == [f"d-{i}" for i in range(50)]
    a3 = await clients.connect(server, "ws", "msgpack", login_as=alice)
    ack = await a3.send_message(conv, "late", cid="late")  # the refused cid was never used
    assert (ack["seq"], ack["dup"]) == (51, False)
