"""The TCP listener: 4-byte length-prefixed frames (PROTOCOL §1).

A declared length over ``max_frame`` is refused with ``too_large`` and closes the
connection, because the stream cannot be resynchronised; nothing of that frame is
buffered. Other bad frames leave the connection open.
"""

from __future__ import annotations

import asyncio
import logging

from imserver.core.session import Session
from imserver.protocol.codec import Codec, detect_codec
from imserver.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from imserver.services.gateway.service import Gateway

logger = logging.getLogger(__name__)

READ_SIZE = 256 * 1024


class TcpLink:
    """A session's TCP transport."""

    kind = "tcp"
    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return encode_frame(payload)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


async def serve_tcp(gateway: Gateway, host: str, port: int) -> asyncio.Server:
    """Start the TCP listener."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(gateway, TcpLink(writer.transport))
        decoder = FrameDecoder(gateway.config.limits.max_frame)
        gateway.opened(session)
        try:
            while not session.closing:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                too_large: FrameTooLarge | None = None
                try:
                    frames = decoder.feed(data)
                except FrameTooLarge as exc:
                    # The frames before the oversized header are valid and are handled.
                    frames, too_large = exc.frames, exc
                for payload in frames:
                    await session.receive(payload, detect_codec(payload))
                    if session.closing:
                        break
                if too_large is not None:
                    session.send_error(None, too_large)
                    session.close("frame_too_large")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await gateway.closed(session)
            if not session.closing:
                writer.close()

    return await asyncio.start_server(handle, host, port, limit=READ_SIZE)
