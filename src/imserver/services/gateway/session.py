"""One client connection's state machine, independent of its transport.

States::

    NEW --hello--> GREETED --login/auth--> AUTHENTICATED --close--> CLOSED
     |  (any other op: hello_required)      (ops needing a user: unauthorized before)

A :class:`Session` receives decoded payloads from its transport (WebSocket or TCP,
see ``imserver.network``), enforces the edge policy (hello first, rate limit,
authentication, the bad-frame threshold) and hands ops to the :class:`Router`.
Replies and events leave through its :class:`Link`, whose write buffer *is* the
session's bounded outbound queue: once more than ``send_queue_bytes`` are waiting,
the client is not keeping up and the session is closed with ``slow_consumer``; the
client recovers by ``convs`` + ``history`` after reconnecting.

Writes (``send``/``edit``/``recall``/``react``) return a future from the message
service; the reply is written from its done-callback, so a session can have many
writes in flight and none of them parks a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from imserver.protocol import ops
from imserver.protocol.codec import Codec, decode_op, encode
from imserver.protocol.events import Closed, ErrorBody, Reply
from imserver.services.caller import Caller
from imserver.utils.errors import BadRequest, HelloRequired, IMError, Internal, RateLimited
from imserver.utils.ids import SessionId, new_session_id

if TYPE_CHECKING:
    from imserver.services.gateway.service import Gateway

logger = logging.getLogger(__name__)


class Link(Protocol):
    """The transport side of a session: framed bytes out, buffer level, close."""

    kind: str
    """``ws``, ``tcp`` or ``http``."""

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        """Wrap an encoded payload in the transport's framing."""

    def write(self, data: bytes) -> None:
        """Queue framed bytes for the peer (never blocks)."""

    def buffered(self) -> int:
        """Bytes queued and not yet taken by the kernel."""

    def close(self) -> None:
        """Flush what is queued, then close."""

    def abort(self) -> None:
        """Close at once, dropping what is queued."""


class Session:
    """A connection: its codec, identity, limits and outbound path."""

    __slots__ = (
        "_closing",
        "_out",
        "bad_frames",
        "bucket",
        "caller",
        "codec",
        "device",
        "gateway",
        "greeted",
        "id",
        "last_rx",
        "link",
        "opened",
    )

    def __init__(self, gateway: Gateway, link: Link) -> None:
        self.id: SessionId = new_session_id()
        self.gateway = gateway
        self.link = link
        self.codec = Codec.JSON
        self.greeted = link.kind == "http"
        self.caller: Caller | None = None
        self.device: str | None = None
        self.bad_frames = 0
        self.bucket = gateway.new_bucket()
        self.opened = self.last_rx = time.monotonic()
        self._closing = False
        self._out: list[bytes] | None = None

    # --- inbound -------------------------------------------------------------------

    async def receive(self, payload: bytes | str, codec: Codec) -> None:
        """Handle one frame payload that arrived in ``codec``."""
        self.last_rx = time.monotonic()
        try:
            op = decode_op(payload, codec)
        except BadRequest as exc:
            self.bad_frames += 1
            self.send_error(exc.rid, exc, codec)
            if self.bad_frames >= self.gateway.config.limits.bad_frames:
                self.close("bad_frames")
            return
        self.bad_frames = 0
        if not self.greeted:
            if type(op) is not ops.Hello:
                self.send_error(op.rid, HelloRequired("the first frame must be hello"), codec)
                return
            # The codec of the hello frame is the codec of everything the server sends.
            self.codec = codec
        wait = self.bucket.take(self.last_rx)
        if wait:
            self.gateway.metrics.op(ops.op_name(type(op)), RateLimited.code)
            self.send_error(op.rid, RateLimited(round(wait, 3)), self.codec)
            return
        await self.dispatch(op)

    async def dispatch(self, op: ops.Op) -> None:
        """Run one validated op and write its reply (now, or when its write commits)."""
        gateway = self.gateway
        name = ops.op_name(type(op))
        try:
            result = gateway.router.call(self, op)
            if isinstance(result, asyncio.Future):
                result.add_done_callback(_WriteReply(self, op.rid, name, time.monotonic()))
                return
            if isinstance(result, Awaitable):
                result = await result
        except IMError as exc:
            gateway.metrics.op(name, exc.code)
            self.send_error(op.rid, exc, self.codec)
            return
        except Exception:
            logger.exception("op %s failed", name)
            gateway.metrics.op(name, Internal.code)
            self.send_error(op.rid, Internal("internal error"), self.codec)
            return
        gateway.metrics.op(name, "ok")
        if op.rid is not None:
            self.send_reply(op.rid, result)

    # --- outbound ------------------------------------------------------------------

    def send_reply(self, rid: str | None, data: Any) -> None:
        """Write a successful reply, or ``internal`` when ``data`` cannot be encoded in
        the session's codec (a bug, logged and counted; the session stays open)."""
        codec = self.codec
        try:
            payload = encode(Reply(rid=rid, ok=True, data=data), codec)
        except Exception:
            logger.exception("cannot encode the reply to rid %r in %s", rid, codec.name)
            self.gateway.metrics.encode_failure("reply", codec.name.lower())
            self.send_error(rid, Internal(f"the reply could not be encoded in {codec.name}"))
            return
        self.push(self.link.frame(payload, codec))

    def send_error(self, rid: str | None, exc: IMError, codec: Codec | None = None) -> None:
        """Write an error reply (sent even for ops without ``rid``)."""
        codec = self.codec if codec is None or self.greeted else codec
        body = ErrorBody(
            code=exc.code,
            message=exc.message,
            retry_after=getattr(exc, "retry_after", None),
            field=exc.field,
        )
        self.push(self.link.frame(encode(Reply(rid=rid, ok=False, error=body), codec), codec))

    def push(self, data: bytes) -> None:
        """Queue framed bytes; they are written with the session's other output of this
        loop iteration in one system call (see :class:`Flusher`)."""
        if self._closing:
            return
        out = self._out
        if out is None:
            self._out = [data]
            self.gateway.flusher.mark(self)
        else:
            out.append(data)

    def flush(self) -> None:
        """Write what :meth:`push` queued; close the session if its queue has overflowed."""
        out = self._out
        if out is None:
            return
        self._out = None
        link = self.link
        # The bound is on the backlog the client has not taken yet: a client that still
        # holds more than send_queue_bytes from earlier writes is not keeping up. One
        # large write (a big history page) to a client that reads is not a backlog.
        if link.buffered() > self.gateway.config.limits.send_queue_bytes and not self._closing:
            self.gateway.metrics.slow_consumers.inc()
            self.close("slow_consumer")
            return
        link.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self, reason: str) -> None:
        """Send ``closed {reason}`` and close the connection after it is flushed."""
        if self._closing:
            return
        self.flush()
        self._closing = True
        if self.greeted and self.link.kind != "http":
            self.link.write(self.link.frame(encode(Closed(reason=reason), self.codec), self.codec))
        self.link.close()
        self.gateway.schedule_abort(self)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing


class Flusher:
    """Coalesces each session's writes per event-loop iteration.

    Replies and events pushed to a session during one iteration are joined and
    written with one system call when the loop gets to the callback scheduled by
    the first push; a fan-out to N sessions costs N writes, not N × events.
    """

    __slots__ = ("_dirty", "_loop")

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, session: Session) -> None:
        """Remember a session with queued output; schedule the flush if none is pending."""
        dirty = self._dirty
        if not dirty:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)
        dirty.append(session)

    def flush(self) -> None:
        """Write every marked session's queued output."""
        dirty = self._dirty
        self._dirty = []
        for session in dirty:
            session.flush()


class _WriteReply:
    """Done-callback of a write future: the reply, the op metric and the ack latency."""

    __slots__ = ("name", "rid", "session", "t0")

    def __init__(self, session: Session, rid: str | None, name: str, t0: float) -> None:
        self.session = session
        self.rid = rid
        self.name = name
        self.t0 = t0

    def __call__(self, fut: asyncio.Future[Any]) -> None:
        session = self.session
        metrics = session.gateway.metrics
        if fut.cancelled():
            metrics.op(self.name, "unavailable")
            return
        exc = fut.exception()
        if exc is None:
            metrics.op(self.name, "ok")
            if self.rid is not None:
                session.send_reply(self.rid, fut.result())
            metrics.ack_latency.observe(time.monotonic() - self.t0)
        elif isinstance(exc, IMError):
            metrics.op(self.name, exc.code)
            session.send_error(self.rid, exc)
        else:
            logger.error("op %s failed", self.name, exc_info=exc)
            metrics.op(self.name, Internal.code)
            session.send_error(self.rid, Internal("internal error"))
