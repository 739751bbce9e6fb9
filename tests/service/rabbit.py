"""The RabbitMQ broker the event-stream tests use, and names of their own on it.

The broker is the machine's, at ``IMS_TEST_RABBITMQ`` (``amqp://guest:guest@127.0.0.1:5672/``
by default); other tests use it at the same time, so every test takes a fresh random
prefix (its exchange and queues are ``<prefix>.…``) and deletes what it declared at
the end. Where the broker does not answer, the tests are skipped with the reason,
except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Mapping, Sequence

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from imserver.testing import rabbitmq

URL = os.environ.get("IMS_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")


def unavailable(reason: str) -> None:
    """Skip (fail under ``CI=true``) a test whose broker is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the RabbitMQ tests must run)")
    pytest.skip(reason)


async def reachable() -> None:
    """Skip (or fail) the test unless the broker answers."""
    try:
        connection = await aio_pika.connect(URL, timeout=5)
    except Exception as exc:
        unavailable(f"RabbitMQ not reachable at {URL}: {exc!r}")
        return
    await connection.close()


def new_prefix() -> str:
    """A prefix no other test uses."""
    return f"imstest{secrets.token_hex(5)}"


async def delete_topology(
    prefix: str, groups: Mapping[str, Sequence[str]], backoff: Sequence[float]
) -> None:
    """Delete the exchange and every queue of ``groups`` under ``prefix``."""
    await rabbitmq.delete_topology(URL, prefix, groups, backoff)


async def drain(queue_name: str, *, wait: float = 0.0) -> list[AbstractIncomingMessage]:
    """Take (and ack) every message now in ``queue_name``; with ``wait``, keep
    polling until that many seconds pass without one."""
    got: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(URL, timeout=5)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        idle = 0.0
        while True:
            message = await queue.get(fail=False)
            if message is None:
                if idle >= wait:
                    return got
                await asyncio.sleep(0.1)
                idle += 0.1
                continue
            idle = 0.0
            await message.ack()
            got.append(message)


class Forwarder:
    """A TCP forwarder on a loopback port of its own, in front of the broker: stopping
    it cuts every connection through it and refuses new ones (a network loss between
    a client and the broker, the broker itself untouched); starting it again listens
    on the same port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        self._target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        """Connections accepted since the first start."""

    @property
    def url(self) -> str:
        """The AMQP URL through the forwarder."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        assert self._server is not None
        self._server.close()
        self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            # One side gone: the whole connection goes, as with a lost route.
            writer.transport.abort()
            up_writer.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
