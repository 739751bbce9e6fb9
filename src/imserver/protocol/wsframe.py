"""Server-to-client WebSocket frame headers (RFC 6455 §5.2), sans-I/O.

Server frames are never masked, so a frame is a 2-, 4- or 10-byte header followed by
the payload. Building the header here lets the hub frame an event once and write the
very same bytes to every WebSocket recipient.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8

_FIN = 0x80


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """A complete unfragmented, unmasked frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        header = bytes((_FIN | opcode, n))
    elif n < 65536:
        header = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return header + payload


def ws_close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a status code and a (≤ 123 byte) reason."""
    body = struct.pack("!H", code) + reason.encode()[:123]
    return ws_frame(body, OP_CLOSE)
