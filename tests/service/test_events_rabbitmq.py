"""The RabbitMQ event stream against the real broker: topology, confirms, retries,
the dead-letter queue (``imserver.storage.events_rabbitmq``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
import rabbit
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from imserver.storage.events import (
    FILE_DELETED,
    FILE_STORED,
    MESSAGE_STORED,
    ROOM_MEMBER_CHANGED,
    Delivery,
    EventStreamDown,
    OutgoingEvent,
)
from imserver.storage.events_rabbitmq import ATTEMPT_HEADER, ERROR_HEADER, RabbitEventStream

BACKOFF = (0.2, 0.4)
GROUPS = {"push": ("message.*",), "files": ("file.#",)}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    await rabbit.reachable()
    name = rabbit.new_prefix()
    yield name
    await rabbit.delete_topology(name, {**GROUPS, "work": ()}, BACKOFF)


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
        ]
    )
    await events.close()
    push = await rabbit.drain(f"{prefix}.push")
    files = await rabbit.drain(f"{prefix}.files")
    assert [(m.message_id, m.type, m.body) for m in push] == [("a", MESSAGE_STORED, b"1")]
    assert [(m.message_id, m.type) for m in files] == [("c", FILE_STORED), ("d", FILE_DELETED)]
    assert push[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert push[0].content_type == "application/msgpack"
    assert push[0].headers[ATTEMPT_HEADER] == 1


async def test_publish_waits_for_confirms_and_fails_without_a_broker(prefix: str) -> None:
    events = stream(prefix)
    await events.publish([OutgoingEvent(f"e{i}", MESSAGE_STORED, b"%d" % i) for i in range(200)])
    # publish returned: the broker confirmed every message, so all 200 are in the queue.
    got = await rabbit.drain(f"{prefix}.push")
    assert [m.message_id for m in got] == [f"e{i}" for i in range(200)]
    await events.close()
    nowhere = RabbitEventStream("amqp://guest:guest@127.0.0.1:1/", prefix=prefix, timeout=2)
    with pytest.raises(EventStreamDown):
        await nowhere.publish([OutgoingEvent("x", MESSAGE_STORED, b"")])
    await nowhere.close()


async def test_a_failing_consumer_is_retried_then_dead_lettered(prefix: str) -> None:
    events = stream(prefix, max_attempts=3)
    seen: list[Delivery] = []
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if delivery.id == "bad" or (delivery.id == "flaky" and delivery.attempt < 2):
            if delivery.id == "bad" and delivery.attempt == 3:
                done.set()
            raise RuntimeError(f"cannot handle {delivery.id}")
        handled.append(delivery.id)

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
    assert sorted(handled) == ["flaky", "good"]
    attempts = {(d.id, d.attempt) for d in seen}
    assert attempts == {("bad", 1), ("bad", 2), ("bad", 3), ("flaky", 1), ("flaky", 2), ("good", 1)}
    assert all(d.key == MESSAGE_STORED for d in seen)
    assert [(m.message_id, m.type, m.body) for m in dead] == [("bad", MESSAGE_STORED, b"b")]
    assert dead[0].headers[ATTEMPT_HEADER] == 3
    assert dead[0].headers[ERROR_HEADER] == "RuntimeError: cannot handle bad"
    # Nothing is left anywhere: acked, retried, or dead.
    for name in (f"{prefix}.push", f"{prefix}.push.retry.1", f"{prefix}.push.retry.2"):
        assert await rabbit.drain(name) == []


async def test_an_unacked_event_is_redelivered_to_another_consumer(prefix: str) -> None:
    first = stream(prefix)
    started = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()  # never returns: the event stays unacked

    await first.subscribe("push", GROUPS["push"], stuck)
    await first.publish([OutgoingEvent("once", MESSAGE_STORED, b"o")])
    await asyncio.wait_for(started.wait(), 10)
    await first.close()  # the consumer dies holding the event
    second = stream(prefix)
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        await got.put(delivery)

    await second.subscribe("push", GROUPS["push"], handler)
    delivery = await asyncio.wait_for(got.get(), 10)
    await second.close()
    assert (delivery.id, delivery.attempt) == ("once", 1)
