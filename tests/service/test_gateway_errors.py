"""The gateway's last line of defence: an unexpected exception becomes ``internal``;
and the room writes it refuses while draining.

No honest end-to-end trigger exists for either (every bad input has its own code, and
a draining server closes its connections at once), so this drives a real gateway on
real SQLite services in-process, with one handler replaced by one that fails the way
a bug would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from imserver.core.metrics import Metrics
from imserver.core.session import Session
from imserver.protocol import ops
from imserver.protocol.codec import Codec
from imserver.services.gateway.service import Gateway
from imserver.services.message.service import open_message_service
from imserver.services.room.service import open_room_service
from imserver.services.user.service import open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.utils.config import Config


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
