"""TCP framing: a 4-byte unsigned big-endian length N, then N bytes of payload.

:class:`FrameDecoder` is incremental: bytes are fed as they arrive, in any split,
and complete payloads come out. A declared length above ``max_frame`` raises
:class:`FrameTooLarge` *before* any of the payload is buffered; after that the
stream cannot be resynchronised and the connection must be closed. Frames completed
earlier in the same :meth:`FrameDecoder.feed` call travel on the exception
(``FrameTooLarge.frames``), so the result never depends on how TCP split the bytes.
"""

from __future__ import annotations

import struct

from imserver.utils.errors import TooLarge

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class FrameTooLarge(TooLarge):
    """A TCP frame declared a length over the limit; the stream is unusable.

    ``frames`` holds the payloads that the failing :meth:`FrameDecoder.feed` call had
    completed before the oversized header: they were valid and the caller should handle
    them before closing, exactly as if they had arrived in an earlier read.
    """

    def __init__(self, message: str = "", *, frames: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.frames: list[bytes] = frames if frames is not None else []


class FrameDecoder:
    """Turn a TCP byte stream into frame payloads."""

    __slots__ = ("_buf", "_need", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being read, -1 while in the header

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every payload it completes (possibly none).

        Raises :class:`FrameTooLarge` when a header declares more than ``max_frame``; the
        payloads completed before that header are on the exception's ``frames``.
        """
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        need = self._need
        while True:
            if need < 0:
                if end - pos < HEADER_SIZE:
                    break
                (need,) = _HEADER.unpack_from(buf, pos)
                if need > self.max_frame:
                    del buf[:]
                    self._need = -1
                    raise FrameTooLarge(
                        f"frame of {need} bytes exceeds max_frame {self.max_frame}", frames=frames
                    )
                pos += HEADER_SIZE
            if end - pos < need:
                break
            frames.append(bytes(buf[pos : pos + need]))
            pos += need
            need = -1
        if pos:
            del buf[:pos]
        self._need = need
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (the partial frame's header included)."""
        # Once a header is parsed it is dropped from the buffer, but its bytes still belong
        # to the frame in progress.
        return len(self._buf) + (HEADER_SIZE if self._need >= 0 else 0)


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    return _HEADER.pack(len(payload)) + payload
