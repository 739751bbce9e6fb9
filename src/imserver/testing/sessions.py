"""Sessions without sockets: a real gateway on real services, driven in memory.

In the style of h11's ``ConnectionPair``: a :class:`Peer` is one client connection
whose transport is a :class:`MemoryLink`. Payloads go in through the same
:meth:`~imserver.network.handler.Connection.receive` a WebSocket or TCP transport
calls; what the session writes is framed like TCP (so both codecs read back) and comes
out as decoded frames. Everything behind the gateway is real: the embedded services
on SQLite files in a directory of the test's.

    async with GatewayHarness.open(tmp_path) as harness:
        peer = harness.peer()
        await peer.ok("hello", v=1)
        assert peer.frames() == [...]
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec

from imserver.core.embedded import Embedded, build_embedded
from imserver.protocol.codec import Codec
from imserver.protocol.framing import FrameDecoder, encode_frame
from imserver.services.gateway.service import Gateway
from imserver.services.gateway.session import Session
from imserver.services.message.api import MessageService
from imserver.services.room.api import RoomService
from imserver.services.user.api import UserService
from imserver.utils.config import AuthConfig, Config
from imserver.utils.metrics import Metrics

Frame = dict[str, Any]
"""A decoded frame as the client sees it."""

REPLY_TIMEOUT = 30.0
"""Seconds :meth:`Peer.reply` waits: a reply that takes longer is a failure."""

CHEAP_AUTH = AuthConfig(argon2_memory_kib=1024, argon2_time_cost=1)
"""Password hashing fast enough for tests (the default config's is the OWASP minimum)."""


class MemoryLink:
    """A link whose written bytes stay in memory, framed like TCP.

    ``backlog`` stands for the bytes the kernel has not taken yet: set it to make the
    client look slow (see ``limits.send_queue_bytes``).
    """

    kind = "tcp"

    def __init__(self) -> None:
        self.written = bytearray()
        self.backlog = 0
        self.closed = False
        self.aborted = False
        self.arrived = asyncio.Event()

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return encode_frame(payload)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data
            self.arrived.set()

    def buffered(self) -> int:
        return self.backlog

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True


def _encoder(codec: Codec) -> Any:
    return msgspec.json.encode if codec is Codec.JSON else msgspec.msgpack.encode


class Peer:
    """One client connection to a :class:`GatewayHarness`' gateway."""

    _rids = itertools.count(1)

    def __init__(self, gateway: Gateway, codec: Codec = Codec.JSON) -> None:
        self.gateway = gateway
        self.codec = codec
        self.link = MemoryLink()
        session = gateway.open(self.link)
        assert isinstance(session, Session)
        self.session = session
        self._decoder = FrameDecoder(1 << 30)
        self._unread: list[Frame] = []

    # --- in --------------------------------------------------------------------------

    async def receive(self, payload: bytes, codec: Codec | None = None) -> None:
        """Hand the session one frame payload, as a transport would."""
        await self.session.receive(payload, self.codec if codec is None else codec)

    async def send(self, op: str, *, codec: Codec | None = None, **fields: Any) -> None:
        """Encode ``{"op": op, **fields}`` in ``codec`` (the peer's by default) and hand
        it to the session."""
        codec = self.codec if codec is None else codec
        await self.receive(_encoder(codec)({"op": op, **fields}), codec)

    async def call(self, op: str, **fields: Any) -> Frame:
        """Send ``op`` with a fresh ``rid`` and return its reply once it is written
        (a write's reply comes when its batch commits)."""
        rid = f"r{next(self._rids)}"
        await self.send(op, rid=rid, **fields)
        return await self.reply(rid)

    async def ok(self, op: str, **fields: Any) -> Any:
        """:meth:`call` that must succeed; its reply data."""
        reply = await self.call(op, **fields)
        assert reply["ok"] is True, (op, reply)
        return reply["data"]

    async def login(self, username: str, password: str = "correct-horse") -> Frame:
        """hello, register (if the name is new) and login; the login reply's data."""
        await self.ok("hello", v=1)
        await self.call("register", username=username, password=password)
        data: Frame = await self.ok("login", username=username, password=password)
        return data

    async def end(self) -> None:
        """The transport ended (the client went away or the link closed)."""
        await self.gateway.closed(self.session)

    # --- out -------------------------------------------------------------------------

    def frames(self) -> list[Frame]:
        """Every frame written since the last call, decoded (pending output is flushed
        first, as the event loop would)."""
        self._read()
        out, self._unread = self._unread, []
        return out

    async def reply(self, rid: str) -> Frame:
        """The reply to ``rid``, waiting until the session has written it; frames
        before it stay readable by :meth:`frames`."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                self._read()
                for i, frame in enumerate(self._unread):
                    if frame.get("op") == "reply" and frame.get("rid") == rid:
                        del self._unread[i]
                        return frame
                self.link.arrived.clear()
                await self.link.arrived.wait()

    def _read(self) -> None:
        self.gateway.flusher.flush()
        data = bytes(self.link.written)
        self.link.written.clear()
        for payload in self._decoder.feed(data):
            decode = msgspec.json.decode if payload[:1] == b"{" else msgspec.msgpack.decode
            self._unread.append(decode(payload))


class GatewayHarness:
    """A gateway in front of the embedded services (:func:`build_embedded`), on SQLite
    files in a directory of the test's."""

    def __init__(self, gateway: Gateway, services: Embedded) -> None:
        self.gateway = gateway
        self.services = services
        self.users: UserService = services.users
        self.rooms: RoomService = services.rooms
        self.messages: MessageService = services.messages

    @classmethod
    @asynccontextmanager
    async def open(
        cls, data_dir: Path, config: Config | None = None
    ) -> AsyncIterator[GatewayHarness]:
        """Open the services' databases under ``data_dir`` and the gateway in front of
        them; close the services on exit. ``config`` defaults to the defaults with
        :data:`CHEAP_AUTH`; its ``data_dir`` is replaced by ``data_dir``."""
        cfg = Config(auth=CHEAP_AUTH) if config is None else config
        cfg = msgspec.structs.replace(cfg, data_dir=str(data_dir))
        services = await build_embedded(cfg)
        try:
            gateway = Gateway(
                cfg,
                users=services.users,
                messages=services.messages,
                rooms=services.rooms,
                broadcasts=services.broadcasts,
                notifications=services.notifications,
                bus=services.bus,
                metrics=Metrics(),
            )
            yield cls(gateway, services)
        finally:
            await services.close()

    def peer(self, codec: Codec = Codec.JSON) -> Peer:
        """A new connection, in state CONNECTED."""
        return Peer(self.gateway, codec)
