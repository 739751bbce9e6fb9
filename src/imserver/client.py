"""An asyncio client for IMServer over WebSocket or TCP, in JSON or MessagePack.

Written from the wire contract (PROTOCOL.md) alone, so it speaks in plain dicts: it
can send any frame, valid or not, which the project's tests need, and it keeps
working when the server adds fields. It is also the benchmark load generator, so
the receive path is one reader per connection, one msgspec decode per frame and no
task per frame.

Layers, from the bottom:

- :class:`ClientTransport` moves whole payloads. :class:`WebSocketTransport` (aiohttp;
  JSON in text frames, MessagePack in binary frames) and :class:`TcpTransport` (a
  4-byte big-endian length before each payload) are the two real ones; tests plug in
  an in-memory one. Writes are synchronous and ordered; :meth:`ClientTransport.drain`
  is the flow control.
- :class:`FrameRouter` is the sans-I/O core: each decoded server frame is either the
  reply to a pending ``rid`` (it resolves that request) or an event (it is queued, in
  arrival order). Replies nobody waits for -- no ``rid``, an unknown ``rid``, or a
  request that already timed out -- are events too, with ``op`` ``"reply"``.
- :class:`Client` ties the two together and adds the request/event API and a few
  helpers (``login``, ``send_message`` ...).

:class:`HttpClient` calls the HTTP API (``POST /api/v1/<op>``) and fetches routes.

Exceptions (timeouts are the builtin :class:`TimeoutError`)::

    IMClientError
     ├── ClientError        the server answered ok: false (code, message, retry_after, field, rid)
     ├── ConnectFailed      could not connect, or the WebSocket upgrade was refused (status)
     └── ConnectionClosed   the connection is gone (reason of the server's closed event, code)
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import ssl as ssl_module
import uuid
from collections import deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Generator,
    Mapping,
)
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from imserver.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME",
    "INVALID_FRAME_OP",
    "Client",
    "ClientError",
    "ClientTransport",
    "CodecName",
    "ConnectFailed",
    "ConnectionClosed",
    "Frame",
    "FrameRouter",
    "HttpClient",
    "IMClientError",
    "PayloadSink",
    "TcpTransport",
    "TransportName",
    "WebSocketTransport",
    "decode_payload",
    "encode_payload",
    "tcp_address",
    "ws_url",
]

Frame = dict[str, Any]
"""A decoded frame: the protocol's map, as a dict."""

TransportName = Literal["ws", "tcp"]
CodecName = Literal["json", "msgpack"]
EventFilter = str | Collection[str] | None
"""An event's ``op``, any of several, or None for every event."""

DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
"""Largest server frame accepted. Generous on purpose: a full ``history`` page of
large bodies is far above the server's *inbound* ``max_frame``."""

INVALID_FRAME_OP: Final = "_invalid"
"""``op`` of the event queued for a server payload that did not decode to a map;
the event carries ``error`` (why) and ``payload`` (the raw bytes)."""

PROTOCOL_VERSION: Final = 1

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_decoder = msgspec.json.Decoder()
_msgpack_decoder = msgspec.msgpack.Decoder()

_WS_HIGH_WATER = 1024 * 1024
"""Queued WebSocket bytes above which :meth:`ClientTransport.drain` waits."""


# --- exceptions -----------------------------------------------------------------------


class IMClientError(Exception):
    """Base of every exception this module raises (besides :class:`TimeoutError`)."""


class ClientError(IMClientError):
    """The server refused a request: a reply with ``ok: false`` (or an HTTP error)."""

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        retry_after: float | None = None,
        field: str | None = None,
        rid: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        """The stable protocol error code (``bad_request``, ``forbidden`` ...)."""
        self.message = message
        self.retry_after = retry_after
        """Seconds to wait, for ``rate_limited``."""
        self.field = field
        """The offending field, when the server named one."""
        self.rid = rid
        self.status = status
        """The HTTP status, for errors from :class:`HttpClient`."""

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any], *, status: int | None = None) -> ClientError:
        """The error of a failed reply (or of an HTTP error body), however malformed."""
        err = reply.get("error")
        if not isinstance(err, Mapping):
            return cls("_malformed", f"error reply without an error map: {reply!r}", status=status)
        retry = err.get("retry_after")
        field = err.get("field")
        rid = reply.get("rid")
        return cls(
            str(err.get("code", "_malformed")),
            str(err.get("message", "")),
            retry_after=float(retry) if isinstance(retry, int | float) else None,
            field=field if isinstance(field, str) else None,
            rid=rid if isinstance(rid, str) else None,
            status=status,
        )


class ConnectFailed(IMClientError):
    """The connection could not be opened (refused, unreachable, upgrade rejected)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status when the WebSocket upgrade was answered with an error."""


class ConnectionClosed(IMClientError):
    """The connection ended; pending requests and event waits fail with this."""

    def __init__(
        self,
        message: str = "connection closed",
        *,
        reason: str | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """The ``reason`` of the server's ``closed`` event, if one came."""
        self.code = code
        """The WebSocket close code, if any."""


# --- codecs ---------------------------------------------------------------------------


def encode_payload(frame: Mapping[str, Any], codec: CodecName) -> bytes:
    """Encode one frame (any map msgspec can encode) with ``codec``."""
    if codec == "json":
        return _json_encoder.encode(frame)
    if codec == "msgpack":
        return _msgpack_encoder.encode(frame)
    raise ValueError(f"unknown codec {codec!r}")


def decode_payload(payload: bytes, text: bool | None = None) -> Any:
    """Decode one server payload.

    ``text`` is the WebSocket frame type (text = JSON, binary = MessagePack); ``None``
    (TCP) picks JSON when the payload starts with ``{``, as the protocol says. Raises
    :class:`msgspec.DecodeError`.
    """
    if text or (text is None and payload[:1] == b"{"):
        return _json_decoder.decode(payload)
    return _msgpack_decoder.decode(payload)


# --- the sans-I/O core ----------------------------------------------------------------


def _event_matcher(
    op: EventFilter, match: Callable[[Frame], bool] | None
) -> Callable[[Frame], bool]:
    if op is None:
        ops: Collection[str] | None = None
    elif isinstance(op, str):
        ops = (op,)
    else:
        ops = frozenset(op)
    if ops is None and match is None:
        return lambda ev: True
    if match is None:
        assert ops is not None
        return lambda ev: ev.get("op") in ops
    if ops is None:
        return match
    return lambda ev: ev.get("op") in ops and match(ev)


def _silence(fut: asyncio.Future[Any]) -> None:
    # Mark a future's exception as retrieved: requests nobody awaits any more (keepalive
    # pings, abandoned pipelined requests) must not log "exception never retrieved".
    if not fut.cancelled():
        fut.exception()


class FrameRouter:
    """Routes decoded server frames: replies to their pending request, the rest to events.

    No I/O: :meth:`route` takes a decoded frame, :meth:`connection_lost` the end of the
    stream. Futures are created on the running loop, so it is tested in memory by
    feeding frames.
    """

    def __init__(self) -> None:
        self._rids = itertools.count(1)
        self.pending: dict[str, asyncio.Future[Frame]] = {}
        """Requests awaiting their reply, by ``rid``."""
        self.events: deque[Frame] = deque()
        """Events not yet taken, in arrival order."""
        self.on_event: Callable[[Frame], None] | None = None
        """When set, events are passed to it instead of being queued."""
        self.closed_reason: str | None = None
        """The ``reason`` of the server's ``closed`` event, once one arrived."""
        self.lost: ConnectionClosed | None = None
        """Why the connection ended; None while it is up."""
        self._wakeup: asyncio.Future[None] | None = None

    def next_rid(self) -> str:
        """A request id not used before on this connection: ``r1``, ``r2`` ..."""
        return f"r{next(self._rids)}"

    def expect(self, rid: str) -> asyncio.Future[Frame]:
        """Register a request; the returned future gets its whole reply frame."""
        if self.lost is not None:
            raise self.closed_error()
        if rid in self.pending:
            raise ValueError(f"rid {rid!r} is already pending")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        return fut

    def forget(self, rid: str) -> None:
        """Stop waiting for ``rid``: a reply that still comes becomes an event."""
        self.pending.pop(rid, None)

    def route(self, frame: Any) -> None:
        """Dispatch one decoded server frame."""
        if type(frame) is not dict:
            frame = {"op": INVALID_FRAME_OP, "error": "frame is not a map", "frame": frame}
        op = frame.get("op")
        if op == "reply":
            rid = frame.get("rid")
            if type(rid) is str:
                fut = self.pending.pop(rid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(frame)
                    return
        elif op == "closed":
            reason = frame.get("reason")
            self.closed_reason = reason if isinstance(reason, str) else str(reason)
        if self.on_event is not None:
            self.on_event(frame)
        else:
            self.events.append(frame)
            self._wake()

    def take(self, accept: Callable[[Frame], bool]) -> Frame | None:
        """Remove and return the first queued event ``accept`` likes, leaving the rest."""
        events = self.events
        for i, ev in enumerate(events):
            if accept(ev):
                del events[i]
                return ev
        return None

    def take_all(self, accept: Callable[[Frame], bool]) -> list[Frame]:
        """Remove and return every queued event ``accept`` likes, leaving the rest in order."""
        taken: list[Frame] = []
        kept: deque[Frame] = deque()
        for ev in self.events:
            (taken if accept(ev) else kept).append(ev)
        self.events = kept
        return taken

    def connection_lost(self, error: ConnectionClosed) -> None:
        """The stream ended: fail every pending request and wake every event waiter."""
        if self.lost is not None:
            return
        self.lost = error
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.closed_error())
                _silence(fut)
        self._wake()

    def closed_error(self) -> ConnectionClosed:
        """A fresh exception describing how the connection ended."""
        lost = self.lost
        if lost is None:
            return ConnectionClosed("connection is open")
        return ConnectionClosed(str(lost), reason=lost.reason, code=lost.code)

    async def changed(self, within: float | None) -> None:
        """Wait until an event is queued or the connection is lost, or ``within`` seconds."""
        wakeup = self._wakeup
        if wakeup is None:
            wakeup = self._wakeup = asyncio.get_running_loop().create_future()
        # asyncio.wait never cancels the shared future, so other waiters are unaffected.
        await asyncio.wait((wakeup,), timeout=within)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)


# --- transports -----------------------------------------------------------------------


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


# --- the client -----------------------------------------------------------------------


class _Connecting:
    """What :meth:`Client.connect` returns: await it, or use it with ``async with``."""

    def __init__(self, opening: Coroutine[Any, Any, Client]) -> None:
        self._opening = opening
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._opening.__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._opening
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class Client:
    """One connection to IMServer (WebSocket or TCP), speaking dicts.

    Open it with :meth:`connect`. :meth:`request` sends an op and returns its reply's
    ``data``; everything the server sends that is not a reply to a pending request
    is an event, read with :meth:`next_event`, :meth:`events` or :meth:`events_nowait`
    (or handed to :attr:`on_event` as it arrives).
    """

    def __init__(self, transport: ClientTransport, *, codec: CodecName = "json") -> None:
        """Wrap an open ``transport``; :meth:`connect` is the usual way in."""
        if codec not in ("json", "msgpack"):
            raise ValueError(f"unknown codec {codec!r}")
        self.transport = transport
        self.codec: CodecName = codec
        self.request_timeout: float | None = 30.0
        """Default seconds :meth:`request` waits for a reply (None: forever)."""
        self.hello_data: Frame | None = None
        """The ``data`` of the ``hello`` reply."""
        self.user: Frame | None = None
        """The user this connection is logged in as (set by login/auth/register helpers)."""
        self.token: str | None = None
        self.refresh_token: str | None = None
        self.close_code: int | None = None
        """The WebSocket close code once the connection ended."""
        self._router = FrameRouter()
        self._text = codec == "json"
        self._loop = asyncio.get_running_loop()
        self._last_send = self._loop.time()
        self._keepalive: asyncio.Task[None] | None = None
        self._closing = False
        self._lost = asyncio.Event()
        transport.attach(self)

    # --- opening and closing

    @classmethod
    def connect(
        cls,
        target: str | tuple[str, int],
        *,
        transport: TransportName = "ws",
        codec: CodecName = "json",
        hello: bool = True,
        client_name: str = "imserver.client",
        device: str | None = None,
        max_frame: int | None = None,
        keepalive: bool = True,
        timeout: float = 10.0,
        ssl: ssl_module.SSLContext | bool | None = None,
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> _Connecting:
        """Open a connection; ``await`` the result, or ``async with`` it.

        ``target`` is a WebSocket URL (``ws://host:port/ws``), ``host:port`` or
        ``(host, port)``. With ``hello`` (the default) the ``hello`` op is sent first
        and its reply kept as :attr:`hello_data`; ``keepalive`` then pings whenever the
        connection has been idle for half the server's heartbeat. ``max_frame`` bounds
        the frames accepted from the server. ``origin``/``headers``/``session`` apply to
        WebSocket only (``session``: a shared aiohttp session, left open on close).
        Raises :class:`ConnectFailed`, or :class:`ClientError` if ``hello`` is refused.
        """
        return _Connecting(
            cls._open(
                target,
                transport=transport,
                codec=codec,
                hello=hello,
                client_name=client_name,
                device=device,
                max_frame=DEFAULT_MAX_FRAME if max_frame is None else max_frame,
                keepalive=keepalive,
                connect_timeout=timeout,
                ssl=ssl,
                origin=origin,
                headers=headers,
                session=session,
            )
        )

    @classmethod
    async def _open(
        cls,
        target: str | tuple[str, int],
        *,
        transport: TransportName,
        codec: CodecName,
        hello: bool,
        client_name: str,
        device: str | None,
        max_frame: int,
        keepalive: bool,
        connect_timeout: float,
        ssl: ssl_module.SSLContext | bool | None,
        origin: str | None,
        headers: Mapping[str, str] | None,
        session: aiohttp.ClientSession | None,
    ) -> Client:
        if codec not in ("json", "msgpack"):
            raise ValueError(f"unknown codec {codec!r}")
        tr: ClientTransport
        if transport == "ws":
            tr = await _open_ws(
                ws_url(target), max_frame, connect_timeout, ssl, origin, headers, session
            )
        elif transport == "tcp":
            tr = await _open_tcp(tcp_address(target), max_frame, connect_timeout, ssl)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        client = cls(tr, codec=codec)
        if hello:
            try:
                await client.hello(client_name=client_name, device=device, keepalive=keepalive)
            except BaseException:
                await client.close()
                raise
        return client

    async def close(self) -> None:
        """Close the connection cleanly and wait until it has ended. Idempotent."""
        self._closing = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        await self.transport.close()
        # A transport that ended without telling us (or an in-memory one) still fails
        # whatever is pending.
        self._router.connection_lost(ConnectionClosed("connection closed by the client"))
        self._lost.set()

    def abort(self) -> None:
        """Drop the connection at once, with no close handshake (an abrupt disconnect)."""
        self._closing = True
        self.transport.abort()

    async def wait_closed(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - the natural API for tests
    ) -> str | None:
        """Wait until the connection has ended; return the server's ``closed`` reason.

        Raises :class:`TimeoutError` if it is still open after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            await self._lost.wait()
        return self.closed_reason

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once the connection has ended."""
        return self._router.lost is not None

    @property
    def closed_reason(self) -> str | None:
        """The ``reason`` of the server's ``closed`` event, if it sent one."""
        return self._router.closed_reason

    @property
    def transport_name(self) -> TransportName:
        """``"ws"`` or ``"tcp"``."""
        return self.transport.name

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._router.pending)

    @property
    def on_event(self) -> Callable[[Frame], None] | None:
        """A callback that receives every event instead of the queue (e.g. a benchmark
        counting messages); None (the default) queues events."""
        return self._router.on_event

    @on_event.setter
    def on_event(self, callback: Callable[[Frame], None] | None) -> None:
        self._router.on_event = callback

    # --- PayloadSink: called by the transport

    def payload_received(self, payload: bytes, text: bool | None) -> None:
        """Decode one server payload and route it (a transport calls this)."""
        try:
            if text or (text is None and payload[:1] == b"{"):
                frame = _json_decoder.decode(payload)
            else:
                frame = _msgpack_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            frame = {"op": INVALID_FRAME_OP, "error": str(exc), "payload": bytes(payload)}
        self._router.route(frame)

    def transport_lost(self, code: int | None, exc: BaseException | None) -> None:
        """The connection ended (a transport calls this)."""
        self.close_code = code
        reason = self._router.closed_reason
        if reason is not None:
            message = f"connection closed by the server: {reason}"
        elif self._closing:
            message = "connection closed by the client"
        elif exc is not None:
            message = f"connection lost: {exc}"
        else:
            message = "connection closed by the server"
        if code is not None:
            message += f" (close code {code})"
        self._router.connection_lost(ConnectionClosed(message, reason=reason, code=code))
        self._lost.set()
        if self._keepalive is not None:
            self._keepalive.cancel()

    # --- sending

    def _write(self, payload: bytes, text: bool) -> None:
        if self._router.lost is not None:
            raise self._router.closed_error()
        self.transport.write(payload, text)
        self._last_send = self._loop.time()

    async def _send(self, payload: bytes, text: bool) -> None:
        if self._router.lost is not None:
            raise self._router.closed_error()
        self._last_send = self._loop.time()
        await self.transport.send(payload, text)

    def request_nowait(
        self, op: str, fields: Mapping[str, Any] | None = None, /, **kw: Any
    ) -> asyncio.Future[Frame]:
        """Send ``op`` now and return a future of its reply's ``data`` (for pipelining).

        The future fails with :class:`ClientError` or :class:`ConnectionClosed`; it has
        no timeout. Call :meth:`drain` now and then when sending many.
        """
        rid, payload, reply = self._prepare(self._build(op, fields, kw))
        try:
            self._write(payload, self._text)
        except BaseException:
            self._router.forget(rid)
            raise
        data: asyncio.Future[Frame] = self._loop.create_future()
        reply.add_done_callback(lambda f: _settle(data, f))
        return data

    async def request(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - on expiry the rid is forgotten too
        **kw: Any,
    ) -> Frame:
        """Send ``op`` with ``fields`` and return its reply's ``data``.

        Fields come as keywords, or as a mapping when a name collides with ``timeout``
        (e.g. ``c.request("auth", {"token": t})`` works too). A ``rid`` is allocated
        unless one is given. Raises :class:`ClientError` on ``ok: false``,
        :class:`TimeoutError` after ``timeout`` (default :attr:`request_timeout`), and
        :class:`ConnectionClosed`.
        """
        reply = await self.roundtrip(self._build(op, fields, kw), timeout=timeout)
        if reply.get("ok") is True:
            data = reply.get("data")
            return data if isinstance(data, dict) else {}
        raise ClientError.from_reply(reply)

    async def roundtrip(
        self,
        frame: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - on expiry the rid is forgotten too
    ) -> Frame:
        """Send ``frame`` (adding a ``rid`` if it has none) and return the whole reply.

        Unlike :meth:`request` it does not raise on ``ok: false``: tests use it to look
        at error replies to arbitrary frames.
        """
        out = dict(frame)
        rid, payload, fut = self._prepare(out)
        if timeout is None:
            timeout = self.request_timeout
        try:
            await self._send(payload, self._text)
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise TimeoutError(
                f"no reply to {out.get('op')!r} (rid {rid}) within {timeout} s"
            ) from None
        finally:
            self._router.forget(rid)

    def _build(self, op: str, fields: Mapping[str, Any] | None, kw: dict[str, Any]) -> Frame:
        frame: Frame = {"op": op}
        if fields:
            frame.update(fields)
        if kw:
            frame.update(kw)
        frame["op"] = op
        return frame

    def _prepare(self, frame: Frame) -> tuple[str, bytes, asyncio.Future[Frame]]:
        # Give the frame a rid (unless it has one), encode it, register the request.
        rid = frame.get("rid")
        if rid is None:
            rid = frame["rid"] = self._router.next_rid()
        elif not isinstance(rid, str):
            raise TypeError(f"rid must be a string, not {rid!r}")
        payload = encode_payload(frame, self.codec)
        return rid, payload, self._router.expect(rid)

    async def send_frame(
        self,
        frame: Mapping[str, Any],
        *,
        codec: CodecName | None = None,
        text: bool | None = None,
    ) -> None:
        """Send ``frame`` as it is: no ``rid`` is added and no reply is awaited.

        ``codec`` overrides the connection's codec for this frame, ``text`` the
        WebSocket frame type (default: text for JSON). Any reply arrives as an event.
        """
        codec = codec or self.codec
        await self._send(encode_payload(frame, codec), codec == "json" if text is None else text)

    async def send_raw(self, payload: bytes | str, *, text: bool | None = None) -> None:
        """Send one payload verbatim: one WebSocket frame, or one length-prefixed TCP frame.

        ``text`` picks the WebSocket frame type; the default is text for ``str`` and
        for bytes on a JSON connection.
        """
        if isinstance(payload, str):
            payload = payload.encode()
            if text is None:
                text = True
        await self._send(payload, self._text if text is None else text)

    async def send_raw_bytes(self, data: bytes) -> None:
        """Write ``data`` to the TCP stream as-is (no length prefix): broken framing,
        partial frames, oversize lengths. Raises :class:`TypeError` on WebSocket."""
        if self._router.lost is not None:
            raise self._router.closed_error()
        self.transport.write_raw(data)
        self._last_send = self._loop.time()
        await self.transport.drain()

    async def drain(self) -> None:
        """Wait while the outgoing buffer is full (flow control for pipelining)."""
        await self.transport.drain()

    # --- events

    async def next_event(
        self,
        op: EventFilter = None,
        *,
        match: Callable[[Frame], bool] | None = None,
        timeout: float | None = 5.0,  # noqa: ASYNC109 - a deadline across several wake-ups
    ) -> Frame:
        """Return (and remove) the first queued event whose ``op`` is ``op`` (a name or
        a set of names, None for any) and that ``match`` accepts, waiting for it.

        Other events stay queued in order. Raises :class:`TimeoutError` after
        ``timeout`` seconds, and :class:`ConnectionClosed` once the connection has
        ended and no queued event matches.
        """
        accept = _event_matcher(op, match)
        router = self._router
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            ev = router.take(accept)
            if ev is not None:
                return ev
            if router.lost is not None:
                raise router.closed_error()
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                what = "an event" if op is None else f"a {op!r} event"
                raise TimeoutError(f"no {what} within {timeout} s")
            await router.changed(remaining)

    async def poll_event(
        self,
        op: EventFilter = None,
        *,
        match: Callable[[Frame], bool] | None = None,
        timeout: float = 0.2,  # noqa: ASYNC109 - the timeout is the result (None)
    ) -> Frame | None:
        """Like :meth:`next_event`, but None when nothing matches within ``timeout``.

        A connection that has ended raises :class:`ConnectionClosed` as in
        :meth:`next_event`: a dead socket is not "no event". For a "nothing arrives"
        check, :meth:`events_before_ping` needs no timeout.
        """
        try:
            return await self.next_event(op, match=match, timeout=timeout)
        except TimeoutError:
            return None

    async def events_before_ping(
        self, op: EventFilter = None, *, match: Callable[[Frame], bool] | None = None
    ) -> list[Frame]:
        """Send ``ping``, wait for its reply, then remove and return every queued event
        that matches.

        The server writes a connection's events and replies in the order it produces
        them, so when the reply arrives, every event produced before the server read
        the ping has arrived too. After an action whose reply (or HTTP response) came
        back, ``assert await c.events_before_ping("typing") == []`` proves the action
        sent this connection nothing, without waiting for a timeout. Raises
        :class:`ConnectionClosed` if the connection has ended.
        """
        await self.request("ping")
        return self.events_nowait(op, match=match)

    def events_nowait(
        self, op: EventFilter = None, *, match: Callable[[Frame], bool] | None = None
    ) -> list[Frame]:
        """Remove and return every queued event that matches, without waiting."""
        return self._router.take_all(_event_matcher(op, match))

    async def events(
        self, op: EventFilter = None, *, match: Callable[[Frame], bool] | None = None
    ) -> AsyncIterator[Frame]:
        """Iterate over matching events as they come; ends when the connection does."""
        while True:
            try:
                yield await self.next_event(op, match=match, timeout=None)
            except ConnectionClosed:
                return

    # --- session helpers

    async def hello(
        self,
        *,
        v: int = PROTOCOL_VERSION,
        client_name: str | None = "imserver.client",
        device: str | None = None,
        keepalive: bool = True,
    ) -> Frame:
        """Send ``hello``, keep the reply as :attr:`hello_data`, start the keepalive."""
        fields: Frame = {"v": v}
        if client_name is not None:
            fields["client"] = client_name
        if device is not None:
            fields["device"] = device
        data = await self.request("hello", fields)
        self.hello_data = data
        heartbeat = data.get("heartbeat")
        if keepalive and isinstance(heartbeat, int | float) and heartbeat > 0:
            if self._keepalive is not None:
                self._keepalive.cancel()
            self._keepalive = asyncio.create_task(
                self._keepalive_loop(heartbeat / 2), name="imserver-client-keepalive"
            )
        return data

    async def _keepalive_loop(self, idle: float) -> None:
        # The server closes a connection silent for 2 x heartbeat; ping after `idle`
        # seconds without sending anything, so a busy connection sends no extra pings.
        while True:
            delay = self._last_send + idle - self._loop.time()
            if delay <= 0:
                try:
                    self.request_nowait("ping").add_done_callback(_silence)
                except ConnectionClosed:
                    return
                delay = idle
            await asyncio.sleep(delay)

    @property
    def session_id(self) -> str | None:
        """The server's id for this connection (from ``hello``)."""
        sid = (self.hello_data or {}).get("session")
        return sid if isinstance(sid, str) else None

    @property
    def user_id(self) -> str:
        """The id of the logged-in user; raises if not logged in."""
        if self.user is None:
            raise RuntimeError("not logged in")
        return str(self.user["id"])

    async def register(
        self, username: str, password: str, display_name: str | None = None
    ) -> Frame:
        """Create an account; returns its ``user`` (this does not log in)."""
        fields: Frame = {"username": username, "password": password}
        if display_name is not None:
            fields["display_name"] = display_name
        data = await self.request("register", fields)
        user: Frame = data["user"]
        return user

    async def login(self, username: str, password: str, device: str | None = None) -> Frame:
        """Log in (this connection too); keeps ``token``, ``refresh_token``, ``user``."""
        fields: Frame = {"username": username, "password": password}
        if device is not None:
            fields["device"] = device
        data = await self.request("login", fields)
        self.token = data.get("token")
        self.refresh_token = data.get("refresh_token")
        self.user = data.get("user")
        return data

    async def auth(self, token: str | None = None) -> Frame:
        """Authenticate this connection with ``token`` (default: the stored one)."""
        token = token or self.token
        if token is None:
            raise RuntimeError("no token: pass one or login first")
        data = await self.request("auth", {"token": token})
        self.token = token
        self.user = data.get("user")
        return data

    async def refresh(self, refresh_token: str | None = None) -> Frame:
        """Trade the refresh token for new tokens, and keep them."""
        refresh_token = refresh_token or self.refresh_token
        if refresh_token is None:
            raise RuntimeError("no refresh token: pass one or login first")
        data = await self.request("refresh", refresh_token=refresh_token)
        self.token = data.get("token")
        self.refresh_token = data.get("refresh_token")
        return data

    async def logout(self) -> Frame:
        """Revoke this session's tokens (the server then closes the connection)."""
        return await self.request("logout")

    async def ping(self) -> Frame:
        """A round trip to the server."""
        return await self.request("ping")

    async def send_message(
        self,
        conv: str,
        body: str,
        *,
        cid: str | None = None,
        type: str = "text",
        **extra: Any,
    ) -> Frame:
        """Send a message (``cid`` defaults to a fresh uuid); returns the reply ``data``
        (``conv``, ``seq``, ``ts``, ``cid``, ``dup``). ``extra``: ``meta``, ``reply_to``,
        ``mentions``..."""
        # Only a missing cid gets a fresh one: an explicit (even invalid) cid is sent as is.
        fields: Frame = {
            "conv": conv,
            "cid": uuid.uuid4().hex if cid is None else cid,
            "type": type,
            "body": body,
        }
        fields.update(extra)
        return await self.request("send", fields)

    async def history(
        self,
        conv: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Frame:
        """One page of a conversation: ``messages`` (ascending by seq) and ``has_more``."""
        fields: Frame = {"conv": conv}
        if after is not None:
            fields["after"] = after
        if before is not None:
            fields["before"] = before
        if limit is not None:
            fields["limit"] = limit
        return await self.request("history", fields)

    async def convs(self) -> list[Frame]:
        """The user's conversations, latest activity first."""
        data = await self.request("convs")
        convs: list[Frame] = data.get("convs", [])
        return convs

    @staticmethod
    def direct_conv(a: str, b: str) -> str:
        """The id of the direct conversation of users ``a`` and ``b``: ``d:<min>:<max>``."""
        lo, hi = (a, b) if a < b else (b, a)
        return f"d:{lo}:{hi}"

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        who = f" user={self.user.get('username')!r}" if self.user else ""
        return f"<Client {self.transport_name}/{self.codec} {state}{who}>"


def _settle(data: asyncio.Future[Frame], reply: asyncio.Future[Frame]) -> None:
    # Turn a future of the reply frame into a future of its data (request_nowait).
    if data.done():
        return
    if reply.cancelled():
        data.cancel()
        return
    exc = reply.exception()
    if exc is not None:
        data.set_exception(exc)
        return
    frame = reply.result()
    if frame.get("ok") is True:
        payload = frame.get("data")
        data.set_result(payload if isinstance(payload, dict) else {})
    else:
        data.set_exception(ClientError.from_reply(frame))


async def _open_ws(
    url: str,
    max_frame: int,
    connect_timeout: float,
    ssl: ssl_module.SSLContext | bool | None,
    origin: str | None,
    headers: Mapping[str, str] | None,
    session: aiohttp.ClientSession | None,
) -> WebSocketTransport:
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


async def _open_tcp(
    address: tuple[str, int],
    max_frame: int,
    connect_timeout: float,
    ssl: ssl_module.SSLContext | bool | None,
) -> TcpTransport:
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


# --- HTTP -----------------------------------------------------------------------------


class HttpClient:
    """The HTTP API: ``POST /api/v1/<op>`` with JSON bodies, plus plain routes.

    ``token`` (given here or per call) is sent as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``session``: a shared aiohttp session, left open by :meth:`close`."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._session = session
        self._own = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _sess(self) -> aiohttp.ClientSession:
        # Created lazily: aiohttp wants a running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _headers(self, token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(headers or {})
        bearer = token or self.token
        if bearer:
            out.setdefault("Authorization", f"Bearer {bearer}")
        return out

    async def call(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        /,
        *,
        token: str | None = None,
        **kw: Any,
    ) -> tuple[int, Frame]:
        """POST the op and return ``(status, body)``.

        The body is the reply ``data`` on 2xx and ``{"error": {...}}`` otherwise; a body
        that is not a JSON object comes back as ``{"_raw": text}``. Fields named
        ``token`` go in the ``fields`` mapping (the keyword is the bearer token).
        """
        body: Frame = dict(fields or {})
        body.update(kw)
        status, _, raw = await self.post(
            f"/api/v1/{op}",
            _json_encoder.encode(body),
            token=token,
            headers={"Content-Type": "application/json"},
        )
        return status, _json_body(raw)

    async def request(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        /,
        *,
        token: str | None = None,
        **kw: Any,
    ) -> Frame:
        """Like :meth:`call`, but return ``data`` and raise :class:`ClientError` on errors."""
        status, body = await self.call(op, fields, token=token, **kw)
        if 200 <= status < 300:
            return body
        if isinstance(body.get("error"), Mapping):
            raise ClientError.from_reply(body, status=status)
        raise ClientError("_http", f"HTTP {status}: {body!r}", status=status)

    async def get(
        self,
        path: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """GET ``path`` (relative to the base URL): ``(status, headers, body)``."""
        return await self._send("GET", path, None, token, headers, params)

    async def post(
        self,
        path: str,
        data: bytes,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """POST raw ``data`` to ``path`` (file uploads): ``(status, headers, body)``."""
        return await self._send("POST", path, data, token, headers, params)

    async def _send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        token: str | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        try:
            async with self._sess().request(
                method,
                url,
                data=data,
                headers=self._headers(token, headers),
                params=dict(params) if params else None,
            ) as resp:
                body = await resp.read()
                return resp.status, resp.headers, body
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise ConnectFailed(f"{method} {url}: {exc}") from exc

    async def close(self) -> None:
        """Close the HTTP session (when this client created it)."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _json_body(raw: bytes) -> Frame:
    if not raw:
        return {}
    try:
        body = _json_decoder.decode(raw)
    except msgspec.DecodeError:
        return {"_raw": raw.decode(errors="replace")}
    return body if isinstance(body, dict) else {"_raw": raw.decode(errors="replace")}
