"""One client connection's state machine, independent of its transport.

States (:class:`State`) and what moves a session between them::

    CONNECTED --hello--> GREETED --login/auth--> AUTHENTICATED
        |                   |                          |
        +-------------------+-----close(reason)--------+--> CLOSING
    any state --the transport ends--> CLOSED

:data:`ADMITTED` is the one table of which ops each state lets through; an op outside
it is refused with the state's error (``hello_required`` before hello,
``unauthorized`` before login or auth). A closing session ignores what still arrives.
The same table admits the ops of an HTTP request, whose :class:`OpContext` is
``GREETED`` without a bearer token and ``AUTHENTICATED`` with one.

A :class:`Session` receives decoded payloads from its transport (WebSocket or TCP, see
:mod:`imserver.network.handler`), enforces the edge policy (hello first, rate limit,
the bad-frame threshold) and hands ops to the router. Replies and events leave through
its :class:`~imserver.network.handler.Link`, whose write buffer *is* the session's
bounded outbound queue: once more than ``send_queue_bytes`` are waiting, the client is
not keeping up and the session is closed with ``slow_consumer``; the client recovers
by ``convs`` + ``history`` after reconnecting.

Writes (``send``/``edit``/``recall``/``react``) return a future from the message
service; the reply is written from its done-callback, so a session can have many
writes in flight and none of them parks a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any, Protocol

from imserver.network.handler import Link
from imserver.protocol import ops
from imserver.protocol.codec import Codec, decode_op, encode
from imserver.protocol.events import Closed, ErrorBody, Reply
from imserver.services.caller import Caller
from imserver.services.gateway.ratelimit import TokenBucket
from imserver.utils.errors import BadRequest, HelloRequired, IMError, Internal, Unauthorized
from imserver.utils.ids import SessionId, new_session_id
from imserver.utils.live import Live, cell
from imserver.utils.metrics import Metrics

logger = logging.getLogger(__name__)


class State(IntEnum):
    """Where a session is in its life. A session only ever moves forward, so "closing
    or closed" is ``state >= CLOSING``: one comparison on the per-recipient path."""

    CONNECTED = 1
    """Accepted; only ``hello`` is admitted."""
    GREETED = 2
    """``hello`` answered: the codec is fixed; the public ops are admitted."""
    AUTHENTICATED = 3
    """Bound to a user by ``login`` or ``auth``: every op is admitted."""
    CLOSING = 4
    """``closed`` sent (when greeted), the link closing; input is ignored, output
    dropped."""
    CLOSED = 5
    """The transport ended; the gateway has forgotten the session."""


_CLOSING = State.CLOSING


PUBLIC_OPS: frozenset[type[ops.Op]] = frozenset(
    {ops.Hello, ops.Register, ops.Login, ops.Auth, ops.Refresh, ops.Ping}
)
"""Ops admitted before authentication."""

ADMITTED: dict[State, frozenset[type[ops.Op]]] = {
    State.CONNECTED: frozenset({ops.Hello}),
    State.GREETED: PUBLIC_OPS,
    State.AUTHENTICATED: frozenset(ops.ALL_OPS),
    State.CLOSING: frozenset(),
    State.CLOSED: frozenset(),
}
"""The ops each state lets through."""


def refusal(state: State) -> IMError:
    """The answer to an op that ``state`` does not admit."""
    if state is State.CONNECTED:
        return HelloRequired("the first frame must be hello")
    if state is State.GREETED:
        return Unauthorized("not authenticated: send login or auth first")
    return BadRequest("the connection is closing")


def error_body(exc: IMError) -> ErrorBody:
    """The protocol's error object for ``exc``, on every transport."""
    return ErrorBody(
        code=exc.code,
        message=exc.message,
        retry_after=getattr(exc, "retry_after", None),
        field=exc.field,
    )


class OpContext(Protocol):
    """Who runs an op: what a handler may know of where it came from."""

    @property
    def state(self) -> State:
        """Decides which ops are admitted (:data:`ADMITTED`)."""

    @property
    def caller(self) -> Caller | None:
        """The authenticated user, or ``None`` (public ops only)."""

    @property
    def device(self) -> str | None:
        """The device the client named in ``hello``, if any."""

    @property
    def session(self) -> Session | None:
        """The live session the op came on; ``None`` for a one-off request (HTTP),
        which ``login`` and ``auth`` bind to nothing."""


class RequestContext:
    """The context of an op without a live session: an HTTP request, authenticated by
    its bearer token or not at all."""

    __slots__ = ("caller",)

    device: str | None = None
    session: Session | None = None

    def __init__(self, caller: Caller | None = None) -> None:
        self.caller = caller

    @property
    def state(self) -> State:
        return State.GREETED if self.caller is None else State.AUTHENTICATED


Dispatch = Callable[[OpContext, ops.Op], "Awaitable[object] | object"]
"""Runs one admitted op: returns its reply data, an awaitable of it, or a future."""


class Edge:
    """What every session of one gateway shares: the dispatch of ops, the write
    flusher, the metrics and the limits."""

    __slots__ = (
        "bad_frames",
        "call",
        "flusher",
        "metrics",
        "rate_burst",
        "rate_per_s",
        "send_queue_bytes",
        "shutdown_grace",
    )

    def __init__(
        self,
        call: Dispatch,
        metrics: Metrics,
        *,
        bad_frames: int,
        send_queue_bytes: int,
        rate_per_s: float | Live[float],
        rate_burst: int | Live[int],
        shutdown_grace: float,
    ) -> None:
        self.call = call
        self.metrics = metrics
        self.flusher = Flusher()
        self.bad_frames = bad_frames
        self.send_queue_bytes = send_queue_bytes
        self.rate_per_s = cell(rate_per_s)
        self.rate_burst = cell(rate_burst)
        self.shutdown_grace = shutdown_grace

    def new_bucket(self) -> TokenBucket:
        """A fresh rate-limit bucket with the configured limits."""
        return TokenBucket(self.rate_per_s, self.rate_burst)


class Session:
    """A connection: its state, codec, identity, limits and outbound path."""

    __slots__ = (
        "_out",
        "bad_frames",
        "bucket",
        "caller",
        "codec",
        "device",
        "edge",
        "id",
        "last_rx",
        "link",
        "opened",
        "state",
    )

    def __init__(self, edge: Edge, link: Link) -> None:
        self.id: SessionId = new_session_id()
        self.edge = edge
        self.link = link
        self.state = State.CONNECTED
        self.codec = Codec.JSON
        self.caller: Caller | None = None
        self.device: str | None = None
        self.bad_frames = 0
        self.bucket = edge.new_bucket()
        self.opened = self.last_rx = time.monotonic()
        self._out: list[bytes] | None = None

    @property
    def session(self) -> Session:
        """The session itself, as the :class:`OpContext` of its ops."""
        return self

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self.state >= _CLOSING

    # --- transitions -----------------------------------------------------------------

    def greet(self, device: str | None) -> None:
        """``hello`` was answered: CONNECTED → GREETED (a later hello only renames the
        device)."""
        if self.state is State.CONNECTED:
            self.state = State.GREETED
        if device is not None:
            self.device = device

    def bind(self, caller: Caller) -> None:
        """``login`` or ``auth`` succeeded: → AUTHENTICATED as ``caller``."""
        if self.closing:
            return
        self.caller = caller
        self.state = State.AUTHENTICATED

    def ended(self) -> None:
        """The transport ended: → CLOSED."""
        self.state = State.CLOSED

    # --- inbound -------------------------------------------------------------------

    async def receive(self, payload: bytes, codec: Codec) -> None:
        """Handle one frame payload that arrived in ``codec``."""
        state = self.state
        if state >= _CLOSING:
            return
        self.last_rx = time.monotonic()
        try:
            op = decode_op(payload, codec)
        except BadRequest as exc:
            self.bad_frames += 1
            self.send_error(exc.rid, exc, codec)
            if self.bad_frames >= self.edge.bad_frames:
                self.close("bad_frames")
            return
        self.bad_frames = 0
        if state is State.CONNECTED:
            if type(op) is not ops.Hello:
                self.send_error(op.rid, refusal(state), codec)
                return
            # The codec of the hello frame is the codec of everything the server sends.
            self.codec = codec
        limited = self.bucket.check(self.last_rx)
        if limited is not None:
            self.edge.metrics.op(ops.op_name(type(op)), limited.code)
            self.send_error(op.rid, limited, self.codec)
            return
        await self.dispatch(op)

    def refuse(self, exc: IMError, codec: Codec | None = None) -> None:
        """Answer a frame the transport refused before decoding it (too large)."""
        self.last_rx = time.monotonic()
        self.send_error(None, exc, codec)

    async def dispatch(self, op: ops.Op) -> None:
        """Run one validated op and write its reply (now, or when its write commits)."""
        edge = self.edge
        name = ops.op_name(type(op))
        try:
            result = edge.call(self, op)
            if isinstance(result, asyncio.Future):
                result.add_done_callback(_WriteReply(self, op.rid, name, time.monotonic()))
                return
            if isinstance(result, Awaitable):
                result = await result
        except IMError as exc:
            edge.metrics.op(name, exc.code)
            self.send_error(op.rid, exc, self.codec)
            return
        except Exception:
            logger.exception("op %s failed", name)
            edge.metrics.op(name, Internal.code)
            self.send_error(op.rid, Internal("internal error"), self.codec)
            return
        edge.metrics.op(name, "ok")
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
            self.edge.metrics.encode_failure("reply", codec.name.lower())
            self.send_error(rid, Internal(f"the reply could not be encoded in {codec.name}"))
            return
        self.push(self.link.frame(payload, codec))

    def send_error(self, rid: str | None, exc: IMError, codec: Codec | None = None) -> None:
        """Write an error reply (sent even for ops without ``rid``); before hello, in
        the codec of the frame it answers."""
        codec = self.codec if codec is None or self.state is not State.CONNECTED else codec
        reply = Reply(rid=rid, ok=False, error=error_body(exc))
        self.push(self.link.frame(encode(reply, codec), codec))

    def push(self, data: bytes) -> None:
        """Queue framed bytes; they are written with the session's other output of this
        loop iteration in one system call (see :class:`Flusher`)."""
        if self.state >= _CLOSING:
            return
        out = self._out
        if out is None:
            self._out = [data]
            self.edge.flusher.mark(self)
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
        if link.buffered() > self.edge.send_queue_bytes and not self.closing:
            self.edge.metrics.slow_consumers.inc()
            self.close("slow_consumer")
            return
        link.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self, reason: str) -> None:
        """Send ``closed {reason}`` (once greeted) and close the connection after it is
        flushed; the link is aborted if it has not closed within ``shutdown_grace``."""
        if self.closing:
            return
        self.flush()
        greeted = self.state is not State.CONNECTED
        self.state = State.CLOSING
        link = self.link
        if greeted:
            link.write(link.frame(encode(Closed(reason=reason), self.codec), self.codec))
        link.close()
        asyncio.get_running_loop().call_later(self.edge.shutdown_grace, link.abort)


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
        metrics = session.edge.metrics
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
