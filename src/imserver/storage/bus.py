"""The live bus: how stored messages and ephemeral events reach the gateways.

A broker in the shape of centrifuge's ``Broker``: publishers put a
:class:`Publication` on a named channel; a gateway subscribes the channels its
attached sessions need, and its handler (the gateway's hub) gets every publication
of those channels with the channel's name. Embedded mode uses
:class:`MemoryLiveBus`; several processes share :class:`~imserver.storage.bus_redis.RedisLiveBus`
(Redis pub/sub), and ``tests/service/test_bus_contract.py`` is the contract both run.

Channels:

* ``r:<room>`` (:func:`room_channel`, the room's conversation id): every message of
  the room, once, whatever its size, and the room's ``typing`` and ``receipt``
  events. A gateway subscribes it while one of its attached users is a member; the
  hub maps the conversation to those users' sessions.
* ``u:<user>`` (:func:`user_channel`, the user's personal channel): the user's
  direct (``d:a:b``, published on both users' channels) and system (``s:<user>``)
  conversations, ``typing`` and ``receipt`` events of direct conversations,
  ``presence`` of a direct peer, and the room notices of users who are not members
  on either side of a room message: the ``invited`` message to the invitee, and a
  membership change to each user who joins or leaves with it (so a gateway that is
  not subscribed to the room learns of the join and subscribes). A gateway
  subscribes the channel of every user with an attached session. Direct
  conversations go here rather than on channels of their own: a user has few
  enough of them to share one channel, and a gateway would otherwise subscribe one
  channel per direct conversation of each of its users.

Positions: a publication carries the conversation's ``seq`` as its position when it
is a stored message (``seq``; ``None`` for ephemeral events and for room notices on
a user channel). Within a channel, the positions of one conversation rise by one
per publication, so a subscriber that sees ``seq > last + 1`` has missed something
(a networked backend drops publications when a subscriber falls behind or
reconnects) and makes its clients sync.

Guarantees of every backend:

* Publications published by one caller (the message writer, one per process)
  reach a subscriber in publication order, across channels too (Redis pub/sub over
  one connection keeps it): the hub relies on a room message on ``r:<room>``
  arriving before the same message's notice on ``u:<user>``.
* At most once: a publication is never delivered twice; it may be lost (a gap).
* A subscriber that fails on one publication is logged and keeps its
  subscriptions; the failure reaches neither the publisher (whose write has
  committed) nor the other subscribers.
* :meth:`LiveBus.subscribe` and :meth:`LiveBus.unsubscribe` are idempotent (a set of
  channels per handler; reference counting over sessions is the hub's) and take
  effect, for the memory backend, before they return; a networked backend may
  take a round trip, and what is published meanwhile may be missed.
  :meth:`LiveBus.settle` answers once every earlier (un)subscription is in effect:
  a gateway awaits it before it tells a client that its live events flow.
* Losses a subscriber cannot see as a gap (its connection to the broker broke, so
  whatever was published meanwhile on every channel is gone, the last message of a
  conversation too) are reported to the :meth:`LiveBus.on_lost` listeners with the
  channels concerned, once those channels are subscribed again. The memory
  backend loses nothing and never calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from imserver.protocol.events import Event

logger = logging.getLogger(__name__)


class Publication(msgspec.Struct, frozen=True, kw_only=True):
    """One event on a channel.

    ``conv`` and ``seq``: the conversation and its seq (the position) for a stored
    message; ``seq`` is ``None`` for ephemeral events. ``exclude_session`` skips
    one connection (the sender's); ``exclude_user`` skips every session of one user
    (the typist of a ``typing`` event). ``joined`` and ``left``: the users a room
    membership change adds and removes at this message; a subscriber delivers the
    message to the members after the joins and before the leaves. ``close_login``:
    see the field.
    """

    event: Event
    conv: str | None = None
    seq: int | None = None
    exclude_session: str | None = None
    exclude_user: str | None = None
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    close_login: str | None = None
    """A login session revoked: the sessions authenticated by it get ``event`` (a
    ``closed``) and are closed, wherever they are; nobody else gets anything."""


PublicationHandler = Callable[[str, Publication], None]
"""Called with the channel and the publication, for every publication of a
subscribed channel."""


LostHandler = Callable[[Sequence[str]], None]
"""Called with subscribed channels whose publications may have been lost (the
subscriptions are in effect again when it is called)."""


def room_channel(conv: str) -> str:
    """The channel of a room conversation: its conversation id (``r:<room>``)."""
    return conv


def user_channel(user: str) -> str:
    """The personal channel of ``user`` (``u:<user>``)."""
    return "u:" + user


class LiveBus(Protocol):
    """Publish/subscribe of publications on channels (at most once, in order)."""

    subscribes_at_once: bool
    """Whether :meth:`subscribe` is in effect before it returns, so a newly
    subscribed channel misses nothing published after the call."""

    async def publish(self, channel: str, publication: Publication) -> None:
        """Hand ``publication`` to every handler subscribed to ``channel``."""

    def subscribe(self, channel: str, handler: PublicationHandler) -> None:
        """Call ``handler`` for every publication on ``channel`` from now on."""

    def unsubscribe(self, channel: str, handler: PublicationHandler) -> None:
        """Stop calling ``handler`` for ``channel`` (no-op when not subscribed)."""

    def on_lost(self, listener: LostHandler) -> None:
        """Call ``listener`` whenever publications on subscribed channels may have
        been lost, with those channels."""

    async def settle(self) -> None:
        """Answer once every subscribe and unsubscribe called before is in effect."""


class MemoryLiveBus:
    """The in-process bus: publishing calls each subscribed handler synchronously,
    in the publisher's order; no task per publication."""

    subscribes_at_once = True

    def __init__(self) -> None:
        self._channels: dict[str, tuple[PublicationHandler, ...]] = {}
        """channel -> its handlers; replaced, never mutated, so a handler may
        (un)subscribe while it handles a publication."""

    async def publish(self, channel: str, publication: Publication) -> None:
        handlers = self._channels.get(channel)
        if handlers is None:
            return
        for handler in handlers:
            try:
                handler(channel, publication)
            except Exception:
                name = type(publication.event).__name__
                logger.exception(
                    "live-bus subscriber %r failed on a %s event on %s", handler, name, channel
                )

    def subscribe(self, channel: str, handler: PublicationHandler) -> None:
        handlers = self._channels.get(channel, ())
        if handler not in handlers:
            self._channels[channel] = (*handlers, handler)

    def unsubscribe(self, channel: str, handler: PublicationHandler) -> None:
        handlers = self._channels.get(channel, ())
        if handler in handlers:
            rest = tuple(h for h in handlers if h != handler)
            if rest:
                self._channels[channel] = rest
            else:
                del self._channels[channel]

    def on_lost(self, listener: LostHandler) -> None:
        """Nothing is ever lost in one process: ``listener`` is never called."""

    async def settle(self) -> None:
        """(Un)subscribing takes effect at once: nothing to wait for."""

    def subscribed(self, channel: str) -> int:
        """How many handlers are subscribed to ``channel`` (for tests and metrics)."""
        return len(self._channels.get(channel, ()))
