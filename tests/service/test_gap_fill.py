"""Gaps on the live bus filled from the record: a gateway that misses publications
reads them from the message service and delivers them in seq order, before the
publication that showed the gap and the later ones; only a fill that fails closes
the channel's sessions with ``closed {resync}``.

The loss is real: the west gateway's bus is :class:`LossyBus`, a live bus over the
shared memory bus that drops the publications a test chooses and, like a networked
backend, lets a subscription take effect only at ``settle()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imserver.protocol.events import Msg
from imserver.services.gateway.channels import HOLD_LIMIT
from imserver.services.gateway.service import Gateway
from imserver.storage.bus import (
    LostHandler,
    MemoryLiveBus,
    Publication,
    PublicationHandler,
    room_channel,
)
from imserver.storage.bus_redis import RedisLiveBus
from imserver.testing.redis import RedisServer
from imserver.testing.sessions import CHEAP_AUTH, GatewayHarness, Peer
from imserver.utils.config import Config, RedisConfig
from imserver.utils.ids import RoomId
from imserver.utils.metrics import Metrics

Drop = Callable[[str, Publication], bool]


class LossyBus:
    """A live bus over ``inner`` that loses what ``drop`` picks; subscriptions wait
    for :meth:`settle` (as a round trip to a broker would)."""

    subscribes_at_once = False

    def __init__(self, inner: MemoryLiveBus) -> None:
        self._inner = inner
        self.drop: Drop = lambda channel, pub: False
        self.dropped: list[tuple[str, int | None]] = []
        self._wrapped: dict[tuple[str, PublicationHandler], PublicationHandler] = {}
        self._pending: list[tuple[str, PublicationHandler]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.settling = asyncio.Event()

    async def publish(self, channel: str, publication: Publication) -> None:
        await self._inner.publish(channel, publication)

    def subscribe(self, channel: str, handler: PublicationHandler) -> None:
        self._pending.append((channel, handler))

    def _apply(self, channel: str, handler: PublicationHandler) -> None:
        if (channel, handler) in self._wrapped:
            return

        def lossy(ch: str, pub: Publication) -> None:
            if self.drop(ch, pub):
                self.dropped.append((ch, pub.seq))
                return
            handler(ch, pub)

        self._wrapped[(channel, handler)] = lossy
        self._inner.subscribe(channel, lossy)

    def unsubscribe(self, channel: str, handler: PublicationHandler) -> None:
        self._pending = [p for p in self._pending if p != (channel, handler)]
        lossy = self._wrapped.pop((channel, handler), None)
        if lossy is not None:
            self._inner.unsubscribe(channel, lossy)

    def on_lost(self, listener: LostHandler) -> None:
        """Nothing is reported: the losses here are gaps the positions show."""

    async def settle(self) -> None:
        """Apply the pending subscriptions; answer once :attr:`gate` is open (a
        broker slow to answer)."""
        pending, self._pending = self._pending, []
        for channel, handler in pending:
            self._apply(channel, handler)
        self.settling.set()
        await self.gate.wait()


@dataclass
class Two:
    lossy: LossyBus
    east: Gateway
    west: Gateway

    async def peer(self, gateway: Gateway, username: str) -> Peer:
        peer = Peer(gateway)
        await peer.login(username)
        peer.frames()
        return peer

    async def idle(self) -> None:
        await self.west.hub.channels.idle()
        await asyncio.sleep(0)


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Two]:
    async with GatewayHarness.open(tmp_path) as h:
        east = h.gateway
        assert isinstance(east.bus, MemoryLiveBus)
        lossy = LossyBus(east.bus)
        west = Gateway(
            east.config,
            users=h.users,
            messages=h.messages,
            rooms=h.rooms,
            broadcasts=h.services.broadcasts,
            bus=lossy,
            metrics=Metrics(),
        )
        yield Two(lossy, east, west)


def msgs(peer: Peer) -> list[dict[str, Any]]:
    """The ``msg`` and ``closed`` events written to ``peer`` since last read."""
    return [f for f in peer.frames() if f["op"] in ("msg", "closed")]


def drop_seqs(conv: str, seqs: Sequence[int]) -> Drop:
    return lambda channel, pub: channel == room_channel(conv) and pub.seq in seqs


async def _room_with(two: Two, owner: Peer, *joiners: Peer) -> str:
    room = (await owner.ok("room.create", name="Team", public=True))["room"]["id"]
    for joiner in joiners:
        await joiner.ok("room.join", room=room)
    await two.idle()
    for joiner in joiners:
        joiner.frames()
    return f"r:{room}"


async def test_a_lost_room_message_is_filled_before_the_later_ones(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    conv = await _room_with(two, olga, bob)
    last = (await olga.ok("send", conv=conv, cid="c0", type="text", body="m0"))["seq"]
    channels = two.west.hub.channels
    before = (channels.gaps, channels.fills, channels.filled, channels.failed_fills)
    two.lossy.drop = drop_seqs(conv, [last + 1, last + 2])
    for i in range(1, 5):
        await olga.ok("send", conv=conv, cid=f"c{i}", type="text", body=f"m{i}")
    await two.idle()
    got = msgs(bob)
    assert [(e["seq"], e["body"]) for e in got] == [(last + i, f"m{i}") for i in range(5)]
    assert two.lossy.dropped == [(conv, last + 1), (conv, last + 2)]
    after = (channels.gaps, channels.fills, channels.filled, channels.failed_fills)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 3, 0]
    metrics = two.west.metrics.render()
    assert b"imserver_bus_gaps_total 0.0" in metrics
    assert f"imserver_bus_fills_total {float(channels.fills)}".encode() in metrics
    assert not bob.session.closing


async def test_a_lost_direct_message_is_filled_on_the_personal_channel(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    assert bob.session.caller is not None and olga.session.caller is not None
    conv = "d:" + ":".join(sorted([olga.session.caller.user, bob.session.caller.user]))
    await olga.ok("send", conv=conv, cid="c1", type="text", body="one")
    two.lossy.drop = lambda channel, pub: channel.startswith("u:") and pub.seq == 2
    for i in (2, 3):
        await olga.ok("send", conv=conv, cid=f"c{i}", type="text", body=f"{i}")
    await two.idle()
    assert [(e["conv"], e["seq"]) for e in msgs(bob)] == [(conv, 1), (conv, 2), (conv, 3)]
    assert two.lossy.dropped == [(f"u:{bob.session.caller.user}", 2)]
    assert not bob.session.closing


async def test_a_followed_room_is_filled_after_its_subscription_round_trip(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    room = (await olga.ok("room.create", name="Team", public=True))["room"]["id"]
    conv = f"r:{room}"
    # West subscribes the room on bob's join notice; the send that follows at once
    # comes before the subscription is in effect, and nothing follows it.
    await bob.ok("room.join", room=room)
    await olga.ok("send", conv=conv, cid="c1", type="text", body="at once")
    await two.idle()
    got = msgs(bob)
    assert [(e["type"], e["body"]) for e in got] == [("system", "bob joined"), ("text", "at once")]
    assert [e["seq"] for e in got] == [2, 3]
    await olga.ok("send", conv=conv, cid="c2", type="text", body="later")
    await two.idle()
    assert [(e["seq"], e["body"]) for e in msgs(bob)] == [(4, "later")]
    assert two.west.hub.channels.failed_fills == 0


@pytest.mark.parametrize("lost_before", [False, True])
async def test_a_kicked_user_gets_nothing_after_the_kick_through_a_fill(
    two: Two, lost_before: bool
) -> None:
    olga = await two.peer(two.east, "olga")
    amy = await two.peer(two.west, "amy")
    bob = await two.peer(two.west, "bob")
    conv = await _room_with(two, olga, amy, bob)
    assert amy.session.caller is not None
    amy_id = amy.session.caller.user
    before = (await olga.ok("history", conv=conv, limit=1))["messages"][-1]["seq"] + 1
    kick = before + 1
    # The kick and the message after it are lost on the room's channel (and, with
    # lost_before, the message before it too): the kick reaches amy on her own
    # channel, the rest comes from a fill, each message to the members at its seq.
    lost = [before, kick, kick + 1] if lost_before else [kick, kick + 1]
    two.lossy.drop = drop_seqs(conv, lost)
    await olga.ok("send", conv=conv, cid="c1", type="text", body="before")
    await olga.ok("room.kick", room=conv[2:], user=amy_id)
    await olga.ok("send", conv=conv, cid="c2", type="text", body="after")
    await olga.ok("send", conv=conv, cid="c3", type="text", body="later")
    await two.idle()
    amy_got = msgs(amy)
    assert [e["seq"] for e in amy_got] == [before, kick]
    assert amy_got[-1]["meta"]["event"] == "kicked"
    bob_got = msgs(bob)
    assert [e["seq"] for e in bob_got] == [before, kick, kick + 1, kick + 2]
    assert [e["body"] for e in bob_got][2:] == ["after", "later"]
    assert not amy.session.closing and not bob.session.closing
    assert two.west.hub.channels.failed_fills == 0
    assert bob.session.caller is not None
    assert two.west.hub.channels.room_users(RoomId(conv[2:])) == [bob.session.caller.user]


async def test_a_fill_that_fails_resyncs_the_channels_sessions(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    carl = await two.peer(two.west, "carl")
    conv = await _room_with(two, olga, bob)
    await olga.ok("send", conv=conv, cid="c1", type="text", body="one")
    await two.idle()
    msgs(bob)
    # Bob leaves on east's record while west misses it: the fill reads as bob, who
    # is no member any more, and fails.
    last = (await olga.ok("send", conv=conv, cid="c2", type="text", body="two"))["seq"]
    two.lossy.drop = lambda channel, pub: pub.seq == last + 1 or channel.startswith("u:")
    await bob.ok("room.leave", room=conv[2:])
    await olga.ok("send", conv=conv, cid="c3", type="text", body="three")
    await two.idle()
    got = msgs(bob)
    assert got[-1] == {"op": "closed", "reason": "resync"}
    assert [e["body"] for e in got if e["op"] == "msg"] == ["two"]
    assert bob.session.closing and not carl.session.closing
    channels = two.west.hub.channels
    assert (channels.gaps, channels.failed_fills) == (1, 1)
    assert b"imserver_bus_gaps_total 1.0" in two.west.metrics.render()


async def test_a_filling_room_holds_up_no_other_conversation(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    assert bob.session.caller is not None and olga.session.caller is not None
    direct = "d:" + ":".join(sorted([olga.session.caller.user, bob.session.caller.user]))
    room = (await olga.ok("room.create", name="Team", public=True))["room"]["id"]
    conv = f"r:{room}"
    two.lossy.gate.clear()
    two.lossy.settling.clear()
    await bob.ok("room.join", room=room)
    await two.lossy.settling.wait()
    await olga.ok("send", conv=conv, cid="r1", type="text", body="held")
    await olga.ok("send", conv=direct, cid="d1", type="text", body="flows")
    assert [(e["conv"], e["body"]) for e in msgs(bob)] == [
        (conv, "bob joined"),
        (direct, "flows"),
    ]
    two.lossy.gate.set()
    await two.idle()
    assert [(e["conv"], e["body"]) for e in msgs(bob)] == [(conv, "held")]


async def test_a_fill_whose_buffer_overflows_resyncs(two: Two) -> None:
    olga = await two.peer(two.east, "olga")
    bob = await two.peer(two.west, "bob")
    room = (await olga.ok("room.create", name="Team", public=True))["room"]["id"]
    conv = f"r:{room}"
    # West's subscription of the room is in effect but its confirmation is slow:
    # the room's publications wait behind the fill until the buffer is full.
    two.lossy.gate.clear()
    two.lossy.settling.clear()
    await bob.ok("room.join", room=room)
    await two.lossy.settling.wait()
    for seq in range(3, 3 + HOLD_LIMIT + 1):
        event = Msg(conv=conv, seq=seq, from_="x", ts=1, type="text", body=f"m{seq}", cid=f"c{seq}")
        await two.lossy.publish(room_channel(conv), Publication(event=event, conv=conv, seq=seq))
    got = msgs(bob)
    assert got[-1] == {"op": "closed", "reason": "resync"}
    assert [e["body"] for e in got if e["op"] == "msg"] == ["bob joined"]
    assert two.west.hub.channels.failed_fills == 1
    two.lossy.gate.set()
    await two.idle()
    assert msgs(bob) == []


async def test_a_joiner_on_a_redis_bus_gets_the_message_sent_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = Config(
        auth=CHEAP_AUTH,
        live="redis",
        redis=RedisConfig(url=redis_server.url, prefix="t:", heartbeat=0.5, ttl=5.0),
    )
    async with GatewayHarness.open(tmp_path, config) as h:
        # Bob on a second gateway with a bus of its own: it follows the room only
        # from his join notice on.
        bus = RedisLiveBus(redis_server.url, prefix="t:")
        await bus.start()
        west = Gateway(
            h.gateway.config,
            users=h.users,
            messages=h.messages,
            rooms=h.rooms,
            broadcasts=h.services.broadcasts,
            bus=bus,
            metrics=Metrics(),
        )
        try:
            olga, bob = Peer(h.gateway), Peer(west)
            await olga.login("olga")
            await bob.login("bob")
            room = (await olga.ok("room.create", name="Team", public=True))["room"]["id"]
            conv = f"r:{room}"
            for round_ in range(5):
                # Each join subscribes the room anew; the message sent at once falls
                # within the subscription's round trip, and nothing follows it.
                await bob.ok("room.join", room=room)
                await olga.ok("send", conv=conv, cid=f"c{round_}", type="text", body=f"m{round_}")
                seen: list[dict[str, Any]] = []
                async with asyncio.timeout(30):
                    while not any(e.get("body") == f"m{round_}" for e in seen):
                        seen += [e for e in bob.frames() if e["op"] in ("msg", "closed")]
                        await asyncio.sleep(0.01)
                assert all(e["op"] == "msg" for e in seen)
                seqs = [e["seq"] for e in seen]
                assert seqs == sorted(set(seqs))
                await bob.ok("room.leave", room=room)
                await west.hub.channels.idle()
            assert west.hub.channels.failed_fills == 0
            assert not bob.session.closing
            await olga.end()
            await bob.end()
        finally:
            await bus.close()
