"""WebSocket (RFC 6455), sans-I/O: the opening handshake, the server's frames and an
incremental parser of the client's frames.

Server frames are never masked, so a frame is a 2-, 4- or 10-byte header followed by
the payload. Building the header here lets the hub frame an event once and write the
very same bytes to every WebSocket recipient.

Client frames are masked (§5.3). :class:`WsParser` takes the byte stream in any
pieces and gives complete messages (fragments joined) and control frames. A message
whose declared length would pass the limit is refused from its header, before any of
its payload is buffered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable
from typing import NamedTuple

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

PEER_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)
"""The codes below 3000 a peer may send (RFC 6455 §7.4.1 and the IANA registry, which
added 1012-1014). 1004 is reserved, 1005, 1006 and 1015 must never be sent, and
1016-2999 are kept for future revisions of the protocol."""

_FIN = 0x80
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


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


def close_code_valid(code: int) -> bool:
    """Whether a peer may put ``code`` in a close frame: one of
    :data:`PEER_CLOSE_CODES`, or 3000-4999 (registered libraries and frameworks,
    private use) (RFC 6455 §7.4.2)."""
    return code in PEER_CLOSE_CODES or 3000 <= code <= 4999


def ws_pong(payload: bytes) -> bytes:
    """The answer to a ping carrying ``payload``."""
    return ws_frame(payload, OP_PONG)


# --- the opening handshake (§4.2) ------------------------------------------------------


class RequestHead(NamedTuple):
    """An HTTP/1.1 request line and its headers (names in lower case; repeated headers
    joined with ``", "``)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]


def parse_request_head(head: bytes) -> RequestHead | None:
    """The request line and headers of ``head`` (up to and including the blank line);
    ``None`` if it is not a well-formed HTTP/1.x request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        fields.append((name, value.strip()))
    return RequestHead(parts[0], parts[1], parts[2], header_dict(fields))


def header_dict(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header fields by lower-case name, repeated ones joined with ``", "``."""
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def upgrade_key(head: RequestHead) -> str | None:
    """The ``Sec-WebSocket-Key`` of a valid WebSocket upgrade request, else ``None``."""
    h = head.headers
    if head.method != "GET" or head.version != "HTTP/1.1":
        return None
    if h.get("upgrade", "").lower() != "websocket":
        return None
    if "upgrade" not in (t.strip().lower() for t in h.get("connection", "").split(",")):
        return None
    if h.get("sec-websocket-version") != "13":
        return None
    key = h.get("sec-websocket-key", "")
    try:
        if len(binascii.a2b_base64(key, strict_mode=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value that answers ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def upgrade_headers(key: str) -> dict[str, str]:
    """The headers of the ``101 Switching Protocols`` answer to ``key``."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_key(key),
    }


def upgrade_response(key: str) -> bytes:
    """The ``101 Switching Protocols`` answer to an upgrade carrying ``key``."""
    fields = "".join(f"{name}: {value}\r\n" for name, value in upgrade_headers(key).items())
    return f"HTTP/1.1 101 Switching Protocols\r\n{fields}\r\n".encode()


# --- client frames ---------------------------------------------------------------------


class WsProtocolError(Exception):
    """The client broke the protocol; close with ``code``. ``frames`` are those
    completed before the offending one, to be handled first."""

    def __init__(self, code: int, message: str, frames: list[tuple[int, bytes]]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frames = frames


def _unmask_py(mask: bytes, data: bytearray) -> None:
    """XOR ``data`` in place with the repeated 4-byte ``mask`` (one big-integer XOR)."""
    n = len(data)
    if n:
        key = (mask * ((n + 3) >> 2))[:n]
        x = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        data[:] = x.to_bytes(n, "little")


try:  # aiohttp's compiled masking loop: five times faster than the big-integer XOR
    from aiohttp._websocket.helpers import websocket_mask as _unmask_in_place
except ImportError:  # pragma: no cover - an aiohttp without it
    _unmask_in_place = _unmask_py


def unmask(data: bytes | bytearray, mask: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``mask``."""
    buf = bytearray(data)
    _unmask_in_place(mask, buf)
    return bytes(buf)


class WsParser:
    """Client-to-server frames, fed in any pieces.

    :meth:`feed` returns ``(opcode, payload)`` pairs: whole data messages (``OP_TEXT``
    or ``OP_BINARY``, fragments joined) and control frames (``OP_CLOSE``, ``OP_PING``,
    ``OP_PONG``), in arrival order. It raises :class:`WsProtocolError` on an unmasked
    frame, reserved bits or opcodes, a bad fragment sequence, a bad control frame, a
    close frame with a one-byte payload or a code :func:`close_code_valid` refuses
    (code 1002), a close reason that is not UTF-8 (1007), and on a message over
    ``max_message`` bytes (1009) — the latter as soon as its header says so. A close
    frame it returns therefore carries nothing, or a valid code and a UTF-8 reason.
    """

    __slots__ = ("_buf", "_frag", "_frag_op", "_frag_size", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._frag: list[bytes] = []
        self._frag_op = 0
        self._frag_size = 0

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                opcode = b0 & 0x0F
                if b0 & 0x70:
                    raise self._error(CLOSE_PROTOCOL_ERROR, "reserved bits set", out)
                if not b1 & 0x80:
                    raise self._error(CLOSE_PROTOCOL_ERROR, "client frames must be masked", out)
                length = b1 & 0x7F
                if length < 126:
                    start = pos + 6
                elif length == 126:
                    if end - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    start = pos + 8
                else:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    start = pos + 14
                if opcode >= 0x8:
                    if not b0 & _FIN or length > 125:
                        raise self._error(CLOSE_PROTOCOL_ERROR, "bad control frame", out)
                elif (self._frag_size if opcode == OP_CONTINUATION else 0) + length > (
                    self.max_message
                ):
                    raise self._error(CLOSE_TOO_BIG, "message too big", out)
                if end < start + length:
                    break
                payload = buf[start : start + length]
                _unmask_in_place(bytes(buf[start - 4 : start]), payload)
                pos = start + length
                self._frame(b0 & _FIN, opcode, bytes(payload), out)
        finally:
            del buf[:pos]
        return out

    def _frame(self, fin: int, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._frag_op:
                raise self._error(CLOSE_PROTOCOL_ERROR, "expected a continuation frame", out)
            if fin:
                out.append((opcode, payload))
            else:
                self._frag_op = opcode
                self._frag = [payload]
                self._frag_size = len(payload)
        elif opcode == OP_CONTINUATION:
            if not self._frag_op:
                raise self._error(CLOSE_PROTOCOL_ERROR, "continuation without a message", out)
            self._frag.append(payload)
            self._frag_size += len(payload)
            if fin:
                out.append((self._frag_op, b"".join(self._frag)))
                self._frag_op = self._frag_size = 0
                self._frag = []
        elif opcode == OP_CLOSE:
            self._check_close(payload, out)
            out.append((opcode, payload))
        elif opcode in (OP_PING, OP_PONG):
            out.append((opcode, payload))
        else:
            raise self._error(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}", out)

    def _check_close(self, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        """Raise unless ``payload`` is empty or a valid code and a UTF-8 reason (§5.5.1)."""
        if not payload:
            return
        if len(payload) == 1:
            raise self._error(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload", out)
        code = (payload[0] << 8) | payload[1]
        if not close_code_valid(code):
            raise self._error(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}", out)
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise self._error(CLOSE_INVALID_DATA, "close reason is not UTF-8", out) from None

    def _error(self, code: int, message: str, out: list[tuple[int, bytes]]) -> WsProtocolError:
        return WsProtocolError(code, message, list(out))
