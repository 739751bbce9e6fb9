"""The live bus over Redis pub/sub: publications between the processes of a cluster.

:class:`RedisLiveBus` keeps the guarantees of :mod:`imserver.storage.bus` with two
connections per process, each driven by one task:

* **Publishing.** :meth:`RedisLiveBus.publish` encodes the publication once
  (MessagePack; a publication put on several channels, a direct message on both
  users', is encoded once) and appends it to one outbox; the publisher task sends
  the outbox over ONE connection as pipelines of ``PUBLISH`` commands, a pipeline
  after the replies of the one before. Redis handles a connection's commands in
  order and delivers a subscriber's messages in the order it handled them, so one
  process's publications reach every subscriber in publication order, across
  channels too. ``publish`` never waits for Redis: the writer's hot path costs an
  encode and an append. Before each pipeline the connection is checked for a close
  by the server (a Redis restarted while this process published nothing): such a
  connection is replaced first, so the outbox waits for the new one rather than
  being lost with the old. A pipeline that fails is dropped (it may have been partly
  delivered: sending it again could deliver a publication twice); the outbox is
  bounded (:data:`OUTBOX_MAX`) and drops what comes past it while Redis is away.
  Either loss is a gap that subscribers detect.
* **Subscribing.** One subscriber connection carries every channel of the
  process. Channels are counted over handlers: ``SUBSCRIBE`` goes out when a
  channel gets its first handler and ``UNSUBSCRIBE`` when it loses its last, sent in
  call order by the subscriber task. The reader dispatches each message to the
  channel's handlers synchronously, in arrival order; no task per publication.
* **Barrier.** :meth:`RedisLiveBus.settle` sends a ``PING`` on the subscriber
  connection: Redis answers it after the commands sent before, so its ``pong``
  means every earlier (un)subscription is in effect.
* **Lost connection.** When the subscriber connection breaks (or a keep-alive
  ``PING`` goes unanswered for :attr:`RedisLiveBus.keepalive` × 2 seconds), the task
  reconnects with backoff, subscribes every channel that has handlers, waits for
  them to be in effect, and only then tells the :meth:`on_lost` listeners which
  channels may have lost publications: a gateway makes those channels' sessions
  sync, and what is published from then on reaches it live.

Redis channels are the bus's channel names after a prefix (the ``[redis] prefix``
setting), so several clusters can share one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from imserver.protocol.events import Closed, Msg, PresenceEvent, Receipt, TypingEvent
from imserver.storage.bus import LostHandler, Publication, PublicationHandler
from imserver.utils.errors import Unavailable

logger = logging.getLogger(__name__)

OUTBOX_MAX = 100_000
"""Publications waiting for the publisher connection; past it new ones are dropped."""
PIPELINE_MAX = 512
"""Most ``PUBLISH`` commands sent before their replies are read."""
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
"""Seconds between reconnection attempts: doubled from the first to the last, with jitter."""

REPLY_TIMEOUT = 10.0
"""Seconds the replies of one pipeline may take before the connection is taken for
dead."""

_FAILURES = (RedisError, OSError, TimeoutError, EOFError)
"""What a broken or refused connection raises."""


class _Wire(msgspec.Struct, array_like=True, frozen=True):
    """A publication as it travels: the event types the bus carries, tagged by ``op``."""

    event: Msg | Receipt | TypingEvent | PresenceEvent | Closed
    conv: str | None
    seq: int | None
    exclude_session: str | None
    exclude_user: str | None
    joined: tuple[str, ...]
    left: tuple[str, ...]
    close_login: str | None = None


def _packed_publishes(batch: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``PUBLISH channel data`` for each pair, in the protocol's own encoding (the
    generic packer costs more than the rest of a publication's path)."""
    parts: list[bytes] = []
    for key, data in batch:
        parts.append(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(data), data)
        )
    return b"".join(parts)


def connection_pool(url: str) -> ConnectionPool:
    """A pool for ``url`` whose connections never retry by themselves: a failure
    reaches the task that owns the connection, which reconnects and reports it."""
    return ConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0))


def new_connection(pool: ConnectionPool) -> AbstractConnection:
    """A connection of ``pool``'s settings that the pool does not hand out: its
    owner alone uses it, so commands on it keep their order."""
    conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    return conn


async def _connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


async def _disconnect(conn: AbstractConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(*_FAILURES):
            await conn.disconnect(nowait=True)


async def _closed_meanwhile(conn: AbstractConnection) -> bool:
    """Whether the server closed ``conn`` while it was idle (a Redis restart), or it
    holds bytes no command asked for: either way, nothing written to it now would be
    delivered, so it is replaced before a pipeline goes out on it."""
    # redis-py 8 names the check ``can_read``; earlier versions ``can_read_destructive``.
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    try:
        return bool(await check())
    except _FAILURES:
        return True


class _Backoff:
    """Exponential backoff with full jitter between reconnection attempts."""

    def __init__(self) -> None:
        self._next = BACKOFF_MIN

    async def wait(self) -> None:
        await asyncio.sleep(random.uniform(0, self._next))
        self._next = min(BACKOFF_MAX, self._next * 2)

    def reset(self) -> None:
        self._next = BACKOFF_MIN


class RedisLiveBus:
    """The live bus over Redis pub/sub (see the module docstring).

    Build it, then :meth:`start` it (which connects, or raises ``unavailable``);
    :meth:`close` it at shutdown. ``prefix`` is put before every channel name.
    """

    subscribes_at_once = False
    """Subscribing takes a round trip to Redis."""

    def __init__(self, url: str, *, prefix: str = "imserver:", keepalive: float = 5.0) -> None:
        self._pool = connection_pool(url)
        self._prefix = prefix.encode()
        self.keepalive = keepalive
        """Seconds between keep-alive pings of an idle subscriber connection."""
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_Wire)
        self._last_encoded: tuple[Publication, bytes] | None = None
        # publishing
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_sent = asyncio.Event()
        """Set after each pipeline (:meth:`drained` waits on it)."""
        self._in_flight = 0
        """Publications of the pipeline awaiting its replies."""
        self._publisher: asyncio.Task[None] | None = None
        self._pub: AbstractConnection | None = None
        """The publisher connection (up or reconnecting)."""
        self.dropped = 0
        """Publications dropped (outbox full, or a failed pipeline) since start."""
        self.published = 0
        """Publications Redis accepted since start."""
        # subscribing
        self._channels: dict[str, tuple[PublicationHandler, ...]] = {}
        """channel -> its handlers; replaced, never mutated, so a handler may
        (un)subscribe while it handles a publication."""
        self._names: dict[bytes, str] = {}
        """Redis channel -> bus channel, for the channels with handlers."""
        self._lost: list[LostHandler] = []
        self._commands: deque[tuple[bytes, ...]] = deque()
        """(UN)SUBSCRIBE and PING commands for the subscriber connection, in call order."""
        self._commands_ready = asyncio.Event()
        self._pongs: deque[asyncio.Future[None]] = deque()
        """The settle() calls whose PING is sent or queued, oldest first."""
        self._sub: AbstractConnection | None = None
        """The subscriber connection while it is up."""
        self._subscriber: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0
        """Times the subscriber connection was re-established since start."""

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect both connections and start their tasks; ``unavailable`` if Redis
        cannot be reached now (later outages are ridden out)."""
        pub = new_connection(self._pool)
        sub = new_connection(self._pool)
        try:
            await _connect(pub)
            await _connect(sub)
        except _FAILURES as exc:
            await _disconnect(pub)
            await _disconnect(sub)
            raise Unavailable(f"redis unreachable: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._pub = pub
        self._attach(sub, report_lost=False)
        self._publisher = loop.create_task(self._publish_loop(pub), name="redis-bus-publisher")
        self._subscriber = loop.create_task(self._subscribe_loop(sub), name="redis-bus-subscriber")
        await self.settle()

    async def close(self) -> None:
        """Send what the outbox holds (bounded by a second), then disconnect."""
        if self._closed:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.drained()
        self._closed = True
        for task in (self._publisher, self._subscriber):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._release_pongs()
        await _disconnect(self._pub)
        await _disconnect(self._sub)
        self._sub = None

    # --- publishing -------------------------------------------------------------------

    async def publish(self, channel: str, publication: Publication) -> None:
        """Queue ``publication`` for ``channel``; sent in order by the publisher task."""
        last = self._last_encoded
        if last is not None and last[0] is publication:
            data = last[1]
        else:
            pub = publication
            wire = _Wire(
                pub.event,  # type: ignore[arg-type]  # the bus's event types, checked on decode
                pub.conv,
                pub.seq,
                pub.exclude_session,
                pub.exclude_user,
                pub.joined,
                pub.left,
                pub.close_login,
            )
            data = self._encoder.encode(wire)
            self._last_encoded = (publication, data)
        if len(self._outbox) >= OUTBOX_MAX:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.warning("live bus outbox full: %d publications dropped", self.dropped)
            return
        self._outbox.append((self._prefix + channel.encode(), data))
        self._outbox_ready.set()

    async def drained(self) -> None:
        """Wait until Redis has answered every publication queued before (or
        dropped it: the connection broke under its pipeline)."""
        while (self._outbox or self._in_flight) and not self._closed:
            self._outbox_sent.clear()
            await self._outbox_sent.wait()

    async def _publish_loop(self, conn: AbstractConnection) -> None:
        backoff = _Backoff()
        while True:
            try:
                await self._send_outbox(conn)
            except _FAILURES as exc:
                logger.warning("live bus publisher connection lost: %s", exc)
            await _disconnect(conn)
            conn = self._pub = new_connection(self._pool)
            while True:
                await backoff.wait()
                try:
                    await _connect(conn)
                except _FAILURES:
                    continue
                backoff.reset()
                logger.info("live bus publisher reconnected")
                break

    async def _send_outbox(self, conn: AbstractConnection) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            if await _closed_meanwhile(conn):
                # Nothing is taken from the outbox: it goes out on the next connection.
                raise ConnectionError("closed by the server")
            count = min(len(outbox), PIPELINE_MAX)
            batch = [outbox.popleft() for _ in range(count)]
            self._in_flight = count
            try:
                await conn.send_packed_command(_packed_publishes(batch), check_health=False)
                # One deadline for the pipeline's replies, not one timer per reply.
                async with asyncio.timeout(REPLY_TIMEOUT):
                    for _ in batch:
                        await conn.read_response(timeout=math.inf)
            except BaseException:
                # Some of it may have been delivered: never sent again (at most once).
                self.dropped += count
                raise
            finally:
                self._in_flight = 0
                self._outbox_sent.set()
            self.published += count

    # --- subscribing ------------------------------------------------------------------

    def subscribe(self, channel: str, handler: PublicationHandler) -> None:
        """Call ``handler`` for ``channel``'s publications once Redis has the
        subscription (:meth:`settle` waits for it)."""
        handlers = self._channels.get(channel, ())
        if handler in handlers:
            return
        self._channels[channel] = (*handlers, handler)
        if not handlers:
            key = self._prefix + channel.encode()
            self._names[key] = channel
            self._command(b"SUBSCRIBE", key)

    def unsubscribe(self, channel: str, handler: PublicationHandler) -> None:
        """Stop calling ``handler`` for ``channel`` at once; the Redis subscription
        ends after the channel's last handler."""
        handlers = self._channels.get(channel, ())
        if handler not in handlers:
            return
        rest = tuple(h for h in handlers if h != handler)
        if rest:
            self._channels[channel] = rest
            return
        del self._channels[channel]
        key = self._prefix + channel.encode()
        del self._names[key]
        self._command(b"UNSUBSCRIBE", key)

    def on_lost(self, listener: LostHandler) -> None:
        """Call ``listener`` with the subscribed channels after the subscriber
        connection broke and came back (their publications meanwhile are lost)."""
        self._lost.append(listener)

    async def settle(self) -> None:
        """Answer once every (un)subscription asked before is in effect at Redis, or
        once the connection it went out on broke (the loss is then reported through
        :meth:`on_lost` when the channels are subscribed again)."""
        if self._sub is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._command(b"PING")
        await future

    def subscribed(self, channel: str) -> int:
        """How many handlers are subscribed to ``channel`` (for tests and metrics)."""
        return len(self._channels.get(channel, ()))

    def _command(self, *command: bytes) -> None:
        if self._sub is not None:  # else the next connection subscribes every channel
            self._commands.append(command)
            self._commands_ready.set()

    def _release_pongs(self) -> None:
        while self._pongs:
            future = self._pongs.popleft()
            if not future.done():
                future.set_result(None)

    async def _subscribe_loop(self, conn: AbstractConnection) -> None:
        backoff = _Backoff()
        while True:
            try:
                await self._serve_subscriber(conn)
            except _FAILURES as exc:
                logger.warning("live bus subscriber connection lost: %s", exc)
            self._sub = None
            self._commands.clear()
            self._release_pongs()
            await _disconnect(conn)
            conn = new_connection(self._pool)
            while True:
                await backoff.wait()
                try:
                    await _connect(conn)
                except _FAILURES:
                    continue
                backoff.reset()
                self.reconnects += 1
                logger.info("live bus subscriber reconnected")
                break
            self._attach(conn, report_lost=True)

    def _attach(self, conn: AbstractConnection, *, report_lost: bool) -> None:
        """Make ``conn`` the subscriber connection: queue a subscription of every
        channel with handlers, and after a reconnect a PING whose answer reports them
        lost (they are subscribed again by then)."""
        self._sub = conn
        channels = list(self._names)
        if channels:
            self._commands.append((b"SUBSCRIBE", *channels))
        if report_lost:
            # The queues are empty here (a loss clears them): this PING answers first.
            resubscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            resubscribed.add_done_callback(lambda _: self._report_lost())
            self._pongs.append(resubscribed)
            self._commands.append((b"PING",))
        self._commands_ready.set()

    async def _serve_subscriber(self, conn: AbstractConnection) -> None:
        """Send the queued commands on ``conn`` and read and dispatch until it breaks."""
        writer = asyncio.get_running_loop().create_task(self._write_commands(conn))
        # The reader waits on the socket: a failed write must break its wait.
        writer.add_done_callback(lambda task: self._writer_done(task, conn))
        try:
            await self._read(conn)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_FAILURES):
                await writer

    def _writer_done(self, task: asyncio.Task[None], conn: AbstractConnection) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("live bus subscriber: sending failed: %s", task.exception())
            asyncio.get_running_loop().create_task(_disconnect(conn))

    def _report_lost(self) -> None:
        channels = list(self._channels)
        if not channels or self._closed:
            return
        logger.warning("live bus: %d channels may have lost publications", len(channels))
        for listener in list(self._lost):
            try:
                listener(channels)
            except Exception:
                logger.exception("live-bus lost listener %r failed", listener)

    async def _write_commands(self, conn: AbstractConnection) -> None:
        """Send the queued commands in order; ping an idle connection (keep-alive)."""
        commands = self._commands
        while True:
            if not commands:
                self._commands_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.keepalive):
                        await self._commands_ready.wait()
                if not commands:
                    self._keepalive_ping()
                continue
            batch = [commands.popleft() for _ in range(len(commands))]
            await conn.send_packed_command(conn.pack_commands(batch), check_health=False)

    def _keepalive_ping(self) -> None:
        """A ``PING`` whose ``pong`` must come within a keep-alive interval, else the
        connection is taken for dead (a peer that vanished sends no reset)."""
        future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._commands.append((b"PING",))
        self._commands_ready.set()
        conn = self._sub
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.keepalive, self._check_pong, future, conn)
        future.add_done_callback(lambda _: timer.cancel())

    def _check_pong(self, future: asyncio.Future[None], conn: AbstractConnection | None) -> None:
        if not future.done() and conn is not None and conn is self._sub:
            logger.warning("live bus subscriber: no answer to a ping; reconnecting")
            asyncio.get_running_loop().create_task(_disconnect(conn))

    async def _read(self, conn: AbstractConnection) -> None:
        names = self._names
        decode = self._decoder.decode
        while True:
            reply: Any = await conn.read_response(timeout=math.inf, push_request=True)
            # A PING answers ["pong", ""] in subscriber mode, or PONG when the
            # connection subscribes nothing.
            kind = b"pong" if reply == b"PONG" else reply[0]
            if kind == b"message":
                channel = names.get(reply[1])
                if channel is None:  # unsubscribed meanwhile
                    continue
                handlers = self._channels.get(channel)
                if handlers is None:
                    continue
                try:
                    wire = decode(reply[2])
                except msgspec.DecodeError:
                    logger.exception("undecodable live-bus publication on %s", channel)
                    continue
                self._dispatch(channel, handlers, wire)
            elif kind == b"pong" and self._pongs:
                future = self._pongs.popleft()
                if not future.done():
                    future.set_result(None)

    @staticmethod
    def _dispatch(channel: str, handlers: Sequence[PublicationHandler], wire: _Wire) -> None:
        publication = Publication(
            event=wire.event,
            conv=wire.conv,
            seq=wire.seq,
            exclude_session=wire.exclude_session,
            exclude_user=wire.exclude_user,
            joined=wire.joined,
            left=wire.left,
            close_login=wire.close_login,
        )
        for handler in handlers:
            try:
                handler(channel, publication)
            except Exception:
                name = type(publication.event).__name__
                logger.exception(
                    "live-bus subscriber %r failed on a %s event on %s", handler, name, channel
                )
