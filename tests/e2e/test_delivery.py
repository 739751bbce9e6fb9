"""End-to-end tests of delivery (docs/protocol.md §4.11, guarantees 3-5): pipelined sends,
gap recovery after being offline, multi-device fan-out, per-conversation order
under concurrent writers, slow consumers, and HTTP sends reaching live sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from metrics import metric, scrape_server

from imserver.client import Client, ClientError, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Account, Clients, ServerProcess, Wire

Frame = dict[str, Any]
LIFTED_RATE = {"rate_per_s": 1_000_000, "rate_burst": 1_000_000}


# --- servers with special configuration, one per module ------------------------------


def _start_server(
    shared_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory, config: Frame
) -> ServerProcess:
    # The harness's ServerProcess class, reached through a fixture value.
    server: ServerProcess = type(shared_server)(
        root=tmp_path_factory.mktemp("delivery"), config=config
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def fast_server(
    shared_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server without a practical rate limit (pipelining, concurrent writers)."""
    server = _start_server(shared_server, tmp_path_factory, {"limits": LIFTED_RATE})
    try:
        yield server
    finally:
        server.close()


SEND_QUEUE = 65536


@pytest.fixture(scope="module")
def small_queue_server(
    shared_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Lifted rate limits and a small outbound queue: slow consumers are cut early."""
    config = {"limits": {**LIFTED_RATE, "send_queue_bytes": SEND_QUEUE}, "shutdown_grace": 2}
    server = _start_server(shared_server, tmp_path_factory, config)
    try:
        yield server
    finally:
        server.close()


# --- helpers --------------------------------------------------------------------------


def dm(a: Client, b: Client) -> str:
    return Client.direct_conv(a.user_id, b.user_id)


async def collect_msgs(c: Client, conv: str, n: int) -> list[Frame]:
    """The next ``n`` msg events of ``conv``, in arrival order (10 s for all of them)."""
    out: list[Frame] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            out.append(
                await c.next_event("msg", match=lambda e: e.get("conv") == conv, timeout=None)
            )
    return out


async def read_all_history(c: Client, conv: str, *, after: int = 0, limit: int) -> list[Frame]:
    """Page through ``history {after}`` until ``has_more`` is false."""
    messages: list[Frame] = []
    while True:
        page = await c.history(conv, after=after, limit=limit)
        got = page["messages"]
        assert len(got) <= limit
        if page["has_more"]:
            assert len(got) == limit, "a page with has_more must be full"
        messages.extend(got)
        if not page["has_more"]:
            return messages
        after = got[-1]["seq"]


async def no_msg_before_sentinel(c: Client, conv: str, sentinel_cid: str) -> None:
    """The next msg of ``conv`` that ``c`` sees is the sentinel: nothing came before it."""
    ev = await c.next_event("msg", match=lambda e: e.get("conv") == conv)
    assert ev["cid"] == sentinel_cid, f"unexpected msg before the sentinel: {ev}"


# --- pipelining -----------------------------------------------------------------------

PIPELINED = 150


async def test_pipelined_sends(fast_server: ServerProcess, clients: Clients, wire: Wire) -> None:
    a = await clients.user(fast_server, "a")
    b = await clients.user(fast_server, "b")
    conv = dm(a, b)
    cids = [f"p-{i:03d}" for i in range(PIPELINED)]
    futs = []
    for i, cid in enumerate(cids):
        futs.append(a.request_nowait("send", conv=conv, cid=cid, type="text", body=f"m{i}"))
        if i % 32 == 31:
            await a.drain()
    acks = await asyncio.wait_for(asyncio.gather(*futs), 30)

    assert [ack["seq"] for ack in acks] == list(range(1, PIPELINED + 1))
    assert [ack["cid"] for ack in acks] == cids
    assert all(ack["dup"] is False and ack["conv"] == conv for ack in acks)
    ts = [ack["ts"] for ack in acks]
    assert ts == sorted(ts)

    events = await collect_msgs(b, conv, PIPELINED)
    assert [e["seq"] for e in events] == list(range(1, PIPELINED + 1))
    assert [e["cid"] for e in events] == cids
    assert [e["ts"] for e in events] == ts
    assert await b.events_before_ping("msg") == []

    history = await read_all_history(b, conv, limit=200)
    assert [(m["seq"], m["cid"], m["body"]) for m in history] == [
        (i + 1, cid, f"m{i}") for i, cid in enumerate(cids)
    ]
    latest = await b.history(conv)  # the default limit is 50
    assert [m["seq"] for m in latest["messages"]] == list(range(PIPELINED - 49, PIPELINED + 1))
    assert latest["has_more"] is True

    # Pipelined duplicates answer the original seqs, in order, and store nothing.
    dups = [
        a.request_nowait("send", conv=conv, cid=cid, type="text", body="again") for cid in cids[:20]
    ]
    again = await asyncio.wait_for(asyncio.gather(*dups), 10)
    assert again == [{**ack, "dup": True} for ack in acks[:20]]
    sentinel = await a.send_message(conv, "sentinel", cid="sentinel")
    assert sentinel["seq"] == PIPELINED + 1
    await no_msg_before_sentinel(b, conv, "sentinel")
    assert a.events_nowait("msg") == []


async def test_sends_past_the_rate_limit_store_nothing(
    shared_server: ServerProcess, clients: Clients
) -> None:
    """With the default limits (50/s, bursts of 200) a pipeline of burst + 60 sends is
    partly refused with ``rate_limited``; the refused ones leave no message, seq or cid."""
    a = await clients.user(shared_server, "a", transport="tcp", codec="msgpack")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    assert a.hello_data is not None
    burst = a.hello_data["limits"]["rate"]["burst"]
    cids = [f"rl-{i:04d}" for i in range(burst + 60)]
    futs = [a.request_nowait("send", conv=conv, cid=cid, type="text", body=cid) for cid in cids]
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    acked = [(cid, r) for cid, r in zip(cids, results, strict=True) if isinstance(r, dict)]
    refused = [(cid, r) for cid, r in zip(cids, results, strict=True) if not isinstance(r, dict)]
    assert refused, f"{len(cids)} sends at once should exceed a burst of {burst}"
    for _, err in refused:
        assert isinstance(err, ClientError) and err.code == "rate_limited", err
        assert err.retry_after is not None and err.retry_after > 0
    # What was acknowledged is stored, gap-free, in order; nothing else is.
    assert [r["seq"] for _, r in acked] == list(range(1, len(acked) + 1))
    stored = await read_all_history(b, conv, limit=200)
    assert [m["cid"] for m in stored] == [cid for cid, _ in acked]
    events = await collect_msgs(b, conv, len(acked))
    assert [e["cid"] for e in events] == [cid for cid, _ in acked]

    # A refused cid was not consumed: retried after retry_after, it is a new message.
    err = refused[0][1]
    assert isinstance(err, ClientError) and err.retry_after is not None
    await asyncio.sleep(err.retry_after)  # the wait the protocol asks for
    retry = await a.send_message(conv, "retried", cid=refused[0][0])
    assert (retry["seq"], retry["dup"]) == (len(acked) + 1, False)


# --- offline recovery -----------------------------------------------------------------

OFFLINE = 23


async def test_offline_recovery(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    a = await clients.user(shared_server, "a")
    b_account: Account = await register_user(shared_server, "b")
    conv = Client.direct_conv(a.user_id, b_account.id)
    sent = [await a.send_message(conv, f"offline {i}") for i in range(OFFLINE)]
    assert [s["seq"] for s in sent] == list(range(1, OFFLINE + 1))

    b = await clients.connect(shared_server, login_as=b_account)
    convs = await b.convs()
    assert [e["conv"] for e in convs] == [conv]
    entry = convs[0]
    assert (entry["kind"], entry["last_seq"], entry["read_seq"], entry["recv_seq"]) == (
        "direct",
        OFFLINE,
        0,
        0,
    )
    assert (entry["unread"], entry["mentions"]) == (OFFLINE, 0)
    assert a.user is not None and entry["title"] == a.user["display_name"]
    assert entry["last"]["seq"] == OFFLINE and entry["last"]["body"] == f"offline {OFFLINE - 1}"

    history = await read_all_history(b, conv, after=0, limit=10)
    assert [m["seq"] for m in history] == list(range(1, OFFLINE + 1))
    assert [m["cid"] for m in history] == [s["cid"] for s in sent]
    assert await b.events_before_ping("msg") == []  # nothing sent while offline is pushed


async def test_gap_recovery_after_a_disconnect(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    a = await clients.user(shared_server, "a")
    b_account: Account = await register_user(shared_server, "b")
    conv = Client.direct_conv(a.user_id, b_account.id)
    b = await clients.connect(shared_server, "tcp", "msgpack", login_as=b_account)
    for i in range(5):
        await a.send_message(conv, f"m{i}")
    seen = {(e["conv"], e["seq"]) for e in await collect_msgs(b, conv, 5)}
    await b.request("recv", conv=conv, seq=5)
    await b.close()

    for i in range(5, 17):
        await a.send_message(conv, f"m{i}")

    b = await clients.connect(shared_server, "ws", "json", login_as=b_account)
    entry = next(e for e in await b.convs() if e["conv"] == conv)
    assert (entry["last_seq"], entry["recv_seq"], entry["read_seq"], entry["unread"]) == (
        17,
        5,
        0,
        17,
    )
    missed = await read_all_history(b, conv, after=entry["recv_seq"], limit=5)
    assert [m["seq"] for m in missed] == list(range(6, 18))
    # De-duplicating by (conv, seq) shows every message exactly once.
    seen |= {(m["conv"], m["seq"]) for m in missed}
    assert sorted(s for _, s in seen) == list(range(1, 18))


# --- multi-device fan-out -------------------------------------------------------------


async def test_multi_device_fan_out(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    a_account: Account = await register_user(shared_server, "a")
    b_account: Account = await register_user(shared_server, "b")
    a1 = await clients.connect(shared_server, login_as=a_account)  # the test's wire
    a2 = await clients.connect(shared_server, "tcp", "msgpack")  # another login (device)
    await a2.login(a_account.username, a_account.password, device="phone")
    a3 = await clients.connect(shared_server, "ws", "json")  # a second connection, same token
    await a3.auth(a1.token)
    b1 = await clients.connect(shared_server, "ws", "msgpack", login_as=b_account)
    b2 = await clients.connect(shared_server, "tcp", "json", login_as=b_account)
    conv = Client.direct_conv(a_account.id, b_account.id)

    ack = await a1.send_message(conv, "to every device", cid="from-a1")
    expected = {
        "op": "msg",
        "conv": conv,
        "seq": 1,
        "from": a_account.id,
        "ts": ack["ts"],
        "type": "text",
        "body": "to every device",
        "cid": "from-a1",
    }
    for c in (b1, b2, a2, a3):
        assert await c.next_event("msg") == expected

    # Another device of A writes: a1 gets it this time, a2 does not.
    ack2 = await a2.send_message(conv, "from the phone", cid="from-a2")
    assert ack2["seq"] == 2
    for c in (a1, a3, b1, b2):
        ev = await c.next_event("msg")
        assert (ev["seq"], ev["cid"], ev["from"]) == (2, "from-a2", a_account.id)

    # B writes: every session of A and B's other session get it; nothing else is queued.
    await b2.send_message(conv, "sentinel", cid="sentinel")
    for c in (a1, a2, a3, b1):
        await no_msg_before_sentinel(c, conv, "sentinel")
    assert b2.events_nowait("msg") == []


# --- per-conversation order under concurrent writers ----------------------------------

CONCURRENT = 80


async def test_concurrent_senders_keep_per_session_order(
    fast_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    a1 = await clients.user(fast_server, "a")
    b1 = await clients.user(fast_server, "b")
    a2 = await clients.connect(fast_server, "tcp", "msgpack")
    await a2.auth(a1.token)
    b2 = await clients.connect(fast_server, "ws", "json")
    await b2.auth(b1.token)
    conv = dm(a1, b1)

    async def burst(c: Client, tag: str) -> list[Frame]:
        futs = []
        for i in range(CONCURRENT):
            futs.append(
                c.request_nowait("send", conv=conv, cid=f"{tag}-{i:03d}", type="text", body=tag)
            )
            if i % 16 == 15:
                await c.drain()
        return list(await asyncio.gather(*futs))

    acks_a, acks_b = await asyncio.wait_for(asyncio.gather(burst(a1, "a"), burst(b1, "b")), 30)
    # Each sender's acks follow its own order; together they use every seq once.
    for acks in (acks_a, acks_b):
        seqs = [x["seq"] for x in acks]
        assert seqs == sorted(seqs) and len(set(seqs)) == CONCURRENT
    all_seqs = sorted(x["seq"] for x in acks_a + acks_b)
    assert all_seqs == list(range(1, 2 * CONCURRENT + 1))
    owner = {x["seq"]: "a" for x in acks_a} | {x["seq"]: "b" for x in acks_b}

    # The observers (second devices) see all of it, ascending and gap-free.
    for c in (a2, b2):
        events = await collect_msgs(c, conv, 2 * CONCURRENT)
        assert [e["seq"] for e in events] == all_seqs
        assert all(e["body"] == owner[e["seq"]] for e in events)
    # Each writer sees the other's messages, strictly ascending.
    for c, other in ((a1, acks_b), (b1, acks_a)):
        events = await collect_msgs(c, conv, CONCURRENT)
        assert [e["seq"] for e in events] == [x["seq"] for x in other]
    history = await read_all_history(a1, conv, limit=200)
    assert [m["seq"] for m in history] == all_seqs


# --- slow consumer --------------------------------------------------------------------

BIG_BODY = "€" * 16000  # 16000 characters, 48000 bytes in UTF-8: well inside max_frame
ROUND = 10


def _flood_size() -> int:
    """Enough big messages to overflow the kernel's buffers on both ends (the server's
    send buffer may grow to ``tcp_wmem`` max; an unread receive buffer stays near its
    default) and then the server's 64 KiB queue, with a wide margin."""
    kernel = 4 * 1024 * 1024 + 128 * 1024
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/sys/net/ipv4/tcp_wmem") as wmem,
        open("/proc/sys/net/ipv4/tcp_rmem") as rmem,
    ):
        kernel = int(wmem.read().split()[2]) + int(rmem.read().split()[1])
    rounds = -(-2 * (kernel + 1024 * 1024) // (len(BIG_BODY.encode()) * ROUND))
    return max(200, rounds * ROUND)


FLOOD = _flood_size()


class SlowTcp:
    """A hand-made TCP client whose reading we control: the socket is only read when
    the test says so. (The kernel does not grow the receive buffer of a socket nobody
    reads, so the backlog soon reaches the server.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> SlowTcp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
        return cls(sock)

    async def send(self, frame: Frame) -> None:
        payload = json.dumps(frame).encode()
        await self.loop.sock_sendall(self.sock, struct.pack(">I", len(payload)) + payload)

    async def recv_frame(self) -> Frame | None:
        """The next frame, or None at the end of the stream (EOF or reset)."""
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    payload, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    frame: Frame = json.loads(payload)
                    return frame
            try:
                chunk = await self.loop.sock_recv(self.sock, 1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    async def close(self) -> None:
        self.sock.close()


class SlowWs:
    """An aiohttp WebSocket that the test simply stops reading from (aiohttp then stops
    reading the socket once its own queue is full)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> SlowWs:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, max_msg_size=0)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, frame: Frame) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def recv_frame(self) -> Frame | None:
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            frame: Frame = json.loads(msg.data)
            return frame
        if msg.type is aiohttp.WSMsgType.BINARY:
            frame = msgspec.msgpack.decode(msg.data)
            return frame
        return None  # CLOSE, CLOSING, CLOSED, ERROR: the stream is over

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.session.close()


async def slow_consumers_cut(server: ServerProcess) -> float:
    """``imserver_slow_consumers_total``: sessions closed with ``slow_consumer``."""
    return metric(await scrape_server(server), "imserver_slow_consumers_total")


@contextlib.asynccontextmanager
async def slow_consumer(server: ServerProcess, transport: str) -> AsyncIterator[Any]:
    conn: SlowTcp | SlowWs
    conn = (
        await SlowTcp.open(server.tcp_addr)
        if transport == "tcp"
        else await SlowWs.open(server.ws_url)
    )
    try:
        yield conn
    finally:
        await conn.close()


async def reply_to(conn: SlowTcp | SlowWs, rid: str) -> Frame:
    async with asyncio.timeout(10):
        while True:
            frame = await conn.recv_frame()
            assert frame is not None, "connection ended before the reply"
            if frame.get("op") == "reply" and frame.get("rid") == rid:
                return frame


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_slow_consumer_is_cut_and_recovers(
    small_queue_server: ServerProcess, clients: Clients, register_user: Any, transport: str
) -> None:
    server = small_queue_server
    cut_before = await slow_consumers_cut(server)
    a = await clients.user(server, "a", transport="ws", codec="json")
    b_account: Account = await register_user(server, "b")
    conv = Client.direct_conv(a.user_id, b_account.id)
    async with slow_consumer(server, transport) as slow:
        await slow.send({"op": "hello", "v": 1, "rid": "h"})
        assert (await reply_to(slow, "h"))["ok"] is True
        await slow.send(
            {
                "op": "login",
                "username": b_account.username,
                "password": b_account.password,
                "rid": "l",
            }
        )
        assert (await reply_to(slow, "l"))["ok"] is True
        # From here on B reads nothing while A floods it, a few messages at a time
        # (one group commit's deliveries are flushed to B at once before the check).
        acks: list[Frame] = []
        for start in range(0, FLOOD, ROUND):
            futs = [
                a.request_nowait("send", conv=conv, cid=f"big-{i:03d}", type="text", body=BIG_BODY)
                for i in range(start, start + ROUND)
            ]
            acks += await asyncio.wait_for(asyncio.gather(*futs), 30)
        # A is unaffected: every send acknowledged, in order.
        assert [x["seq"] for x in acks] == list(range(1, FLOOD + 1))
        assert all(x["dup"] is False for x in acks)
        assert await a.ping() == {}

        # B reads what the server still sends: a prefix of the messages, then the end.
        frames: list[Frame] = []
        try:
            async with asyncio.timeout(20):
                while (frame := await slow.recv_frame()) is not None:
                    frames.append(frame)
        except TimeoutError:
            pytest.fail(
                f"the server did not close the slow consumer ({len(frames)} frames read, "
                f"last {frames[-1].get('op') if frames else None})"
            )
    seqs = [f["seq"] for f in frames if f.get("op") == "msg"]
    assert seqs == list(range(1, len(seqs) + 1)), "the delivered part has a gap"
    assert len(seqs) < FLOOD, "the slow consumer got everything: it was not cut"
    closed = [f for f in frames if f.get("op") == "closed"]
    if closed:  # readable only if it arrived before the server's final abort
        assert closed == [{"op": "closed", "reason": "slow_consumer"}]
        assert frames[-1] == closed[0]
    # Counted before the close, so by the time the client saw the end.
    assert await slow_consumers_cut(server) == cut_before + 1

    # Reconnected, B recovers everything through convs + history.
    b = await clients.connect(server, "tcp", "msgpack", login_as=b_account)
    entry = next(e for e in await b.convs() if e["conv"] == conv)
    assert entry["last_seq"] == FLOOD
    # One message per page: with a 64 KiB send queue a bigger reply would itself trip
    # the slow-consumer check (see test_large_history_page_reaches_a_reading_client).
    history = await read_all_history(b, conv, after=0, limit=1)
    assert [m["seq"] for m in history] == list(range(1, FLOOD + 1))
    assert all(m["body"] == BIG_BODY for m in history)
    # A's connection was never disturbed.
    assert not a.closed and a.closed_reason is None


async def test_large_history_page_reaches_a_reading_client(
    small_queue_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    """A client that reads promptly must get any valid ``history`` page.

    200 messages of 16000 three-byte characters make a ~9.6 MB reply, far more than
    this server's ``send_queue_bytes`` (64 KiB) -- but the client is reading as fast
    as it can, asked for nothing the protocol forbids, and "reconnect and recover
    with history" is exactly what a slow consumer is told to do.
    """
    server = small_queue_server
    cut_before = await slow_consumers_cut(server)
    a = await clients.user(server, "a")
    b_account: Account = await register_user(server, "b")
    conv = Client.direct_conv(a.user_id, b_account.id)
    for start in range(0, 200, 20):
        futs = [
            a.request_nowait("send", conv=conv, cid=f"big-{i}", type="text", body=BIG_BODY)
            for i in range(start, start + 20)
        ]
        await asyncio.wait_for(asyncio.gather(*futs), 30)
    b = await clients.connect(server, "tcp", "msgpack", login_as=b_account)
    page = await b.history(conv, after=0, limit=200)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 201))
    assert page["has_more"] is False
    assert await b.ping() == {}
    assert not b.closed
    assert await slow_consumers_cut(server) == cut_before


# --- HTTP send reaches live sessions --------------------------------------------------


async def test_http_send_reaches_websocket_sessions(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a", transport="ws", codec="json")
    b = await clients.user(shared_server, "b", transport="ws", codec="msgpack")
    conv = dm(a, b)
    cid = uuid.uuid4().hex
    async with HttpClient(shared_server.http_url) as http:
        status, body = await http.call(
            "send", token=a.token, conv=conv, cid=cid, type="text", body="over http"
        )
        assert status == 200, body
        assert (body["conv"], body["seq"], body["cid"], body["dup"]) == (conv, 1, cid, False)
        # The HTTP request was the sending "connection": A's WebSocket gets the message too.
        for c in (b, a):
            ev = await c.next_event("msg")
            assert (ev["conv"], ev["seq"], ev["from"], ev["body"], ev["cid"], ev["ts"]) == (
                conv,
                1,
                a.user_id,
                "over http",
                cid,
                body["ts"],
            )
        status, again = await http.call(
            "send", token=a.token, conv=conv, cid=cid, type="text", body="over http"
        )
        assert (status, again) == (200, {**body, "dup": True})

        reversed_conv = "d:" + ":".join(sorted((a.user_id, b.user_id), reverse=True))
        status, err = await http.call(
            "send", token=a.token, conv=reversed_conv, cid=uuid.uuid4().hex, type="text", body="x"
        )
        assert status == 400 and err["error"]["code"] == "bad_request"
        assert err["error"]["field"] == "conv"
        status, err = await http.call(
            "send", conv=conv, cid=uuid.uuid4().hex, type="text", body="no token"
        )
        assert status == 401 and err["error"]["code"] == "unauthorized"
    history = await b.history(conv)
    assert [(m["seq"], m["cid"]) for m in history["messages"]] == [(1, cid)]
