"""The live bus: how stored messages and ephemeral events reach gateways.

The message service publishes a :class:`Delivery` after commit; every gateway that
subscribed hands it to its hub, which encodes the event once per codec and queues
the same bytes to each live session of the named users. Embedded mode uses
:class:`MemoryLiveBus` (a direct call); distributed mode puts Redis pub/sub here.

Deliveries published by one caller reach subscribers in publication order, which
is what keeps each conversation's ``msg`` events in seq order per session. A
subscriber that fails on one delivery is logged and keeps its subscription; the
failure reaches neither the publisher (whose write has committed) nor the other
subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from imserver.protocol.events import Event

logger = logging.getLogger(__name__)


class Delivery(msgspec.Struct, frozen=True):
    """One event for the live sessions of ``users``.

    ``exclude_session`` skips one connection (the sender's); ``exclude_user`` skips
    every session of one user (the typist of a ``typing`` event).
    """

    users: Sequence[str]
    event: Event
    exclude_session: str | None = None
    exclude_user: str | None = None


DeliveryHandler = Callable[[Delivery], None]


class LiveBus(Protocol):
    """Publish/subscribe of deliveries to live sessions (at most once, in order)."""

    def publish(self, delivery: Delivery) -> None:
        """Hand ``delivery`` to every subscriber."""

    def subscribe(self, handler: DeliveryHandler) -> None:
        """Call ``handler`` for every delivery published from now on."""


class MemoryLiveBus:
    """The in-process bus: publishing calls each subscriber synchronously."""

    def __init__(self) -> None:
        self._handlers: list[DeliveryHandler] = []

    def publish(self, delivery: Delivery) -> None:
        for handler in self._handlers:
            try:
                handler(delivery)
            except Exception:
                name = type(delivery.event).__name__
                logger.exception("live-bus subscriber %r failed on a %s event", handler, name)

    def subscribe(self, handler: DeliveryHandler) -> None:
        self._handlers.append(handler)
