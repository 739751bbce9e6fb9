"""The gateway's last line of defence: an unexpected exception becomes ``internal``;
an event or reply that a session's codec cannot encode costs that session only that
frame; and the room writes it refuses while draining.

No honest end-to-end trigger exists for either (every bad input has its own code, and
a draining server closes its connections at once), so this drives a real gateway on
real SQLite services in-process, with one handler replaced by one that fails the way
a bug would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from imserver.protocol import ops
from imserver.protocol.codec import Codec
from imserver.protocol.events import Msg
from imserver.protocol.framing import FrameDecoder, encode_frame
from imserver.services.gateway.service import Gateway
from imserver.services.gateway.session import Session
from imserver.services.message.service import open_message_service
from imserver.services.room.service import open_room_service
from imserver.services.user.service import open_user_service
from imserver.storage.bus import Delivery, MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.utils.config import Config
from imserver.utils.metrics import Metrics


class MemoryLink:
    """A link that keeps what the session writes, one JSON payload per line."""

    kind = "tcp"

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return payload + b"\n"  # JSON from msgspec never holds a raw newline

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    bus = MemoryLiveBus()
    users = await open_user_service(sqlite_url(tmp_path, "user"))
    rooms = await open_room_service(sqlite_url(tmp_path, "room"), users=users)
    messages = await open_message_service(
        sqlite_url(tmp_path, "message"), bus=bus, users=users, rooms=rooms
    )
    rooms.bind(messages=messages)
    gw = Gateway(Config(), users=users, messages=messages, rooms=rooms, bus=bus, metrics=Metrics())
    rooms.bind(online=gw.hub)
    yield gw
    await messages.close()
    await rooms.close()
    await users.close()


async def test_an_unexpected_exception_is_answered_internal_and_the_session_lives(
    gateway: Gateway,
) -> None:
    def broken(session: Session, op: ops.Ping) -> ops.Empty:
        raise RuntimeError("a bug")

    gateway.router._handlers[ops.Ping] = broken
    link = MemoryLink()
    session = Session(gateway, link)
    await session.receive(b'{"op":"hello","v":1,"rid":"h"}', Codec.JSON)
    await session.receive(b'{"op":"ping","rid":"p"}', Codec.JSON)
    register = b'{"op":"register","rid":"r","username":"zed","password":"12345678"}'
    await session.receive(register, Codec.JSON)
    gateway.flusher.flush()
    lines = b"".join(link.written).splitlines()
    by_rid = {f["rid"]: f for f in map(msgspec.json.decode, lines)}
    assert sorted(by_rid) == ["h", "p", "r"]
    assert by_rid["p"] == {
        "op": "reply",
        "rid": "p",
        "ok": False,
        "error": {"code": "internal", "message": "internal error"},
    }
    assert by_rid["r"]["ok"] is True
    assert not link.closed
    assert gateway.metrics.ops[("ping", "internal")] == 1


async def test_room_writes_are_refused_while_draining(gateway: Gateway) -> None:
    link = MemoryLink()
    session = Session(gateway, link)
    frames = [
        b'{"op":"hello","v":1,"rid":"h"}',
        b'{"op":"register","rid":"r","username":"zed","password":"12345678"}',
        b'{"op":"login","rid":"l","username":"zed","password":"12345678"}',
        b'{"op":"room.create","rid":"c","name":"before"}',
    ]
    for frame in frames:
        await session.receive(frame, Codec.JSON)
    gateway.draining = True
    writes = {
        "create": b'"room.create","name":"x"',
        "update": b'"room.update","room":"r1","name":"x"',
        "join": b'"room.join","room":"r1"',
        "leave": b'"room.leave","room":"r1"',
        "invite": b'"room.invite","room":"r1","user":"u1"',
        "kick": b'"room.kick","room":"r1","user":"u1"',
        "role": b'"room.role","room":"r1","user":"u1","role":"admin"',
    }
    for rid, body in writes.items():
        await session.receive(b'{"rid":"%s","op":%s}' % (rid.encode(), body), Codec.JSON)
    await session.receive(b'{"op":"room.list","rid":"list"}', Codec.JSON)
    gateway.flusher.flush()
    lines = b"".join(link.written).splitlines()
    by_rid = {f["rid"]: f for f in map(msgspec.json.decode, lines) if "rid" in f}
    assert by_rid["c"]["ok"] is True
    for rid in writes:
        assert by_rid[rid]["error"]["code"] == "unavailable", by_rid[rid]
    # Reads still work while draining.
    assert [r["name"] for r in by_rid["list"]["data"]["rooms"]] == []


class TcpMemoryLink(MemoryLink):
    """A link that frames like TCP, so MessagePack payloads can be read back."""

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return encode_frame(payload)

    def frames(self) -> list[dict[str, Any]]:
        payloads = FrameDecoder(1 << 20).feed(b"".join(self.written))
        return [
            msgspec.json.decode(p) if p[:1] == b"{" else msgspec.msgpack.decode(p) for p in payloads
        ]


async def logged_in(gateway: Gateway, codec: Codec, username: str) -> tuple[Session, TcpMemoryLink]:
    """A session of ``username`` (registered on first use) speaking ``codec``."""
    enc = msgspec.json.encode if codec is Codec.JSON else msgspec.msgpack.encode
    link = TcpMemoryLink()
    session = Session(gateway, link)
    await session.receive(enc({"op": "hello", "v": 1, "rid": "h"}), codec)
    await session.receive(
        enc({"op": "register", "username": username, "password": "12345678"}), codec
    )
    await session.receive(
        enc({"op": "login", "rid": "l", "username": username, "password": "12345678"}), codec
    )
    gateway.flusher.flush()
    assert session.caller is not None
    link.written.clear()
    return session, link


def msg(seq: int, meta: dict[str, Any]) -> Msg:
    return Msg(
        conv="d:a:b", seq=seq, from_="a", ts=1, type="text", body="", cid=f"c{seq}", meta=meta
    )


async def test_an_event_one_codec_cannot_encode_skips_only_that_codecs_sessions(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """An integer past 64 bits (as stored before values were checked) fits JSON but not
    MessagePack: the MessagePack session misses that event and nothing else, stays
    open, and the live-bus subscriber goes on with the next delivery."""
    js, js_link = await logged_in(gateway, Codec.JSON, "zed")
    mp, mp_link = await logged_in(gateway, Codec.MSGPACK, "zed")
    assert js.caller is not None
    user = js.caller.user
    gateway.bus.publish(Delivery(users=[user], event=msg(1, {"n": 2**64})))
    gateway.bus.publish(Delivery(users=[user], event=msg(2, {"n": 1})))
    gateway.flusher.flush()
    assert [(f["seq"], f["meta"]) for f in js_link.frames()] == [(1, {"n": 2**64}), (2, {"n": 1})]
    assert [(f["seq"], f["meta"]) for f in mp_link.frames()] == [(2, {"n": 1})]
    assert not mp_link.closed and not mp.closing
    assert gateway.metrics.encode_failures == {("event", "msgpack"): 1}
    assert "cannot encode a Msg event in MSGPACK" in caplog.text
    assert b'imserver_encode_failures_total{codec="msgpack",frame="event"} 1.0' in (
        gateway.metrics.render()
    )


async def test_a_reply_the_codec_cannot_encode_is_answered_internal_and_the_session_lives(
    gateway: Gateway,
) -> None:
    session, link = await logged_in(gateway, Codec.MSGPACK, "zed")
    session.send_reply("r1", {"n": 2**64})
    session.send_reply("r2", {"n": 2})
    gateway.flusher.flush()
    assert link.frames() == [
        {
            "op": "reply",
            "rid": "r1",
            "ok": False,
            "error": {"code": "internal", "message": "the reply could not be encoded in MSGPACK"},
        },
        {"op": "reply", "rid": "r2", "ok": True, "data": {"n": 2}},
    ]
    assert not link.closed and not session.closing
    assert gateway.metrics.encode_failures == {("reply", "msgpack"): 1}


def test_a_failing_live_bus_subscriber_reaches_neither_the_publisher_nor_the_others() -> None:
    bus = MemoryLiveBus()
    seen: list[int] = []

    def broken(delivery: Delivery) -> None:
        raise RuntimeError("a bug")

    bus.subscribe(broken)
    bus.subscribe(lambda d: seen.append(d.event.seq))  # type: ignore[attr-defined]
    bus.publish(Delivery(users=["u"], event=msg(1, {})))
    bus.publish(Delivery(users=["u"], event=msg(2, {})))
    assert seen == [1, 2]
