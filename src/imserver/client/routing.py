"""The sans-I/O core of a connection: which server frame answers which request.

Each decoded server frame is either the reply to a pending ``rid`` (it resolves that
request) or an event (it is queued, in arrival order). Replies nobody waits for -- no
``rid``, an unknown ``rid``, or a request that already timed out -- are events too,
with ``op`` ``"reply"``. Nothing here reads or writes a socket, so the routing is
tested by feeding frames (``tests/unit/test_client_framing.py``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Final

from imserver.client.codec import Frame
from imserver.client.errors import ConnectionClosed

__all__ = ["INVALID_FRAME_OP", "EventFilter", "FrameRouter", "event_matcher", "silence"]

EventFilter = str | Collection[str] | None
"""An event's ``op``, any of several, or None for every event."""

INVALID_FRAME_OP: Final = "_invalid"
"""``op`` of the event queued for a server payload that did not decode to a map;
the event carries ``error`` (why) and ``payload`` (the raw bytes)."""


def event_matcher(
    op: EventFilter, match: Callable[[Frame], bool] | None
) -> Callable[[Frame], bool]:
    """The test an event must pass: its ``op`` is ``op`` (a name, any of several
    names, or None for any) and ``match`` (when given) accepts it."""
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


def silence(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (a done callback)."""
    # Requests nobody awaits any more (keepalive
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
                silence(fut)
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
