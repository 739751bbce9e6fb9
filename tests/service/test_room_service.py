"""Service tests of the room service on a real database, with the real message
service (on a database of its own, or the same server database) and a real
MemoryLiveBus, on every selected database (``sqlite``, ``postgresql``, ``mariadb``:
``tests/databases.py``).

The user directory is the plain data double of ``message_helpers`` (who is online is
its set). Contract tests: each runs over the ``local`` and ``loopback`` transports
(``transports.py``); in the loopback run the room service, the message service and
the user directory are reached through the serialising adapter, both ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conformance import signature_mismatches
from databases import Databases, rows
from message_helpers import Delivery, Directory, Recorder, caller, send
from sqlalchemy import create_engine
from transports import through

from imserver.protocol import ops
from imserver.protocol.events import Msg, Receipt, TypingEvent
from imserver.protocol.models import Message, Room
from imserver.services.caller import Caller
from imserver.services.message.api import Members, MessageService, RoomDirectory
from imserver.services.message.api import UserDirectory as MessageUserDirectory
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.room.api import RoomService
from imserver.services.room.api import UserDirectory as RoomUserDirectory
from imserver.services.room.service import MIGRATIONS, LocalRoomService, open_room_service
from imserver.services.room.store import metadata
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url, sync_url, upgrade_sync
from imserver.storage.statements import CHUNK
from imserver.utils.errors import BadRequest, Conflict, Forbidden, IMError, NotFound
from imserver.utils.ids import UserId

A, B, C, D, E = (caller(u) for u in ("ua", "ub", "uc", "ud", "ue"))
NAMES = {"ua": "Alice", "ub": "Bob", "uc": "Carol", "ud": "Dave", "ue": "Eve"}


@dataclass
class Env:
    databases: Databases
    transport: str
    users: Directory
    bus: MemoryLiveBus
    deliveries: list[Delivery]
    messages: LocalMessageService
    rooms: LocalRoomService

    async def reopen(self, max_room_size: int = 10_000) -> None:
        """A restart: both services closed and opened again on the same files."""
        await self.messages.close()
        await self.rooms.close()
        self.rooms, self.messages = await _open(
            self.databases, self.users, self.bus, self.transport, max_room_size
        )

    def msgs(self, room: str | None = None) -> list[tuple[Msg, tuple[str, ...]]]:
        """Published ``msg`` events (of ``room``) with their recipients."""
        return [
            (d.event, tuple(d.users))
            for d in self.deliveries
            if isinstance(d.event, Msg) and (room is None or d.event.conv == f"r:{room}")
        ]

    def system(self, room: str) -> list[dict[str, Any]]:
        """``meta`` of the published system messages of ``room``, in order."""
        return [m.meta or {} for m, _ in self.msgs(room) if m.type == "system"]

    async def db(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (named ``:params``) on the room database."""
        return await rows(self.databases.url("room"), sql, params)


async def _open(
    databases: Databases,
    users: Directory,
    bus: MemoryLiveBus,
    transport: str,
    max_room_size: int = 10_000,
) -> tuple[Any, Any]:
    """The two services wired as the server does: rooms first, reaching the message
    service through a lookup; each reaches the other over ``transport``."""
    found: dict[str, MessageService] = {}
    rooms = await open_room_service(
        databases.url("room"),
        users=through(transport, RoomUserDirectory, users),
        messages=lambda: found["messages"],
        max_room_size=max_room_size,
    )
    messages = await open_message_service(
        databases.url("message"),
        bus=bus,
        users=through(transport, MessageUserDirectory, users),
        rooms=through(transport, RoomDirectory, rooms),
    )
    found["messages"] = through(transport, MessageService, messages)
    return through(transport, RoomService, rooms), found["messages"]


@pytest.fixture
async def env(databases: Databases, transport: str) -> AsyncIterator[Env]:
    users = Directory()
    for uid, name in NAMES.items():
        users.add(uid, name)
    bus = MemoryLiveBus()
    recorder = Recorder(bus)  # every user online on one gateway
    for user in NAMES:
        recorder.attach(user)
    deliveries = recorder.deliveries
    rooms, messages = await _open(databases, users, bus, transport)
    e = Env(databases, transport, users, bus, deliveries, messages, rooms)
    yield e
    await e.messages.close()
    await e.rooms.close()
    assert recorder.resyncs == []  # every conversation's seqs were published without a gap


async def fails(aw: Awaitable[Any], cls: type[IMError], field: str | None = None) -> IMError:
    """Await ``aw`` and require it to fail with exactly ``cls`` (and ``field``)."""
    with pytest.raises(IMError) as info:
        await aw
    assert type(info.value) is cls, info.value
    assert info.value.field == field, (info.value.field, info.value)
    return info.value


async def make_room(
    env: Env,
    *,
    public: bool = False,
    members: tuple[Caller, ...] = (),
    admins: tuple[Caller, ...] = (),
    name: str = "Team",
) -> str:
    """A room owned by ``A`` with ``admins`` and ``members`` (admins join first)."""
    everyone = [*admins, *members]
    room = await env.rooms.create(
        A,
        ops.RoomCreate(
            name=name, public=public, members=[c.user for c in everyone], rid="rid-create"
        ),
    )
    for admin in admins:
        await env.rooms.set_role(A, room.id, admin.user, "admin")
    return room.id


async def history(env: Env, who: Caller, room: str) -> list[Message]:
    page = await env.messages.history(
        who, ops.History(conv=f"r:{room}", limit=200, rid="rid-history")
    )
    return page.messages


# --- schema and protocol ------------------------------------------------------------


def test_migrations_match_the_store_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, "room")
    upgrade_sync(url, MIGRATIONS)
    upgrade_sync(url, MIGRATIONS)  # a second run is a no-op
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": "alembic_version_room"}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_local_service_satisfies_the_protocol() -> None:
    # RoomService includes RoomDirectory, the message service's view of rooms.
    assert signature_mismatches(RoomService, LocalRoomService) == []


# --- create and get -----------------------------------------------------------------


async def test_create_makes_the_caller_owner_and_members_join(env: Env) -> None:
    room = await env.rooms.create(
        A, ops.RoomCreate(name="Team", topic="work", members=["ub", "uc", "ub", "ua"])
    )
    assert (room.name, room.topic, room.public, room.owner, room.members) == (
        "Team",
        "work",
        False,
        "ua",
        3,
    )
    assert room.conv == f"r:{room.id}" and room.id.startswith("r") and ":" not in room.id
    assert await env.rooms.room_role(room.id, UserId("ua")) == "owner"
    assert await env.rooms.room_role(room.id, UserId("uc")) == "member"
    assert (await env.rooms.room_members(room.id)).users == ("ua", "ub", "uc")
    page = await history(env, B, room.id)
    assert [(m.seq, m.from_, m.type, m.body) for m in page] == [
        (1, "system", "system", "Alice created Team"),
        (2, "system", "system", "Alice added Bob"),
        (3, "system", "system", "Alice added Carol"),
    ]
    assert [m.meta for m in page] == [
        {"event": "created", "actor": "ua"},
        {"event": "joined", "actor": "ua", "user": "ub"},
        {"event": "joined", "actor": "ua", "user": "uc"},
    ]
    # Everyone got them live, in seq order.
    assert [(m.seq, users) for m, users in env.msgs(room.id)] == [
        (1, ("ua", "ub", "uc")),
        (2, ("ua", "ub", "uc")),
        (3, ("ua", "ub", "uc")),
    ]
    assert await env.rooms.get(C, room.id) == room
    assert [c.title for c in await env.messages.convs(C)] == ["Team"]


async def test_create_refuses_unknown_members_and_oversized_rooms(env: Env) -> None:
    await fails(
        env.rooms.create(A, ops.RoomCreate(name="x", members=["ub", "nope"])), NotFound, "members"
    )
    await env.reopen(max_room_size=3)
    await fails(
        env.rooms.create(A, ops.RoomCreate(name="x", members=["ub", "uc", "ud"])), Forbidden
    )
    assert (await env.rooms.create(A, ops.RoomCreate(name="x", members=["ub", "uc"]))).members == 3
    assert await env.db("SELECT count(*) FROM rooms") == [(1,)]


async def test_get_visibility(env: Env) -> None:
    private = await make_room(env, members=(B,))
    public = await make_room(env, public=True)
    await fails(env.rooms.get(C, private), Forbidden)
    await env.rooms.invite(A, private, UserId("uc"))
    assert (await env.rooms.get(C, private)).id == private  # invitees see it
    assert (await env.rooms.get(D, public)).id == public
    await fails(env.rooms.get(A, "rnope"), NotFound, "room")


# --- membership cache ---------------------------------------------------------------


async def test_room_members_is_the_same_object_until_membership_changes(env: Env) -> None:
    """The same version, and locally the same object, until the membership changes."""

    def same(a: Members, b: Members) -> bool:
        if env.transport == "local" and a is not b:
            return False
        return a == b

    room = await make_room(env, public=True, members=(B,))
    first = await env.rooms.room_members(room)
    assert same(await env.rooms.room_members(room), first)
    await env.rooms.update(A, ops.RoomUpdate(room=room, topic="t"))
    assert same(await env.rooms.room_members(room), first)  # not a membership change
    await env.rooms.join(C, room)
    second = await env.rooms.room_members(room)
    assert second.version > first.version and second.users == ("ua", "ub", "uc")
    assert first.users == ("ua", "ub")  # handed-out objects never change
    await fails(env.rooms.room_members("rnope"), NotFound, "conv")


async def test_state_survives_a_restart(env: Env) -> None:
    room = await make_room(env, members=(C, D), admins=(B,))
    await env.rooms.leave(A, room)
    await env.reopen()
    assert (await env.rooms.room_members(room)).users == ("ub", "uc", "ud")
    assert await env.rooms.room_role(room, UserId("ub")) == "owner"
    got = await env.rooms.get(B, room)
    assert (got.owner, got.members) == ("ub", 3)
    # Join order continues after the restart.
    await env.rooms.invite(B, room, UserId("ua"))
    await env.rooms.join(A, room)
    assert (await env.rooms.room_members(room)).users == ("ub", "uc", "ud", "ua")


# --- join, invite -------------------------------------------------------------------


async def test_private_rooms_need_an_invitation_which_the_join_consumes(env: Env) -> None:
    room = await make_room(env, members=(B,))
    await fails(env.rooms.join(C, room), Forbidden)
    await env.rooms.invite(A, room, UserId("uc"))
    assert await env.rooms.invitations_of(UserId("uc")) == [room]
    convs = await env.messages.convs(C)
    assert [(c.conv, c.kind, c.title) for c in convs] == [(f"r:{room}", "room", "Team")]
    joined = await env.rooms.join(C, room)
    assert joined.members == 3
    assert await env.rooms.invitations_of(UserId("uc")) == []
    assert await env.rooms.rooms_of(UserId("uc")) == [room]
    # Leaving and coming back needs a new invitation.
    await env.rooms.leave(C, room)
    await fails(env.rooms.join(C, room), Forbidden)
    assert [m["event"] for m in env.system(room)][-4:] == ["joined", "invited", "joined", "left"]


async def test_invite_rules(env: Env) -> None:
    room = await make_room(env, members=(C,), admins=(B,))
    await fails(env.rooms.invite(C, room, UserId("ud")), Forbidden)  # a member
    await fails(env.rooms.invite(D, room, UserId("ue")), Forbidden)  # a non-member
    await fails(env.rooms.invite(A, room, UserId("nope")), NotFound, "user")
    await fails(env.rooms.invite(A, room, UserId("uc")), Conflict, "user")
    await fails(env.rooms.invite(A, room, UserId("ua")), Conflict, "user")
    await env.rooms.invite(B, room, UserId("ud"))
    before = len(env.system(room))
    await env.rooms.invite(A, room, UserId("ud"))  # already pending: nothing new
    assert len(env.system(room)) == before
    invited = env.msgs(room)[-1]
    assert invited[0].meta == {"event": "invited", "actor": "ub", "user": "ud"}
    assert invited[0].body == "Bob invited Dave"
    assert "ud" in invited[1]  # the invitee sees it live
    await fails(env.rooms.invite(A, "rnope", UserId("ud")), NotFound, "room")


async def test_join_is_idempotent_and_public_rooms_are_open(env: Env) -> None:
    room = await make_room(env, public=True)
    r1 = await env.rooms.join(B, room)
    n = len(env.msgs(room))
    r2 = await env.rooms.join(B, room)
    assert r1 == r2 and r2.members == 2
    assert len(env.msgs(room)) == n
    assert env.system(room)[-1] == {"event": "joined", "actor": "ub", "user": "ub"}


async def test_max_room_size(env: Env) -> None:
    await env.reopen(max_room_size=3)
    room = await make_room(env, public=True, members=(B,))
    await env.rooms.join(C, room)
    err = await fails(env.rooms.join(D, room), Forbidden)
    assert "full" in err.message
    await env.rooms.leave(C, room)
    await env.rooms.join(D, room)


async def test_concurrent_joins_and_leaves_keep_counts_consistent(env: Env) -> None:
    ids = [f"x{i}" for i in range(40)]
    for uid in ids:
        env.users.add(uid)
    await env.reopen(max_room_size=25)
    room = await make_room(env, public=True)
    results = await asyncio.gather(
        *(env.rooms.join(caller(uid), room) for uid in ids), return_exceptions=True
    )
    joined = [r for r in results if isinstance(r, Room)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(joined) == 24 and all(isinstance(r, Forbidden) for r in refused)
    members = await env.rooms.room_members(room)
    assert len(members.users) == 25
    await asyncio.gather(*(env.rooms.leave(caller(u), room) for u in members.users[1:13]))
    assert await env.db("SELECT member_count FROM rooms WHERE id = :r", r=room) == [(13,)]
    assert await env.db("SELECT count(*) FROM members WHERE room_id = :r", r=room) == [(13,)]
    orders = [
        r[0] for r in await env.db("SELECT join_order FROM members WHERE room_id = :r", r=room)
    ]
    assert len(set(orders)) == 13
    assert (await env.rooms.get(A, room)).members == 13
    # One system message per change, gap-free.
    seqs = [m.seq for m, _ in env.msgs(room)]
    assert seqs == list(range(1, 1 + 1 + 24 + 12))


async def test_listed_rooms_joined_then_invited_per_user_over_chunks(env: Env) -> None:
    """``listed_rooms`` over more users than one ``IN`` list holds (``CHUNK``)."""
    many = [f"m{i:03d}" for i in range(CHUNK + 10)]
    for user in many:
        env.users.add(user)
    one = await make_room(env, members=(B,), name="One")  # ua, ub
    await env.rooms.invite(A, one, UserId("uc"))
    await env.rooms.invite(A, one, UserId("ud"))
    two = (await env.rooms.create(C, ops.RoomCreate(name="Two"))).id  # uc
    big = (await env.rooms.create(A, ops.RoomCreate(name="Big", members=many))).id
    four = (await env.rooms.create(B, ops.RoomCreate(name="Four"))).id  # ub
    for invitee in ("ue", many[-5]):
        await env.rooms.invite(B, four, UserId(invitee))
    # A member with an invitation left over as well (written from outside: the service
    # consumes an invitation at the join).
    await env.db("INSERT INTO invitations VALUES (:r, 'ub', 'ua', 1)", r=one)

    asked = [UserId(u) for u in ["ghost", *many, *NAMES, "uc"]]
    listed = await env.rooms.listed_rooms(asked)
    joined = {
        "ua": {one, big},
        "ub": {one, four},
        "uc": {two},
        "ud": set(),
        "ue": set(),
        **{u: {big} for u in many},
    }
    invited = {"uc": [one], "ud": [one], "ue": [four], many[-5]: [four]}
    assert set(listed) == set(joined)  # ghost has neither: left out
    for user, rooms in listed.items():
        k = len(joined[user])
        assert set(rooms[:k]) == joined[user], user  # joined first
        assert rooms[k:] == invited.get(user, []), user  # then invited, no repeat
    # Sorted, the users of the second chunk are the last many ones and ua..ue.
    assert sorted(asked)[CHUNK:][:3] == [many[-11], many[-10], many[-9]]
    # The message service's badges reach the rooms through this call.
    await env.messages.send(B, send(f"r:{four}", "b1"))
    badges = await env.messages.unread_totals([UserId(u) for u in ("ue", many[-5], "ud", "ua")])
    for user, total in badges.items():
        assert total == sum(c.unread for c in await env.messages.convs(caller(user))), user
    # Every system message counts (its sender is "system"): four has "created", two
    # "invited" and b1; one has "created", "added Bob" and two "invited"; big has
    # "created" and one "added" per member.
    big_msgs = 1 + len(many)
    assert badges == {"ue": 4, many[-5]: 4 + big_msgs, "ud": 4, "ua": 4 + big_msgs}


# --- leave, hand-over, empty rooms --------------------------------------------------


async def test_owner_leaving_hands_over_to_the_oldest_admin(env: Env) -> None:
    room = await make_room(env, members=(B, C, D))
    await env.rooms.set_role(A, room, UserId("ud"), "admin")
    await env.rooms.set_role(A, room, UserId("uc"), "admin")
    await env.rooms.leave(A, room)
    # uc joined before ud: the longest-standing admin, whatever order they were promoted.
    assert await env.rooms.room_role(room, UserId("uc")) == "owner"
    assert (await env.rooms.get(B, room)).owner == "uc"
    assert env.system(room)[-2:] == [
        {"event": "left", "actor": "ua", "user": "ua"},
        {"event": "role", "actor": "ua", "user": "uc", "role": "owner"},
    ]
    _, left_to = env.msgs(room)[-2]
    assert "ua" in left_to  # the leaver's other devices learn it
    assert await env.db("SELECT owner FROM rooms WHERE id = :r", r=room) == [("uc",)]
    assert await env.db(
        "SELECT role FROM members WHERE room_id = :r AND user_id = 'uc'", r=room
    ) == [("owner",)]


async def test_owner_leaving_without_admins_hands_over_to_the_oldest_member(env: Env) -> None:
    room = await make_room(env, members=(C, B))
    await env.rooms.leave(A, room)
    assert (await env.rooms.get(B, room)).owner == "uc"
    assert (await env.rooms.room_members(room)).users == ("uc", "ub")


async def test_last_member_leaving_empties_the_room(env: Env) -> None:
    room = await make_room(env, public=True, members=(B,))
    await env.rooms.invite(A, room, UserId("uc"))
    await env.rooms.leave(A, room)
    await env.rooms.leave(B, room)
    assert (await env.rooms.list(D, ops.RoomList())).rooms == []
    await fails(env.rooms.join(D, room), NotFound, "room")
    await fails(env.rooms.join(C, room), NotFound, "room")
    await fails(env.rooms.get(B, room), NotFound, "room")
    await fails(env.rooms.leave(B, room), NotFound, "room")
    assert await env.rooms.invitations_of(UserId("uc")) == []
    assert (await env.rooms.room_members(room)).users == ()
    # Its former members are refused like any non-member.
    await fails(env.messages.history(B, ops.History(conv=f"r:{room}")), Forbidden)
    assert await env.db("SELECT member_count, emptied IS NOT NULL FROM rooms") == [(0, 1)]
    await env.reopen()
    await fails(env.rooms.join(D, room), NotFound, "room")


async def test_leave_by_non_member_is_forbidden(env: Env) -> None:
    room = await make_room(env, public=True)
    await fails(env.rooms.leave(B, room), Forbidden)


# --- kick and roles ------------------------------------------------------------------


async def test_kick_rules(env: Env) -> None:
    room = await make_room(env, members=(D, E), admins=(B, C))
    await fails(env.rooms.kick(D, room, UserId("ue")), Forbidden)  # members cannot kick
    await fails(env.rooms.kick(B, room, UserId("uc")), Forbidden)  # admin vs admin
    await fails(env.rooms.kick(B, room, UserId("ua")), Forbidden)  # admin vs owner
    await fails(env.rooms.kick(A, room, UserId("ua")), Forbidden)  # oneself
    await fails(env.rooms.kick(B, room, UserId("ub")), Forbidden)  # oneself
    await fails(env.rooms.kick(A, room, UserId("nope")), NotFound, "user")
    env.users.add("uf")
    await fails(env.rooms.kick(A, room, UserId("uf")), NotFound, "user")  # not a member
    await env.rooms.kick(B, room, UserId("ud"))
    await env.rooms.kick(A, room, UserId("uc"))
    assert (await env.rooms.room_members(room)).users == ("ua", "ub", "ue")
    kicked, to = env.msgs(room)[-1]
    assert kicked.meta == {"event": "kicked", "actor": "ua", "user": "uc"}
    assert kicked.body == "Alice removed Carol"
    assert "uc" in to


async def test_set_role_rules(env: Env) -> None:
    room = await make_room(env, members=(C, D), admins=(B,))
    await fails(env.rooms.set_role(B, room, UserId("uc"), "admin"), Forbidden)  # admins cannot
    await fails(env.rooms.set_role(C, room, UserId("ud"), "admin"), Forbidden)
    await fails(env.rooms.set_role(A, room, UserId("ua"), "member"), Forbidden)  # the owner
    await fails(env.rooms.set_role(A, room, UserId("nope"), "admin"), NotFound, "user")
    await fails(env.rooms.set_role(A, room, UserId("ue"), "admin"), NotFound, "user")
    await fails(env.rooms.set_role(A, room, UserId("uc"), "owner"), BadRequest, "role")
    await env.rooms.set_role(A, room, UserId("uc"), "admin")
    n = len(env.msgs(room))
    await env.rooms.set_role(A, room, UserId("uc"), "admin")  # unchanged: nothing stored
    assert len(env.msgs(room)) == n
    await env.rooms.set_role(A, room, UserId("ub"), "member")
    assert env.system(room)[-2:] == [
        {"event": "role", "actor": "ua", "user": "uc", "role": "admin"},
        {"event": "role", "actor": "ua", "user": "ub", "role": "member"},
    ]
    # A demoted admin loses the admin rights at once.
    await fails(env.rooms.invite(B, room, UserId("ue")), Forbidden)
    await env.rooms.invite(C, room, UserId("ue"))


# --- update ---------------------------------------------------------------------------


async def test_update(env: Env) -> None:
    room = await make_room(env, members=(C,), admins=(B,))
    await fails(env.rooms.update(C, ops.RoomUpdate(room=room, name="x")), Forbidden)
    await fails(env.rooms.update(D, ops.RoomUpdate(room=room, name="x")), Forbidden)
    got = await env.rooms.update(B, ops.RoomUpdate(room=room, name="Renamed", topic="hi"))
    assert (got.name, got.topic, got.public) == ("Renamed", "hi", False)
    assert env.system(room)[-1] == {
        "event": "updated",
        "actor": "ub",
        "changes": {"name": "Renamed", "topic": "hi"},
    }
    n = len(env.msgs(room))
    same = await env.rooms.update(A, ops.RoomUpdate(room=room, name="Renamed", public=False))
    assert same == got and len(env.msgs(room)) == n  # no change, no message
    cleared = await env.rooms.update(A, ops.RoomUpdate(room=room, topic="", public=True))
    assert (cleared.topic, cleared.public) == (None, True)
    assert env.system(room)[-1]["changes"] == {"topic": None, "public": True}
    assert await env.rooms.room_title(room) == "Renamed"
    listed = (await env.rooms.list(D, ops.RoomList(query="renamed"))).rooms
    assert [r.id for r in listed] == [room]


# --- list and members ---------------------------------------------------------------


async def test_list_search_paging_and_escaping(env: Env) -> None:
    names = ["Python", "python tips", "PYTHONISTAS", "100% Rust", "snake_case", "snakeXcase"]
    ids = [await make_room(env, public=True, name=n) for n in names]
    await make_room(env, name="Python private")
    await env.rooms.join(B, ids[1])

    async def listed(**kw: Any) -> list[tuple[str, int]]:
        return [(r.name, r.members) for r in (await env.rooms.list(C, ops.RoomList(**kw))).rooms]

    assert await listed(query="PyThOn") == [("Python", 1), ("python tips", 2), ("PYTHONISTAS", 1)]
    assert await listed(query="%") == [("100% Rust", 1)]
    assert await listed(query="e_c") == [("snake_case", 1)]
    assert await listed(query="_") == [("snake_case", 1)]
    assert await listed(query="") == [(n, 2 if n == "python tips" else 1) for n in names]
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = await env.rooms.list(C, ops.RoomList(limit=4, after=after))
        seen.extend(r.name for r in page.rooms)
        after = page.next
        if after is None:
            break
    assert seen == names
    await fails(env.rooms.list(C, ops.RoomList(after="!!")), BadRequest, "after")
    await fails(env.rooms.list(C, ops.RoomList(after="bm9kb3Q")), BadRequest, "after")


async def test_names_and_queries_with_nul_and_the_escape_character(env: Env) -> None:
    """Any text is a name or a query, NUL included (PostgreSQL cannot store NUL: the
    escaping codec of ``storage/pg_text.py`` stands between), and the codec's own
    escape character U+E000 is text like any other."""
    names = ["Zero\x00Day", "Plain Day", "Priv\ue000ate", "Esc\ue0000aped", "Tail\x00"]
    ids = [await make_room(env, public=True, name=n) for n in names]

    async def listed(query: str) -> list[str]:
        return [r.name for r in (await env.rooms.list(C, ops.RoomList(query=query))).rooms]

    assert await listed("\x00") == ["Zero\x00Day", "Tail\x00"]
    assert await listed("o\x00d") == ["Zero\x00Day"]
    assert await listed("ZERO\x00DAY") == ["Zero\x00Day"]
    assert await listed("day") == ["Zero\x00Day", "Plain Day"]
    assert await listed("\ue000") == ["Priv\ue000ate", "Esc\ue0000aped"]
    assert await listed("\x00\x00") == []
    assert [(await env.rooms.get(A, i)).name for i in ids] == names
    stored = await env.db("SELECT name FROM rooms ORDER BY created, id")
    assert sorted(r[0] for r in stored) == sorted(names)


async def test_members_paging_online_and_visibility(env: Env) -> None:
    room = await make_room(env, members=(C, D, E), admins=(B,))
    env.users.online = {"ub", "ud"}
    page = await env.rooms.members(C, ops.RoomMembers(room=room, limit=2))
    assert [(m.user, m.role, m.online) for m in page.members] == [
        ("ua", "owner", False),
        ("ub", "admin", True),
    ]
    assert page.next is not None
    rest = await env.rooms.members(C, ops.RoomMembers(room=room, after=page.next, limit=10))
    assert [(m.user, m.online) for m in rest.members] == [
        ("uc", False),
        ("ud", True),
        ("ue", False),
    ]
    assert rest.next is None
    await fails(env.rooms.members(caller("x"), ops.RoomMembers(room=room)), Forbidden)
    await fails(env.rooms.members(C, ops.RoomMembers(room=room, after="-1")), BadRequest, "after")
    public = await make_room(env, public=True)
    assert len((await env.rooms.members(D, ops.RoomMembers(room=public))).members) == 1


# --- the exclusion guarantee ---------------------------------------------------------


async def test_a_kicked_user_gets_nothing_after_the_kick(env: Env) -> None:
    room = await make_room(env, members=(B, C))
    conv = f"r:{room}"
    await env.messages.send(B, send(conv, "before"))
    # A burst of sends, typing and receipts from B interleaved with the kick of C.
    sends = [env.messages.send(B, send(conv, f"m{i}")) for i in range(50)]
    kick = asyncio.ensure_future(env.rooms.kick(A, room, UserId("uc")))
    sends += [env.messages.send(B, send(conv, f"n{i}")) for i in range(50)]
    deadline = asyncio.get_running_loop().time() + 10
    # A stream until the kick is done (a database server takes more loop turns than SQLite).
    while not kick.done() and asyncio.get_running_loop().time() < deadline:
        sends.append(env.messages.send(B, send(conv, f"s{len(sends)}")))
        await asyncio.sleep(0)
    await env.messages.typing(B, conv)
    await env.messages.mark(B, conv, 3, "read")
    await asyncio.gather(kick, *sends)
    kicked = next(m for m, _ in env.msgs(room) if (m.meta or {}).get("event") == "kicked")
    to_c = [d for d in env.deliveries if "uc" in d.users]
    last_to_c = to_c[-1].event
    assert isinstance(last_to_c, Msg) and last_to_c.seq == kicked.seq
    for d in env.deliveries[env.deliveries.index(to_c[-1]) + 1 :]:
        assert "uc" not in d.users
    # The kick took effect at its seq: C got every message before it, none after.
    msgs = [d for d in env.deliveries if isinstance(d.event, Msg) and d.event.conv == conv]
    assert all(("uc" in d.users) == (d.event.seq <= kicked.seq) for d in msgs)
    assert any(d.event.seq > kicked.seq for d in msgs)
    # After the ack: refused everywhere.
    await fails(env.messages.history(C, ops.History(conv=conv)), Forbidden)
    await fails(env.messages.send(C, send(conv, "late")), Forbidden)
    await fails(env.messages.typing(C, conv), Forbidden)
    await fails(env.messages.mark(C, conv, 1, "read"), Forbidden)
    await env.messages.typing(B, conv)
    await env.messages.mark(B, conv, 50, "read")
    last = env.deliveries[-2:]
    assert isinstance(last[0].event, TypingEvent) and "uc" not in last[0].users
    assert isinstance(last[1].event, Receipt) and "uc" not in last[1].users
    assert await env.rooms.rooms_of(UserId("uc")) == []


async def test_mentions_must_be_members(env: Env) -> None:
    room = await make_room(env, public=True, members=(B,))
    conv = f"r:{room}"
    await fails(env.messages.send(A, send(conv, "c1", mentions=["uc"])), BadRequest, "mentions")
    await env.rooms.join(C, room)
    sent = await env.messages.send(A, send(conv, "c2", mentions=["uc"]))
    assert sent.seq > 0
    (summary,) = [c for c in await env.messages.convs(C) if c.conv == conv]
    assert summary.mentions == 1
