"""The transports a service's contract tests run over: ``local`` (direct calls),
``loopback`` (every call encoded and decoded by :mod:`imserver.services.loopback`)
and ``grpc`` (every call through a real ``grpc.aio`` server on 127.0.0.1 and the
client of :mod:`imserver.rpc.client`).

A contract test gets the service under test, and the services it calls, through
:func:`through`; one test body runs over all three. A test may check the service's
storage from outside (its database file, its blob store, its temporary directory)
in every run: the state is there whichever way the service was called. Tests that
reach into the local object — its private attributes and store, methods only the
concrete type has, or a fault only an in-process call can raise — are marked
``@local_only`` and run over ``local`` alone (``tests/service/conftest.py``
deselects their other runs).

Over ``grpc``, each (Protocol, local object) pair gets its own server on a free
port, made on first use and stopped by the ``transport`` fixture after the test
(:func:`close_served`).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import pytest

from imserver.rpc.client import grpc_client
from imserver.rpc.server import make_server
from imserver.rpc.upstream import StaticUpstream
from imserver.services.loopback import loopback

T = TypeVar("T")

TRANSPORTS = ["local", "loopback", "grpc"]

local_only = pytest.mark.local_only
"""The test looks inside the local implementation: it runs over ``local`` only."""

in_step = pytest.mark.in_step
"""The test observes the callee pulling a caller's stream in step with the caller
(a temporary file exists by the time the caller's third chunk is asked for). Over
gRPC the client sends ahead of the server, as far as HTTP/2 flow control lets it,
so there is no such step: the test has no ``grpc`` run."""


class _Served:
    """One local object behind its own gRPC server, and a client of it."""

    def __init__(self, proto: Any, service: Any) -> None:
        self.service = service
        self.server = make_server((proto, service))
        port = self.server.add_insecure_port("127.0.0.1:0")
        # through() is synchronous; the server starts on the loop before any call
        # reaches it (the port is already listening, connections wait in its backlog).
        self.started = asyncio.get_running_loop().create_task(self.server.start())
        self.upstream = StaticUpstream(f"127.0.0.1:{port}")
        self.client = grpc_client(proto, self.upstream)

    async def close(self) -> None:
        await self.started
        await self.upstream.close()
        await self.server.stop(None)


_SERVED: dict[tuple[Any, int], _Served] = {}


def through(transport: str, proto: Any, service: T) -> T:
    """``service`` as a caller reaches it over ``transport``."""
    if transport == "loopback":
        return loopback(proto, service)
    if transport == "grpc":
        key = (proto, id(service))
        served = _SERVED.get(key)
        if served is None or served.service is not service:
            served = _SERVED[key] = _Served(proto, service)
        return served.client  # type: ignore[no-any-return]
    return service


async def close_served() -> None:
    """Stop every server :func:`through` started (the ``transport`` fixture's teardown)."""
    while _SERVED:
        _, served = _SERVED.popitem()
        await served.close()
