"""Session-level protocol (docs/protocol.md §1-§3, §8): hello, codecs, bad frames, frame and body
limits, rate limiting, heartbeats and the WebSocket Origin allow-list.

Every error test checks the exact ``code`` (and ``field`` where the server names one),
that the connection still answers a ``ping`` afterwards, and that nothing was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest

import imserver
from imserver.client import (
    Client,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    encode_payload,
)

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory, ServerProcess, Wire

MAX_FRAME = 65536
MAX_BODY = 16384
MAX_META = 8192


def other_codec(codec: str) -> str:
    return "msgpack" if codec == "json" else "json"


def sized_frame(frame: dict[str, Any], codec: str, size: int) -> bytes:
    """``frame`` padded with a ``pad`` field so that it encodes to exactly ``size`` bytes."""
    n = size - len(encode_payload({**frame, "pad": ""}, codec))
    while True:
        payload = encode_payload({**frame, "pad": "x" * n}, codec)
        if len(payload) == size:
            return payload
        n += size - len(payload)  # msgpack string headers grow with the length


def error_of(reply: dict[str, Any]) -> tuple[str, str | None]:
    """(code, field) of a failed reply; fails the test on a successful one."""
    assert reply["op"] == "reply" and reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error["message"], str) and error["message"], reply
    return error["code"], error.get("field")


# --- raw connections: what the server sends, byte for byte ---------------------------


class RawTcp:
    """A TCP connection speaking the length-prefixed framing by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> RawTcp:
        reader, writer = await asyncio.open_connection(*addr)
        return cls(reader, writer)

    async def send(self, payload: bytes) -> None:
        self.writer.write(struct.pack(">I", len(payload)) + payload)
        await self.writer.drain()

    async def recv(self) -> tuple[str, Any]:
        """One server payload: (codec it is in, decoded frame)."""
        async with asyncio.timeout(5):
            (n,) = struct.unpack(">I", await self.reader.readexactly(4))
            payload = await self.reader.readexactly(n)
        if payload[:1] == b"{":
            return "json", msgspec.json.decode(payload)
        return "msgpack", msgspec.msgpack.decode(payload)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class RawWs:
    """A WebSocket through plain aiohttp: the frame type of every server frame is visible."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> RawWs:
        session = aiohttp.ClientSession()
        return cls(session, await session.ws_connect(url))

    async def send(self, payload: bytes, codec: str) -> None:
        if codec == "json":
            await self.ws.send_str(payload.decode())
        else:
            await self.ws.send_bytes(payload)

    async def recv(self) -> tuple[str, Any]:
        msg = await self.ws.receive(timeout=5)
        if msg.type is aiohttp.WSMsgType.TEXT:
            return "json", msgspec.json.decode(msg.data)
        assert msg.type is aiohttp.WSMsgType.BINARY, msg
        return "msgpack", msgspec.msgpack.decode(msg.data)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


# --- hello ---------------------------------------------------------------------------


async def test_hello_reply_fields(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.connect(shared_server, hello=False)
    reply = await c.roundtrip(
        {"op": "hello", "rid": "h-1", "v": 1, "client": "e2e-tests", "device": "dev-1"}
    )
    assert reply["op"] == "reply" and reply["rid"] == "h-1" and reply["ok"] is True, reply
    data = reply["data"]
    assert data["v"] == 1
    assert data["server"] == {"name": "imserver", "version": imserver.__version__}
    assert isinstance(data["session"], str) and data["session"]
    assert data["heartbeat"] == 30
    assert data["limits"] == {
        "max_frame": MAX_FRAME,
        "max_body": MAX_BODY,
        "max_meta": MAX_META,
        "rate": {"per_s": 50, "burst": 200},
    }
    # Every connection is its own session.
    other = await clients.connect(shared_server, "tcp", "json")
    assert other.session_id is not None and other.session_id != data["session"]
    assert await c.ping() == {}


async def test_unsupported_version_names_the_supported_ones(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.connect(shared_server, hello=False)
    for v in (2, 0, 99):
        code, _ = error_of(await c.roundtrip({"op": "hello", "v": v}))
        assert code == "unsupported_version"
    reply = await c.roundtrip({"op": "hello", "v": 2})
    message = reply["error"]["message"]
    assert re.search(r"\b1\b", message), f"the supported version 1 is not named: {message!r}"
    # A hello without a usable version is a malformed frame, not a version question.
    assert error_of(await c.roundtrip({"op": "hello"})) == ("bad_request", "v")
    assert error_of(await c.roundtrip({"op": "hello", "v": "1"})) == ("bad_request", "v")
    # The connection is still open and still waiting for its hello.
    assert error_of(await c.roundtrip({"op": "ping"})) == ("hello_required", None)
    data = await c.hello()
    assert data["v"] == 1
    assert await c.ping() == {}


async def test_hello_required_first(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.connect(shared_server, hello=False)
    reply = await c.roundtrip({"op": "ping", "rid": "p-1"})
    assert reply["rid"] == "p-1"
    assert error_of(reply) == ("hello_required", None)
    # Fire-and-forget ops get no reply unless they fail: this one fails.
    await c.send_frame({"op": "ping"})
    ev = await c.next_event("reply")
    assert "rid" not in ev and error_of(ev) == ("hello_required", None)
    # Nothing before hello is executed: this registration does not happen.
    username = f"nohello_{uuid.uuid4().hex[:12]}"
    reply = await c.roundtrip({"op": "register", "username": username, "password": "x" * 12})
    assert error_of(reply) == ("hello_required", None)
    reply = await c.roundtrip({"op": "login", "username": username, "password": "x" * 12})
    assert error_of(reply) == ("hello_required", None)
    # hello afterwards works, and so does everything else.
    assert (await c.hello())["v"] == 1
    assert await c.ping() == {}
    user = await c.register(username, "x" * 12)  # not taken: the first attempt stored nothing
    assert user["username"] == username


async def test_ops_without_rid_get_no_reply_unless_they_fail(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.user(shared_server, "nofire")
    peer = await clients.user(shared_server, "peer", transport="ws", codec="json")
    conv = Client.direct_conv(c.user_id, peer.user_id)
    await c.send_frame({"op": "ping"})
    await c.send_frame({"op": "send", "conv": conv, "cid": "ff-1", "type": "text", "body": "ff"})
    assert (await peer.next_event("msg"))["cid"] == "ff-1"  # it was stored and delivered
    await c.send_frame({"op": "user.get", "user": "u-no-such-user"})
    ev = await c.next_event("reply")
    assert "rid" not in ev and error_of(ev) == ("not_found", "user")
    assert await c.ping() == {}
    assert c.events_nowait("reply") == []  # neither the ping nor the send was answered
    assert [m["cid"] for m in (await c.history(conv))["messages"]] == ["ff-1"]


async def test_hello_codec_fixes_the_server_codec(shared_server: ServerProcess, wire: Wire) -> None:
    """The codec of ``hello`` is the codec of every server frame, whatever the client
    sends later; before ``hello`` an error answers in the codec of the failing frame."""
    hello_codec, other = wire.codec, other_codec(wire.codec)
    raw: RawTcp | RawWs
    if wire.transport == "tcp":
        raw = await RawTcp.open(shared_server.tcp_addr)

        async def send(frame: dict[str, Any] | bytes, codec: str) -> None:
            await raw.send(frame if isinstance(frame, bytes) else encode_payload(frame, codec))
    else:
        raw = await RawWs.open(shared_server.ws_url)

        async def send(frame: dict[str, Any] | bytes, codec: str) -> None:
            payload = frame if isinstance(frame, bytes) else encode_payload(frame, codec)
            await raw.send(payload, codec)

    try:
        await send({"op": "ping", "rid": "early"}, other)
        codec, reply = await raw.recv()
        assert codec == other
        assert reply["rid"] == "early" and error_of(reply) == ("hello_required", None)

        await send({"op": "hello", "rid": "h", "v": 1}, hello_codec)
        codec, reply = await raw.recv()
        assert codec == hello_codec
        assert reply["rid"] == "h" and reply["ok"] is True and reply["data"]["v"] == 1

        await send({"op": "ping", "rid": "p"}, other)
        codec, reply = await raw.recv()
        assert codec == hello_codec
        assert reply == {"op": "reply", "rid": "p", "ok": True, "data": {}}

        await send({"op": "no.such.op", "rid": "u"}, other)
        codec, reply = await raw.recv()
        assert codec == hello_codec
        assert reply["rid"] == "u" and error_of(reply) == ("bad_request", "op")

        garbage = b"{not json" if other == "json" else b"\xc1\xc1\xc1"
        await send(garbage, other)
        codec, reply = await raw.recv()
        assert codec == hello_codec
        assert "rid" not in reply and error_of(reply) == ("bad_request", None)

        await send({"op": "ping", "rid": "p2"}, hello_codec)
        codec, reply = await raw.recv()
        assert (codec, reply["rid"], reply["ok"]) == (hello_codec, "p2", True)
    finally:
        await raw.close()


# --- bad frames -------------------------------------------------------------------------


def bad_frames(codec: str, conv: str) -> list[tuple[str, bytes, str | None, str | None]]:
    """(case, payload, rid expected in the reply, field expected) for ``codec``."""

    def enc(value: Any) -> bytes:
        return encode_payload(value, codec)

    send = {"op": "send", "conv": conv, "type": "text", "body": "never stored"}
    no_conv = {"op": "send", "cid": "c-miss", "type": "text", "body": "never stored"}
    truncated = enc({"op": "ping", "rid": "t-trunc"})[:-3]
    garbage = b"{garbage" if codec == "json" else b"\xc1\x00\xc1"
    return [
        ("truncated", truncated, None, None),
        ("garbage", garbage, None, None),
        ("list, not a map", enc(["ping", {"rid": "t-list"}]), None, None),
        ("string, not a map", enc("ping"), None, None),
        ("unknown op", enc({"op": "no.such.op", "rid": "t-op"}), "t-op", "op"),
        ("missing op", enc({"rid": "t-noop"}), "t-noop", "op"),
        ("op not a string", enc({"op": 7, "rid": "t-op7"}), "t-op7", "op"),
        ("missing conv", enc({**no_conv, "rid": "t-miss"}), "t-miss", "conv"),
        ("missing cid", enc({**send, "rid": "t-cid"}), "t-cid", "cid"),
        (
            "wrong type",
            enc({**send, "rid": "t-type", "cid": "c-type", "body": 5}),
            "t-type",
            "body",
        ),
        (
            "null conv",
            enc({**send, "rid": "t-null", "cid": "c-null", "conv": None}),
            "t-null",
            "conv",
        ),
        (
            "bad enum",
            enc({**send, "rid": "t-enum", "cid": "c-enum", "type": "video"}),
            "t-enum",
            "type",
        ),
        (
            "seq < 1",
            enc({**send, "rid": "t-seq", "cid": "c-seq", "reply_to": 0}),
            "t-seq",
            "reply_to",
        ),
        ("rid too long", enc({"op": "ping", "rid": "r" * 65}), None, "rid"),
        ("rid not a string", enc({"op": "ping", "rid": 42}), None, "rid"),
    ]


async def test_bad_frames_get_bad_request_and_keep_the_connection(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.user(shared_server, "badframes")
    peer = await clients.user(shared_server, "peer", transport="ws", codec="json")
    conv = Client.direct_conv(c.user_id, peer.user_id)
    for case, payload, rid, field in bad_frames(wire.codec, conv):
        await c.send_raw(payload)
        ev = await c.next_event("reply")
        assert ev.get("rid") == rid, (case, ev)
        assert error_of(ev) == ("bad_request", field), (case, ev)
        assert await c.ping() == {}, case
    # Unknown fields are ignored (docs/protocol.md §8).
    reply = await c.roundtrip({"op": "ping", "rid": "t-new", "future_field": {"x": [1, 2]}})
    assert reply == {"op": "reply", "rid": "t-new", "ok": True, "data": {}}
    # None of the refused sends was stored: the conversation is empty and their cids are new.
    assert await c.history(conv) == {"messages": [], "has_more": False}
    refused = ["c-miss", "c-type", "c-null", "c-enum", "c-seq"]
    for cid in refused:
        ack = await c.send_message(conv, "now valid", cid=cid)
        assert ack["dup"] is False, cid
    assert [m["cid"] for m in (await peer.history(conv))["messages"]] == refused
    assert not c.closed and peer.events_nowait("closed") == []


async def test_too_many_consecutive_bad_frames_close_the_connection(
    server_factory: ServerFactory, clients: Clients
) -> None:
    server = server_factory({"limits": {"bad_frames": 3}})
    for transport, codec in (
        ("ws", "json"),
        ("ws", "msgpack"),
        ("tcp", "json"),
        ("tcp", "msgpack"),
    ):
        c = await clients.connect(server, transport, codec)
        garbage = b"{garbage" if codec == "json" else b"\xc1"
        # Two bad frames, then a good one: the count starts again.
        for _ in range(2):
            await c.send_raw(garbage)
            assert error_of(await c.next_event("reply")) == ("bad_request", None)
        assert await c.ping() == {}
        for _ in range(2):
            await c.send_raw(garbage)
            assert error_of(await c.next_event("reply")) == ("bad_request", None)
        assert await c.ping() == {}, f"{transport}/{codec}: closed before the threshold"
        # Three in a row: the third is answered, then `closed`, then the end.
        for _ in range(3):
            await c.send_raw(garbage)
        assert await c.wait_closed(5) == "bad_frames", f"{transport}/{codec}"
        events = c.events_nowait()
        assert [e["op"] for e in events] == ["reply", "reply", "reply", "closed"], events
        assert all(error_of(e) == ("bad_request", None) for e in events[:3])
        assert events[3] == {"op": "closed", "reason": "bad_frames"}
        with pytest.raises(ConnectionClosed):
            await c.ping()


# --- frame and body limits -----------------------------------------------------------


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_websocket_frame_over_max_frame_is_too_large(
    shared_server: ServerProcess, clients: Clients, codec: str
) -> None:
    c = await clients.connect(shared_server, "ws", codec)
    # Exactly max_frame is accepted.
    await c.send_raw(sized_frame({"op": "ping", "rid": "at-limit"}, codec, MAX_FRAME))
    ev = await c.next_event("reply")
    assert ev == {"op": "reply", "rid": "at-limit", "ok": True, "data": {}}
    # One byte more is refused, and the connection stays open.
    await c.send_raw(sized_frame({"op": "ping", "rid": "over"}, codec, MAX_FRAME + 1))
    ev = await c.next_event("reply")
    assert error_of(ev) == ("too_large", None)
    assert ev.get("rid") in (None, "over")  # the server may or may not read an oversized frame
    assert await c.ping() == {}
    await c.send_raw(sized_frame({"op": "ping", "rid": "over2"}, codec, 4 * MAX_FRAME))
    assert error_of(await c.next_event("reply")) == ("too_large", None)
    assert await c.ping() == {}
    assert not c.closed


async def test_websocket_frame_over_the_hard_cap_closes_with_1009(
    shared_server: ServerProcess, clients: Clients
) -> None:
    """docs/protocol.md §1: WebSocket messages over max_frame are answered too_large
    with the connection kept open up to 16 x max_frame; past that hard cap, which bounds
    what a client can make the server buffer, the server closes the WebSocket with
    close code 1009 (message too big). Other connections are unaffected."""
    bystander = await clients.connect(shared_server, "ws", "json")
    c = await clients.connect(shared_server, "ws", "msgpack")
    await c.send_raw(sized_frame({"op": "ping", "rid": "huge"}, "msgpack", 17 * MAX_FRAME))
    await c.wait_closed(5)
    assert c.close_code == 1009
    with pytest.raises(ConnectionClosed):
        await c.ping()
    assert await bystander.ping() == {}


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_tcp_length_over_max_frame_closes_only_that_connection(
    shared_server: ServerProcess, clients: Clients, register_user: Any, codec: str
) -> None:
    account = await register_user(shared_server, "tcpbig")
    victim = await clients.connect(shared_server, "tcp", codec, login_as=account)
    same_login = await clients.connect(shared_server, "tcp", codec)
    await same_login.auth(victim.token)
    other_login = await clients.connect(shared_server, "ws", "json", login_as=account)
    peer = await clients.user(shared_server, "peer", transport="tcp", codec="msgpack")
    conv = Client.direct_conv(account.id, peer.user_id)

    # A frame of exactly max_frame is fine.
    await victim.send_raw(sized_frame({"op": "ping", "rid": "at-limit"}, codec, MAX_FRAME))
    assert (await victim.next_event("reply"))["rid"] == "at-limit"
    # A declared length one byte over the limit: too_large, then the connection closes.
    await victim.send_raw_bytes(struct.pack(">I", MAX_FRAME + 1) + b"{")
    assert await victim.wait_closed(5) == "frame_too_large"
    events = victim.events_nowait()
    assert [e["op"] for e in events] == ["reply", "closed"], events
    assert error_of(events[0]) == ("too_large", None)
    with pytest.raises(ConnectionClosed):
        await victim.ping()

    # The user's other connections, of the same login session or not, are unaffected.
    for c in (same_login, other_login):
        assert await c.ping() == {}
        assert c.events_nowait("closed") == []
    ack = await same_login.send_message(conv, "still here")
    assert ack["seq"] == 1
    assert (await other_login.next_event("msg"))["body"] == "still here"
    assert (await peer.next_event("msg"))["body"] == "still here"


async def test_tcp_close_with_unread_input_ends_in_fin_not_reset(
    shared_server: ServerProcess,
) -> None:
    """A connection the server closes while the client's bytes are still arriving gets
    the server's last frames and then a clean end of stream. Closing a socket with
    unread input makes the kernel answer with a reset, which can destroy ``closed``
    before the client reads it; the server half-closes and drains instead."""
    raw = await RawTcp.open(shared_server.tcp_addr)
    await raw.send(b'{"op":"hello","rid":"h","v":1}')
    assert (await raw.recv())[1]["ok"] is True
    # An over-long header ends the connection; 4 MiB behind it stay unread by the server.
    raw.writer.write(struct.pack(">I", MAX_FRAME + 1) + b"x" * (4 << 20))
    raw.writer.write_eof()
    assert error_of((await raw.recv())[1]) == ("too_large", None)
    assert (await raw.recv())[1] == {"op": "closed", "reason": "frame_too_large"}
    async with asyncio.timeout(5):
        assert await raw.reader.read() == b""  # FIN; a reset raises ConnectionResetError
    await raw.close()


async def test_message_body_over_max_body_is_too_large(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.user(shared_server, "bigbody")
    peer = await clients.user(shared_server, "peer", transport="ws", codec="json")
    conv = Client.direct_conv(c.user_id, peer.user_id)
    # max_body counts characters, not bytes: 16384 two-byte characters are accepted.
    at_limit = "é" * MAX_BODY
    ack = await c.send_message(conv, at_limit, cid="at-limit")
    assert (ack["seq"], ack["dup"]) == (1, False)
    with pytest.raises(ClientError) as info:
        await c.send_message(conv, "é" * (MAX_BODY + 1), cid="over")
    assert (info.value.code, info.value.field) == ("too_large", "body")
    assert await c.ping() == {}
    page = await peer.history(conv)
    assert [(m["seq"], m["cid"], len(m["body"])) for m in page["messages"]] == [
        (1, "at-limit", MAX_BODY)
    ]
    # The refused cid was not used up.
    ack = await c.send_message(conv, "short", cid="over")
    assert (ack["seq"], ack["dup"]) == (2, False)


# --- rate limiting ---------------------------------------------------------------------


async def test_rate_limit_refuses_past_the_burst_and_stores_nothing(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    """Tokens come back at 0.01 per second, so none does while the test runs however
    slow the machine is, and every count below is exact. (The refill itself is tested
    on a controlled clock in tests/unit/test_ratelimit.py, and test_delivery.py waits
    out a ``retry_after`` at the default rate.)"""
    per_s, burst = 0.01, 10
    server = server_factory({"limits": {"rate_per_s": per_s, "rate_burst": burst}})
    account = await register_user(server, "rl")
    watcher = await clients.connect(server, "ws", "json", login_as=account)
    assert watcher.hello_data is not None
    assert watcher.hello_data["limits"]["rate"] == {"per_s": per_s, "burst": burst}
    peer = await register_user(server, "rlpeer")
    conv = Client.direct_conv(account.id, peer.id)
    seq = 0
    for transport, codec in (("ws", "json"), ("tcp", "msgpack")):
        # A fresh connection has a full bucket: hello and auth take tokens 1 and 2.
        c = await clients.connect(server, transport, codec)
        await c.auth(watcher.token)
        # Frames that do not decode take none, nor do WebSocket messages over max_frame.
        await bad_frames_answered(c)
        cids = [f"{transport}-{i}" for i in range(12)]
        futs = [
            c.request_nowait("send", conv=conv, cid=cid, type="text", body=cid, rid=cid)
            for cid in cids
        ]
        results = await asyncio.gather(*futs, return_exceptions=True)
        # Ops 3..10 pass, the 11th and later are refused.
        accepted = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(accepted) + len(refused) == len(results), results
        assert [r["cid"] for r in accepted] == cids[:8], results
        assert [r["seq"] for r in accepted] == list(range(seq + 1, seq + 9))
        seq += 8
        waits = []
        for err in refused:
            assert err.code == "rate_limited"
            assert err.retry_after is not None and 0 < err.retry_after <= 1 / per_s
            assert err.retry_after == round(err.retry_after, 3), "rounded to milliseconds"
            waits.append(err.retry_after)
        assert waits == sorted(waits, reverse=True), "the wait shrinks as time passes"
        assert [err.rid for err in refused] == cids[8:]
        # An empty bucket refuses every op, but a frame that does not decode is still
        # answered bad_request: it never reaches the bucket.
        await refused_op(c, {"op": "ping"}, "rate_limited")
        await bad_frames_answered(c)
        # Other connections have their own bucket; the refused sends were not stored.
        page = await watcher.history(conv)
        assert [m["cid"] for m in page["messages"][-8:]] == cids[:8]
        assert page["messages"][-1]["seq"] == seq
        # The refused cid was not used up: sent again from the watcher, it is new.
        ack = await watcher.send_message(conv, "later", cid=cids[8])
        seq += 1
        assert (ack["seq"], ack["dup"]) == (seq, False)


async def refused_op(c: Client, frame: dict[str, Any], code: str) -> None:
    reply = await c.roundtrip(frame)
    assert error_of(reply)[0] == code, reply


async def bad_frames_answered(c: Client) -> None:
    """Frames the server cannot turn into an op, each answered ``bad_request`` (and, on
    WebSocket, a message over ``max_frame`` answered ``too_large``)."""
    await refused_op(c, {"op": "no.such.op"}, "bad_request")
    await refused_op(c, {"op": "send", "conv": 5}, "bad_request")
    await c.send_raw(b"{not json", text=c.codec == "json")
    assert error_of(await c.next_event("reply"))[0] == "bad_request"
    if c.transport_name == "ws":
        await c.send_raw(b"x" * (MAX_FRAME + 1))
        assert error_of(await c.next_event("reply"))[0] == "too_large"


# --- heartbeat ---------------------------------------------------------------------------


async def test_silent_connections_are_closed_after_twice_the_heartbeat(
    server_factory: ServerFactory, clients: Clients
) -> None:
    """A connection that sends no frame for 2 x heartbeat is closed, one that keeps
    sending ops stays. WebSocket pings and a TCP frame that never completes are not
    frames: they keep nothing open.

    No window on when the close comes: the kept connections are opened first, so the
    check that closed the silent ones would have closed them too had their pings not
    counted; they are checked after it, by a round trip.
    """
    server = server_factory({"limits": {"heartbeat": 1}})
    kept_ws = await clients.connect(server, "ws", "msgpack")  # pings after 0.5 s idle
    kept_tcp = await clients.connect(server, "tcp", "json")
    started = time.monotonic()
    silent_ws = await clients.connect(server, "ws", "json", keepalive=False)
    silent_tcp = await clients.connect(server, "tcp", "msgpack", keepalive=False)
    pinging_ws = await clients.connect(server, "ws", "json", keepalive=False)
    trickling_tcp = await clients.connect(server, "tcp", "json", keepalive=False)
    assert silent_ws.hello_data is not None and silent_ws.hello_data["heartbeat"] == 1

    async def feed(c: Client, step: Callable[[], Awaitable[object]]) -> None:
        # Something every 0.2 s, well within the heartbeat, until the server closes.
        with contextlib.suppress(ConnectionClosed, ConnectionError, aiohttp.ClientError):
            while not c.closed:
                await step()
                await asyncio.sleep(0.2)

    aiohttp_ws = pinging_ws.transport.ws  # the client's aiohttp WebSocket: control frames
    await trickling_tcp.send_raw_bytes(struct.pack("!I", MAX_FRAME - 1))  # then a byte a time
    feeders = [
        asyncio.create_task(feed(pinging_ws, aiohttp_ws.ping)),
        asyncio.create_task(feed(trickling_tcp, lambda: trickling_tcp.send_raw_bytes(b" "))),
    ]
    for c in (silent_ws, silent_tcp, pinging_ws, trickling_tcp):
        assert await c.wait_closed(30) == "heartbeat_timeout"
        assert await c.next_event("closed") == {"op": "closed", "reason": "heartbeat_timeout"}
    # The server counts from each hello, which came after `started`.
    assert time.monotonic() - started >= 2
    await asyncio.gather(*feeders)
    for c in (kept_ws, kept_tcp):
        assert await c.events_before_ping("closed") == []


# --- WebSocket Origin allow-list -------------------------------------------------------


async def test_websocket_origin_allow_list(server_factory: ServerFactory, clients: Clients) -> None:
    server = server_factory({"ws": {"allowed_origins": ["https://good.example"]}})
    good = await clients.connect(server, "ws", "json", origin="https://good.example")
    username = f"origin_{uuid.uuid4().hex[:12]}"
    await good.register(username, "correct-horse-battery")
    login = await good.login(username, "correct-horse-battery")
    assert await good.convs() == []
    for origin in ("https://evil.example", "https://good.example.evil.example", "null", None):
        with pytest.raises(ConnectFailed) as info:
            await clients.connect(server, "ws", "json", origin=origin)
        assert info.value.status == 403, origin
        status, content_type, body = await raw_upgrade(server, origin)
        assert (status, content_type) == (403, "application/json"), origin
        assert msgspec.json.decode(body) == {
            "error": {"code": "forbidden", "message": "origin not allowed"}
        }, origin
    status, _, _ = await raw_upgrade(server, "https://good.example")
    assert status == 101
    # The refusals did not disturb the allowed connection; TCP has no Origin to check.
    assert await good.ping() == {}
    tcp = await clients.connect(server, "tcp", "msgpack")
    assert (await tcp.auth(login["token"]))["user"]["username"] == username


async def raw_upgrade(server: ServerProcess, origin: str | None) -> tuple[int, str, bytes]:
    """A WebSocket upgrade request with ``Origin: origin`` (none if None), on a socket:
    the answer's status, ``Content-Type`` (no parameters) and body (none after a 101)."""
    reader, writer = await asyncio.open_connection(server.host, server.http_port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
            + (f"Origin: {origin}\r\n".encode() if origin is not None else b"")
            + b"\r\n"
        )
        async with asyncio.timeout(5):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            status_line, *lines = head.split("\r\n")
            status = int(status_line.split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
            if status == 101:
                return status, "", b""
            body = await reader.readexactly(int(headers["content-length"]))
        return status, headers["content-type"].split(";")[0], body
    finally:
        writer.close()
