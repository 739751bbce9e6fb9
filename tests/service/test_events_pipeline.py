"""``message.stored`` from the message writer's outbox to the notification service
through the real RabbitMQ: the relay, the consumer, a repeated event, and a broker
that is unreachable for a while (a TCP forwarder cut and restored)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import rabbit
from databases import Databases
from notification_helpers import World, eventually, login, open_world
from sqlalchemy import select

from imserver.protocol import ops
from imserver.protocol.convs import direct_conv
from imserver.services.message.api import CommittedMessage, MessageStored
from imserver.services.message.schema import outbox as message_outbox
from imserver.services.message.service import MIGRATIONS as MESSAGE_MIGRATIONS
from imserver.services.notification.events import GROUP, PATTERNS, MessageStoredConsumer
from imserver.services.notification.schema import push_decisions
from imserver.storage.events import (
    MESSAGE_STORED,
    Delivery,
    OutgoingEvent,
    decode_batch,
    decode_event,
    encode_event,
)
from imserver.storage.events_rabbitmq import RabbitEventStream
from imserver.storage.outbox import Outbox, OutboxRelay
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.clock import now_ms
from imserver.utils.ids import ConvId
from imserver.utils.metrics import EventMetrics, Metrics

BACKOFF = (0.2,)
TOKEN = {"token": "bob-phone"}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    await rabbit.reachable()
    name = rabbit.new_prefix()
    yield name
    await rabbit.delete_topology(name, {GROUP: PATTERNS}, BACKOFF)


def stream(url: str, prefix: str) -> RabbitEventStream:
    return RabbitEventStream(
        url,
        prefix=prefix,
        backoff=BACKOFF,
        groups={GROUP: PATTERNS},
        timeout=3,
        reconnect=(0.05, 0.5),
    )


class Counting:
    """The notification service's consumer, counting what it has ingested."""

    def __init__(self, world: World) -> None:
        self._consumer = MessageStoredConsumer(world.local)
        self.handled: list[tuple[str, int]] = []
        self.ids: list[str] = []

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        await self._consumer(deliveries)
        for delivery in deliveries:
            self.ids.append(delivery.id)
            event = decode_event(delivery.body, MessageStored)
            self.handled.append((event.message.conv, event.message.seq))


async def emptied(relay: OutboxRelay | None, within: float = 30.0) -> None:
    """Wait until the relay has deleted every row it published (a consumer can see
    an event before the relay's delete commits)."""
    assert relay is not None
    deadline = asyncio.get_running_loop().time() + within
    while await relay.pending():
        assert asyncio.get_running_loop().time() < deadline, "the outbox did not empty"
        await asyncio.sleep(0.05)


async def decisions(world: World, conv: str) -> list[tuple[int, str]]:
    engine = make_engine(world.notification_url)
    try:
        async with engine.connect() as conn:
            d = push_decisions.c
            found = await conn.execute(
                select(d.seq, d.user_id).where(d.conv == conv).order_by(d.seq, d.user_id)
            )
            return [(r.seq, r.user_id) for r in found]
    finally:
        await engine.dispose()


async def test_a_message_reaches_an_offline_user_through_the_broker(
    tmp_path: Path, prefix: str
) -> None:
    events = stream(rabbit.URL, prefix)
    try:
        async with open_world(tmp_path, "local", publisher=events) as w:
            consumer = Counting(w)
            await events.subscribe(GROUP, PATTERNS, consumer)
            await w.notifications.register(login("bob"), "test", TOKEN)
            conv = direct_conv("alice", "bob")
            sent = await w.messages.send(
                login("alice"), ops.Send(conv=conv, cid="c1", type="text", body="hi")
            )
            await eventually(lambda: len(w.provider.pushes) == 1, within=15)
            push = w.provider.pushes[0]
            assert (push.user, push.conv, push.seq) == ("bob", conv, sent.seq)
            assert consumer.handled == [(conv, 1)]
            await emptied(w.relay)
    finally:
        await events.close()


async def test_a_repeated_event_is_ingested_once(tmp_path: Path, prefix: str) -> None:
    events = stream(rabbit.URL, prefix)
    try:
        async with open_world(tmp_path, "local", publisher=events) as w:
            consumer = Counting(w)
            await events.subscribe(GROUP, PATTERNS, consumer)
            await w.notifications.register(login("bob"), "test", TOKEN)
            conv = direct_conv("alice", "bob")
            event = MessageStored(
                message=CommittedMessage(
                    conv=conv,
                    seq=7,
                    ts=now_ms(),
                    sender="alice",
                    type="text",
                    body="again",
                    members=("alice", "bob"),
                )
            )
            body = encode_event(event)
            # What a relay that crashed between its publish and its delete sends: the
            # same event twice, and once more later.
            await events.publish([OutgoingEvent(event.id, MESSAGE_STORED, body)] * 2)
            await eventually(lambda: len(consumer.ids) == 2, within=15)
            await eventually(lambda: len(w.provider.pushes) == 1, within=15)
            await events.publish([OutgoingEvent(event.id, MESSAGE_STORED, body)])
            await eventually(lambda: len(consumer.ids) == 3, within=15)
            await w.local.settle()
            assert consumer.ids == [event.id] * 3
            assert await decisions(w, conv) == [(7, "alice"), (7, "bob")]
            assert [(p.user, p.seq) for p in w.provider.pushes] == [("bob", 7)]
            assert w.local.stats.results[("test", "sent")] == 1
    finally:
        await events.close()


async def test_broker_unreachable_then_back(databases: Databases, prefix: str) -> None:
    """Messages sent while the relay cannot reach RabbitMQ are acked and stored, wait
    in the outbox, and are all published and consumed once it is reachable again:
    none lost, none twice."""
    forwarder = rabbit.Forwarder()
    await forwarder.start()
    relay_side = stream(forwarder.url, prefix)
    consumer_side = stream(rabbit.URL, prefix)
    try:
        async with open_world(databases, "local", publisher=relay_side) as w:
            assert w.relay is not None
            consumer = Counting(w)
            await consumer_side.subscribe(GROUP, PATTERNS, consumer)
            await w.notifications.register(login("bob"), "test", TOKEN)
            conv = direct_conv("alice", "bob")
            alice = login("alice")
            await w.messages.send(alice, ops.Send(conv=conv, cid="before", type="text", body="up"))
            await eventually(lambda: consumer.handled == [(conv, 1)], within=15)
            await eventually(lambda: w.relay is not None and w.relay.published == 1)

            await forwarder.stop()
            down = 25
            acks = await asyncio.gather(
                *(
                    w.messages.send(
                        alice, ops.Send(conv=conv, cid=f"d{i}", type="text", body=f"m{i}")
                    )
                    for i in range(down)
                )
            )
            assert sorted(a.seq for a in acks) == list(range(2, 2 + down))
            history = await w.messages.history(alice, ops.History(conv=conv, limit=100))
            assert [m.seq for m in history.messages] == list(range(1, 2 + down))
            await eventually(lambda: w.relay is not None and w.relay.failures >= 2, within=15)
            assert await w.relay.pending() == down
            assert consumer.handled == [(conv, 1)]

            await forwarder.start()
            expected = [(conv, seq) for seq in range(1, 2 + down)]
            await eventually(lambda: sorted(consumer.handled) == expected, within=30)
            await emptied(w.relay)
            await w.local.settle()
            assert Counter(consumer.handled).most_common(1)[0][1] == 1
            assert await decisions(w, conv) == [
                (seq, user) for seq in range(1, 2 + down) for user in ("alice", "bob")
            ]
    finally:
        await consumer_side.close()
        await relay_side.close()
        await forwarder.stop()


async def test_the_relay_and_the_writer_share_the_database_under_load(
    databases: Databases, prefix: str
) -> None:
    """Batches commit while the relay deletes what it published, many times over:
    every send is acked, and every message is consumed once (on SQLite the relay's
    transactions run on a thread of their own, never waiting for the event loop that
    the message writer holds while it waits for the write lock)."""
    events = stream(rabbit.URL, prefix)
    try:
        async with open_world(databases, "local", publisher=events) as w:
            consumer = Counting(w)
            await events.subscribe(GROUP, PATTERNS, consumer)
            alice = login("alice")
            convs = [direct_conv("alice", other) for other in ("bob", "carol")]
            total = 0
            for wave in range(20):
                acks = await asyncio.gather(
                    *(
                        w.messages.send(
                            alice, ops.Send(conv=conv, cid=f"w{wave}-{i}", type="text", body="x")
                        )
                        for i in range(50)
                        for conv in convs
                    )
                )
                assert not any(a.dup for a in acks)
                total += len(acks)
            await eventually(lambda: len(consumer.handled) >= total, within=60)
            await emptied(w.relay)
            assert sorted(consumer.handled) == sorted(
                (conv, seq) for conv in convs for seq in range(1, total // 2 + 1)
            )
    finally:
        await events.close()


async def test_two_relays_on_one_server_database_publish_each_row_once(
    databases: Databases, prefix: str
) -> None:
    """Two instances' relays on the same outbox (``FOR UPDATE SKIP LOCKED``): every
    row is published by one of them, once, and the outbox empties."""
    if databases.dialect == "sqlite":
        pytest.skip("SQLite: one process, so one relay, per database")
    url = databases.url("message")
    await upgrade(url, MESSAGE_MIGRATIONS)
    outbox = Outbox(message_outbox)
    events = [
        MessageStored(
            message=CommittedMessage(
                conv=ConvId("d:a:b"), seq=seq, ts=seq, sender="a", type="text", body=""
            )
        )
        for seq in range(1, 3001)
    ]
    engine = make_engine(url)
    async with engine.begin() as conn:
        rows = [outbox.row(MESSAGE_STORED, e) for e in events]
        await conn.run_sync(outbox.insert, rows)
    await engine.dispose()
    consumer_side = stream(rabbit.URL, prefix)
    got: list[str] = []

    async def record(deliveries: Sequence[Delivery]) -> None:
        got.extend(d.id for d in deliveries)

    await consumer_side.subscribe(GROUP, PATTERNS, record)
    sides = [stream(rabbit.URL, prefix) for _ in range(2)]
    relays = [OutboxRelay(url, outbox, side, batch=50) for side in sides]
    try:
        for relay in relays:
            relay.start()
        await eventually(lambda: len(got) >= len(events), within=60)
        await eventually(lambda: sum(r.published for r in relays) == len(events), within=10)
        await emptied(relays[0])
        assert all(r.published > 0 for r in relays)  # both took turns
        assert sorted(got) == sorted(e.id for e in events)
    finally:
        for relay in relays:
            await relay.close()
        for side in sides:
            await side.close()
        await consumer_side.close()


async def test_the_relay_reports_each_claim_and_publishes_it_in_batches(
    databases: Databases, prefix: str
) -> None:
    """A backlog of 120 rows, claims of 50: the claim gauge reads 50, 50, 20, then 0
    once the outbox is empty; each claim reached the queue as one message."""
    url = databases.url("message")
    await upgrade(url, MESSAGE_MIGRATIONS)
    outbox = Outbox(message_outbox)
    events = [
        MessageStored(
            message=CommittedMessage(
                conv=ConvId("d:a:b"), seq=seq, ts=seq, sender="a", type="text", body=""
            )
        )
        for seq in range(1, 121)
    ]
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(outbox.insert, [outbox.row(MESSAGE_STORED, e) for e in events])
    await engine.dispose()
    metrics = Metrics()
    metrics.events = EventMetrics()
    side = stream(rabbit.URL, prefix)
    claimed = metrics.events.claims
    relay = OutboxRelay(url, outbox, side, batch=50, claims=claimed, service="message")
    claims = []
    try:
        for _ in range(4):
            await relay.turn()
            claims.append(metrics.events.claims["message"])
            if claims[-1]:
                assert b'imserver_outbox_claim{service="message"} %d.0' % claims[-1] in (
                    metrics.render()
                )
    finally:
        await relay.close()
        await side.close()
    assert claims == [50, 50, 20, 0]
    assert b'imserver_outbox_claim{service="message"} 0.0' in metrics.render()
    got = await rabbit.drain(f"{prefix}.{GROUP}")
    assert [len(decode_batch(m.body)) for m in got] == [50, 50, 20]
    assert [e.id for m in got for e in decode_batch(m.body)] == [e.id for e in events]
