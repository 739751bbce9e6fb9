"""The live bus's contract: one test body for every backend (``memory``, ``redis``).

What every backend promises (``imserver.storage.bus``): only subscribed channels
are delivered; one publisher's publications arrive in publication order, on one
channel and across channels; a publication arrives whole (position, exclusions,
membership change); subscribing is idempotent and unsubscribing stops delivery;
a failing handler is logged, stays subscribed, and reaches neither the publisher
nor the other handlers.

A networked backend delivers later than ``publish`` returns, so the tests wait for
what they expect, and prove that something did NOT arrive by publishing a marker
after it on a subscribed channel: once the marker is in, anything published before
it would be too. Its subscriptions take a round trip: a test awaits ``settle()``
before it publishes to what it has just subscribed.

The Redis runs use the machine's Redis with a channel prefix of their own, which is
also the proof that the prefix keeps buses apart: every run publishes the same
channel names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from imserver.protocol.events import Msg, TypingEvent
from imserver.storage.bus import LiveBus, MemoryLiveBus, Publication, room_channel, user_channel
from imserver.storage.bus_redis import RedisLiveBus

BACKENDS = ["memory", "redis"]


@pytest.fixture(params=BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[LiveBus]:
    if request.param == "memory":
        yield MemoryLiveBus()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    redis_bus = RedisLiveBus(url, prefix=prefix)
    await redis_bus.start()
    try:
        yield redis_bus
    finally:
        await redis_bus.close()


class Inbox:
    """A handler that keeps what it receives: (channel, publication)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Publication]] = []
        self._arrived = asyncio.Event()

    def __call__(self, channel: str, publication: Publication) -> None:
        self.got.append((channel, publication))
        self._arrived.set()

    async def until(self, ok: Callable[[], bool]) -> None:
        """Wait until ``ok()`` holds (a networked backend delivers after a round trip)."""
        async with asyncio.timeout(5):
            while not ok():
                self._arrived.clear()
                await self._arrived.wait()

    def seqs(self, channel: str | None = None) -> list[int | None]:
        return [p.seq for c, p in self.got if channel is None or c == channel]


def msg(conv: str, seq: int) -> Publication:
    event = Msg(conv=conv, seq=seq, from_="ua", ts=1, type="text", body=f"m{seq}", cid=f"c{seq}")
    return Publication(event=event, conv=conv, seq=seq)


MARK = Publication(event=TypingEvent(conv="r:mark", user="marker"))


async def marked(bus: LiveBus, inbox: Inbox, channel: str) -> None:
    """Publish :data:`MARK` on ``channel`` (subscribed by ``inbox``) and wait for it."""
    before = len(inbox.got)
    await bus.publish(channel, MARK)
    await inbox.until(lambda: any(p == MARK for _, p in inbox.got[before:]))


ROOM = room_channel("r:r1")
OTHER = room_channel("r:r2")


async def test_only_subscribed_channels_are_delivered(bus: LiveBus) -> None:
    inbox = Inbox()
    bus.subscribe(ROOM, inbox)
    await bus.settle()
    await bus.publish(OTHER, msg("r:r2", 1))
    await bus.publish(ROOM, msg("r:r1", 1))
    await marked(bus, inbox, ROOM)
    assert [(c, p.seq) for c, p in inbox.got[:-1]] == [(ROOM, 1)]


async def test_publications_arrive_whole_and_in_order_with_their_positions(
    bus: LiveBus,
) -> None:
    inbox = Inbox()
    bus.subscribe(ROOM, inbox)
    await bus.settle()
    sent = [msg("r:r1", seq) for seq in range(1, 201)]
    typing = Publication(event=TypingEvent(conv="r:r1", user="ub"), conv="r:r1", exclude_user="ub")
    change = Publication(
        event=sent[0].event,
        conv="r:r1",
        seq=None,
        exclude_session="s1",
        joined=("ua", "ub"),
        left=("uc",),
    )
    for publication in sent[:100]:
        await bus.publish(ROOM, publication)
    await bus.publish(ROOM, typing)
    await bus.publish(ROOM, change)
    for publication in sent[100:]:
        await bus.publish(ROOM, publication)
    await inbox.until(lambda: len(inbox.got) == 202)
    assert [p for _, p in inbox.got] == [*sent[:100], typing, change, *sent[100:]]
    assert inbox.seqs() == [*range(1, 101), None, None, *range(101, 201)]
    assert {c for c, _ in inbox.got} == {ROOM}


async def test_one_publishers_order_holds_across_channels(bus: LiveBus) -> None:
    inbox = Inbox()
    channels = [ROOM, OTHER, user_channel("ua"), user_channel("ub")]
    for channel in channels:
        bus.subscribe(channel, inbox)
    await bus.settle()
    order = [(channels[i % 4], i) for i in range(200)]
    for channel, i in order:
        await bus.publish(channel, msg(channel, i + 1))
    await inbox.until(lambda: len(inbox.got) == 200)
    assert [(c, p.seq - 1) for c, p in inbox.got if p.seq is not None] == order


async def test_subscribing_twice_is_once_and_unsubscribing_stops(bus: LiveBus) -> None:
    inbox, witness = Inbox(), Inbox()
    bus.subscribe(ROOM, inbox)
    bus.subscribe(ROOM, inbox)
    bus.subscribe(ROOM, witness)
    await bus.settle()
    await bus.publish(ROOM, msg("r:r1", 1))
    await witness.until(lambda: len(witness.got) == 1)
    await marked(bus, witness, ROOM)
    assert inbox.seqs() == [1, None]
    bus.unsubscribe(ROOM, inbox)
    bus.unsubscribe(ROOM, inbox)  # not subscribed: nothing happens
    bus.unsubscribe(OTHER, inbox)
    await bus.publish(ROOM, msg("r:r1", 2))
    await marked(bus, witness, ROOM)
    assert inbox.seqs() == [1, None]
    assert witness.seqs(ROOM) == [1, None, 2, None]
    bus.subscribe(ROOM, inbox)  # again: from now on
    await bus.publish(ROOM, msg("r:r1", 3))
    await inbox.until(lambda: len(inbox.got) == 3)
    assert inbox.seqs() == [1, None, 3]


async def test_a_handler_may_change_subscriptions_while_it_handles_a_publication(
    bus: LiveBus,
) -> None:
    inbox = Inbox()

    def hop(channel: str, publication: Publication) -> None:
        inbox(channel, publication)
        bus.unsubscribe(ROOM, hop)
        bus.subscribe(OTHER, hop)

    bus.subscribe(ROOM, hop)
    bus.subscribe(ROOM, inbox)
    await bus.settle()
    await bus.publish(ROOM, msg("r:r1", 1))
    await bus.publish(ROOM, msg("r:r1", 2))
    await inbox.until(lambda: len(inbox.got) == 3)
    await bus.settle()  # hop's subscription of OTHER, made while it handled r1 1
    await bus.publish(OTHER, msg("r:r2", 1))
    await inbox.until(lambda: len(inbox.got) == 4)
    assert [(c, p.seq) for c, p in inbox.got] == [(ROOM, 1), (ROOM, 1), (ROOM, 2), (OTHER, 1)]


async def test_a_failing_handler_reaches_neither_the_publisher_nor_the_others(
    bus: LiveBus, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()
    calls: list[int | None] = []

    def broken(channel: str, publication: Publication) -> None:
        calls.append(publication.seq)
        raise RuntimeError("a bug")

    bus.subscribe(ROOM, broken)
    bus.subscribe(ROOM, inbox)
    await bus.settle()
    await bus.publish(ROOM, msg("r:r1", 1))  # does not raise
    await bus.publish(ROOM, msg("r:r1", 2))
    await inbox.until(lambda: len(inbox.got) == 2)
    assert inbox.seqs() == [1, 2]
    assert calls == [1, 2]  # still subscribed after failing
    assert "a bug" in caplog.text
