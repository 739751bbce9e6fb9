"""The HTTP port's front door and the WebSocket transport.

Every connection to the HTTP port starts at :class:`Front`, which reads the first
request head. A valid WebSocket upgrade of ``/ws`` that the handler accepts (origin
allowed, not draining) is answered here and the connection becomes a
:class:`WsConnection`: the frames are parsed by :class:`~imserver.protocol.wsframe.WsParser`
and go to a :class:`~imserver.network.handler.Connection` of the
:class:`~imserver.network.handler.ConnectionHandler`, as TCP's do. Anything else —
every HTTP API request, and upgrades to be refused — is handed, with the bytes already
read, to aiohttp's request handler, which serves the HTTP API (including the refusals
of ``/ws``). An upgrade that comes after HTTP requests on a keep-alive connection
therefore reaches aiohttp; its ``/ws`` route gives that connection to a
:class:`WsConnection` as well (:func:`upgrade_within_aiohttp`).

Taking the upgrade out of aiohttp saves most of the cost of accepting a WebSocket
(request object, response object, two tasks, its reader and writer) and of receiving
each message; see ``docs/performance.md``.

Inbound limits: messages up to ``max_frame`` bytes are handled; larger ones up to
``WS_HARD_CAP_FACTOR`` × ``max_frame`` are answered ``too_large`` and the connection
stays open; a message past that cap is refused from its header, before its payload is
buffered, with close code 1009. A text message or a close reason that is not UTF-8
closes with 1007, any other protocol violation (an invalid close code among them) with
1002; none of these sends ``closed``.

Closing is a handshake: whoever closes sends a close frame, and the server reads (and
discards) until the peer's close frame before it closes the socket, so that frames
still in flight from the client cannot turn the close into a reset (which can destroy
the server's last frames before the client reads them). A protocol violation (an
invalid close frame among them) *fails* the connection instead (RFC 6455 §7.1.7): the
close frame with the error's code, then at once the end of the server's side (FIN),
then input is discarded, without being parsed, until the client's side ends too. No
close frame is awaited: the client may have sent its own already (the invalid one),
and nothing it sends after the violation is processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from enum import Enum, auto
from typing import cast

from aiohttp import web

from imserver.network.handler import ConnectionHandler
from imserver.network.listener import Admission, Listener
from imserver.protocol.codec import Codec
from imserver.protocol.wsframe import (
    CLOSE_INVALID_DATA,
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    WsParser,
    WsProtocolError,
    parse_request_head,
    upgrade_headers,
    upgrade_key,
    upgrade_response,
    ws_close_frame,
    ws_frame,
    ws_pong,
)
from imserver.utils.errors import TooLarge

logger = logging.getLogger(__name__)

WS_PATH = "/ws"
WS_HARD_CAP_FACTOR = 16
"""Messages up to this many times ``max_frame`` are answered ``too_large``; larger
ones close the connection (1009)."""
MAX_HEAD = 16 * 1024
"""A first request head longer than this goes to aiohttp, which refuses it."""
READ_LIMIT = 256 * 1024
"""Unprocessed input past which a connection stops reading until its task catches up."""


class _End(Enum):
    """How :meth:`WsConnection._serve` ended, which decides how the socket is closed."""

    PEER_CLOSED = auto()
    """The client's (valid) close frame arrived and was answered: close the socket."""
    SERVER_CLOSING = auto()
    """The session is closing, or the client is gone: the close handshake unless it is
    gone, then close the socket."""
    FAILED = auto()
    """A protocol violation: the close frame with its code went out; half-close and
    discard until the client's end."""


class WsLink:
    """A session's WebSocket transport."""

    kind = "ws"
    __slots__ = ("closing", "conn", "transport")

    def __init__(self, conn: WsConnection) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.closing = False

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return ws_frame(payload, OP_TEXT if codec is Codec.JSON else OP_BINARY)

    def write(self, data: bytes) -> None:
        if not self.closing and not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self, code: int = CLOSE_NORMAL) -> None:
        """Send the close frame after what is queued; the connection's task then
        waits for the client's close frame and closes the socket."""
        if self.closing:
            return
        if not self.transport.is_closing():
            self.transport.write(ws_close_frame(code))
        self.closing = True
        self.conn.interrupt()

    def abort(self) -> None:
        self.transport.abort()


class WsConnection(asyncio.Protocol):
    """One upgraded WebSocket: buffers what arrives and runs its frames, in order, on
    one task (:meth:`run`) that calls the session."""

    def __init__(self, handler: ConnectionHandler, transport: asyncio.Transport) -> None:
        self.handler = handler
        self.transport = transport
        self.link = WsLink(self)
        self.session = handler.open(self.link)
        self.parser = WsParser(handler.max_frame * WS_HARD_CAP_FACTOR)
        self._inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._interrupted = False
        self._paused = False

    # --- asyncio.Protocol --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        if len(self._inbox) > READ_LIMIT and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return True  # the task closes the transport once it is done with it

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()

    # --- the task's side ---------------------------------------------------------------

    def interrupt(self) -> None:
        """Make a pending :meth:`_read` return so the task notices the session closed."""
        self._interrupted = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _read(self, interruptible: bool) -> bytearray:
        """What arrived since the last call; empty once the peer is gone (or, when
        ``interruptible``, once the session is closing)."""
        while not self._inbox:
            if self._ended or (interruptible and self._interrupted):
                return self._inbox
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._inbox
        self._inbox = bytearray()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def run(self) -> None:
        """The connection's life: its frames, then the close handshake."""
        try:
            try:
                end = await self._serve()
            finally:
                await self.handler.closed(self.session)
            if end is _End.FAILED:
                await self._discard()
            elif end is _End.SERVER_CLOSING and not self._ended:
                self.link.close()
                await self._linger()
        finally:
            self.transport.close()

    async def _serve(self) -> _End:
        """Hand the session its messages until either side closes or the client
        breaks the protocol."""
        session = self.session
        link = self.link
        max_frame = self.handler.max_frame
        try:
            while not session.closing:
                data = await self._read(interruptible=True)
                if not data or session.closing:
                    return _End.SERVER_CLOSING
                failure: int | None = None
                try:
                    frames = self.parser.feed(data)
                except WsProtocolError as exc:
                    frames, failure = exc.frames, exc.code
                for opcode, payload in frames:
                    if opcode in (OP_TEXT, OP_BINARY):
                        if opcode == OP_TEXT:
                            codec = Codec.JSON
                            try:
                                payload.decode()
                            except UnicodeDecodeError:
                                failure = CLOSE_INVALID_DATA
                                break
                        else:
                            codec = Codec.MSGPACK
                        size = len(payload)
                        if size > max_frame:
                            session.refuse(
                                TooLarge(f"frame of {size} bytes exceeds max_frame {max_frame}"),
                                codec,
                            )
                            continue
                        await session.receive(payload, codec)
                        if session.closing:
                            return _End.SERVER_CLOSING
                    elif opcode == OP_PING:
                        link.write(ws_pong(payload))
                    elif opcode == OP_CLOSE:
                        session.flush()
                        # The parser let only a valid code through: echo it (§5.5.1).
                        if not link.closing:
                            self.transport.write(ws_frame(payload[:2], OP_CLOSE))
                            link.closing = True
                        return _End.PEER_CLOSED
                if failure is not None:
                    session.flush()  # the replies to the frames before the bad one
                    link.close(failure)
                    return _End.FAILED
        except ConnectionError:
            pass
        return _End.SERVER_CLOSING

    async def _discard(self) -> None:
        """After a failure: end the server's side (after the close frame already
        queued) and discard input until the client's side ends, at most
        ``shutdown_grace`` seconds."""
        transport = self.transport
        if not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.handler.shutdown_grace):
                while await self._read(interruptible=False):
                    pass

    async def _linger(self) -> None:
        """Discard input until the client's close frame (or its end), at most
        ``shutdown_grace`` seconds."""
        with contextlib.suppress(TimeoutError, WsProtocolError):
            async with asyncio.timeout(self.handler.shutdown_grace):
                while data := await self._read(interruptible=False):
                    if any(op == OP_CLOSE for op, _ in self.parser.feed(data)):
                        return


class Front(asyncio.Protocol):
    """A new connection to the HTTP port, until its first request head says whether it
    is a WebSocket of ours or HTTP for aiohttp."""

    def __init__(self, entry: WsEntry) -> None:
        self.entry = entry
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        # A connection that never completes its first request head is dropped after
        # the same time a TCP connection has to send hello.
        self._timer = asyncio.get_running_loop().call_later(
            self.entry.handler.hello_timeout, transport.close
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        head = self._head
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= MAX_HEAD:
            return
        if end < 0 or end > MAX_HEAD:
            self._hand_over(self.entry.http())
            return
        request = parse_request_head(bytes(head[: end + 4]))
        if request is not None and request.target.partition("?")[0] == WS_PATH:
            key = upgrade_key(request)
            handler = self.entry.handler
            if key is not None and handler.ws_refusal(request.headers.get("origin")) is None:
                self._upgrade(key, bytes(head[end + 4 :]))
                return
        self._hand_over(self.entry.http())

    def _hand_over(self, protocol: asyncio.Protocol) -> None:
        self._stop_timer()
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self._head))

    def _upgrade(self, key: str, rest: bytes) -> None:
        self._stop_timer()
        transport = self.transport
        assert transport is not None
        transport.write(upgrade_response(key))
        conn = WsConnection(self.entry.handler, transport)
        transport.set_protocol(conn)
        if rest:
            conn.data_received(rest)
        self.entry.start(conn)


class _AiohttpFeed:
    """What aiohttp's request handler is given to pass on a connection's bytes once
    the connection is a WebSocket (its ``set_parser`` interface, which its own
    WebSocket reader implements)."""

    __slots__ = ("conn",)

    def __init__(self, conn: WsConnection) -> None:
        self.conn = conn

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.conn.data_received(data)
        return False, b""

    def feed_eof(self) -> None:
        self.conn.connection_lost(None)


async def upgrade_within_aiohttp(
    handler: ConnectionHandler, request: web.Request, key: str
) -> web.StreamResponse:
    """Serve a WebSocket whose upgrade reached aiohttp: one sent on a keep-alive
    connection that carried HTTP requests first (:class:`Front` sees only a
    connection's first request head). aiohttp writes the ``101``; from then on its
    request handler passes every byte to the :class:`WsConnection`, which writes to
    the transport directly, and this handler lasts as long as the WebSocket."""
    response = web.StreamResponse(status=101, headers=upgrade_headers(key))
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    conn = WsConnection(handler, transport)
    request.protocol.set_parser(_AiohttpFeed(conn))  # type: ignore[arg-type]
    await conn.run()
    return response


class WsEntry:
    """What every :class:`Front` shares: the connection handler, aiohttp's protocol
    factory for HTTP, and the running WebSocket connections' tasks."""

    def __init__(self, handler: ConnectionHandler, http: Callable[[], asyncio.Protocol]) -> None:
        self.handler = handler
        self.http = http
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, conn: WsConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.run())
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("WebSocket connection failed", exc_info=task.exception())

    async def wait_closed(self, within: float) -> None:
        """Wait (bounded) for every WebSocket connection's task to finish."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=within)


async def serve_http(
    handler: ConnectionHandler,
    http: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    backlog: int,
    admission: Admission,
) -> tuple[Listener, WsEntry]:
    """Listen on the HTTP port: WebSocket upgrades here, everything else to ``http``."""
    entry = WsEntry(handler, http)
    listener = await Listener.start(host, port, backlog, lambda: Front(entry), admission)
    return listener, entry
