"""The durable event stream: what producers publish and consumers take, broker aside.

The distributed mode's asynchronous events (``message.stored``, ``room.member_changed``,
``file.stored``, ``file.deleted``) travel through a broker that keeps them until a
consumer acknowledges them. This module is the broker-free part of that capability:

* an event is a versioned msgspec struct (:class:`Event`: an event ``id``, a version
  ``v``), subclassed by the service that produces it in its ``api.py``, and encoded
  with MessagePack (:func:`encode_event`) — compact, and the codec the project
  already uses for its internal calls;
* :class:`OutgoingEvent` is an encoded event on its way out (the outbox's rows,
  :mod:`imserver.storage.outbox`); :class:`Delivery` one on its way in;
* several events travel in one broker message, a versioned **batch envelope**
  (:class:`Batch`, :func:`encode_batch` / :func:`decode_batch`): the per-message
  frames, confirms and acks are what a busy stream costs, not the bytes;
* :class:`EventSubscriber` is the consumer side: a consumer *group* (one durable
  queue, shared by every instance of the consuming service) receives the events
  whose routing key matches its patterns, a batch at a time, and acknowledges the
  batch when its handler returns. A handler that raises has the batch retried with
  backoff, each of its events on its own, and an event that keeps failing is, after
  ``max_attempts``, dead-lettered; so a handler must be idempotent (every event can
  arrive more than once: a relay that crashed between publishing and deleting its
  outbox rows publishes them again, and a failed batch is retried whole).

The publisher side, :class:`~imserver.storage.outbox.EventPublisher`, is owned by the
outbox relay, its one user. The backend is :mod:`imserver.storage.events_rabbitmq`,
imported only when ``[events] backend = "rabbitmq"``: embedded mode hands committed
batches to the notification service by a direct call and needs no broker.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol, TypeVar

import msgspec

MESSAGE_STORED: Final = "message.stored"
ROOM_MEMBER_CHANGED: Final = "room.member_changed"
FILE_STORED: Final = "file.stored"
FILE_DELETED: Final = "file.deleted"


def new_event_id() -> str:
    """A fresh event id: 128 random bits as 32 hex digits (what a random UUID's hex
    is, at a fifth of ``uuid4``'s cost: one per stored message)."""
    return os.urandom(16).hex()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """The base of every event: its ``id`` (what an idempotent consumer may remember)
    and its schema version ``v``. A consumer that meets a version it does not know
    fails the delivery, which ends in the dead-letter queue instead of being lost."""

    id: str = msgspec.field(default_factory=new_event_id)
    v: int = 1


E = TypeVar("E", bound=Event)

_encoder = msgspec.msgpack.Encoder()


def encode_event(event: Event) -> bytes:
    """The event's MessagePack encoding (the body of its broker message)."""
    return _encoder.encode(event)


def decode_event(body: bytes, kind: type[E]) -> E:
    """Decode a delivery's body as ``kind``; :class:`msgspec.ValidationError` or
    :class:`msgspec.DecodeError` when it is not one."""
    return msgspec.msgpack.decode(body, type=kind)


class OutgoingEvent(msgspec.Struct, frozen=True):
    """An encoded event to publish: its id, routing key and MessagePack body."""

    id: str
    key: str
    body: bytes


class Delivery(msgspec.Struct, frozen=True):
    """An event as a consumer receives it."""

    id: str
    key: str
    body: bytes
    attempt: int
    """1 for the first delivery to this group, 2 for the first retry, and so on."""


Handler = Callable[[Sequence[Delivery]], Awaitable[None]]
"""A consumer's handler: takes the events of one broker message (one or more, all
with the same attempt number), returns once they are durably handled (the message
is then acknowledged); raises to have every one of them retried."""

BATCH_VERSION: Final = 1
"""The version of :class:`Batch` this code writes and reads."""


class BatchItem(msgspec.Struct, frozen=True, array_like=True):
    """One event of a :class:`Batch`: its id, routing key and MessagePack body
    (encoded as a three-element array)."""

    id: str
    key: str
    body: bytes


class Batch(msgspec.Struct, frozen=True):
    """The body of a broker message carrying several events: the envelope's version
    ``v`` and the events, in publication order. A reader that meets a version it
    does not know fails the message (:class:`UnknownBatch`), which is retried and
    then dead-lettered, never dropped."""

    v: int
    events: list[BatchItem]


class UnknownBatch(ValueError):
    """A broker message whose envelope cannot be read (unknown version, bad bytes)."""


_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(events: Sequence[OutgoingEvent]) -> bytes:
    """The envelope of ``events`` (current version)."""
    return _encoder.encode(Batch(BATCH_VERSION, [BatchItem(e.id, e.key, e.body) for e in events]))


def decode_batch(body: bytes) -> list[BatchItem]:
    """The events of an envelope; :class:`UnknownBatch` when it is not one this code
    reads."""
    try:
        batch = _batch_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UnknownBatch(f"not an event batch: {exc}") from exc
    if batch.v != BATCH_VERSION:
        raise UnknownBatch(f"event batch version {batch.v} is not known here")
    return batch.events


def batch_size(event: OutgoingEvent) -> int:
    """An upper bound of the bytes ``event`` adds to an envelope (its fields and
    their MessagePack headers)."""
    return len(event.body) + len(event.id) + len(event.key) + 16


class EventStreamDown(Exception):
    """The broker cannot be reached, or did not confirm a publication: the events
    were not (all) published and must be published again."""


class EventSubscriber(Protocol):
    """The consumer side of the event stream."""

    async def subscribe(self, group: str, patterns: Sequence[str], handler: Handler) -> None:
        """Consume, from now until :meth:`close`, the events whose routing key
        matches one of ``patterns`` (topic patterns: ``message.*``), through the
        group's durable queue: each event reaches one instance of the group. Returns
        after the first attempt to connect (the queue then exists and is bound when
        the broker answered); reconnects with backoff on its own as long as it must."""

    async def close(self) -> None:
        """Stop consuming and disconnect (unacknowledged events return to the queue)."""
