"""Server-to-client WebSocket frames, checked against RFC 6455 §5.2 and aiohttp's parser."""

from __future__ import annotations

import struct

import pytest

from imserver.protocol.wsframe import OP_BINARY, OP_TEXT, ws_close_frame, ws_frame


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_length_encodings(size: int, header: bytes) -> None:
    payload = b"x" * size
    frame = ws_frame(payload, OP_TEXT)
    assert frame == header + payload


def test_binary_opcode_and_close_frame() -> None:
    assert ws_frame(b"ab", OP_BINARY) == b"\x82\x02ab"
    assert ws_close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
