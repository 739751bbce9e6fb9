"""The RabbitMQ event stream against the real broker: topology, confirms, batches,
retries, the dead-letter queue, single-event messages of earlier versions
(``imserver.storage.events_rabbitmq``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aio_pika
import msgspec
import pytest
import rabbit
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from imserver.storage.events import (
    FILE_DELETED,
    FILE_STORED,
    MESSAGE_STORED,
    ROOM_MEMBER_CHANGED,
    BatchItem,
    Delivery,
    EventStreamDown,
    OutgoingEvent,
    decode_batch,
)
from imserver.storage.events_rabbitmq import (
    ATTEMPT_HEADER,
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    ERROR_HEADER,
    RabbitEventStream,
)
from imserver.utils.metrics import EventMetrics, Metrics

BACKOFF = (0.2, 0.4)
GROUPS = {"push": ("message.*",), "files": ("file.#",)}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    await rabbit.reachable()
    name = rabbit.new_prefix()
    yield name
    await rabbit.delete_topology(name, {**GROUPS, "work": ()}, BACKOFF)


def items(message: aio_pika.abc.AbstractIncomingMessage) -> list[tuple[str, str, bytes]]:
    """The events of a batch message, as (id, key, body)."""
    assert message.content_type == BATCH_CONTENT_TYPE
    return [(e.id, e.key, e.body) for e in decode_batch(message.body)]


def stream(prefix: str, **kwargs: object) -> RabbitEventStream:
    settings: dict[str, object] = {"prefix": prefix, "backoff": BACKOFF, "groups": GROUPS}
    settings.update(kwargs)
    return RabbitEventStream(rabbit.URL, **settings)  # type: ignore[arg-type]


async def test_topology_is_declared_exactly(prefix: str) -> None:
    events = stream(prefix)
    await events.publish([OutgoingEvent("e0", MESSAGE_STORED, b"x")])
    await events.close()
    connection = await aio_pika.connect(rabbit.URL)
    async with connection:
        channel = await connection.channel()
        # The same declarations again are accepted: same type, durability, arguments.
        await channel.declare_exchange(
            f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        quorum = {"x-queue-type": "quorum"}
        await channel.declare_queue(f"{prefix}.push", durable=True, arguments=quorum)
        await channel.declare_queue(f"{prefix}.push.dead", durable=True, arguments=quorum)
        for step, ttl in ((1, 200), (2, 400)):
            await channel.declare_queue(
                f"{prefix}.push.retry.{step}",
                durable=True,
                arguments={
                    **quorum,
                    "x-message-ttl": ttl,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": f"{prefix}.push",
                },
            )
        # Anything else is refused by the broker: the declared ones are exactly these.
        wrong = [
            lambda ch: ch.declare_exchange(
                f"{prefix}.events", aio_pika.ExchangeType.DIRECT, durable=True
            ),
            lambda ch: ch.declare_exchange(
                f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=False
            ),
            lambda ch: ch.declare_queue(
                f"{prefix}.push", durable=True, arguments={"x-queue-type": "classic"}
            ),
            lambda ch: ch.declare_queue(
                f"{prefix}.push.dead", durable=True, arguments={"x-queue-type": "classic"}
            ),
            lambda ch: ch.declare_queue(
                f"{prefix}.push.retry.1",
                durable=True,
                arguments={
                    **quorum,
                    "x-message-ttl": 999,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": f"{prefix}.push",
                },
            ),
        ]
        for declare in wrong:
            ch = await connection.channel()
            with pytest.raises(ChannelPreconditionFailed):
                await declare(ch)
        # One delay queue per backoff step, no more.
        ch = await connection.channel()
        with pytest.raises(ChannelNotFoundEntity):
            await ch.declare_queue(f"{prefix}.push.retry.3", passive=True)
    got_push = [m.message_id for m in await rabbit.drain(f"{prefix}.push")]
    assert got_push == ["e0"]


async def test_routing_keys_reach_the_bound_groups(prefix: str) -> None:
    events = stream(prefix)
    await events.publish(
        [
            OutgoingEvent("a", MESSAGE_STORED, b"1"),
            OutgoingEvent("b", ROOM_MEMBER_CHANGED, b"2"),
            OutgoingEvent("c", FILE_STORED, b"3"),
            OutgoingEvent("d", FILE_DELETED, b"4"),
            OutgoingEvent("e", FILE_STORED, b"5"),
        ]
    )
    await events.close()
    push = await rabbit.drain(f"{prefix}.push")
    files = await rabbit.drain(f"{prefix}.files")
    assert [(m.message_id, m.type) for m in push] == [("a", MESSAGE_STORED)]
    assert items(push[0]) == [("a", MESSAGE_STORED, b"1")]
    # One message per routing key, its events in order.
    assert [(m.message_id, m.type, m.routing_key) for m in files] == [
        ("c", FILE_STORED, FILE_STORED),
        ("d", FILE_DELETED, FILE_DELETED),
    ]
    assert items(files[0]) == [("c", FILE_STORED, b"3"), ("e", FILE_STORED, b"5")]
    assert items(files[1]) == [("d", FILE_DELETED, b"4")]
    assert push[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert push[0].headers[ATTEMPT_HEADER] == 1


async def test_publish_waits_for_confirms_and_fails_without_a_broker(prefix: str) -> None:
    events = stream(prefix)
    await events.publish([OutgoingEvent(f"e{i}", MESSAGE_STORED, b"%d" % i) for i in range(200)])
    # publish returned: the broker confirmed, so all 200 are in the queue, in one message.
    got = await rabbit.drain(f"{prefix}.push")
    assert len(got) == 1
    assert [i for i, _, _ in items(got[0])] == [f"e{i}" for i in range(200)]
    await events.close()
    nowhere = RabbitEventStream("amqp://guest:guest@127.0.0.1:1/", prefix=prefix, timeout=2)
    with pytest.raises(EventStreamDown):
        await nowhere.publish([OutgoingEvent("x", MESSAGE_STORED, b"")])
    await nowhere.close()


async def test_a_batch_is_bounded_in_bytes(prefix: str) -> None:
    events = stream(prefix, max_message_bytes=1000)
    body = b"x" * 300  # about 330 bytes of envelope each: three fit in 1000
    sent = [OutgoingEvent(f"e{i}", MESSAGE_STORED, body) for i in range(7)]
    sent.append(OutgoingEvent("big", MESSAGE_STORED, b"y" * 5000))  # alone, whole
    sent.append(OutgoingEvent("last", MESSAGE_STORED, b"z"))
    await events.publish(sent)
    await events.close()
    got = await rabbit.drain(f"{prefix}.push")
    runs = [[i for i, _, _ in items(m)] for m in got]
    assert runs == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"], ["big"], ["last"]]
    assert all(len(m.body) <= 1000 for m in got if m.message_id != "big")
    assert items(got[3]) == [("big", MESSAGE_STORED, b"y" * 5000)]


async def test_a_failing_batch_is_retried_event_by_event_and_only_the_poison_dies(
    prefix: str,
) -> None:
    metrics = Metrics()
    metrics.events = EventMetrics()
    events = stream(prefix, max_attempts=3, dead=metrics.events.dead)
    seen: list[tuple[str, int, int]] = []  # (id, attempt, size of its batch)
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            seen.append((d.id, d.attempt, len(deliveries)))
        for d in deliveries:
            if d.id == "bad" or (d.id == "flaky" and d.attempt < 3):
                if d.id == "bad" and d.attempt == 3:
                    done.set()
                raise RuntimeError(f"cannot handle {d.id}")
        handled.extend(d.id for d in deliveries)

    await events.subscribe("push", GROUPS["push"], handler)
    await events.publish(
        [
            OutgoingEvent("bad", MESSAGE_STORED, b"b"),
            OutgoingEvent("flaky", MESSAGE_STORED, b"f"),
            OutgoingEvent("good", MESSAGE_STORED, b"g"),
        ]
    )
    await asyncio.wait_for(done.wait(), 30)
    dead = await rabbit.drain(f"{prefix}.push.dead", wait=2.0)
    await events.close()
    # The batch failed whole once (one message of three), then each event was tried
    # alone: the good one at once, the flaky one until it passed, the bad one to the end.
    assert sorted(seen) == [
        ("bad", 1, 3),
        ("bad", 2, 1),
        ("bad", 3, 1),
        ("flaky", 1, 3),
        ("flaky", 2, 1),
        ("flaky", 3, 1),
        ("good", 1, 3),
        ("good", 2, 1),
    ]
    assert sorted(handled) == ["flaky", "good"]
    assert [(m.message_id, m.type) for m in dead] == [("bad", MESSAGE_STORED)]
    assert items(dead[0]) == [("bad", MESSAGE_STORED, b"b")]
    assert dead[0].headers[ATTEMPT_HEADER] == 3
    assert dead[0].headers[ERROR_HEADER] == "RuntimeError: cannot handle bad"
    assert b'imserver_events_dead_total{group="push"} 1.0' in metrics.render()
    # Nothing is left anywhere: acked, retried, or dead.
    for name in (f"{prefix}.push", f"{prefix}.push.retry.1", f"{prefix}.push.retry.2"):
        assert await rabbit.drain(name) == []


async def publish_raw(prefix: str, message: aio_pika.Message, key: str) -> None:
    """Publish ``message`` to the stream's exchange as another version would."""
    connection = await aio_pika.connect(rabbit.URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{prefix}.events")
        await exchange.publish(message, key)


async def test_single_event_messages_of_earlier_versions_are_consumed(prefix: str) -> None:
    events = stream(prefix, max_attempts=2)
    await events.publish([])  # nothing sent
    got: asyncio.Queue[list[Delivery]] = asyncio.Queue()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        await got.put(list(deliveries))
        if deliveries[0].id == "old-bad":
            raise RuntimeError("no")

    await events.subscribe("push", GROUPS["push"], handler)
    # What a relay of the previous version published, still queued at the upgrade.
    for event_id, body in (("old", b"o"), ("old-bad", b"p")):
        await publish_raw(
            prefix,
            aio_pika.Message(
                body,
                message_id=event_id,
                type=MESSAGE_STORED,
                content_type=CONTENT_TYPE,
                headers={ATTEMPT_HEADER: 1},
            ),
            MESSAGE_STORED,
        )
    first = await asyncio.wait_for(got.get(), 10)
    assert first == [Delivery("old", MESSAGE_STORED, b"o", 1)]
    assert await asyncio.wait_for(got.get(), 10) == [Delivery("old-bad", MESSAGE_STORED, b"p", 1)]
    assert await asyncio.wait_for(got.get(), 10) == [Delivery("old-bad", MESSAGE_STORED, b"p", 2)]
    dead = await rabbit.drain(f"{prefix}.push.dead", wait=3.0)
    await events.close()
    # Retried and dead-lettered as it came.
    assert [(m.message_id, m.type, m.body, m.content_type) for m in dead] == [
        ("old-bad", MESSAGE_STORED, b"p", CONTENT_TYPE)
    ]


async def test_an_envelope_of_an_unknown_version_is_dead_lettered_as_it_is(prefix: str) -> None:
    events = stream(prefix, max_attempts=2)
    called: list[Sequence[Delivery]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        called.append(deliveries)

    await events.subscribe("push", GROUPS["push"], handler)
    future = msgspec.msgpack.encode({"v": 2, "events": [BatchItem("n", MESSAGE_STORED, b"?")]})
    await publish_raw(
        prefix,
        aio_pika.Message(
            future, message_id="n", type=MESSAGE_STORED, content_type=BATCH_CONTENT_TYPE
        ),
        MESSAGE_STORED,
    )
    dead = await rabbit.drain(f"{prefix}.push.dead", wait=5.0)
    await events.close()
    assert called == []
    assert [(m.message_id, m.body, m.content_type) for m in dead] == [
        ("n", future, BATCH_CONTENT_TYPE)
    ]
    assert dead[0].headers[ATTEMPT_HEADER] == 2
    assert dead[0].headers[ERROR_HEADER] == "UnknownBatch: event batch version 2 is not known here"


async def test_an_unacked_event_is_redelivered_to_another_consumer(prefix: str) -> None:
    first = stream(prefix)
    started = asyncio.Event()

    async def stuck(deliveries: Sequence[Delivery]) -> None:
        started.set()
        await asyncio.Event().wait()  # never returns: the event stays unacked

    await first.subscribe("push", GROUPS["push"], stuck)
    await first.publish([OutgoingEvent("once", MESSAGE_STORED, b"o")])
    await asyncio.wait_for(started.wait(), 10)
    await first.close()  # the consumer dies holding the event
    second = stream(prefix)
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await got.put(delivery)

    await second.subscribe("push", GROUPS["push"], handler)
    delivery = await asyncio.wait_for(got.get(), 10)
    await second.close()
    assert (delivery.id, delivery.attempt) == ("once", 1)
