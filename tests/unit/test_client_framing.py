"""The Python client without a server: routing, rids, events, codecs, TCP framing.

A :class:`MemoryTransport` records what the client writes and lets the test play the
server by feeding payloads, so every path of the reply/event dispatch is exercised
in memory, as in the sans-I/O libraries we learn from.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from imserver.client import (
    INVALID_FRAME_OP,
    Client,
    ClientError,
    ClientTransport,
    CodecName,
    ConnectionClosed,
    FrameRouter,
    PayloadSink,
    TcpTransport,
    decode_payload,
    encode_payload,
    tcp_address,
    ws_url,
)
from imserver.protocol.framing import encode_frame


class MemoryTransport(ClientTransport):
    """An in-memory transport: ``sent`` holds what the client wrote."""

    name = "ws"

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.raw: list[bytes] = []
        self.sink: PayloadSink | None = None
        self.closed = False

    def attach(self, sink: PayloadSink) -> None:
        self.sink = sink

    def write(self, payload: bytes, text: bool) -> None:
        self.sent.append((payload, text))

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lose(1000)

    def abort(self) -> None:
        self.lose(1006)

    # the test plays the server

    def frames(self) -> list[dict[str, Any]]:
        return [decode_payload(p, text) for p, text in self.sent]

    def last(self) -> dict[str, Any]:
        payload, text = self.sent[-1]
        frame: dict[str, Any] = decode_payload(payload, text)
        return frame

    def feed(self, frame: dict[str, Any], codec: CodecName = "json") -> None:
        assert self.sink is not None
        self.sink.payload_received(encode_payload(frame, codec), codec == "json")

    def lose(self, code: int | None = None, exc: BaseException | None = None) -> None:
        assert self.sink is not None
        self.sink.transport_lost(code, exc)


async def make(codec: CodecName = "json") -> tuple[Client, MemoryTransport]:
    tr = MemoryTransport()
    return Client(tr, codec=codec), tr


def ok(rid: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"op": "reply", "rid": rid, "ok": True, "data": data if data is not None else {}}


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# --- rids and replies -----------------------------------------------------------------


def test_rids_are_unique_per_router() -> None:
    router = FrameRouter()
    rids = [router.next_rid() for _ in range(1000)]
    assert len(set(rids)) == 1000
    assert all(len(r) <= 64 for r in rids)


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_request_resolves_with_data(codec: CodecName) -> None:
    c, tr = await make(codec)
    task = asyncio.create_task(c.request("send", conv="d:a:b", cid="c1", type="text", body="hi"))
    await settle()
    payload, text = tr.sent[-1]
    assert text is (codec == "json")
    assert (payload[:1] == b"{") is (codec == "json")
    frame = tr.last()
    assert frame["op"] == "send" and frame["body"] == "hi" and isinstance(frame["rid"], str)
    tr.feed(ok(frame["rid"], {"seq": 7}), codec)
    assert await task == {"seq": 7}
    assert c.pending == 0
    assert c.events_nowait() == []


async def test_error_reply_raises_client_error() -> None:
    c, tr = await make()
    task = asyncio.create_task(c.request("history", conv="r:1"))
    await settle()
    rid = tr.last()["rid"]
    tr.feed(
        {
            "op": "reply",
            "rid": rid,
            "ok": False,
            "error": {"code": "rate_limited", "message": "slow down", "retry_after": 1.5},
        }
    )
    with pytest.raises(ClientError) as info:
        await task
    err = info.value
    assert (err.code, err.message, err.retry_after, err.rid) == (
        "rate_limited",
        "slow down",
        1.5,
        rid,
    )


async def test_fields_mapping_allows_any_name() -> None:
    c, tr = await make()
    fut = c.request_nowait("auth", {"token": "t", "timeout": 3})
    assert tr.last() == {"op": "auth", "token": "t", "timeout": 3, "rid": tr.last()["rid"]}
    tr.feed(ok(tr.last()["rid"], {"user": {"id": "u1"}}))
    assert await fut == {"user": {"id": "u1"}}


async def test_pipelined_replies_out_of_order() -> None:
    c, tr = await make()
    futs = [c.request_nowait("ping") for _ in range(50)]
    rids = [f["rid"] for f in tr.frames()]
    assert len(set(rids)) == 50
    for i, rid in reversed(list(enumerate(rids))):
        tr.feed(ok(rid, {"i": i}))
    assert [r["i"] for r in await asyncio.gather(*futs)] == list(range(50))


async def test_request_nowait_error() -> None:
    c, tr = await make()
    fut = c.request_nowait("ping")
    tr.feed({"op": "reply", "rid": tr.last()["rid"], "ok": False, "error": {"code": "internal"}})
    with pytest.raises(ClientError, match="internal"):
        await fut


async def test_roundtrip_returns_error_replies_and_keeps_given_rid() -> None:
    c, tr = await make()
    task = asyncio.create_task(c.roundtrip({"op": "nope", "rid": "mine"}))
    await settle()
    assert tr.last() == {"op": "nope", "rid": "mine"}
    reply = {"op": "reply", "rid": "mine", "ok": False, "error": {"code": "bad_request"}}
    tr.feed(reply)
    assert await task == reply


async def test_timeout_forgets_the_rid_and_late_reply_becomes_event() -> None:
    c, tr = await make()
    with pytest.raises(TimeoutError, match="ping"):
        await c.request("ping", timeout=0.01)
    assert c.pending == 0
    late = ok(tr.last()["rid"])
    tr.feed(late)
    assert await c.next_event("reply", timeout=0) == late


# --- events ---------------------------------------------------------------------------


async def test_unmatched_replies_and_events_are_queued_in_order() -> None:
    c, tr = await make()
    frames: list[dict[str, Any]] = [
        {"op": "msg", "conv": "d:a:b", "seq": 1},
        {"op": "reply", "ok": False, "error": {"code": "bad_request"}},  # no rid
        {"op": "reply", "rid": "unknown", "ok": True, "data": {}},
        {"op": "typing", "conv": "d:a:b", "user": "a"},
    ]
    for f in frames:
        tr.feed(f)
    assert c.events_nowait() == frames
    assert c.events_nowait() == []


async def test_next_event_filters_and_keeps_the_rest() -> None:
    c, tr = await make("msgpack")
    tr.feed({"op": "typing", "n": 1}, "msgpack")
    tr.feed({"op": "msg", "n": 2}, "msgpack")
    tr.feed({"op": "presence", "n": 3}, "msgpack")
    tr.feed({"op": "msg", "n": 4}, "msgpack")
    assert (await c.next_event("msg"))["n"] == 2
    assert (await c.next_event({"presence", "receipt"}))["n"] == 3
    assert (await c.next_event(match=lambda e: e["n"] == 4))["n"] == 4
    assert [e["n"] for e in c.events_nowait()] == [1]


async def test_next_event_waits_and_times_out() -> None:
    c, tr = await make()
    waiter = asyncio.create_task(c.next_event("msg", timeout=2))
    await settle()
    tr.feed({"op": "typing"})
    await settle()
    assert not waiter.done()
    tr.feed({"op": "msg", "seq": 1})
    assert (await waiter)["seq"] == 1
    with pytest.raises(TimeoutError):
        await c.next_event("msg", timeout=0.01)
    assert await c.poll_event("msg", timeout=0.01) is None
    assert (await c.next_event(timeout=0))["op"] == "typing"


async def test_two_waiters_do_not_disturb_each_other() -> None:
    c, tr = await make()
    a = asyncio.create_task(c.next_event("a", timeout=1))
    b = asyncio.create_task(c.next_event("b", timeout=0.01))
    await settle()
    with pytest.raises(TimeoutError):
        await b
    tr.feed({"op": "a"})
    assert (await a)["op"] == "a"


async def test_on_event_callback_bypasses_the_queue() -> None:
    c, tr = await make()
    seen: list[dict[str, Any]] = []
    c.on_event = seen.append
    fut = c.request_nowait("ping")
    tr.feed({"op": "msg"})
    tr.feed(ok(tr.last()["rid"]))
    assert await fut == {}
    assert seen == [{"op": "msg"}]
    assert c.events_nowait() == []


async def test_invalid_payloads_become_events() -> None:
    c, tr = await make()
    assert tr.sink is not None
    tr.sink.payload_received(b"{not json", True)
    tr.sink.payload_received(b"[1, 2]", True)
    tr.sink.payload_received(b"\xc1", False)  # a byte MessagePack never uses
    evs = c.events_nowait()
    assert [e["op"] for e in evs] == [INVALID_FRAME_OP] * 3
    assert evs[0]["payload"] == b"{not json"
    assert evs[1]["frame"] == [1, 2]


# --- closing --------------------------------------------------------------------------


async def test_closed_event_then_loss_fails_pending_and_drains_queue() -> None:
    c, tr = await make()
    fut = c.request_nowait("ping")
    req = asyncio.create_task(c.request("convs"))
    await settle()
    tr.feed({"op": "msg", "seq": 1})
    tr.feed({"op": "closed", "reason": "logout"})
    assert c.closed_reason == "logout" and not c.closed
    tr.lose(1000)
    assert c.closed and c.close_code == 1000
    for pending in (fut, req):
        with pytest.raises(ConnectionClosed) as info:
            await pending
        assert info.value.reason == "logout"
    assert await c.wait_closed(0) == "logout"
    # queued events are still readable, then ConnectionClosed
    assert (await c.next_event("msg"))["seq"] == 1
    assert (await c.next_event("closed"))["reason"] == "logout"
    with pytest.raises(ConnectionClosed):
        await c.next_event()
    with pytest.raises(ConnectionClosed):
        await c.request("ping")
    with pytest.raises(ConnectionClosed):
        await c.send_frame({"op": "ping"})


async def test_loss_wakes_a_waiting_next_event() -> None:
    c, tr = await make()
    waiter = asyncio.create_task(c.next_event("msg", timeout=5))
    await settle()
    tr.lose(None, ConnectionResetError("reset"))
    with pytest.raises(ConnectionClosed, match="reset"):
        await waiter


async def test_poll_event_raises_on_a_lost_connection() -> None:
    """A dead connection is not "no event": a negative check on it must fail."""
    c, tr = await make()
    tr.feed({"op": "typing"})
    waiter = asyncio.create_task(c.poll_event("msg", timeout=5))
    await settle()
    tr.lose(None, ConnectionResetError("reset"))
    with pytest.raises(ConnectionClosed, match="reset"):
        await waiter
    with pytest.raises(ConnectionClosed):
        await c.poll_event("msg", timeout=0)
    # An event queued before the loss is still returned.
    assert await c.poll_event("typing", timeout=0) == {"op": "typing"}


async def test_events_before_ping_returns_what_came_before_the_reply() -> None:
    c, tr = await make()
    tr.feed({"op": "typing", "n": 1})
    task = asyncio.create_task(c.events_before_ping("typing"))
    await settle()
    ping = tr.last()
    assert ping["op"] == "ping" and not task.done()
    tr.feed({"op": "msg", "n": 2})
    tr.feed({"op": "typing", "n": 3})
    tr.feed(ok(ping["rid"]))
    assert await task == [{"op": "typing", "n": 1}, {"op": "typing", "n": 3}]
    assert c.events_nowait() == [{"op": "msg", "n": 2}]
    # Nothing queued: an empty list, not a wait.
    task = asyncio.create_task(c.events_before_ping())
    await settle()
    tr.feed(ok(tr.last()["rid"]))
    assert await task == []
    tr.lose(1000)
    with pytest.raises(ConnectionClosed):
        await c.events_before_ping()


async def test_events_iterator_ends_with_the_connection() -> None:
    c, tr = await make()
    tr.feed({"op": "msg", "seq": 1})
    tr.feed({"op": "typing"})
    tr.feed({"op": "msg", "seq": 2})

    async def collect() -> list[int]:
        return [ev["seq"] async for ev in c.events("msg")]

    task = asyncio.create_task(collect())
    await settle()
    tr.lose()
    assert await task == [1, 2]


async def test_close_is_idempotent_and_fails_pending() -> None:
    c, tr = await make()
    fut = c.request_nowait("ping")
    await c.close()
    await c.close()
    assert tr.closed and c.closed
    with pytest.raises(ConnectionClosed, match="client"):
        await fut


# --- sending arbitrary frames ---------------------------------------------------------


async def test_send_frame_and_raw_bypass_rids() -> None:
    c, tr = await make()
    await c.send_frame({"op": "typing", "conv": "d:a:b"})
    await c.send_frame({"op": "hello", "v": 1}, codec="msgpack")
    await c.send_raw("garbage")
    await c.send_raw(b"\x00\x01", text=False)
    assert tr.sent[0] == (b'{"op":"typing","conv":"d:a:b"}', True)
    assert tr.sent[1] == (msgspec.msgpack.encode({"op": "hello", "v": 1}), False)
    assert tr.sent[2] == (b"garbage", True)
    assert tr.sent[3] == (b"\x00\x01", False)
    with pytest.raises(TypeError):
        await c.send_raw_bytes(b"\x00")  # unframed bytes are a TCP thing
    assert c.pending == 0


async def test_helpers_build_the_protocol_frames() -> None:
    c, tr = await make()

    async def answer(data: dict[str, Any]) -> None:
        await settle()
        tr.feed(ok(tr.last()["rid"], data))

    user = {"id": "u1", "username": "alice"}
    login = {"user": user, "token": "T", "refresh_token": "R", "expires_in": 900}
    await asyncio.gather(c.login("alice", "password1", device="d1"), answer(login))
    assert tr.last()["device"] == "d1"
    assert (c.token, c.refresh_token, c.user_id) == ("T", "R", "u1")

    res = await asyncio.gather(c.send_message("d:u1:u2", "hi"), answer({"seq": 1}))
    sent = tr.last()
    assert sent["type"] == "text" and sent["cid"] and sent["body"] == "hi"
    assert res[0] == {"seq": 1}

    await asyncio.gather(c.history("d:u1:u2", after=3), answer({"messages": []}))
    last = tr.last()
    del last["rid"]
    assert last == {"op": "history", "conv": "d:u1:u2", "after": 3}

    res2 = await asyncio.gather(c.convs(), answer({"convs": [{"conv": "d:u1:u2"}]}))
    assert res2[0] == [{"conv": "d:u1:u2"}]


def test_direct_conv_orders_ids() -> None:
    assert Client.direct_conv("u2", "u10") == "d:u10:u2"  # plain string order
    assert Client.direct_conv("ua", "ub") == Client.direct_conv("ub", "ua") == "d:ua:ub"


# --- codecs and addresses -------------------------------------------------------------


def test_decode_payload_detects_the_codec_on_tcp() -> None:
    frame = {"op": "msg", "body": "é", "n": 1}
    assert decode_payload(encode_payload(frame, "json")) == frame
    assert decode_payload(encode_payload(frame, "msgpack")) == frame
    assert decode_payload(encode_payload(frame, "json"), True) == frame
    assert decode_payload(encode_payload(frame, "msgpack"), False) == frame


def test_addresses() -> None:
    assert ws_url(("127.0.0.1", 8080)) == "ws://127.0.0.1:8080/ws"
    assert ws_url("127.0.0.1:8080") == "ws://127.0.0.1:8080/ws"
    assert ws_url("http://h:1") == "ws://h:1/ws"
    assert ws_url("https://h:1/") == "wss://h:1/ws"
    assert ws_url("ws://h:1/custom?x=1") == "ws://h:1/custom?x=1"
    assert tcp_address("h:8090") == ("h", 8090)
    assert tcp_address("tcp://h:8090") == ("h", 8090)
    assert tcp_address("[::1]:8090") == ("::1", 8090)
    assert tcp_address(("h", 1)) == ("h", 1)
    with pytest.raises(ValueError):
        tcp_address("nohost")
    with pytest.raises(ValueError):
        ws_url("ftp://h/")


# --- the TCP transport, with an in-memory asyncio transport ---------------------------


class FakeSocketTransport(asyncio.Transport):
    def __init__(self, protocol: TcpTransport) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.aborted = False
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()


async def make_tcp(max_frame: int = 1024) -> tuple[Client, TcpTransport, FakeSocketTransport]:
    proto = TcpTransport(max_frame)
    sock = FakeSocketTransport(proto)
    proto.connection_made(sock)
    return Client(proto, codec="msgpack"), proto, sock


async def test_tcp_frames_requests_and_reassembles_split_replies() -> None:
    c, proto, sock = await make_tcp()
    fut = c.request_nowait("ping")
    payload = msgspec.msgpack.encode({"op": "ping", "rid": "r1"})
    assert bytes(sock.written) == encode_frame(payload)
    stream = encode_frame(encode_payload(ok("r1", {"a": 1}), "msgpack")) + encode_frame(
        encode_payload({"op": "msg", "seq": 1}, "json")  # codec detected per payload
    )
    for i in range(len(stream)):  # one byte at a time
        proto.data_received(stream[i : i + 1])
    assert await fut == {"a": 1}
    assert c.events_nowait() == [{"op": "msg", "seq": 1}]


async def test_tcp_raw_bytes_are_written_verbatim() -> None:
    c, _, sock = await make_tcp()
    await c.send_raw_bytes(b"\xff\xff\xff\xff")
    await c.send_raw(b"{}")
    assert bytes(sock.written) == b"\xff\xff\xff\xff" + encode_frame(b"{}")


async def test_tcp_oversize_server_frame_closes_the_connection() -> None:
    c, proto, sock = await make_tcp(max_frame=16)
    fut = c.request_nowait("ping")
    proto.data_received(b"\x00\x00\x10\x00")  # declares 4096 bytes
    assert sock.aborted
    with pytest.raises(ConnectionClosed, match="max_frame"):
        await fut
    assert c.closed
