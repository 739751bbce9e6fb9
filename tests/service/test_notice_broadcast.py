"""``notice.broadcast`` on the real user and message services (SQLite files, the
memory live bus): who may, what is checked, idempotency, ``to: "all"``, and a
broadcast to 10,000 users.

Contract tests: each runs over the ``local`` and ``loopback`` transports
(``transports.py``): the broadcast service, and the user and message services it
calls, are all reached through the transport.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conformance import signature_mismatches
from message_helpers import Recorder
from transports import through

from imserver.protocol import ops
from imserver.protocol.codec import Codec, decode_op
from imserver.protocol.events import Msg
from imserver.protocol.models import User
from imserver.services.caller import Caller
from imserver.services.message.api import MessageService
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.notification import broadcast
from imserver.services.notification.broadcast import (
    BroadcastService,
    LocalBroadcastService,
    NoticePoster,
    broadcast_id,
)
from imserver.services.user.api import UserService
from imserver.services.user.service import LocalUserService, open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.testing.accounts import bulk_register
from imserver.testing.sessions import CHEAP_AUTH
from imserver.utils.errors import BadRequest, Forbidden, IMError, TooLarge
from imserver.utils.ids import LoginId, UserId

PASSWORD = "correct horse"
MAX_BODY = 100


@dataclass
class World:
    path: Path
    users: UserService
    messages: MessageService
    broadcasts: BroadcastService
    recorder: Recorder
    accounts: dict[str, User]

    def caller(self, name: str) -> Caller:
        return Caller(user=UserId(self.accounts[name].id), login=LoginId(f"{name}-login"))

    def uid(self, name: str) -> str:
        return self.accounts[name].id

    async def notices(self, name: str) -> list[Any]:
        """The messages of ``name``'s ``s:`` conversation, read through the API."""
        data = await self.messages.history(
            self.caller(name), ops.History(conv=f"s:{self.uid(name)}")
        )
        return data.messages


@pytest.fixture
async def world(tmp_path: Path, transport: str) -> AsyncIterator[World]:
    local_users = await _open_users(tmp_path)
    accounts = {
        name: await local_users.register(name, PASSWORD, None)
        for name in ("root", "alice", "bob", "carol")
    }
    async with _services(tmp_path, transport, local_users) as (users, messages, bc, recorder):
        for account in accounts.values():
            recorder.attach(account.id)
        yield World(tmp_path, users, messages, bc, recorder, accounts)


async def _open_users(path: Path) -> LocalUserService:
    return await open_user_service(
        sqlite_url(path, "user"),
        argon2_memory_kib=CHEAP_AUTH.argon2_memory_kib,
        argon2_time_cost=CHEAP_AUTH.argon2_time_cost,
        admins=["root"],
    )


class _services:
    """The message and broadcast services over ``local_users``, through ``transport``;
    closes all three."""

    def __init__(self, path: Path, transport: str, local_users: LocalUserService) -> None:
        self.path, self.transport, self.local_users = path, transport, local_users
        self.local_messages: LocalMessageService | None = None

    async def __aenter__(self) -> tuple[UserService, MessageService, BroadcastService, Recorder]:
        users = through(self.transport, UserService, self.local_users)
        bus = MemoryLiveBus()
        recorder = Recorder(bus)
        self.local_messages = await open_message_service(
            sqlite_url(self.path, "message"), bus=bus, users=users
        )
        messages = through(self.transport, MessageService, self.local_messages)
        local = LocalBroadcastService(users=users, messages=messages, max_body=MAX_BODY)
        return users, messages, through(self.transport, BroadcastService, local), recorder

    async def __aexit__(self, *exc: object) -> None:
        if self.local_messages is not None:
            await self.local_messages.close()
        await self.local_users.close()


def bc(to: Any, body: str = "maintenance at 02:00", cid: str | None = None) -> ops.NoticeBroadcast:
    return ops.NoticeBroadcast(body=body, to=to, cid=cid)


async def refused(world: World, who: str, req: ops.NoticeBroadcast, cls: type[IMError]) -> IMError:
    with pytest.raises(IMError) as info:
        await world.broadcasts.broadcast(world.caller(who), req)
    assert type(info.value) is cls, info.value
    return info.value


def stored_notices(path: Path) -> dict[str, int]:
    """``s:`` conversation -> how many messages it holds, read from message.db."""
    with sqlite3.connect(path / "message.db") as db:
        rows = db.execute(
            "SELECT conv, count(*) FROM messages WHERE conv LIKE 's:%' GROUP BY conv"
        ).fetchall()
    return {conv: n for conv, n in rows}


def test_local_services_satisfy_the_protocols() -> None:
    assert signature_mismatches(BroadcastService, LocalBroadcastService) == []
    assert signature_mismatches(NoticePoster, LocalMessageService) == []


# --- who may ----------------------------------------------------------------------------


async def test_an_admin_of_the_setting_reaches_each_user_named(world: World) -> None:
    reply = await world.broadcasts.broadcast(
        world.caller("root"), bc([world.uid("alice"), world.uid("bob")], cid="c1")
    )
    assert reply == ops.BroadcastData(
        id=broadcast_id(UserId(world.uid("root")), "c1"), reached=2, unknown=[], dup=False
    )
    for name in ("alice", "bob"):
        [m] = await world.notices(name)
        assert (m.from_, m.type, m.body, m.cid) == ("system", "system", bc([]).body, reply.id)
        assert m.meta == {"broadcast": reply.id}
    assert await world.notices("carol") == []
    live = [(d.users, d.event) for d in world.recorder.deliveries]
    assert sorted(u for users, _ in live for u in users) == sorted(
        [world.uid("alice"), world.uid("bob")]
    )
    assert all(isinstance(e, Msg) and e.conv.startswith("s:") for _, e in live)


async def test_a_granted_admin_may_until_revoked(world: World) -> None:
    req = bc([world.uid("bob")])
    await refused(world, "alice", req, Forbidden)
    await world.users.grant_admin("alice")
    assert (await world.broadcasts.broadcast(world.caller("alice"), req)).reached == 1
    await world.users.revoke_admin("alice")
    await refused(world, "alice", req, Forbidden)
    assert len(await world.notices("bob")) == 1


async def test_a_user_who_is_no_admin_is_forbidden_and_nothing_is_posted(world: World) -> None:
    await refused(world, "bob", bc("all"), Forbidden)
    await refused(world, "bob", bc([world.uid("alice")]), Forbidden)
    assert stored_notices(world.path) == {}


# --- what is checked --------------------------------------------------------------------


async def test_a_body_over_max_body_is_too_large(world: World) -> None:
    error = await refused(world, "root", bc("all", body="x" * (MAX_BODY + 1)), TooLarge)
    assert error.field == "body"
    error = await refused(world, "root", bc("all", body=""), BadRequest)
    assert error.field == "body"
    reply = await world.broadcasts.broadcast(world.caller("root"), bc("all", body="x" * MAX_BODY))
    assert reply.reached == 4
    assert stored_notices(world.path) == {f"s:{u.id}": 1 for u in world.accounts.values()}


async def test_unknown_ids_are_reported_and_the_known_reached(world: World) -> None:
    alice = world.uid("alice")
    reply = await world.broadcasts.broadcast(
        world.caller("root"), bc([alice, "u_ghost", alice, "u_ghost", "u_other"])
    )
    assert (reply.reached, reply.unknown) == (1, ["u_ghost", "u_other"])
    assert len(await world.notices("alice")) == 1
    only_unknown = await world.broadcasts.broadcast(world.caller("root"), bc(["u_ghost"]))
    assert (only_unknown.reached, only_unknown.unknown, only_unknown.dup) == (0, ["u_ghost"], False)


@pytest.mark.parametrize(
    "to",
    ['"some"', '"ALL"', "[]", "5", "null", "[5]", '[""]', "[" + ",".join(['"u1"'] * 10_001) + "]"],
    ids=["other-word", "upper-case", "empty", "number", "null", "non-string", "empty-id", "10001"],
)
def test_a_bad_to_is_a_bad_request_naming_to(to: str) -> None:
    payload = f'{{"op":"notice.broadcast","body":"hi","to":{to}}}'
    with pytest.raises(BadRequest) as info:
        decode_op(payload, Codec.JSON)
    assert "to" in (info.value.field or "")


def test_ten_thousand_ids_is_a_valid_to() -> None:
    ids = ",".join(f'"u{n}"' for n in range(ops.BROADCAST_MAX_USERS))
    op = decode_op(f'{{"op":"notice.broadcast","body":"hi","to":[{ids}]}}', Codec.JSON)
    assert isinstance(op, ops.NoticeBroadcast) and len(op.to) == ops.BROADCAST_MAX_USERS


# --- idempotency ------------------------------------------------------------------------


async def test_a_retry_with_the_same_cid_posts_nothing_twice(world: World) -> None:
    req = bc("all", cid="weekly-1")
    first = await world.broadcasts.broadcast(world.caller("root"), req)
    again = await world.broadcasts.broadcast(world.caller("root"), req)
    assert (first.id, first.reached, first.dup) == (again.id, 4, False)
    assert (again.reached, again.dup) == (4, True)
    assert stored_notices(world.path) == {f"s:{u.id}": 1 for u in world.accounts.values()}
    # A new user since: the retry reaches them and no one else again.
    dave = await world.users.register("dave", PASSWORD, None)
    third = await world.broadcasts.broadcast(world.caller("root"), req)
    assert (third.reached, third.dup) == (5, False)
    assert stored_notices(world.path)[f"s:{dave.id}"] == 1
    assert sum(stored_notices(world.path).values()) == 5


async def test_the_key_is_per_admin_and_cid(world: World) -> None:
    await world.users.grant_admin("alice")
    to = [world.uid("bob")]
    by_root = await world.broadcasts.broadcast(world.caller("root"), bc(to, cid="same"))
    by_alice = await world.broadcasts.broadcast(world.caller("alice"), bc(to, cid="same"))
    other_cid = await world.broadcasts.broadcast(world.caller("root"), bc(to, cid="other"))
    no_cid = [await world.broadcasts.broadcast(world.caller("root"), bc(to)) for _ in range(2)]
    ids = {by_root.id, by_alice.id, other_cid.id, *(r.id for r in no_cid)}
    assert len(ids) == 5
    assert not any(r.dup for r in (by_root, by_alice, other_cid, *no_cid))
    assert len(await world.notices("bob")) == 5


# --- to: "all" --------------------------------------------------------------------------


async def test_to_all_pages_through_every_user(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broadcast, "PAGE", 3)  # 4 users: a full page and a short one
    reply = await world.broadcasts.broadcast(world.caller("root"), bc("all"))
    assert reply.reached == 4
    assert stored_notices(world.path) == {f"s:{u.id}": 1 for u in world.accounts.values()}
    monkeypatch.setattr(broadcast, "PAGE", 2)  # pages that end exactly at the last user
    assert (await world.broadcasts.broadcast(world.caller("root"), bc("all"))).reached == 4
    assert set(stored_notices(world.path).values()) == {2}


async def test_a_broadcast_reaches_ten_thousand_users(tmp_path: Path, transport: str) -> None:
    names = [f"user{n:05d}" for n in range(10_000)]
    created = await bulk_register(tmp_path, ["root", *names], PASSWORD, CHEAP_AUTH)
    root = Caller(user=UserId(created[0].id), login=LoginId("root-login"))
    local_users = await _open_users(tmp_path)
    async with _services(tmp_path, transport, local_users) as (_, messages, broadcasts, _rec):
        reply = await broadcasts.broadcast(root, bc("all", body="server move", cid="move"))
        assert (reply.reached, reply.unknown, reply.dup) == (10_001, [], False)
        assert stored_notices(tmp_path) == {f"s:{u.id}": 1 for u in created}
        again = await broadcasts.broadcast(root, bc("all", body="server move", cid="move"))
        assert (again.reached, again.dup) == (10_001, True)
        ids = [u.id for u in created[1:]]
        listed = await broadcasts.broadcast(root, bc(ids, body="by list"))
        assert (listed.reached, listed.unknown) == (10_000, [])
        last = created[-1]
        page = await messages.history(
            Caller(user=UserId(last.id), login=LoginId("l")), ops.History(conv=f"s:{last.id}")
        )
        assert [(m.body, m.cid) for m in page.messages] == [
            ("server move", reply.id),
            ("by list", listed.id),
        ]
    counts = stored_notices(tmp_path)
    assert counts.pop(f"s:{created[0].id}") == 1
    assert counts == {f"s:{u}": 2 for u in ids}
