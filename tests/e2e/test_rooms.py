"""End-to-end tests of docs/protocol.md §5 (rooms) as a client author reads it, against real
``imserver serve`` processes: the permission matrix, ownership hand-over, empty rooms,
system messages, the kick guarantee, group receipts, mentions, typing, search, the
directory, member lists, the size limit, HTTP and bad input.

Every refusal is checked for its exact ``code`` (and ``field`` where docs/protocol.md
names one) and for the connection staying usable.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from refusals import refused

from imserver.client import Client, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory, ServerProcess

Frame = dict[str, Any]
ROOM_FIELDS = {"id", "conv", "name", "topic", "public", "owner", "members", "created"}
ROOM_OPS = [
    "room.create",
    "room.get",
    "room.update",
    "room.list",
    "room.join",
    "room.leave",
    "room.invite",
    "room.kick",
    "room.role",
    "room.members",
]


# --- helpers --------------------------------------------------------------------------


def unique(prefix: str = "room") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


async def create(c: Client, name: str | None = None, **fields: Any) -> Frame:
    data = await c.request("room.create", name=name or unique(), **fields)
    room: Frame = data["room"]
    assert set(room) == ROOM_FIELDS, room
    return room


async def messages(c: Client, room: Frame | str) -> list[Frame]:
    conv = room["conv"] if isinstance(room, dict) else f"r:{room}"
    page = await c.history(conv, after=0, limit=200)
    assert page["has_more"] is False
    found: list[Frame] = page["messages"]
    return found


def events(msgs: list[Frame]) -> list[dict[str, Any]]:
    """``meta`` of the system messages among ``msgs``."""
    return [m["meta"] for m in msgs if m["type"] == "system"]


async def next_msg(c: Client, conv: str) -> Frame:
    return await c.next_event("msg", match=lambda e: e.get("conv") == conv)


async def system_event(c: Client, conv: str, event: str, **meta: Any) -> Frame:
    """The first queued (or next) live ``msg`` of ``conv`` that is the system event
    ``event`` with ``meta`` among its meta; other events stay queued."""

    def match(e: Frame) -> bool:
        got = e.get("meta") or {}
        return (
            e.get("conv") == conv
            and e.get("type") == "system"
            and got.get("event") == event
            and all(got.get(k) == v for k, v in meta.items())
        )

    return await c.next_event("msg", match=match)


async def role_of(c: Client, room: str, user: str) -> str | None:
    data = await c.request("room.members", room=room, limit=500)
    roles = {m["user"]: m["role"] for m in data["members"]}
    return roles.get(user)


# --- the permission matrix ------------------------------------------------------------


@dataclass
class Cast:
    """Six users; ``build`` makes a room where they play their part."""

    owner: Client
    admin: Client
    member: Client
    target: Client  # a second plain member: the target of kick and role
    invitee: Client
    outsider: Client

    def by_role(self, role: str) -> Client:
        c: Client = getattr(self, role)
        return c

    async def build(self, public: bool) -> str:
        room = await create(
            self.owner,
            public=public,
            members=[self.admin.user_id, self.member.user_id, self.target.user_id],
        )
        rid: str = room["id"]
        await self.owner.request("room.role", room=rid, user=self.admin.user_id, role="admin")
        await self.owner.request("room.invite", room=rid, user=self.invitee.user_id)
        return rid


@pytest.fixture
async def cast(shared_server: ServerProcess, clients: Clients) -> Cast:
    names = ("owner", "admin", "member", "target", "invitee", "outsider")
    users = await asyncio.gather(*(clients.user(shared_server, n) for n in names))
    return Cast(*users)


ACTORS = ("owner", "admin", "member", "invitee", "outsider")
OK, NO = "ok", "forbidden"
PRIVATE_ONLY = (NO, OK)  # forbidden in a private room, allowed in a public one

MATRIX: dict[str, dict[str, str | tuple[str, str]]] = {
    # op: {actor: outcome, or (outcome in a private room, outcome in a public room)}
    "room.get": {"owner": OK, "admin": OK, "member": OK, "invitee": OK, "outsider": PRIVATE_ONLY},
    "room.update": {"owner": OK, "admin": OK, "member": NO, "invitee": NO, "outsider": NO},
    "room.list": {"owner": OK, "admin": OK, "member": OK, "invitee": OK, "outsider": OK},
    "room.join": {"owner": OK, "admin": OK, "member": OK, "invitee": OK, "outsider": PRIVATE_ONLY},
    "room.leave": {"owner": OK, "admin": OK, "member": OK, "invitee": NO, "outsider": NO},
    "room.invite": {"owner": OK, "admin": OK, "member": NO, "invitee": NO, "outsider": NO},
    "room.kick": {"owner": OK, "admin": OK, "member": NO, "invitee": NO, "outsider": NO},
    "room.role": {"owner": OK, "admin": NO, "member": NO, "invitee": NO, "outsider": NO},
    "room.members": {
        "owner": OK,
        "admin": OK,
        "member": OK,
        "invitee": PRIVATE_ONLY,
        "outsider": PRIVATE_ONLY,
    },
}


def op_fields(op: str, room: str, cast: Cast, spare: str) -> Frame:
    """The fields of ``op`` on ``room``: invite ``spare``, kick/promote ``cast.target``."""
    return {
        "room.get": {"room": room},
        "room.update": {"room": room, "topic": "new topic"},
        "room.list": {"query": room},
        "room.join": {"room": room},
        "room.leave": {"room": room},
        "room.invite": {"room": room, "user": spare},
        "room.kick": {"room": room, "user": cast.target.user_id},
        "room.role": {"room": room, "user": cast.target.user_id, "role": "admin"},
        "room.members": {"room": room},
    }[op]


@pytest.mark.parametrize("op", list(MATRIX))
async def test_permission_matrix(
    op: str, cast: Cast, shared_server: ServerProcess, register_user: Any
) -> None:
    spare = (await register_user(shared_server, "spare")).id
    for public in (False, True):
        for actor in ACTORS:
            expected = MATRIX[op][actor]
            outcome = expected[int(public)] if isinstance(expected, tuple) else expected
            room = await cast.build(public)
            c = cast.by_role(actor)
            what = f"{op} by the {actor} of a {'public' if public else 'private'} room"
            call = c.request(op, op_fields(op, room, cast, spare))
            if outcome == OK:
                data = await call
                if op in ("room.get", "room.update", "room.join"):
                    assert data["room"]["id"] == room, what
                elif op == "room.members":
                    assert len(data["members"]) == 4 and data["next"] is None, what
                elif op == "room.list":
                    assert data["rooms"] == [], what  # the room's id is not its name
                else:
                    assert data == {}, what
            else:
                await refused(call, outcome, what=what)
            assert await c.ping() == {}


async def test_effects_of_allowed_ops(cast: Cast) -> None:
    room = await cast.build(public=False)
    # update by an admin
    updated = await cast.admin.request("room.update", room=room, name="Renamed", public=True)
    assert (updated["room"]["name"], updated["room"]["public"]) == ("Renamed", True)
    # kick by the admin of a plain member
    await cast.admin.request("room.kick", room=room, user=cast.target.user_id)
    assert await role_of(cast.owner, room, cast.target.user_id) is None
    # role by the owner
    await cast.owner.request("room.role", room=room, user=cast.member.user_id, role="admin")
    assert await role_of(cast.owner, room, cast.member.user_id) == "admin"
    # join by the invitee consumes the invitation
    joined = await cast.invitee.request("room.join", room=room)
    assert joined["room"]["members"] == 4
    got = await cast.owner.request("room.get", room=room)
    assert got["room"]["members"] == 4


@pytest.mark.parametrize(
    ("actor", "target", "code"),
    [
        ("owner", "admin", None),
        ("owner", "member", None),
        ("owner", "owner", "forbidden"),  # oneself: use room.leave
        ("admin", "owner", "forbidden"),
        ("admin", "admin2", "forbidden"),
        ("admin", "admin", "forbidden"),
        ("admin", "member", None),
        ("member", "member2", "forbidden"),
        ("member", "admin", "forbidden"),
        ("member", "owner", "forbidden"),
    ],
)
async def test_kick_ranks(
    shared_server: ServerProcess, clients: Clients, actor: str, target: str, code: str | None
) -> None:
    names = ("owner", "admin", "admin2", "member", "member2")
    logged_in = await asyncio.gather(*(clients.user(shared_server, n) for n in names))
    users = dict(zip(names, logged_in, strict=True))
    owner = users["owner"]
    room = (await create(owner, members=[users[n].user_id for n in names[1:]]))["id"]
    for n in ("admin", "admin2"):
        await owner.request("room.role", room=room, user=users[n].user_id, role="admin")
    call = users[actor].request("room.kick", room=room, user=users[target].user_id)
    if code is None:
        assert await call == {}
        assert await role_of(owner, room, users[target].user_id) is None
    else:
        await refused(call, code, what=f"{actor} kicks {target}")
        assert await role_of(owner, room, users[target].user_id) is not None


async def test_role_rules(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    owner = await clients.user(shared_server, "owner")
    admin = await clients.user(shared_server, "admin")
    member = await clients.user(shared_server, "member")
    stranger = await register_user(shared_server, "stranger")
    room = (await create(owner, members=[admin.user_id, member.user_id]))["id"]
    await owner.request("room.role", room=room, user=admin.user_id, role="admin")
    await refused(
        owner.request("room.role", room=room, user=owner.user_id, role="member"), "forbidden"
    )
    await refused(
        admin.request("room.role", room=room, user=owner.user_id, role="member"), "forbidden"
    )
    await refused(
        admin.request("room.role", room=room, user=member.user_id, role="admin"), "forbidden"
    )
    await refused(
        owner.request("room.role", room=room, user=stranger.id, role="admin"), "not_found", "user"
    )
    await refused(
        owner.request("room.role", room=room, user="unope", role="admin"), "not_found", "user"
    )
    await refused(
        owner.request("room.role", room=room, user=member.user_id, role="owner"),
        "bad_request",
        "role",
    )
    # Demotion takes the admin rights away at once.
    await owner.request("room.role", room=room, user=admin.user_id, role="member")
    await refused(admin.request("room.invite", room=room, user=stranger.id), "forbidden")
    assert await role_of(owner, room, admin.user_id) == "member"


async def test_unknown_rooms_users_and_conflicts(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    for op in ROOM_OPS:
        if op in ("room.create", "room.list"):
            continue
        fields: Frame = {"room": "rnope"}
        if op in ("room.invite", "room.kick", "room.role"):
            fields["user"] = b.user_id
        if op == "room.role":
            fields["role"] = "admin"
        await refused(a.request(op, fields), "not_found", "room", what=op)
    await refused(
        a.request("room.create", name="x", members=[b.user_id, "unope"]), "not_found", "members"
    )
    room = (await create(a, members=[b.user_id]))["id"]
    await refused(a.request("room.invite", room=room, user="unope"), "not_found", "user")
    await refused(a.request("room.kick", room=room, user="unope"), "not_found", "user")
    outsider = await register_user(shared_server, "out")
    await refused(a.request("room.kick", room=room, user=outsider.id), "not_found", "user")
    # Inviting a member is a conflict; re-inviting an invitee stores nothing new.
    await refused(a.request("room.invite", room=room, user=b.user_id), "conflict", "user")
    await a.request("room.invite", room=room, user=outsider.id)
    before = await messages(a, room)
    assert await a.request("room.invite", room=room, user=outsider.id) == {}
    # Joining twice answers the room and stores nothing new.
    again = await b.request("room.join", room=room)
    assert again["room"]["members"] == 2
    assert await messages(a, room) == before


# --- hand-over and empty rooms --------------------------------------------------------


async def test_owner_hands_over_to_the_oldest_admin_else_the_oldest_member(
    shared_server: ServerProcess, clients: Clients
) -> None:
    names = ("owner", "m1", "m2", "m3")
    owner, m1, m2, m3 = await asyncio.gather(*(clients.user(shared_server, n) for n in names))
    room = await create(owner, members=[m1.user_id, m2.user_id, m3.user_id])
    rid, conv = room["id"], room["conv"]
    # Promoted in reverse order: the longest-standing admin is m2 nonetheless.
    await owner.request("room.role", room=rid, user=m3.user_id, role="admin")
    await owner.request("room.role", room=rid, user=m2.user_id, role="admin")
    await owner.request("room.leave", room=rid)
    left = await system_event(m1, conv, "left")
    handed = await system_event(m1, conv, "role", role="owner")
    assert left["meta"] == {"event": "left", "actor": owner.user_id, "user": owner.user_id}
    assert handed["meta"] == {
        "event": "role",
        "actor": owner.user_id,
        "user": m2.user_id,
        "role": "owner",
    }
    assert handed["seq"] == left["seq"] + 1
    got = (await m1.request("room.get", room=rid))["room"]
    assert (got["owner"], got["members"]) == (m2.user_id, 3)
    assert await role_of(m1, rid, m2.user_id) == "owner"
    # No admin left once m3 is demoted: the next owner is the longest-standing member, m1.
    await m2.request("room.role", room=rid, user=m3.user_id, role="member")
    await m2.request("room.leave", room=rid)
    assert (await m3.request("room.get", room=rid))["room"]["owner"] == m1.user_id
    # The new owner has the owner's rights.
    await m1.request("room.role", room=rid, user=m3.user_id, role="admin")


async def test_last_member_leaving_removes_the_room(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    invitee = await clients.user(shared_server, "inv")
    name = unique("lonely")
    room = await create(a, name, public=True, members=[b.user_id])
    rid = room["id"]
    await a.request("room.invite", room=rid, user=invitee.user_id)
    assert room["conv"] in [c["conv"] for c in await invitee.convs()]
    listed = await a.request("room.list", query=name)
    assert [r["id"] for r in listed["rooms"]] == [rid]
    await a.request("room.leave", room=rid)
    await b.request("room.leave", room=rid)
    assert (await a.request("room.list", query=name))["rooms"] == []
    for c in (a, b, invitee):
        await refused(c.request("room.join", room=rid), "not_found", "room")
        await refused(c.request("room.get", room=rid), "not_found", "room")
    assert room["conv"] not in [c["conv"] for c in await invitee.convs()]
    assert room["conv"] not in [c["conv"] for c in await a.convs()]
    await refused(a.history(room["conv"]), "forbidden")


# --- system messages ------------------------------------------------------------------


async def test_system_messages_reach_members_live_and_in_history(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Any
) -> None:
    alice = await clients.user(shared_server, "alice", display_name="Alice")
    bob = await clients.user(shared_server, "bob", display_name="Bob")  # the test's wire
    carol = await clients.user(shared_server, "carol", display_name="Carol")
    room = await create(alice, "Team", topic="work", members=[bob.user_id])
    rid, conv = room["id"], room["conv"]
    assert (room["conv"], room["owner"], room["members"], room["public"]) == (
        f"r:{rid}",
        alice.user_id,
        2,
        False,
    )
    await alice.request("room.invite", room=rid, user=carol.user_id)
    await carol.request("room.join", room=rid)
    await alice.request("room.role", room=rid, user=bob.user_id, role="admin")
    await bob.request("room.update", room=rid, name="Team 2", topic="")
    await bob.request("room.kick", room=rid, user=carol.user_id)
    await bob.request("room.leave", room=rid)
    a, b, c = alice.user_id, bob.user_id, carol.user_id
    expected = [
        ({"event": "created", "actor": a}, "Alice created Team"),
        ({"event": "joined", "actor": a, "user": b}, "Alice added Bob"),
        ({"event": "invited", "actor": a, "user": c}, "Alice invited Carol"),
        ({"event": "joined", "actor": c, "user": c}, "Carol joined"),
        ({"event": "role", "actor": a, "user": b, "role": "admin"}, "Alice made Bob admin"),
        (
            {"event": "updated", "actor": b, "changes": {"name": "Team 2", "topic": None}},
            "Bob renamed the room to Team 2, cleared the topic",
        ),
        ({"event": "kicked", "actor": b, "user": c}, "Bob removed Carol"),
        ({"event": "left", "actor": b, "user": b}, "Bob left"),
    ]
    history = await messages(alice, rid)
    assert [(m["meta"], m["body"]) for m in history] == expected
    assert [m["seq"] for m in history] == list(range(1, 9))
    assert all(m["type"] == "system" and m["from"] == "system" for m in history)
    # Bob saw every one of them live (he was a member, or just leaving), in seq order.
    live = [await next_msg(bob, conv) for _ in range(8)]
    assert [m["seq"] for m in live] == list(range(1, 9))
    assert [m["meta"] for m in live] == [e[0] for e in expected]
    for m, h in zip(live, history, strict=True):
        assert {k: m[k] for k in ("seq", "from", "ts", "type", "body", "cid", "meta")} == {
            k: h[k] for k in ("seq", "from", "ts", "type", "body", "cid", "meta")
        }
    # Carol saw her invitation (not yet a member), and her kick, then nothing.
    seen = [await next_msg(carol, conv) for _ in range(4)]
    assert [m["meta"]["event"] for m in seen] == ["invited", "joined", "role", "updated"]
    assert (await next_msg(carol, conv))["meta"]["event"] == "kicked"
    assert await carol.events_before_ping("msg") == []
    (entry,) = [e for e in await alice.convs() if e["conv"] == conv]
    assert (entry["kind"], entry["title"], entry["last_seq"]) == ("room", "Team 2", 8)
    assert entry["last"]["meta"]["event"] == "left"


async def test_invited_users_see_the_room_in_convs(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    room = await create(a, "Invitation")
    await a.request("room.invite", room=room["id"], user=b.user_id)
    invited = await system_event(b, room["conv"], "invited")
    assert invited["meta"]["user"] == b.user_id
    (entry,) = await b.convs()
    assert (entry["conv"], entry["kind"], entry["title"], entry["last_seq"]) == (
        room["conv"],
        "room",
        "Invitation",
        2,
    )
    # Not a member yet: the history is closed, the room itself is visible.
    await refused(b.history(room["conv"]), "forbidden")
    assert (await b.request("room.get", room=room["id"]))["room"]["id"] == room["id"]
    await b.request("room.join", room=room["id"])
    assert [m["seq"] for m in await messages(b, room)] == [1, 2, 3]


# --- the kick guarantee ---------------------------------------------------------------


async def test_a_kicked_user_gets_the_kick_and_nothing_after_it(
    shared_server: ServerProcess, clients: Clients
) -> None:
    owner = await clients.user(shared_server, "owner")
    sender = await clients.user(shared_server, "sender")
    victim = await clients.user(shared_server, "victim")
    room = await create(owner, members=[sender.user_id, victim.user_id])
    rid, conv = room["id"], room["conv"]
    warm = await sender.send_message(conv, "warm-up")
    while (await next_msg(victim, conv))["seq"] < warm["seq"]:
        pass  # the victim is live in the room and has everything so far

    # Sends in flight from another connection before, during and after the kick: a
    # first burst, then a steady stream until the kick is acknowledged.
    def send() -> asyncio.Future[Frame]:
        return sender.request_nowait(
            "send", conv=conv, cid=uuid.uuid4().hex, type="text", body=f"burst {len(burst)}"
        )

    burst: list[asyncio.Future[Frame]] = []
    burst += [send() for _ in range(40)]
    kick = asyncio.ensure_future(owner.request("room.kick", room=rid, user=victim.user_id))
    while not kick.done() and len(burst) < 150:  # within the default rate-limit burst
        burst.append(send())
        await asyncio.sleep(0.0005)
    await sender.drain()
    acks = await asyncio.gather(*burst)
    assert await kick == {}
    # After the kick's ack: more messages, typing and receipts from the members.
    after = await sender.send_message(conv, "after the kick")
    await sender.request("typing", conv=conv)
    await sender.request("read", conv=conv, seq=after["seq"])
    await owner.request("recv", conv=conv, seq=after["seq"])
    # Every event of those acknowledged ops was written before the ping's reply.
    await victim.ping()

    got = victim.events_nowait("msg", match=lambda e: e.get("conv") == conv)
    kicked = [m for m in got if m["type"] == "system" and m["meta"]["event"] == "kicked"]
    assert len(kicked) == 1, got
    kick_seq = kicked[0]["seq"]
    assert kicked[0]["meta"] == {"event": "kicked", "actor": owner.user_id, "user": victim.user_id}
    assert [m["seq"] for m in got if m["seq"] > kick_seq] == []
    assert got[-1]["seq"] == kick_seq
    assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)
    assert victim.events_nowait(("typing", "receipt")) == []
    # Every message of the burst is stored. The kick takes effect at its seq: the victim
    # got exactly the burst's messages before it, none after it.
    seqs = sorted(a["seq"] for a in acks)
    assert len(set(seqs)) == len(burst)
    assert [m["seq"] for m in got if m["type"] == "text"] == [s for s in seqs if s < kick_seq]
    assert any(s > kick_seq for s in seqs)  # the stream did overlap the kick
    # The victim is refused from now on.
    await refused(victim.history(conv), "forbidden")
    await refused(victim.send_message(conv, "let me in"), "forbidden")
    await refused(victim.request("typing", conv=conv), "forbidden")
    await refused(victim.request("read", conv=conv, seq=1), "forbidden")
    await refused(victim.request("room.members", room=rid), "forbidden")
    await sender.request("typing", conv=conv)
    assert await victim.events_before_ping() == []


async def test_a_departed_user_gets_nothing_more(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    owner = await clients.user(shared_server, "owner")
    account = await register_user(shared_server, "leaver")
    leaver = await clients.connect(shared_server, login_as=account)
    other_device = await clients.connect(shared_server, login_as=account)
    room = await create(owner, public=True, members=[leaver.user_id])
    conv = room["conv"]
    await leaver.request("room.leave", room=room["id"])
    # The leaver's other device learns it from the stored event.
    left = await system_event(other_device, conv, "left")
    assert left["meta"]["user"] == leaver.user_id
    await system_event(leaver, conv, "left")
    for c in (leaver, other_device):
        c.events_nowait()  # what came before the leave
    await owner.send_message(conv, "after")
    await owner.request("typing", conv=conv)
    for c in (leaver, other_device):
        assert await c.events_before_ping(("msg", "typing")) == []
    await refused(leaver.history(conv), "forbidden")
    await refused(leaver.send_message(conv, "x"), "forbidden")
    await refused(leaver.request("typing", conv=conv), "forbidden")
    await refused(leaver.request("room.leave", room=room["id"]), "forbidden")
    # A public room can be joined again, and its history is open again.
    await leaver.request("room.join", room=room["id"])
    history = await messages(leaver, room)
    assert [m["body"] for m in history if m["type"] == "text"] == ["after"]
    assert history[-1]["meta"] == {
        "event": "joined",
        "actor": leaver.user_id,
        "user": leaver.user_id,
    }


# --- messaging in rooms ---------------------------------------------------------------


async def test_group_receipts(shared_server: ServerProcess, clients: Clients) -> None:
    a, b, c = await asyncio.gather(*(clients.user(shared_server, n) for n in ("a", "b", "c")))
    room = await create(a, members=[b.user_id, c.user_id])
    conv = room["conv"]
    base = 3  # created + two joined
    for i in range(3):
        await a.send_message(conv, f"m{i}")
    await b.request("read", conv=conv, seq=base + 2)
    want = {"op": "receipt", "conv": conv, "user": b.user_id, "seq": base + 2, "kind": "read"}
    for other in (a, c):
        assert await other.next_event("receipt") == want
    await c.request("recv", conv=conv, seq=base + 3)
    want = {"op": "receipt", "conv": conv, "user": c.user_id, "seq": base + 3, "kind": "recv"}
    for other in (a, b):
        assert await other.next_event("receipt") == want
    assert await b.events_before_ping("receipt") == []  # nothing about itself
    marks = {}
    for who in (a, b, c):
        (entry,) = [e for e in await who.convs() if e["conv"] == conv]
        marks[who.user_id] = (entry["read_seq"], entry["recv_seq"], entry["unread"])
    # Unread: past the read marker and not one's own (system messages count).
    assert marks[b.user_id] == (base + 2, base + 2, 1)
    assert marks[c.user_id] == (0, base + 3, base + 3)
    assert marks[a.user_id] == (0, 0, base)


async def test_mentions_must_be_members(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    room = await create(a, members=[b.user_id])
    conv = room["conv"]
    await refused(a.send_message(conv, "hey", mentions=[c.user_id]), "bad_request", "mentions")
    await refused(a.send_message(conv, "hey", mentions=["unope"]), "bad_request", "mentions")
    ack = await a.send_message(conv, "hey b", mentions=[b.user_id])
    assert await c.events_before_ping("msg") == []
    msg = await next_msg(b, conv)
    while msg["seq"] != ack["seq"]:
        msg = await next_msg(b, conv)
    assert msg["mentions"] == [b.user_id]
    (entry,) = [e for e in await b.convs() if e["conv"] == conv]
    assert entry["mentions"] == 1
    assert [m["seq"] for m in await messages(a, room)][-1] == ack["seq"]


async def test_owner_and_admins_recall_others_messages(
    shared_server: ServerProcess, clients: Clients
) -> None:
    names = ("owner", "admin", "member", "other")
    owner, admin, member, other = await asyncio.gather(
        *(clients.user(shared_server, n) for n in names)
    )
    room = await create(owner, members=[admin.user_id, member.user_id, other.user_id])
    conv = room["conv"]
    await owner.request("room.role", room=room["id"], user=admin.user_id, role="admin")
    by_member = (await member.send_message(conv, "from the member"))["seq"]
    by_admin = (await admin.send_message(conv, "from the admin"))["seq"]
    by_owner = (await owner.send_message(conv, "from the owner"))["seq"]

    def recall(c: Client, target: int) -> Awaitable[Frame]:
        return c.request("recall", conv=conv, cid=uuid.uuid4().hex, target=target)

    await refused(recall(other, by_member), "forbidden", what="member recalls a member's")
    await refused(recall(member, by_admin), "forbidden", what="member recalls an admin's")
    await recall(admin, by_member)
    await recall(admin, by_owner)
    await recall(owner, by_admin)
    recalled = {m["seq"]: m.get("recalled") for m in await messages(other, room)}
    assert recalled[by_member] is recalled[by_admin] is recalled[by_owner] is True
    # System messages are not content: nobody recalls them.
    await refused(recall(owner, 1), "bad_request", "target")


async def test_typing_goes_to_other_online_members_only(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    account = await register_user(shared_server, "a")
    a = await clients.connect(shared_server, login_as=account)
    a2 = await clients.connect(shared_server, login_as=account)
    b = await clients.user(shared_server, "b")
    outsider = await clients.user(shared_server, "out")
    offline = await register_user(shared_server, "offline")
    room = await create(a, public=True, members=[b.user_id, offline.id])
    conv = room["conv"]
    assert await a.request("typing", conv=conv) == {}
    assert await b.next_event("typing") == {"op": "typing", "conv": conv, "user": a.user_id}
    for c in (a, a2, outsider):  # never to the typist, not even its other devices
        assert await c.events_before_ping("typing") == []
    await refused(outsider.request("typing", conv=conv), "forbidden")
    # The offline member finds nothing of it later: typing is never stored.
    assert all(m["type"] == "system" for m in await messages(a, room))


async def test_search_covers_the_rooms_one_belongs_to(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    word = f"zebra{secrets.token_hex(4)}"
    room = await create(a, public=True, members=[b.user_id])
    other = await create(a)  # b is not in it
    await a.send_message(room["conv"], f"the {word} in the room")
    await a.send_message(other["conv"], f"the {word} elsewhere")
    found = await b.request("search", query=word)
    assert [(m["conv"], m["body"]) for m in found["messages"]] == [
        (room["conv"], f"the {word} in the room")
    ]
    scoped = await a.request("search", query=word, conv=room["conv"])
    assert len(scoped["messages"]) == 1
    await b.request("room.leave", room=room["id"])
    assert (await b.request("search", query=word))["messages"] == []
    await refused(b.request("search", query=word, conv=room["conv"]), "forbidden")
    assert len((await a.request("search", query=word))["messages"]) == 2


# --- the directory and member lists ---------------------------------------------------


async def test_room_list_search_paging_counts_and_escaping(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    tag = secrets.token_hex(4)
    names = [
        f"Chess {tag}",
        f"chess club {tag}",
        f"CHESS-masters {tag}",
        f"100% chess {tag}",
        f"chess_x {tag}",
        f"chessyx {tag}",
    ]
    ids = [(await create(a, n, public=True))["id"] for n in names]
    await create(a, f"chess private {tag}")  # private rooms are not listed
    await b.request("room.join", room=ids[1])

    async def listed(query: str, **kw: Any) -> list[tuple[str, int]]:
        data = await b.request("room.list", query=query, **kw)
        return [(r["name"], r["members"]) for r in data["rooms"]]

    assert await listed(tag) == [(n, 2 if i == 1 else 1) for i, n in enumerate(names)]
    assert await listed(f"ChEsS cLuB {tag}".upper()) == [(names[1], 2)]
    assert await listed(f"% chess {tag}") == [(names[3], 1)]
    assert await listed(f"chess_x {tag}") == [(names[4], 1)]  # "_" is not a wildcard
    assert await listed(f"s_x {tag}") == [(names[4], 1)]
    # Paging: oldest first, an opaque cursor, no duplicates, nothing missed.
    seen: list[str] = []
    after: str | None = None
    while True:
        fields: Frame = {"query": tag, "limit": 4}
        if after is not None:
            fields["after"] = after
        page = await b.request("room.list", fields)
        assert len(page["rooms"]) <= 4
        seen += [r["id"] for r in page["rooms"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ids
    for r in (await b.request("room.list", query=tag))["rooms"]:
        assert set(r) == ROOM_FIELDS and r["public"] is True


async def test_room_members_paging_and_online(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    offline = [await register_user(shared_server, f"off{i}") for i in range(3)]
    room = await create(a, members=[b.user_id, *(u.id for u in offline)])
    await a.request("room.role", room=room["id"], user=b.user_id, role="admin")
    page = await a.request("room.members", room=room["id"], limit=2)
    assert page["members"] == [
        {"user": a.user_id, "role": "owner", "online": True},
        {"user": b.user_id, "role": "admin", "online": True},
    ]
    assert isinstance(page["next"], str)
    rest = await b.request("room.members", room=room["id"], after=page["next"], limit=2)
    assert rest["members"] == [
        {"user": offline[0].id, "role": "member", "online": False},
        {"user": offline[1].id, "role": "member", "online": False},
    ]
    last = await b.request("room.members", room=room["id"], after=rest["next"], limit=2)
    assert [m["user"] for m in last["members"]] == [offline[2].id]
    assert last["next"] is None
    await b.close()
    # The server sees the end of the connection after the client: ask until it has.
    async with asyncio.timeout(10):
        while True:
            page = await a.request("room.members", room=room["id"], limit=2)
            if page["members"][1]["online"] is False:
                break
            await asyncio.sleep(0.02)


async def test_max_room_size(server_factory: ServerFactory, clients: Clients) -> None:
    server = server_factory({"rooms": {"max_size": 3}})
    a, b, c, d = await asyncio.gather(*(clients.user(server, n) for n in "abcd"))
    err = await refused(
        a.request("room.create", name="big", members=[b.user_id, c.user_id, d.user_id]),
        "forbidden",
    )
    assert "full" in err.message
    room = await create(a, public=True, members=[b.user_id])
    await c.request("room.join", room=room["id"])
    err = await refused(d.request("room.join", room=room["id"]), "forbidden")
    assert "full" in err.message
    await a.request("room.invite", room=room["id"], user=d.user_id)  # inviting is fine
    err = await refused(d.request("room.join", room=room["id"]), "forbidden")
    assert "full" in err.message
    await c.request("room.leave", room=room["id"])
    assert (await d.request("room.join", room=room["id"]))["room"]["members"] == 3


# --- HTTP and bad input -----------------------------------------------------------------


async def test_every_room_op_over_http(shared_server: ServerProcess, clients: Clients) -> None:
    live = await clients.user(shared_server, "live")
    async with HttpClient(shared_server.http_url) as http:
        tokens: dict[str, tuple[str, str]] = {}
        for who in ("owner", "guest"):
            name = unique(who)
            await http.request("register", username=name, password="correct-horse-battery")
            data = await http.request("login", username=name, password="correct-horse-battery")
            tokens[who] = (data["user"]["id"], data["token"])
        (owner, ot), (guest, gt) = tokens["owner"], tokens["guest"]
        name = unique("http")
        room = (await http.request("room.create", name=name, members=[live.user_id], token=ot))[
            "room"
        ]
        rid = room["id"]
        assert set(room) == ROOM_FIELDS
        assert (await http.request("room.get", room=rid, token=ot))["room"] == room
        status, body = await http.call("room.get", room=rid, token=gt)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = await http.call("room.get", room="rnope", token=gt)
        assert (status, body["error"]["code"], body["error"]["field"]) == (404, "not_found", "room")
        up = await http.request("room.update", room=rid, public=True, token=ot)
        assert up["room"]["public"] is True
        listed = await http.request("room.list", query=name, token=gt)
        assert [r["id"] for r in listed["rooms"]] == [rid] and listed["next"] is None
        assert (await http.request("room.join", room=rid, token=gt))["room"]["members"] == 3
        assert await http.request("room.role", room=rid, user=guest, role="admin", token=ot) == {}
        assert await http.request("room.kick", room=rid, user=live.user_id, token=gt) == {}
        assert await http.request("room.invite", room=rid, user=live.user_id, token=gt) == {}
        status, body = await http.call("room.invite", room=rid, user=guest, token=ot)
        assert (status, body["error"]["code"]) == (409, "conflict")
        members = await http.request("room.members", room=rid, token=ot)
        assert [(m["user"], m["role"]) for m in members["members"]] == [
            (owner, "owner"),
            (guest, "admin"),
        ]
        assert await http.request("room.leave", room=rid, token=ot) == {}
        assert (await http.request("room.get", room=rid, token=gt))["room"]["owner"] == guest
        status, body = await http.call("room.leave", room=rid)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        # The live member saw the whole story over WebSocket, ending with the kick.
        kicked = await system_event(live, room["conv"], "kicked")
        assert kicked["meta"]["actor"] == guest
        status, _, raw = await http.get("/api/v1/openapi.json")
        assert status == 200
        paths = msgspec.json.decode(raw)["paths"]
        for op in ROOM_OPS:
            assert f"/api/v1/{op}" in paths, op


BAD_INPUT: list[tuple[str, Frame, str]] = [
    ("room.create", {}, "name"),
    ("room.create", {"name": ""}, "name"),
    ("room.create", {"name": "x" * 101}, "name"),
    ("room.create", {"name": "x", "topic": "t" * 501}, "topic"),
    ("room.create", {"name": "x", "public": "yes"}, "public"),
    ("room.create", {"name": "x", "members": "u1"}, "members"),
    ("room.create", {"name": "x", "members": [1]}, "members"),
    ("room.get", {}, "room"),
    ("room.get", {"room": ""}, "room"),
    ("room.get", {"room": 5}, "room"),
    ("room.update", {"room": "r1", "name": ""}, "name"),
    ("room.list", {"limit": 0}, "limit"),
    ("room.list", {"limit": 101}, "limit"),
    ("room.list", {"after": "not a cursor!"}, "after"),
    ("room.list", {"query": "q" * 101}, "query"),
    ("room.join", {"room": None}, "room"),
    ("room.leave", {}, "room"),
    ("room.invite", {"room": "r1"}, "user"),
    ("room.kick", {"user": "u1"}, "room"),
    ("room.role", {"room": "r1", "user": "u1"}, "role"),
    ("room.role", {"room": "r1", "user": "u1", "role": "owner"}, "role"),
    ("room.members", {"room": "r1", "limit": 501}, "limit"),
]


async def test_malformed_room_ops_name_the_field(
    shared_server: ServerProcess, clients: Clients, wire: Any
) -> None:
    a = await clients.user(shared_server, "bad")
    room = await create(a)
    for op, fields, field in BAD_INPUT:
        await refused(a.request(op, fields), "bad_request", field, what=f"{op} {fields}")
    await refused(a.request("room.members", room=room["id"], after="-1"), "bad_request", "after")
    assert await a.ping() == {}
    assert (await a.request("room.get", room=room["id"]))["room"]["id"] == room["id"]
