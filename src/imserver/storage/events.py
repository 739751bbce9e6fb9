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
* :class:`EventSubscriber` is the consumer side: a consumer *group* (one durable
  queue, shared by every instance of the consuming service) receives the events
  whose routing key matches its patterns and acknowledges each one when its handler
  returns. A handler that raises has the event retried with backoff and, after
  ``max_attempts``, dead-lettered; so a handler must be idempotent (every event can
  arrive more than once: a relay that crashed between publishing and deleting its
  outbox rows publishes them again).

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


Handler = Callable[[Delivery], Awaitable[None]]
"""A consumer's handler: returns once the event is durably handled (it is then
acknowledged); raises to have it retried."""


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
