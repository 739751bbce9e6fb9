"""What a gRPC client asks of discovery: an endpoint to call, and the call's outcome.

The gRPC client (``rpc/``) codes against this interface; the discovery balancer
(:class:`~imserver.discovery.balancer.ServiceUpstream`) implements it. ``pick``
raises :class:`~imserver.utils.errors.Unavailable` when no instance can take calls.
A caller reports each picked endpoint's outcome exactly once: :meth:`Endpoint.succeeded`
when the instance answered (an error reply about the request itself included),
:meth:`Endpoint.failed` when it did not (connection refused, deadline, ``UNAVAILABLE``).
"""

from __future__ import annotations

from typing import Protocol

import grpc.aio


class Endpoint(Protocol):
    """One instance of a service, as a channel to call it on."""

    key: str
    channel: grpc.aio.Channel

    def succeeded(self) -> None: ...

    def failed(self) -> None: ...


class Upstream(Protocol):
    """The instances of one service a client may call."""

    def pick(self) -> Endpoint: ...
