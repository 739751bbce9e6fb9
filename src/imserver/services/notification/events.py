"""The notification service as a consumer of the event stream: ``message.stored``.

With ``[events] backend`` set, the message writer does not call the notification
service after a commit; its ``message.stored`` events go through the message
database's outbox and the broker, and reach the notification service here, from the
consumer group :data:`GROUP`'s own durable queue, a batch (the events of one outbox
claim) at a time. A batch is ingested in one go by the same code as a direct call
(:meth:`LocalNotificationService.take`, which takes runs of messages), and its broker
message acknowledged only once that ingest committed. A failed ingest is retried by
the stream event by event (a repeat of the others is absorbed, see below), so an
event that cannot be ingested is dead-lettered alone.

Idempotent: an event can come twice (a relay that crashed between its publish and
its delete publishes again; a consumer that crashed before its ack gets it
redelivered). The ingest skips a message whose decision rows — one per (conv, seq,
member) that could be pushed, written in the ingest's transaction — exist, and a
message without any writes nothing; so a repeat stores and pushes nothing.

No start-up catch-up either: the outbox keeps every stored message until the broker
has it, and the queue keeps it until the ingest commits. Message ids can commit out
of order when several message-service instances share a database, which a catch-up
by id would get wrong; the outbox makes that order irrelevant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from imserver.services.message.api import MessageStored
from imserver.services.notification.service import LocalNotificationService
from imserver.storage.events import MESSAGE_STORED, Delivery, EventSubscriber, decode_event

GROUP: Final = "notification"
"""The consumer group (its queue is ``<prefix>.notification``)."""
PATTERNS: Final = (MESSAGE_STORED,)
VERSIONS: Final = frozenset({1})
"""The ``message.stored`` versions this consumer understands."""


class UnknownEvent(ValueError):
    """A delivery this consumer cannot read: retried, then dead-lettered for an
    operator, never dropped."""


class MessageStoredConsumer:
    """Hands each ``message.stored`` event to the notification service's ingest."""

    def __init__(self, service: LocalNotificationService) -> None:
        self._service = service

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        """Ingest the events in one go; returns once they are stored (then they are
        acknowledged). Raises, ingesting none, when one cannot be read."""
        messages = []
        for delivery in deliveries:
            if delivery.key != MESSAGE_STORED:
                raise UnknownEvent(f"unexpected event {delivery.key!r}")
            event = decode_event(delivery.body, MessageStored)
            if event.v not in VERSIONS:
                raise UnknownEvent(f"message.stored version {event.v} is not known here")
            messages.append(event.message)
        await self._service.take(messages)


async def consume_message_events(
    service: LocalNotificationService, subscriber: EventSubscriber
) -> None:
    """Start consuming ``message.stored`` for ``service`` (the group :data:`GROUP`)."""
    await subscriber.subscribe(GROUP, PATTERNS, MessageStoredConsumer(service))
