"""A lean WebSocket receiver for fan-out benchmarks.

Thousands of receivers must cost the load generator less than they cost the server,
or the generator saturates first and the figure measures it. :class:`Receiver` is a
bare :class:`asyncio.Protocol`: an HTTP/1.1 upgrade, ``hello`` and ``auth`` as masked
text frames, then an incremental parser of the server's (unmasked) frames that
decodes each event into a small struct, ignoring every field it does not need.

JSON codec only. What arrives is handed to ``on_event(receiver, event, now_ns)``;
replies to requests sent with :meth:`Receiver.request` (e.g. a ``ping``) resolve its
future instead.

:class:`AuthProbe` / :func:`auth_cycle` is the reconnect loop's unit of work for the
``auth-storm`` scenario: connect, upgrade, ``hello`` + ``auth`` in one write, wait
for the auth reply, then a close frame -- and the *server* closes the TCP connection
(so the TIME_WAIT state lands on the server's side, not on the generator's ports).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgspec

_OP_TEXT = 0x1
_OP_CLOSE = 0x8
_OP_PING = 0x9


class Meta(msgspec.Struct):
    t: int | None = None


class Event(msgspec.Struct):
    """The fields of a server frame a fan-out benchmark looks at."""

    op: str | None = None
    rid: str | None = None
    ok: bool | None = None
    conv: str | None = None
    seq: int | None = None
    meta: Meta | None = None
    reason: str | None = None
    error: dict[str, Any] | None = None


_decode = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.encode


_ZERO_MASK: Final = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = _OP_TEXT) -> bytes:
    """One masked client frame (RFC 6455 §5.3). The server must see a mask; the all-zero
    key is a valid one and costs no XOR."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


def take_upgrade(buf: bytearray) -> bytes | None:
    """When the HTTP response head is complete in ``buf``: remove it and return its
    status line; otherwise None (wait for more bytes)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = bytes(buf[: buf.find(b"\r\n")])
    del buf[: end + 4]
    return status


def take_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove every complete (unmasked, unfragmented) server frame from ``buf``; returns
    ``(opcode, payload)`` of each, in order. A partial frame stays in ``buf``."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    size = len(buf)
    while size - pos >= 2:
        n = buf[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if size - pos < 4:
                break
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            head = 4
        elif n == 127:
            if size - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if size - pos < head + n:
            break
        start = pos + head
        frames.append((buf[pos] & 0x0F, bytes(buf[start : start + n])))
        pos = start + n
    if pos:
        del buf[:pos]
    return frames


class Receiver(asyncio.Protocol):
    """One authenticated WebSocket connection that only listens."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        on_event: Callable[[Receiver, Event, int], None],
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.on_event = on_event
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed_reason: str | None = None
        self.lost = False
        self._buf = bytearray()
        self._upgraded = False
        self._pending: dict[str, asyncio.Future[Event]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are one.
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.write(request.encode())  # type: ignore[attr-defined]

    def send(self, frame: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(_encode(frame)))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._upgraded:
            status = take_upgrade(buf)
            if status is None:
                return
            if b" 101 " not in status:
                self._fail(f"upgrade refused: {status!r}")
                return
            self._upgraded = True
            self.send({"op": "hello", "v": 1, "client": "imserver-bench", "rid": "h"})
            self.send({"op": "auth", "token": self.token, "rid": "a"})
        now = time.monotonic_ns()
        for opcode, payload in take_frames(buf):
            if opcode == _OP_TEXT:
                self._event(_decode(payload), now)
            elif opcode == _OP_CLOSE:
                self.lost = True
            elif opcode == _OP_PING:
                assert self.transport is not None
                self.transport.write(client_frame(payload, 0xA))

    async def request(self, frame: dict[str, Any], wait_s: float = 30.0) -> Event:
        """Send ``frame`` (which must carry a ``rid`` other than ``h``/``a``) and wait
        for its reply; an error reply is returned, not raised."""
        rid = frame["rid"]
        if self._pending is None:
            self._pending = {}
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self.send(frame)
            async with asyncio.timeout(wait_s):
                return await fut
        finally:
            self._pending.pop(rid, None)

    def _event(self, ev: Event, now: int) -> None:
        if ev.rid is not None:
            pending = self._pending
            if pending is not None and ev.rid in pending:
                fut = pending.pop(ev.rid)
                if not fut.done():
                    fut.set_result(ev)
                return
            if ev.rid == "a":
                if ev.ok:
                    if not self.ready.done():
                        self.ready.set_result(None)
                else:
                    self._fail(f"auth refused: {ev.error}")
            elif ev.ok is False:
                self._fail(f"{ev.rid} refused: {ev.error}")
            return
        if ev.op == "closed":
            self.closed_reason = ev.reason
        self.on_event(self, ev, now)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))
        if self._pending:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection lost: {exc}"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(b"\x03\xe8", _OP_CLOSE))
            self.transport.close()


async def connect_receiver(
    host: str,
    port: int,
    token: str,
    on_event: Callable[[Receiver, Event, int], None],
    *,
    local_addr: tuple[str, int] | None = None,
    wait_s: float = 30.0,
) -> Receiver:
    """Open one receiver and wait until it is authenticated."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: Receiver(host, port, token, on_event), host, port, local_addr=local_addr
    )
    async with asyncio.timeout(wait_s):
        await proto.ready
    return proto


# --- auth cycles (auth-storm) -----------------------------------------------------------


def upgrade_request(host: str, port: int) -> bytes:
    """The HTTP/1.1 upgrade request of ``/ws`` (one fixed key: the server does not care)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def auth_greeting(token: str) -> bytes:
    """``hello`` and ``auth(token)`` as two masked frames, built once per token."""
    return client_frame(
        _encode({"op": "hello", "v": 1, "client": "imserver-bench", "rid": "h"})
    ) + client_frame(_encode({"op": "auth", "token": token, "rid": "a"}))


CLOSE_FRAME: bytes = client_frame(b"\x03\xe8", _OP_CLOSE)
"""A masked close frame, status 1000."""


class CycleResult(NamedTuple):
    """What one connect → hello + auth → close cycle saw (``time.monotonic_ns()``; 0
    where the cycle did not get that far)."""

    start_ns: int
    """``connect()`` called."""
    auth_ns: int
    """Upgrade answered ``101``; ``hello`` + ``auth`` written."""
    reply_ns: int
    """The auth reply read (ok or not)."""
    end_ns: int
    """The connection gone."""
    error: str | None
    """``None`` if authenticated; else the auth reply's error code, or what failed
    (``connect:<errno>``, ``upgrade``, ``hello:<code>``, ``lost``, ``timeout``)."""
    server_closed: bool
    """The server closed the TCP connection (not the client, not a timeout)."""


class AuthProbe(asyncio.Protocol):
    """One connection that authenticates with a token and closes at once."""

    def __init__(self, request: bytes, greeting: bytes) -> None:
        self.request = request
        self.greeting = greeting
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.auth_ns = 0
        self.reply_ns = 0
        self.error: str | None = None
        self.client_closed = False
        self._buf = bytearray()
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._upgraded:
            status = take_upgrade(buf)
            if status is None:
                return
            if b" 101 " not in status:
                self._finish("upgrade")
                return
            self._upgraded = True
            self.auth_ns = time.monotonic_ns()
            assert self.transport is not None
            self.transport.write(self.greeting)
        for opcode, payload in take_frames(buf):
            if opcode == _OP_TEXT and not self.reply_ns:
                ev = _decode(payload)
                if ev.rid == "a":
                    self.reply_ns = time.monotonic_ns()
                    if not ev.ok:
                        self.error = _code(ev.error)
                    self._finish(None)
                elif ev.rid == "h" and ev.ok is False:
                    self._finish(f"hello:{_code(ev.error)}")
            elif opcode == _OP_CLOSE and not self.reply_ns:
                self._finish("lost")

    def _finish(self, error: str | None) -> None:
        """Record ``error`` (if any) and start the closing handshake: the server answers
        the close frame and closes the TCP connection itself."""
        if error is not None and self.error is None:
            self.error = error
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)
            if error == "upgrade":
                self.client_closed = True
                self.transport.close()

    def close_now(self) -> None:
        """Drop the connection from this side (a timeout)."""
        self.client_closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply_ns and self.error is None:
            self.error = "lost"
        if not self.done.done():
            self.done.set_result(None)


def _code(error: dict[str, Any] | None) -> str:
    return str((error or {}).get("code", "unknown"))


async def auth_cycle(
    host: str,
    port: int,
    request: bytes,
    greeting: bytes,
    *,
    local_addr: tuple[str, int] | None = None,
    wait_s: float = 10.0,
) -> CycleResult:
    """Connect, upgrade, send ``greeting`` (see :func:`auth_greeting`), wait for the auth
    reply, close; returns the timings. Never raises for a failed cycle."""
    loop = asyncio.get_running_loop()
    start = time.monotonic_ns()
    probe = AuthProbe(request, greeting)
    try:
        async with asyncio.timeout(wait_s):
            await loop.create_connection(lambda: probe, host, port, local_addr=local_addr)
            await probe.done
    except TimeoutError:
        probe.close_now()
        if probe.error is None and not probe.reply_ns:
            probe.error = "timeout"
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "error")
        return CycleResult(start, 0, 0, time.monotonic_ns(), f"connect:{name}", False)
    return CycleResult(
        start,
        probe.auth_ns,
        probe.reply_ns,
        time.monotonic_ns(),
        probe.error,
        not probe.client_closed,
    )
