"""A lost Redis connection, for real: the Redis bus reports it once its channels are
subscribed again, and a gateway closes the sessions those channels serve with
``closed {resync}``; what is published after the reconnect arrives live.

Each test runs a ``redis-server`` of its own (breaking connections of the machine's
Redis would break other runs): ``CLIENT KILL TYPE pubsub`` breaks the subscriber
connection alone, a ``kill -9`` and a start on the same port is a Redis restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from imserver.protocol.convs import direct_conv
from imserver.protocol.events import Msg
from imserver.storage.bus import Publication, room_channel, user_channel
from imserver.storage.bus_redis import RedisLiveBus
from imserver.testing.redis import RedisServer
from imserver.testing.sessions import CHEAP_AUTH, GatewayHarness, Peer
from imserver.utils.config import Config, RedisConfig

ROOM = room_channel("r:r1")
WAIT = 30.0
"""Most seconds a reconnection may take here (backoff is at most 2 s a try)."""


def msg(conv: str, seq: int) -> Publication:
    event = Msg(conv=conv, seq=seq, from_="ua", ts=1, type="text", body=f"m{seq}", cid=f"c{seq}")
    return Publication(event=event, conv=conv, seq=seq)


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, Publication]] = []
        self.lost: list[list[str]] = []
        self._arrived = asyncio.Event()

    def __call__(self, channel: str, publication: Publication) -> None:
        self.got.append((channel, publication))
        self._arrived.set()

    def on_lost(self, channels: Sequence[str]) -> None:
        self.lost.append(list(channels))
        self._arrived.set()

    async def until(self, ok: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not ok():
                self._arrived.clear()
                await self._arrived.wait()


async def test_a_killed_subscriber_connection_is_reported_and_delivery_resumes(
    redis_server: RedisServer,
) -> None:
    bus = RedisLiveBus(redis_server.url, prefix="t:", keepalive=1.0)
    await bus.start()
    try:
        inbox = Inbox()
        bus.on_lost(inbox.on_lost)
        bus.subscribe(ROOM, inbox)
        bus.subscribe(user_channel("ua"), inbox)
        await bus.settle()
        await bus.publish(ROOM, msg("r:r1", 1))
        await inbox.until(lambda: len(inbox.got) == 1)
        admin = redis.Redis.from_url(redis_server.url)
        try:
            assert admin.client_kill_filter(_type="pubsub") == 1
        finally:
            admin.close()
        await inbox.until(lambda: bool(inbox.lost))
        assert sorted(inbox.lost[0]) == sorted([ROOM, user_channel("ua")])
        assert bus.reconnects == 1
        await bus.publish(ROOM, msg("r:r1", 2))
        await bus.publish(user_channel("ua"), msg("d:ua:ub", 1))
        await inbox.until(lambda: len(inbox.got) == 3)
        assert [(c, p.seq) for c, p in inbox.got] == [
            (ROOM, 1),
            (ROOM, 2),
            (user_channel("ua"), 1),
        ]
    finally:
        await bus.close()


async def test_a_restarted_redis_is_reported_and_delivery_resumes(
    redis_server: RedisServer,
) -> None:
    bus = RedisLiveBus(redis_server.url, prefix="t:", keepalive=1.0)
    await bus.start()
    try:
        inbox = Inbox()
        bus.on_lost(inbox.on_lost)
        bus.subscribe(ROOM, inbox)
        await bus.settle()
        await bus.publish(ROOM, msg("r:r1", 1))
        await inbox.until(lambda: len(inbox.got) == 1)
        redis_server.kill()
        await bus.publish(ROOM, msg("r:r1", 2))  # Redis is down: lost, or sent late
        redis_server.start()
        await inbox.until(lambda: bool(inbox.lost))
        assert inbox.lost == [[ROOM]]
        await bus.publish(ROOM, msg("r:r1", 3))
        await inbox.until(lambda: any(p.seq == 3 for _, p in inbox.got))
        seqs = [p.seq for _, p in inbox.got]
        assert seqs in ([1, 3], [1, 2, 3])  # at most once, in order
    finally:
        await bus.close()


async def test_the_first_publication_after_a_restart_with_none_during_it_arrives(
    redis_server: RedisServer,
) -> None:
    # Nothing is published while Redis is down, so the publisher connection is found
    # closed only by the next publication: that one must go out on a new connection,
    # not be dropped with the old one (it would be the last of its conversation, a
    # loss no subscriber sees until the conversation's next message).
    bus = RedisLiveBus(redis_server.url, prefix="t:", keepalive=1.0)
    await bus.start()
    try:
        inbox = Inbox()
        bus.on_lost(inbox.on_lost)
        bus.subscribe(ROOM, inbox)
        await bus.settle()
        await bus.publish(ROOM, msg("r:r1", 1))
        await inbox.until(lambda: len(inbox.got) == 1)
        redis_server.kill()
        redis_server.start()
        await inbox.until(lambda: bool(inbox.lost))
        await bus.publish(ROOM, msg("r:r1", 2))
        await inbox.until(lambda: any(p.seq == 2 for _, p in inbox.got))
        assert [p.seq for _, p in inbox.got] == [1, 2]
        assert bus.dropped == 0
    finally:
        await bus.close()


def _events(peer: Peer) -> list[dict[str, Any]]:
    return [f for f in peer.frames() if f["op"] != "reply"]


async def _until_event(peer: Peer, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            seen += _events(peer)
            for event in seen:
                if ok(event):
                    return event
            await asyncio.sleep(0.02)


async def test_a_gateway_resyncs_its_sessions_after_redis_restarts(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = Config(
        auth=CHEAP_AUTH,
        live="redis",
        redis=RedisConfig(url=redis_server.url, prefix="t:", heartbeat=0.5, ttl=5.0),
    )
    async with GatewayHarness.open(tmp_path, config) as h:
        alice, bob = Peer(h.gateway), Peer(h.gateway)
        alice_id = (await alice.login("alice"))["user"]["id"]
        bob_id = (await bob.login("bob"))["user"]["id"]
        conv = direct_conv(alice_id, bob_id)
        await alice.ok("send", conv=conv, cid="c1", type="text", body="one")
        first = await _until_event(bob, lambda e: e["op"] == "msg")
        assert (first["conv"], first["seq"], first["body"]) == (conv, 1, "one")

        redis_server.kill()
        redis_server.start()
        for peer in (alice, bob):
            closed = await _until_event(peer, lambda e: e["op"] == "closed")
            assert closed == {"op": "closed", "reason": "resync"}
        assert h.gateway.hub.channels.losses >= 1
        await alice.end()
        await bob.end()

        # The clients reconnect and sync; live events flow again.
        alice, bob = Peer(h.gateway), Peer(h.gateway)
        await alice.login("alice")
        await bob.login("bob")
        history = await bob.ok("history", conv=conv, before=None, limit=10)
        assert [m["body"] for m in history["messages"]] == ["one"]
        await alice.ok("send", conv=conv, cid="c2", type="text", body="two")
        second = await _until_event(bob, lambda e: e["op"] == "msg")
        assert (second["seq"], second["body"]) == (2, "two")
        await alice.end()
        await bob.end()
