"""Where a gRPC client sends its calls: the seam a discovery balancer plugs into.

A client asks its :class:`Upstream` for an :class:`Endpoint` on every attempt and
reports how the attempt went: :meth:`Endpoint.failed` after a transport failure
(the peer unreachable, the connection lost, a deadline passed),
:meth:`Endpoint.succeeded` after anything else, an application error included (the
instance answered). A balancer over many instances keeps its per-instance health
(a circuit breaker) from those reports; :class:`StaticUpstream` is the one fixed
address of a test or a hand-wired deployment.
"""

from __future__ import annotations

from typing import Protocol

import grpc

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a peer restarts: the default backoff reaches 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
"""The options of every channel between services."""


class Endpoint(Protocol):
    """One instance a call can go to."""

    key: str
    """Stable name of the instance (its address, or its registry key)."""
    channel: grpc.aio.Channel

    def succeeded(self) -> None:
        """The instance answered (a result or an application error)."""

    def failed(self) -> None:
        """The call failed in transport (unreachable, connection lost, deadline)."""


class Upstream(Protocol):
    """The instances of one service as a client sees them."""

    def pick(self, affinity: str | None = None) -> Endpoint:
        """An instance for the next attempt; raises
        :class:`imserver.utils.errors.Unavailable` when no instance can take calls.

        ``affinity``: calls with the same key go to the same instance while the set
        of healthy instances stays the same (the ordered writes of one conversation
        use it, so a session's writes to a conversation keep their order); None:
        any instance."""


class StaticEndpoint:
    """One address, one channel; keeps no health."""

    def __init__(self, address: str) -> None:
        self.key = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    def succeeded(self) -> None:
        """Nothing to record."""

    def failed(self) -> None:
        """Nothing to record: there is no other instance to prefer."""


class StaticUpstream:
    """Every call to one fixed ``host:port``."""

    def __init__(self, address: str) -> None:
        self.endpoint = StaticEndpoint(address)

    def pick(self, affinity: str | None = None) -> Endpoint:
        """The one endpoint."""
        return self.endpoint

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self.endpoint.channel.close()
