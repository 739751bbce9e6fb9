"""Transports move whole payloads between a client and the server.

:class:`WebSocketTransport` (aiohttp; JSON in text frames, MessagePack in binary
frames) and :class:`TcpTransport` (a 4-byte big-endian length before each payload) are
the two real ones; tests plug in an in-memory one. Writes are synchronous and
ordered; :meth:`ClientTransport.drain` is the flow control. What a transport receives
goes to its :class:`PayloadSink`, undecoded.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ssl as ssl_module
from collections.abc import Mapping
from typing import ClassVar, Final, Literal, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from imserver.client.errors import ConnectFailed, ConnectionClosed
from imserver.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ClientTransport",
    "PayloadSink",
    "TcpTransport",
    "TransportName",
    "WebSocketTransport",
    "open_tcp",
    "open_ws",
    "tcp_address",
    "ws_url",
]

TransportName = Literal["ws", "tcp"]

DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
"""Largest server frame accepted. Generous on purpose: a full ``history`` page of
large bodies is far above the server's *inbound* ``max_frame``."""

_WS_HIGH_WATER = 1024 * 1024
"""Queued WebSocket bytes above which :meth:`ClientTransport.drain` waits."""


class PayloadSink(Protocol):
    """What a transport reports to (a :class:`Client`)."""

    def payload_received(self, payload: bytes, text: bool | None) -> None:
        """One whole payload; ``text`` is the WebSocket frame type, None on TCP."""

    def transport_lost(self, code: int | None, exc: BaseException | None) -> None:
        """The connection ended (``code``: WebSocket close code, when known)."""


class ClientTransport(abc.ABC):
    """Moves whole payloads between a client and the server.

    ``write`` is synchronous and keeps order, so requests can be pipelined without a
    task each; ``drain`` waits while too much is buffered.
    """

    name: ClassVar[TransportName]

    @abc.abstractmethod
    def attach(self, sink: PayloadSink) -> None:
        """Start delivering received payloads (and the end of the stream) to ``sink``."""

    @abc.abstractmethod
    def write(self, payload: bytes, text: bool) -> None:
        """Send one payload: a text (or binary) WebSocket frame, or one TCP frame."""

    def write_raw(self, data: bytes) -> None:
        """Write bytes to the stream verbatim, without framing (TCP only)."""
        raise TypeError(f"{self.name} transport cannot send unframed bytes")

    async def send(self, payload: bytes, text: bool) -> None:
        """:meth:`write` then :meth:`drain`; a transport may do it more directly."""
        self.write(payload, text)
        await self.drain()

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until the outgoing buffer is below its high-water mark."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close cleanly (flush, close handshake) and wait until the stream ended."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the connection at once, without a close handshake."""


class WebSocketTransport(ClientTransport):
    """A WebSocket through aiohttp: one reader task and one writer task.

    aiohttp's send is a coroutine, so a synchronous, ordered ``write`` needs the
    writer task: it empties the outgoing queue, usually in the same loop iteration.
    """

    name = "ws"

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse[Literal[False]],
        session: aiohttp.ClientSession | None,
    ) -> None:
        """``session`` is closed with the transport when given (the client owns it)."""
        self.ws = ws
        self._session = session
        self._sink: PayloadSink | None = None
        self._out: list[tuple[bytes, aiohttp.WSMsgType]] = []
        self._out_bytes = 0
        self._ready = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._send_error: BaseException | None = None
        self._closing = False

    def attach(self, sink: PayloadSink) -> None:
        self._sink = sink
        self._reader = asyncio.create_task(self._read_loop(sink), name="imserver-client-ws-read")
        self._writer = asyncio.create_task(self._write_loop(), name="imserver-client-ws-write")

    async def _read_loop(self, sink: PayloadSink) -> None:
        ws = self.ws
        text_type = aiohttp.WSMsgType.TEXT
        binary_type = aiohttp.WSMsgType.BINARY
        exc: BaseException | None = None
        try:
            while True:
                msg = await ws.receive()
                kind = msg.type
                if kind is text_type:
                    sink.payload_received(msg.data, True)
                elif kind is binary_type:
                    sink.payload_received(msg.data, False)
                elif kind in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
        except Exception as e:  # the stream is over, whatever went wrong
            exc = e
        finally:
            if self._writer is not None:
                self._writer.cancel()
            self._flushed.set()
            sink.transport_lost(ws.close_code, exc or ws.exception() or self._send_error)
            # On a client close, close() still runs the close handshake on this session.
            if self._session is not None and not self._closing:
                await self._session.close()

    async def _write_loop(self) -> None:
        ws = self.ws
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._out = self._out, []
            self._out_bytes = 0
            try:
                for payload, opcode in batch:
                    await ws.send_frame(payload, opcode)
            except Exception as exc:  # the reader reports the end
                self._send_error = exc
                self._out.clear()
                self._flushed.set()
                return
            if not self._out:
                self._flushed.set()

    def write(self, payload: bytes, text: bool) -> None:
        if self._send_error is not None or self.ws.closed:
            raise ConnectionClosed("the WebSocket is closed")
        self._out.append((payload, aiohttp.WSMsgType.TEXT if text else aiohttp.WSMsgType.BINARY))
        self._out_bytes += len(payload)
        self._flushed.clear()
        self._ready.set()

    async def drain(self) -> None:
        if self._out_bytes > _WS_HIGH_WATER:
            await self._flushed.wait()

    async def send(self, payload: bytes, text: bool) -> None:
        if not self._flushed.is_set():
            # Frames are queued: go behind them to keep the order.
            self.write(payload, text)
            await self.drain()
            return
        # Nothing queued: send directly and save the writer task's loop iteration
        # (aiohttp writes an uncompressed frame before its first await, so order holds).
        if self._send_error is not None or self.ws.closed:
            raise ConnectionClosed("the WebSocket is closed")
        opcode = aiohttp.WSMsgType.TEXT if text else aiohttp.WSMsgType.BINARY
        try:
            await self.ws.send_frame(payload, opcode)
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionClosed(f"the WebSocket is closed: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._flushed.wait()
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None:
            await self._session.close()

    def abort(self) -> None:
        sock = self.ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)  # SHUT_RDWR: the reader sees the end at once


class TcpTransport(ClientTransport, asyncio.Protocol):
    """TCP with a 4-byte big-endian length prefix per payload, as an asyncio Protocol.

    No reader task: ``data_received`` feeds :class:`FrameDecoder` and hands each
    payload to the sink. A server frame declaring more than ``max_frame`` bytes ends
    the connection (the stream cannot be resynchronised).
    """

    name = "tcp"

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._decoder = FrameDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._sink: PayloadSink | None = None
        self._early: list[bytes] = []
        self._error: BaseException | None = None
        self._lost = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as exc:
            self._error = exc
            if self._transport is not None:
                self._transport.abort()
            return
        sink = self._sink
        if sink is None:
            self._early.extend(payloads)
            return
        for payload in payloads:
            sink.payload_received(payload, None)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake_drain()
        if not self._closed.done():
            self._closed.set_result(None)
        if self._sink is not None:
            self._sink.transport_lost(None, self._error or exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ClientTransport

    def attach(self, sink: PayloadSink) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for payload in early:
            sink.payload_received(payload, None)
        if self._lost:
            sink.transport_lost(None, self._error)

    def write(self, payload: bytes, text: bool) -> None:
        self.write_raw(encode_frame(payload))

    def write_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise ConnectionClosed("the TCP connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        if self._paused and not self._lost:
            if self._drain_waiter is None:
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    async def close(self) -> None:
        if self._transport is None:
            return
        if not self._lost:
            self._transport.close()
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self._closed)
            except TimeoutError:
                self._transport.abort()
        await asyncio.shield(self._closed)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def open_ws(
    url: str,
    max_frame: int,
    connect_timeout: float,
    ssl: ssl_module.SSLContext | bool | None,
    origin: str | None,
    headers: Mapping[str, str] | None,
    session: aiohttp.ClientSession | None,
) -> WebSocketTransport:
    """Open a WebSocket to ``url``; raises :class:`ConnectFailed`.

    ``session``: a shared aiohttp session, left open; without one the transport
    makes its own and closes it with the connection.
    """
    own = session is None
    sess = aiohttp.ClientSession() if session is None else session
    try:
        async with asyncio.timeout(connect_timeout):
            ws = await sess.ws_connect(
                url,
                decode_text=False,
                max_msg_size=max_frame,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                ssl=True if ssl is None else ssl,
                origin=origin,
                headers=dict(headers) if headers else None,
            )
    except aiohttp.WSServerHandshakeError as exc:
        if own:
            await sess.close()
        raise ConnectFailed(
            f"WebSocket upgrade to {url} refused: {exc.status} {exc.message}", status=exc.status
        ) from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if own:
            await sess.close()
        raise ConnectFailed(f"cannot connect to {url}: {exc}") from exc
    except BaseException:
        if own:
            await sess.close()
        raise
    return WebSocketTransport(ws, sess if own else None)


async def open_tcp(
    address: tuple[str, int],
    max_frame: int,
    connect_timeout: float,
    ssl: ssl_module.SSLContext | bool | None,
) -> TcpTransport:
    """Open a TCP connection to ``address``; raises :class:`ConnectFailed`."""
    host, port = address
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: TcpTransport(max_frame), host, port, ssl=ssl or None
            )
    except (OSError, TimeoutError) as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    return protocol


# --- addresses ------------------------------------------------------------------------


def ws_url(target: str | tuple[str, int]) -> str:
    """The WebSocket URL for ``target``: ``(host, port)``, ``host:port``, or a URL.

    ``http(s)://`` becomes ``ws(s)://``, and a URL without a path gets ``/ws``.
    """
    if isinstance(target, tuple):
        host, port = target
        return f"ws://{_host_for_url(host)}:{port}/ws"
    if "://" not in target:
        target = "ws://" + target
    parts = urlsplit(target)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {target!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def tcp_address(target: str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` from ``(host, port)``, ``host:port`` or ``tcp://host:port``."""
    if isinstance(target, tuple):
        return target
    if "://" in target:
        parts = urlsplit(target)
        if parts.scheme not in ("tcp", "tls") or parts.hostname is None or parts.port is None:
            raise ValueError(f"not a TCP address: {target!r}")
        return parts.hostname, parts.port
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {target!r}")
    return host.strip("[]"), int(port)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
