"""The durable event stream of a process, when ``[events] backend`` enables it.

:func:`start_events` is called by the composition root after the services are built
with their outboxes on: it opens the broker (``storage/events_rabbitmq.py``, whose
aio-pika is imported only here, only then), starts one outbox relay per producing
service (message, room, file) on that service's own database, and makes the
notification service consume ``message.stored`` from its group's queue.
:meth:`EventsRuntime.close_consumers` stops the consumer before the notification
service closes; :meth:`EventsRuntime.close`, after the producing services, the
relays (rows not yet published wait in the outboxes for the next start) and the
broker connections.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from imserver.services.notification import events as notification_events
from imserver.services.notification.service import LocalNotificationService
from imserver.storage.events import EventSubscriber
from imserver.storage.outbox import EventPublisher, Outbox, OutboxRelay
from imserver.utils.config import EventsConfig
from imserver.utils.metrics import EventMetrics

logger = logging.getLogger(__name__)

GROUPS: Mapping[str, Sequence[str]] = {notification_events.GROUP: notification_events.PATTERNS}
"""Every consumer group of the deployment and its patterns: the publisher declares
their queues, so no event is published before its queue exists."""


class EventStream(EventPublisher, EventSubscriber, Protocol):
    """Both sides of a backend, as the runtime holds it."""

    async def close_consumers(self) -> None:
        """Stop consuming (unacknowledged events return to their queues)."""


@dataclass(eq=False)
class EventsRuntime:
    """The event stream's parts in this process."""

    stream: EventStream
    relays: dict[str, OutboxRelay]
    """service name -> the relay of its outbox."""
    metrics: EventMetrics
    """Dead letters by group and the relays' last claims, for the server's metrics."""

    async def close_consumers(self) -> None:
        """Stop consuming (before the consuming services close)."""
        await self.stream.close_consumers()

    async def close(self) -> None:
        """Stop the relays (after the producing services), then disconnect."""
        for relay in self.relays.values():
            await relay.close()
        await self.stream.close()


async def start_events(
    config: EventsConfig,
    *,
    outboxes: Mapping[str, tuple[str, Outbox]],
    notifications: LocalNotificationService | None,
) -> EventsRuntime:
    """Start the relays of ``outboxes`` (service -> (its database URL, its outbox))
    and the notification service's consumer (none without ``notifications``: a
    process of the distributed mode without the notification service)."""
    if config.backend != "rabbitmq":
        raise ValueError(f"no event stream backend {config.backend!r}")
    from imserver.storage.events_rabbitmq import RabbitEventStream

    metrics = EventMetrics()
    stream = RabbitEventStream(
        config.url,
        prefix=config.prefix,
        prefetch=config.prefetch,
        max_attempts=config.max_attempts,
        backoff=config.backoff,
        groups=GROUPS,
        dead=metrics.dead,
    )
    if notifications is not None:
        await notification_events.consume_message_events(notifications, stream)
    relays = {}
    for name, (url, outbox) in outboxes.items():
        relay = OutboxRelay(url, outbox, stream, claims=metrics.claims, service=name)
        relay.start()
        relays[name] = relay
    logger.info("event stream: RabbitMQ, exchange %s.events", config.prefix)
    return EventsRuntime(stream=stream, relays=relays, metrics=metrics)
