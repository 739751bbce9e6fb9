"""Every write on a full disk answers ``unavailable`` (PROTOCOL §2.5), logs no
traceback, leaves the connection usable and changes nothing; once the space is back
the same write succeeds and nothing stored before is lost.

The user, room and message services run on real SQLite files on a small tmpfs of
their own (``tests/disks.py``), behind a real gateway: each op is a JSON frame into a
:class:`~imserver.core.session.Session` and each answer the reply frame it writes.

Every commit appends at least one WAL frame (a 4 KiB page and its header: always at
least one more 4 KiB block of the tmpfs), and the user, room and file databases never
checkpoint during a test, so their first write on the filled disk fails. The message
store checkpoints in the background, after which SQLite rewrites the log in place:
see its test.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from disks import SmallDisk

from imserver.core.metrics import Metrics
from imserver.core.session import Session
from imserver.protocol.codec import Codec
from imserver.services.gateway.service import Gateway
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.room.service import LocalRoomService, open_room_service
from imserver.services.user.service import LocalUserService, open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.utils.config import Config

Frame = dict[str, Any]
PASSWORD = "correct-horse"
FULL = "database or disk is full"
"""What SQLite says (SQLITE_FULL), and what the storage boundary's log line names."""


class MemoryLink:
    """A link that decodes what the session writes (one JSON payload per line)."""

    kind = "tcp"

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.closed = False
        self._arrived = asyncio.Event()

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return payload + b"\n"  # JSON from msgspec never holds a raw newline

    def write(self, data: bytes) -> None:
        self.frames.extend(msgspec.json.decode(line) for line in data.splitlines())
        self._arrived.set()

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    async def reply(self, rid: str) -> Frame:
        """The reply to ``rid``, once the session has written it."""
        while True:
            for f in self.frames:
                if f.get("op") == "reply" and f.get("rid") == rid:
                    return f
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 30)


class Conn:
    """One client connection to the in-process gateway."""

    _rids = itertools.count(1)

    def __init__(self, gateway: Gateway) -> None:
        self.link = MemoryLink()
        self.session = Session(gateway, self.link)

    async def call(self, op: str, **fields: Any) -> Frame:
        rid = f"r{next(self._rids)}"
        payload = msgspec.json.encode({"op": op, "rid": rid, **fields})
        await self.session.receive(payload, Codec.JSON)
        return await self.link.reply(rid)

    async def ok(self, op: str, **fields: Any) -> Any:
        reply = await self.call(op, **fields)
        assert reply["ok"] is True, (op, reply)
        return reply["data"]

    async def unavailable(self, op: str, **fields: Any) -> None:
        """Require the documented answer to a write the storage cannot take."""
        reply = await self.call(op, **fields)
        assert reply == {
            "op": "reply",
            "rid": reply["rid"],
            "ok": False,
            "error": {"code": "unavailable", "message": reply["error"]["message"]},
        }, (op, reply)
        assert reply["error"]["message"], reply

    def usable(self) -> None:
        assert not self.link.closed and not self.session.closing


@dataclass
class World:
    disk: SmallDisk
    gateway: Gateway
    users: LocalUserService
    rooms: LocalRoomService
    messages: LocalMessageService

    async def conn(self) -> Conn:
        """A new connection, greeted."""
        c = Conn(self.gateway)
        await c.ok("hello", v=1)
        return c

    async def user(self, name: str) -> tuple[Conn, Frame]:
        """A registered user logged in on a connection of its own; the login reply."""
        c = await self.conn()
        await c.ok("register", username=name, password=PASSWORD)
        return c, await c.ok("login", username=name, password=PASSWORD)


@pytest.fixture
async def world(disk: SmallDisk) -> AsyncIterator[World]:
    bus = MemoryLiveBus()
    data = disk.path
    users = await open_user_service(
        sqlite_url(data, "user"), argon2_memory_kib=1024, argon2_time_cost=1
    )
    rooms = await open_room_service(sqlite_url(data, "room"), users=users)
    messages = await open_message_service(
        sqlite_url(data, "message"), bus=bus, users=users, rooms=rooms
    )
    rooms.bind(messages=messages)
    gw = Gateway(Config(), users=users, messages=messages, rooms=rooms, bus=bus, metrics=Metrics())
    rooms.bind(online=gw.hub)
    yield World(disk, gw, users, rooms, messages)
    if disk.full:
        disk.free()
    await messages.close()
    await rooms.close()
    await users.close()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged with a traceback, nothing at ERROR or above."""
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]


def no_internal_and_logged_once(
    world: World, caplog: pytest.LogCaptureFixture, cause: str = FULL
) -> None:
    """No traceback anywhere in the log, no op answered ``internal``, and the storage
    failures were logged as warnings naming ``cause``."""
    no_tracebacks(caplog)
    internal = [op for (op, result) in world.gateway.metrics.ops if result == "internal"]
    assert internal == [], internal
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(cause in w for w in warnings), warnings


# --- the user service -----------------------------------------------------------------


async def test_user_writes_on_a_full_disk(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    alice, login = await world.user("alice")
    bob, bob_login = await world.user("bob")
    bob_id = bob_login["user"]["id"]
    other = await world.conn()

    world.disk.fill()
    await other.unavailable("register", username="carol", password=PASSWORD)
    await other.unavailable("login", username="alice", password=PASSWORD)
    await other.unavailable("refresh", refresh_token=login["refresh_token"])
    await alice.unavailable("user.update", display_name="Alice Two")
    await alice.unavailable("block", user=bob_id)
    await alice.unavailable("logout")
    # Reads still work, and showed no change.
    me = await alice.ok("user.get", user=login["user"]["id"])
    assert me["user"]["display_name"] == "alice"
    assert not await world.users.is_blocked(login["user"]["id"], bob_id)
    await (await world.conn()).ok("auth", token=login["token"])  # logout did not happen
    await other.ok("ping")
    for c in (alice, bob, other):
        c.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    await other.ok("register", username="carol", password=PASSWORD)
    await other.ok("login", username="alice", password=PASSWORD)
    # The refresh token was not spent by the refused rotation.
    pair = await (await world.conn()).ok("refresh", refresh_token=login["refresh_token"])
    assert pair["token"] != login["token"]
    got = await alice.ok("user.update", display_name="Alice Two")
    assert got["user"]["display_name"] == "Alice Two"
    await alice.ok("block", user=bob_id)
    assert await world.users.is_blocked(login["user"]["id"], bob_id)
    world.disk.fill()
    await alice.unavailable("unblock", user=bob_id)
    assert await world.users.is_blocked(login["user"]["id"], bob_id)
    world.disk.free()
    await alice.ok("unblock", user=bob_id)
    assert not await world.users.is_blocked(login["user"]["id"], bob_id)
    # Earlier data: both accounts still log in, bob's token still works.
    await (await world.conn()).ok("login", username="bob", password=PASSWORD)
    await (await world.conn()).ok("auth", token=bob_login["token"])
    await alice.ok("logout")


# --- the room service -----------------------------------------------------------------


async def test_room_writes_on_a_full_disk(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    alice, a = await world.user("alice")
    bob, b = await world.user("bob")
    _, c = await world.user("carol")
    bob_id, carol_id = b["user"]["id"], c["user"]["id"]
    public = (await alice.ok("room.create", name="lobby", public=True, members=[carol_id]))["room"]
    private = (await alice.ok("room.create", name="attic", public=False))["room"]
    rid = public["id"]

    world.disk.fill()
    await alice.unavailable("room.create", name="new room")
    await bob.unavailable("room.join", room=rid)
    await alice.unavailable("room.invite", room=private["id"], user=bob_id)
    await alice.unavailable("room.role", room=rid, user=carol_id, role="admin")
    await alice.unavailable("room.kick", room=rid, user=carol_id)
    await alice.unavailable("room.update", room=rid, name="renamed")
    # Nothing changed, in memory or on disk.
    assert (await alice.ok("room.get", room=rid))["room"] == public
    members = (await alice.ok("room.members", room=rid))["members"]
    assert [(m["user"], m["role"]) for m in members] == [
        (a["user"]["id"], "owner"),
        (carol_id, "member"),
    ]
    rooms = (await bob.ok("room.list"))["rooms"]
    assert [r["name"] for r in rooms] == ["lobby"]
    for conn in (alice, bob):
        conn.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    created = (await alice.ok("room.create", name="new room"))["room"]
    await bob.ok("room.join", room=rid)
    await alice.ok("room.invite", room=private["id"], user=bob_id)
    await alice.ok("room.role", room=rid, user=carol_id, role="admin")
    await alice.ok("room.kick", room=rid, user=carol_id)
    renamed = (await alice.ok("room.update", room=rid, name="renamed"))["room"]
    assert (renamed["name"], renamed["members"]) == ("renamed", 2)
    assert (await alice.ok("room.get", room=created["id"]))["room"]["name"] == "new room"
    # The room's history holds each change once, and none of the refused ones.
    page = await alice.ok("history", conv=f"r:{rid}")
    events = [m["meta"]["event"] for m in page["messages"]]
    assert events == ["created", "joined", "joined", "role", "kicked", "updated"]


# --- the message service --------------------------------------------------------------


async def test_message_writes_on_a_full_disk(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    alice, a = await world.user("alice")
    bob, b = await world.user("bob")
    conv = "d:" + ":".join(sorted((a["user"]["id"], b["user"]["id"])))
    for i in range(3):
        await alice.ok("send", conv=conv, cid=f"before-{i}", type="text", body=f"hello {i}")
    body = "x" * 16_000

    world.disk.fill()
    # The first write fails unless a WAL checkpoint emptied the log just before the
    # fill: SQLite then rewrites the log in place, and a few writes fit in that room.
    # Every one acknowledged must survive; the first refused one is the test's write.
    acked: list[int] = []
    for i in range(200):
        reply = await alice.call("send", conv=conv, cid=f"full-{i}", type="text", body=body)
        if not reply["ok"]:
            assert reply["error"]["code"] == "unavailable", reply
            refused = i
            break
        acked.append(reply["data"]["seq"])
    else:
        pytest.fail("200 writes of 16 KB on a full disk all succeeded")
    # Reads still work; the session too.
    page = await bob.ok("history", conv=conv)
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, *acked]
    for conn in (alice, bob):
        conn.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    again = await alice.ok("send", conv=conv, cid=f"full-{refused}", type="text", body=body)
    assert (again["seq"], again["dup"]) == (4 + len(acked), False)
    page = await bob.ok("history", conv=conv, limit=200)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 5 + len(acked)))
    assert [m["body"] for m in page["messages"][:3]] == ["hello 0", "hello 1", "hello 2"]


# --- writes in the background ---------------------------------------------------------


async def test_last_seen_on_a_full_disk_is_postponed_quietly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, a = await world.user("alice")
    world.disk.fill()
    await world.users.set_offline(a["user"]["id"])
    await world.users.close()  # writes the pending last_seen: refused
    no_tracebacks(caplog)
    assert any("last_seen" in r.getMessage() for r in caplog.records), caplog.records
