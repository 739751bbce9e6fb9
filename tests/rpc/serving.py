"""A real ``grpc.aio`` server on 127.0.0.1 for the rpc tests, and endpoints that count."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from imserver.rpc.server import make_server
from imserver.rpc.upstream import CHANNEL_OPTIONS


@asynccontextmanager
async def serving(*services: tuple[type, object]) -> AsyncIterator[str]:
    """Serve ``(Protocol, local)`` pairs on a free port; yields ``host:port``."""
    server = make_server(*services)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def serving_raw(handler: grpc.GenericRpcHandler) -> AsyncIterator[str]:
    """Serve a plain gRPC handler (a peer that is not IMServer)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def closed_address() -> str:
    """An address on 127.0.0.1 where nothing listens (a port bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


class CountingEndpoint:
    """An endpoint that records the reports of the client."""

    def __init__(self, address: str) -> None:
        self.key = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.successes = 0
        self.failures = 0

    def succeeded(self) -> None:
        self.successes += 1

    def failed(self) -> None:
        self.failures += 1


class InTurn:
    """An upstream that hands out its endpoints in turn (the last one repeats)."""

    def __init__(self, *addresses: str) -> None:
        self.endpoints = [CountingEndpoint(a) for a in addresses]
        self.picks = 0

    def pick(self, affinity: str | None = None) -> Any:
        endpoint = self.endpoints[min(self.picks, len(self.endpoints) - 1)]
        self.picks += 1
        return endpoint

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.channel.close()
