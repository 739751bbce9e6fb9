"""The event stream on RabbitMQ (aio-pika): :class:`RabbitEventStream`.

**Topology** (``P`` is the ``[events] prefix``, ``G`` a consumer group):

* ``P.events`` — a durable topic exchange; every event is published to it with its
  kind as the routing key (``message.stored``, ``room.member_changed``,
  ``file.stored``, ``file.deleted``);
* ``P.G`` — the group's work queue: durable, **quorum** (replicated, and safe on a
  broker restart), bound to ``P.events`` by each of the group's patterns;
* ``P.G.retry.N`` (N = 1 … len(backoff)) — the delay queues: quorum queues with a
  queue-wide message TTL of ``backoff[N-1]`` seconds whose expired messages are
  dead-lettered (through the default exchange) back to ``P.G``. Per-attempt queues
  rather than a per-message TTL, because RabbitMQ expires messages only at a queue's
  head: one queue with mixed per-message TTLs would hold a short retry behind a
  long one;
* ``P.G.dead`` — the group's dead-letter queue (durable, quorum), where an event
  lands after ``max_attempts`` failed deliveries, for an operator to inspect.

**Publishing**: a channel in confirm mode; :meth:`RabbitEventStream.publish` groups
the events it is given by routing key (keeping their order within a key) and sends
each group as few messages as fit ``max_message_bytes``: each message is a batch
envelope (:class:`~imserver.storage.events.Batch`, content type
:data:`BATCH_CONTENT_TYPE`) routed by the group's key, persistent, with that key as
``type`` and its first event's id as ``message_id``. It returns once the broker
confirmed every message (``EventStreamDown`` otherwise). One message per outbox
claim rather than one per event: each AMQP message costs a publish, a confirm, a
delivery and an ack, in frames on both sides, whatever its size.

**Reading**: a message of content type :data:`BATCH_CONTENT_TYPE` is an envelope
(its version checked); one of :data:`CONTENT_TYPE` (``application/msgpack``) is a
single event, its id in ``message_id`` and its key in ``type`` — what earlier
versions published, still read, so that messages queued across an upgrade are
consumed.

**Consuming**: manual acks, ``prefetch`` unacknowledged messages per consumer. The
handler gets the events of one message together and, when it returns, the message
is acked once. One that raises has the message's events republished (with
confirm) **one event per message** to the delay queue of its attempt, with the
attempt counter in the ``x-attempt`` header (1 on the first delivery), and the
message acked: the whole batch is tried again (consumers are idempotent), and an
event that keeps failing fails alone, so a poison event never holds back the others
of its batch. At attempt ``max_attempts`` an event goes to ``P.G.dead`` instead,
with the error in ``x-error`` (a batch that fails at its last attempt — only when
``max_attempts`` is 1 — is dead-lettered as its single events). A message whose
envelope cannot be read is retried and dead-lettered as it is. A consumer whose
connection drops leaves its unacked messages to the broker, which redelivers them;
it reconnects with backoff.

Every declaration is idempotent with the same arguments, so the publisher and every
consumer declare the whole topology of the groups they know on each connection:
events published before any consumer of a group ever ran wait in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aiormq.exceptions import AMQPError
from pamqp.common import FieldValue

from imserver.storage.events import (
    Delivery,
    EventStreamDown,
    Handler,
    OutgoingEvent,
    batch_size,
    decode_batch,
    encode_batch,
)

logger = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-attempt"
ERROR_HEADER = "x-error"
CONTENT_TYPE = "application/msgpack"
"""A message of one event (what earlier versions published; still read)."""
BATCH_CONTENT_TYPE = "application/vnd.imserver.events+msgpack"
"""A message of a batch envelope (:class:`~imserver.storage.events.Batch`)."""
MAX_MESSAGE_BYTES = 256 * 1024
QUORUM: dict[str, FieldValue] = {"x-queue-type": "quorum"}


class Topology:
    """The names of the exchange and queues of one prefix (see the module docstring)."""

    def __init__(self, prefix: str, backoff: Sequence[float]) -> None:
        self.prefix = prefix
        self.exchange = f"{prefix}.events"
        self.backoff = tuple(backoff)

    def queue(self, group: str) -> str:
        """The group's work queue."""
        return f"{self.prefix}.{group}"

    def retry_queue(self, group: str, step: int) -> str:
        """The delay queue of retry ``step`` (1-based)."""
        return f"{self.queue(group)}.retry.{step}"

    def dead_queue(self, group: str) -> str:
        """The group's dead-letter queue."""
        return f"{self.queue(group)}.dead"

    def delay_ms(self, step: int) -> int:
        """The delay of retry ``step`` in milliseconds."""
        return int(self.backoff[step - 1] * 1000)

    async def declare(
        self, channel: AbstractChannel, groups: Mapping[str, Sequence[str]]
    ) -> AbstractExchange:
        """Declare the exchange and every queue of ``groups`` (group -> patterns)."""
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for group, patterns in groups.items():
            work = await channel.declare_queue(self.queue(group), durable=True, arguments=QUORUM)
            for pattern in patterns:
                await work.bind(exchange, pattern)
            for step in range(1, len(self.backoff) + 1):
                await channel.declare_queue(
                    self.retry_queue(group, step),
                    durable=True,
                    arguments={
                        **QUORUM,
                        "x-message-ttl": self.delay_ms(step),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": self.queue(group),
                    },
                )
            await channel.declare_queue(self.dead_queue(group), durable=True, arguments=QUORUM)
        return exchange


def _message(
    body: bytes,
    message_id: str,
    key: str,
    attempt: int,
    content_type: str = BATCH_CONTENT_TYPE,
    **headers: Any,
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        message_id=message_id,
        type=key,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={ATTEMPT_HEADER: attempt, **headers},
    )


def batches(events: Sequence[OutgoingEvent], max_bytes: int) -> list[list[OutgoingEvent]]:
    """``events`` grouped by routing key (in order within a key, keys in the order of
    their first event), each group cut into runs of at most ``max_bytes`` of envelope
    (an event larger than that alone in its run)."""
    by_key: dict[str, list[list[OutgoingEvent]]] = {}
    sizes: dict[str, int] = {}
    for event in events:
        runs = by_key.setdefault(event.key, [[]])
        size = batch_size(event)
        if runs[-1] and sizes[event.key] + size > max_bytes:
            runs.append([])
            sizes[event.key] = 0
        runs[-1].append(event)
        sizes[event.key] = sizes.get(event.key, 0) + size
    return [run for runs in by_key.values() for run in runs]


def _single(delivery: Delivery) -> tuple[str, str, bytes, str]:
    """A delivery as the one-event envelope it is retried in."""
    body = encode_batch([OutgoingEvent(delivery.id, delivery.key, delivery.body)])
    return (delivery.id, delivery.key, body, BATCH_CONTENT_TYPE)


class RabbitEventStream:
    """Both sides of the event stream on one RabbitMQ broker (see the module
    docstring): :meth:`publish` for the outbox relays, :meth:`subscribe` for consumers.

    ``groups``: every consumer group (name -> routing patterns) whose queues the
    publisher declares, so that no event is published to an exchange with no queue
    for it. ``timeout``: seconds a connection attempt or a confirm may take.
    ``max_message_bytes``: the most envelope bytes per published message. ``dead``:
    where to count the events each group dead-lettered (the server's metrics).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "imserver",
        prefetch: int = 64,
        max_attempts: int = 5,
        backoff: Sequence[float] = (1.0, 5.0, 30.0),
        groups: Mapping[str, Sequence[str]] | None = None,
        timeout: float = 10.0,
        reconnect: tuple[float, float] = (0.2, 10.0),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        dead: dict[str, int] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not backoff:
            raise ValueError("backoff needs at least one delay")
        self._url = url
        self.topology = Topology(prefix, backoff)
        self._prefetch = prefetch
        self._max_attempts = max_attempts
        self._groups = dict(groups or {})
        self._timeout = timeout
        self._reconnect = reconnect
        self._publisher: tuple[AbstractConnection, AbstractExchange] | None = None
        self._publish_lock = asyncio.Lock()
        self._consumers: list[asyncio.Task[None]] = []
        self._connections: set[Any] = set()
        self._closed = False
        self._max_bytes = max_message_bytes
        self.dead_lettered: dict[str, int] = {} if dead is None else dead
        """group -> events sent to its dead-letter queue since the start."""

    # --- publishing ---------------------------------------------------------------------

    async def _connect(self) -> Any:
        try:
            connection = await aio_pika.connect(self._url, timeout=self._timeout)
        except (TimeoutError, OSError, AMQPError) as exc:
            raise EventStreamDown(f"RabbitMQ unreachable: {exc!r}") from exc
        self._connections.add(connection)
        return connection

    async def _publishing(self) -> AbstractExchange:
        if self._publisher is not None and not self._publisher[0].is_closed:
            return self._publisher[1]
        connection = await self._connect()
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await self.topology.declare(channel, self._groups)
        except BaseException:
            await self._drop(connection)
            raise
        self._publisher = (connection, exchange)
        return exchange

    async def publish(self, events: Sequence[OutgoingEvent]) -> None:
        """Publish ``events`` to the exchange, in batches by routing key (see the
        module docstring), and wait for every confirm."""
        if not events:
            return
        async with self._publish_lock:
            try:
                exchange = await self._publishing()
                # Sent in order on one channel; the confirms are awaited together.
                await asyncio.gather(
                    *(
                        exchange.publish(
                            _message(encode_batch(run), run[0].id, run[0].key, 1),
                            run[0].key,
                            mandatory=False,
                            timeout=self._timeout,
                        )
                        for run in batches(events, self._max_bytes)
                    )
                )
            except EventStreamDown:
                raise
            except (TimeoutError, OSError, AMQPError, RuntimeError) as exc:
                if self._publisher is not None:
                    await self._drop(self._publisher[0])
                    self._publisher = None
                raise EventStreamDown(f"publish not confirmed: {exc!r}") from exc

    # --- consuming ------------------------------------------------------------------------

    async def subscribe(self, group: str, patterns: Sequence[str], handler: Handler) -> None:
        """Consume the group's queue (see :class:`~imserver.storage.events.EventSubscriber`).
        Returns after the first connection attempt; a failed one, like every later
        loss, is retried in the background with backoff."""
        self._groups.setdefault(group, tuple(patterns))
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._consume(group, tuple(patterns), handler, ready), name=f"events-{group}"
        )
        self._consumers.append(task)
        await ready

    async def _consume(
        self,
        group: str,
        patterns: tuple[str, ...],
        handler: Handler,
        ready: asyncio.Future[None],
    ) -> None:
        delay = self._reconnect[0]
        while not self._closed:
            try:
                await self._session(group, patterns, handler, ready)
                delay = self._reconnect[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A broker down at start is waited for like one lost later.
                if not ready.done():
                    ready.set_result(None)
                logger.warning("event consumer %s lost RabbitMQ: %r; reconnecting", group, exc)
            if not self._closed:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._reconnect[1])

    async def _session(
        self,
        group: str,
        patterns: tuple[str, ...],
        handler: Handler,
        ready: asyncio.Future[None],
    ) -> None:
        """One connection of a consumer: declare, consume, return when it is lost."""
        connection = await self._connect()
        try:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_close(*_: Any) -> None:
                if not lost.done():
                    lost.set_result(None)

            connection.close_callbacks.add(on_close)
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self._prefetch)
            await self.topology.declare(channel, {group: patterns})
            queue = await channel.get_queue(self.topology.queue(group), ensure=False)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await self._handle(channel, group, handler, message)

            await queue.consume(on_message)
            if not ready.done():
                ready.set_result(None)
            await lost
        finally:
            await self._drop(connection)

    async def _handle(
        self,
        channel: AbstractChannel,
        group: str,
        handler: Handler,
        message: AbstractIncomingMessage,
    ) -> None:
        raw = (message.headers or {}).get(ATTEMPT_HEADER)
        attempt = raw if isinstance(raw, int) and raw > 0 else 1
        key = message.type or message.routing_key or ""
        deliveries: list[Delivery] = []
        try:
            if message.content_type == BATCH_CONTENT_TYPE:
                deliveries = [
                    Delivery(id=e.id, key=e.key, body=e.body, attempt=attempt)
                    for e in decode_batch(message.body)
                ]
            else:
                deliveries = [Delivery(message.message_id or "", key, message.body, attempt)]
            await handler(deliveries)
        except Exception as exc:
            # Retried as it came (one event, or an envelope that cannot be read), or
            # a batch as its events one by one.
            retries = (
                [_single(d) for d in deliveries]
                if len(deliveries) > 1
                else [
                    (
                        message.message_id or "",
                        key,
                        message.body,
                        message.content_type or CONTENT_TYPE,
                    )
                ]
            )
            try:
                await self._retry(channel, group, retries, attempt, exc)
            except Exception:
                # Not acked: the broker redelivers it when this channel goes.
                logger.exception("event message %s could not be queued for a retry", key)
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
        with contextlib.suppress(Exception):
            await message.ack()

    async def _retry(
        self,
        channel: AbstractChannel,
        group: str,
        messages: Sequence[tuple[str, str, bytes, str]],
        attempt: int,
        exc: Exception,
    ) -> None:
        """Republish the ``(message id, key, body, content type)`` of a failed
        delivery to its delay queue, or to the dead-letter queue after
        ``max_attempts`` (through the default exchange, with confirm)."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        ids = ", ".join(m[0] for m in messages[:8]) + (", …" if len(messages) > 8 else "")
        if attempt >= self._max_attempts:
            logger.error("events %s dead-lettered after %d attempts: %s", ids, attempt, error)
            target = self.topology.dead_queue(group)
            next_attempt = attempt
        else:
            logger.warning("events %s failed (attempt %d): %s", ids, attempt, error)
            target = self.topology.retry_queue(group, min(attempt, len(self.topology.backoff)))
            next_attempt = attempt + 1
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    _message(body, mid, key, next_attempt, ctype, **{ERROR_HEADER: error}),
                    target,
                    timeout=self._timeout,
                )
                for mid, key, body, ctype in messages
            )
        )
        if next_attempt == attempt:
            self.dead_lettered[group] = self.dead_lettered.get(group, 0) + len(messages)

    # --- life cycle -------------------------------------------------------------------

    async def _drop(self, connection: Any) -> None:
        self._connections.discard(connection)
        with contextlib.suppress(Exception):
            await connection.close()

    async def close_consumers(self) -> None:
        """Stop every consumer: their unacknowledged events return to the queues."""
        self._closed = True
        for task in self._consumers:
            task.cancel()
        for task in self._consumers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._consumers.clear()

    async def close(self) -> None:
        """Stop every consumer and close every connection."""
        await self.close_consumers()
        for connection in list(self._connections):
            await self._drop(connection)
        self._publisher = None
