"""Live fan-out through the bus's channels: two gateways (as two processes would be)
on one memory bus and real SQLite services, sessions on in-memory links.

What is checked here and not end to end: a gateway follows a room only while one of
its users is a member (a joiner on a gateway that did not follow the room gets the
``joined`` message from their own channel, and the rest of the room from then on;
the gateway stops following a room its last member left), and a gap in a
channel's positions closes the sessions it serves with ``closed {resync}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from message_helpers import Recorder

from imserver.protocol.events import Msg
from imserver.services.gateway.service import Gateway
from imserver.storage.bus import MemoryLiveBus, Publication, room_channel, user_channel
from imserver.testing.sessions import GatewayHarness, Peer
from imserver.utils.ids import RoomId
from imserver.utils.metrics import Metrics


@dataclass
class Two:
    bus: MemoryLiveBus
    east: Gateway
    west: Gateway

    async def peer(self, gateway: Gateway, username: str) -> Peer:
        """A logged-in connection of ``username`` to ``gateway``, its frames so far read."""
        peer = Peer(gateway)
        await peer.login(username)
        peer.frames()
        return peer


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Two]:
    async with GatewayHarness.open(tmp_path) as h:
        east = h.gateway
        bus = east.bus
        assert isinstance(bus, MemoryLiveBus)
        west = Gateway(
            east.config,
            users=h.users,
            messages=h.messages,
            rooms=h.rooms,
            broadcasts=h.services.broadcasts,
            bus=bus,
            metrics=Metrics(),
        )
        yield Two(bus, east, west)


def events(peer: Peer) -> list[dict[str, Any]]:
    """The events written to ``peer`` since its frames were last read."""
    return [f for f in peer.frames() if f["op"] != "reply"]


async def test_a_gateway_follows_a_room_while_one_of_its_users_is_a_member(two: Two) -> None:
    owner = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    room = (await owner.ok("room.create", name="Team", public=True))["room"]["id"]
    conv = f"r:{room}"
    channel = room_channel(conv)
    assert two.bus.subscribed(channel) == 1  # east only: west has no member
    await owner.ok("send", conv=conv, cid="c1", type="text", body="before")
    await bob.ok("room.join", room=room)
    # West had no member of the room: bob got his joined message from his own channel.
    [joined] = events(bob)
    assert (joined["op"], joined["seq"], joined["meta"]["event"]) == ("msg", 3, "joined")
    assert two.bus.subscribed(channel) == 2
    await owner.ok("send", conv=conv, cid="c2", type="text", body="after")
    assert [(e["seq"], e["body"]) for e in events(bob)] == [(4, "after")]
    # The last member on west leaves: west stops following the room.
    await bob.ok("room.leave", room=room)
    assert [e["meta"]["event"] for e in events(bob)] == ["left"]
    assert two.bus.subscribed(channel) == 1
    await owner.ok("send", conv=conv, cid="c3", type="text", body="gone")
    assert events(bob) == []
    # The owner's own sends go to their other sessions only.
    assert [e["body"] for e in events(owner) if e["op"] == "msg"] == [
        "olga created Team",
        "bob joined",
        "bob left",
    ]


async def test_a_kicked_users_gateway_delivers_the_kick_and_nothing_after(two: Two) -> None:
    owner = await two.peer(two.east, "olga")
    amy = await two.peer(two.west, "amy")
    amy2 = await two.peer(two.west, "amy")
    assert amy.session.caller is not None
    user = amy.session.caller.user
    room = (await owner.ok("room.create", name="Team", members=[user]))["room"]["id"]
    conv = f"r:{room}"
    assert [e["meta"]["event"] for e in events(amy)] == ["created", "joined"]
    # A burst of sends into which the kick falls: their replies are not waited for.
    for i in range(20):
        await owner.send("send", rid=f"a{i}", conv=conv, cid=f"a{i}", type="text", body="x")
    await owner.ok("room.kick", room=room, user=user)
    await owner.ok("send", conv=conv, cid="z", type="text", body="after")
    for peer in (amy, amy2):
        got = [e for e in events(peer) if e["op"] == "msg"]
        kinds = [(e.get("meta") or {}).get("event") for e in got]
        assert kinds[-1] == "kicked" and [e["body"] for e in got].count("x") == 20
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    assert two.bus.subscribed(room_channel(conv)) == 1


async def test_a_gap_closes_the_sessions_the_channel_serves_with_resync(two: Two) -> None:
    zed = await two.peer(two.east, "zed")
    amy = await two.peer(two.east, "amy")
    assert zed.session.caller is not None
    user = zed.session.caller.user

    def msg(conv: str, seq: int) -> Publication:
        event = Msg(conv=conv, seq=seq, from_="x", ts=1, type="text", body=f"m{seq}", cid=f"c{seq}")
        return Publication(event=event, conv=conv, seq=seq)

    # A personal channel: positions are per conversation.
    for conv, seq in [("d:a:b", 1), ("d:a:c", 1), ("d:a:b", 2), ("d:a:c", 2)]:
        await two.bus.publish(user_channel(user), msg(conv, seq))
    assert [(e["conv"], e["seq"]) for e in events(zed)] == [
        ("d:a:b", 1),
        ("d:a:c", 1),
        ("d:a:b", 2),
        ("d:a:c", 2),
    ]
    await two.bus.publish(user_channel(user), msg("d:a:b", 4))  # 3 was lost
    await two.east.hub.channels.idle()  # the fill fails: zed is no member of d:a:b
    assert events(zed) == [{"op": "closed", "reason": "resync"}]
    assert zed.session.closing and not amy.session.closing
    # A room's channel: every local member's sessions.
    room = (await amy.ok("room.create", name="Team"))["room"]["id"]
    await amy.ok("send", conv=f"r:{room}", cid="c1", type="text", body="one")
    await two.bus.publish(room_channel(f"r:{room}"), msg(f"r:{room}", 5))
    await two.east.hub.channels.idle()  # the record has no seq 3 and 4 to fill
    assert events(amy)[-1] == {"op": "closed", "reason": "resync"}
    assert amy.session.closing
    assert two.east.hub.channels.gaps == 2
    assert b"imserver_bus_gaps_total 2.0" in two.east.metrics.render()


def room_msg(conv: str, seq: int, **change: tuple[str, ...]) -> Publication:
    event = Msg(conv=conv, seq=seq, from_="system", ts=1, type="system", body="", cid=f"c{seq}")
    return Publication(event=event, conv=conv, seq=seq, **change)


async def test_membership_changes_racing_the_loading_of_a_users_rooms() -> None:
    """A user's rooms are read (``rooms_of``) while their own channel already runs: a
    room they leave meanwhile is not followed even if the list still names it, and
    a room they join meanwhile is followed from their ``joined`` message on."""
    bus = MemoryLiveBus()
    recorder = Recorder(bus)
    recorder.channels.add_user("ua")  # rooms_of in flight
    left = room_msg("r:r1", 7, left=("ua",))
    joined = room_msg("r:r2", 3, joined=("ua",))
    for publication in (left, joined):
        notice = Publication(
            event=publication.event,
            conv=publication.conv,
            joined=publication.joined,
            left=publication.left,
        )
        await bus.publish(publication.conv or "", publication)  # no gateway follows it
        await bus.publish(user_channel("ua"), notice)
    recorder.channels.add_rooms("ua", [RoomId("r1")])  # read before the leave
    assert recorder.channels.room_users(RoomId("r1")) == []
    assert bus.subscribed(room_channel("r:r1")) == 0
    assert recorder.channels.room_users(RoomId("r2")) == ["ua"]
    after = room_msg("r:r2", 4)
    await bus.publish(room_channel("r:r1"), room_msg("r:r1", 8))
    await bus.publish(room_channel("r:r2"), after)
    assert [d.event for d in recorder.deliveries] == [joined.event, after.event]
    assert recorder.resyncs == []


async def test_a_publication_below_where_its_position_started_resyncs_its_users() -> None:
    """Two writers of one conversation (its writer moved) can publish out of seq order;
    a gateway whose position started at the newer writer's message (a new
    subscription, or one after a lost connection) never routed the older one, and
    no position says whether its sessions had it: they resync, and the
    conversation's position starts afresh."""
    bus = MemoryLiveBus()
    recorder = Recorder(bus)
    recorder.attach("ua")
    channel = user_channel("ua")
    await bus.publish(channel, room_msg("d:ua:ub", 5))
    await bus.publish(channel, room_msg("d:ua:ub", 4))  # the old writer's, late
    assert [getattr(d.event, "seq", None) for d in recorder.deliveries] == [5]
    assert recorder.resyncs == [["ua"]]
    assert recorder.channels.late == 1
    await bus.publish(channel, room_msg("d:ua:ub", 6))
    await bus.publish(channel, room_msg("d:ua:ub", 7))
    assert [getattr(d.event, "seq", None) for d in recorder.deliveries] == [5, 6, 7]
    assert recorder.resyncs == [["ua"]]
