"""The TCP listener: 4-byte length-prefixed frames (docs/protocol.md §1).

A declared length over ``max_frame`` is refused with ``too_large`` and closes the
connection, because the stream cannot be resynchronised; nothing of that frame is
buffered. Other bad frames leave the connection open.

Each connection runs in a task that :class:`TcpConnections` keeps, so that shutdown
can wait (bounded) until every connection has finished, its end handled
(``handler.closed``, which in the distributed mode calls other services) before the
services close under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from imserver.network.handler import Connection, ConnectionHandler
from imserver.network.listener import Admission, Listener
from imserver.protocol.codec import Codec, detect_codec
from imserver.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame

logger = logging.getLogger(__name__)

READ_SIZE = 256 * 1024


class TcpLink:
    """A session's TCP transport."""

    kind = "tcp"
    __slots__ = ("ending", "transport")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self.ending = False

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return encode_frame(payload)

    def write(self, data: bytes) -> None:
        if not self.ending and not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self) -> None:
        """Flush what is queued, then half-close (FIN). The reader keeps draining the
        peer's input until it closes too (:func:`linger`): closing a socket with unread
        input makes the kernel send RST, which can destroy the last frames (``closed``
        among them) before the peer reads them."""
        if self.ending:
            return
        self.ending = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class TcpConnections:
    """The running TCP connections' tasks."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()

    async def wait_closed(self, within: float) -> None:
        """Wait (bounded) for every TCP connection's task to finish."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=within)


async def serve_tcp(
    handler: ConnectionHandler, host: str, port: int, backlog: int, admission: Admission
) -> tuple[Listener, TcpConnections]:
    """Start the TCP listener; its connections' tasks are in the second value."""
    connections = TcpConnections()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            connections.tasks.add(task)
        session = handler.open(TcpLink(writer.transport))
        try:
            try:
                await serve(session, reader)
            finally:
                await handler.closed(session)
            if session.closing:
                await linger(reader, handler.shutdown_grace)
        finally:
            writer.close()
            connections.tasks.discard(task)

    async def serve(session: Connection, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(handler.max_frame)
        try:
            while not session.closing:
                data = await reader.read(READ_SIZE)
                if not data or session.closing:
                    return
                too_large: FrameTooLarge | None = None
                try:
                    frames = decoder.feed(data)
                except FrameTooLarge as exc:
                    # The frames before the oversized header are valid and are handled.
                    frames, too_large = exc.frames, exc
                for payload in frames:
                    await session.receive(payload, detect_codec(payload))
                    if session.closing:
                        return
                if too_large is not None:
                    session.refuse(too_large)
                    session.close("frame_too_large")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    def connection() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=READ_SIZE), handle)

    listener = await Listener.start(host, port, backlog, connection, admission)
    return listener, connections


async def linger(reader: asyncio.StreamReader, within: float) -> None:
    """Read and discard until the peer closes its side or ``within`` seconds pass."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(within):
            while await reader.read(READ_SIZE):
                pass
