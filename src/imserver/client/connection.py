"""A connection: requests and their replies, events, raw frames, closing.

It ties a :class:`ClientTransport` to a :class:`FrameRouter`. The receive path is
one msgspec decode per frame and no task per frame, since the benchmarks drive
thousands of connections through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Self

import msgspec

from imserver.client.codec import (
    CodecName,
    Frame,
    encode_payload,
    json_decoder,
    msgpack_decoder,
)
from imserver.client.errors import ClientError, ConnectionClosed
from imserver.client.routing import INVALID_FRAME_OP, EventFilter, FrameRouter, event_matcher
from imserver.client.transport import ClientTransport, TransportName

__all__ = ["Connection"]


class Connection:
    """One open connection to IMServer (WebSocket or TCP), speaking dicts.

    :meth:`request` sends an op and returns its reply's ``data``; everything the
    server sends that is not a reply to a pending request is an event, read with
    :meth:`next_event`, :meth:`events` or :meth:`events_nowait` (or handed to
    :attr:`on_event` as it arrives). It is the :class:`PayloadSink` of its transport:
    it decodes each payload and hands it to its :class:`FrameRouter`.
    :class:`~imserver.client.api.Client` adds opening and the protocol's ops.
    """

    def __init__(self, transport: ClientTransport, *, codec: CodecName = "json") -> None:
        """Wrap an open ``transport``."""
        if codec not in ("json", "msgpack"):
            raise ValueError(f"unknown codec {codec!r}")
        self.transport = transport
        self.codec: CodecName = codec
        self.request_timeout: float | None = 30.0
        """Default seconds :meth:`request` waits for a reply (None: forever)."""
        self.close_code: int | None = None
        """The WebSocket close code once the connection ended."""
        self._router = FrameRouter()
        self._text = codec == "json"
        self._loop = asyncio.get_running_loop()
        self._last_send = self._loop.time()
        # Started by Client.hello; ended here with the connection.
        self._keepalive: asyncio.Task[None] | None = None
        self._closing = False
        self._lost = asyncio.Event()
        transport.attach(self)

    # --- closing

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

    async def __aenter__(self) -> Self:
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
                frame = json_decoder.decode(payload)
            else:
                frame = msgpack_decoder.decode(payload)
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
        accept = event_matcher(op, match)
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
        return self._router.take_all(event_matcher(op, match))

    async def events(
        self, op: EventFilter = None, *, match: Callable[[Frame], bool] | None = None
    ) -> AsyncIterator[Frame]:
        """Iterate over matching events as they come; ends when the connection does."""
        while True:
            try:
                yield await self.next_event(op, match=match, timeout=None)
            except ConnectionClosed:
                return


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
