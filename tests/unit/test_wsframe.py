"""WebSocket frames both ways and the opening handshake, checked against RFC 6455."""

from __future__ import annotations

import struct

import pytest

from imserver.protocol.wsframe import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WsParser,
    WsProtocolError,
    _unmask_py,
    parse_request_head,
    unmask,
    upgrade_key,
    upgrade_response,
    ws_close_frame,
    ws_frame,
)


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


# --- the client side: handshake and the incremental parser ----------------------------


def masked(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One client frame, masked with a fixed non-zero key (RFC 6455 §5.3)."""
    mask = b"\x37\xfa\x21\x3d"
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def test_rfc_6455_accept_key() -> None:
    """The example of RFC 6455 §1.3."""
    response = upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")


UPGRADE = (
    b"GET /ws?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: https://a.example\r\n\r\n"
)


def test_upgrade_request_is_recognised() -> None:
    head = parse_request_head(UPGRADE)
    assert head is not None
    assert (head.method, head.target) == ("GET", "/ws?x=1")
    assert head.headers["origin"] == "https://a.example"
    assert upgrade_key(head) == "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"GET ", b"POST "),
        (b"HTTP/1.1\r\nHost", b"HTTP/1.0\r\nHost"),
        (b"Upgrade: WebSocket", b"Upgrade: h2c"),
        (b"keep-alive, Upgrade", b"keep-alive"),
        (b"Version: 13", b"Version: 8"),
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="),  # 5 bytes, not 16
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"not base64!"),
    ],
)
def test_invalid_upgrades_are_not_taken(old: bytes, new: bytes) -> None:
    head = parse_request_head(UPGRADE.replace(old, new))
    assert head is not None
    assert upgrade_key(head) is None


@pytest.mark.parametrize("head", [b"GET /ws\r\n\r\n", b"GET /ws HTTP/1.1\r\nNoColon\r\n\r\n"])
def test_malformed_request_heads(head: bytes) -> None:
    assert parse_request_head(head) is None


def test_unmask_matches_the_pure_python_xor() -> None:
    mask = b"\x01\x80\xff\x10"
    for n in (0, 1, 3, 4, 5, 127, 4096):
        data = bytes(range(256)) * (n // 256 + 1)
        expect = bytes(b ^ mask[i % 4] for i, b in enumerate(data[:n]))
        pure = bytearray(data[:n])
        _unmask_py(mask, pure)
        assert unmask(data[:n], mask) == bytes(pure) == expect


STREAM = [
    (masked(b'{"op":"ping"}'), [(OP_TEXT, b'{"op":"ping"}')]),
    (masked(b"\x81\xa2op\xa4ping", OP_BINARY), [(OP_BINARY, b"\x81\xa2op\xa4ping")]),
    (masked(b"x" * 300), [(OP_TEXT, b"x" * 300)]),
    (masked(b"y" * 70_000), [(OP_TEXT, b"y" * 70_000)]),
    (masked(b"ab", fin=False) + masked(b"hi", OP_PING), [(OP_PING, b"hi")]),
    (masked(b"cd", OP_CONTINUATION, fin=False), []),
    (masked(b"ef", OP_CONTINUATION), [(OP_TEXT, b"abcdef")]),
    (
        masked(b"", OP_PONG) + masked(b"\x03\xe8", OP_CLOSE),
        [(OP_PONG, b""), (OP_CLOSE, b"\x03\xe8")],
    ),
]


def test_any_split_of_the_stream_gives_the_same_frames() -> None:
    data = b"".join(frames for frames, _ in STREAM)
    expect = [f for _, fs in STREAM for f in fs]
    whole = WsParser(100_000)
    assert whole.feed(data) == expect
    for step in (1, 2, 3, 7, 1000):
        parser = WsParser(100_000)
        got: list[tuple[int, bytes]] = []
        for i in range(0, len(data), step):
            got += parser.feed(data[i : i + step])
        assert got == expect, step


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (masked(b"x")[:1] + bytes([0x01]) + b"x", "must be masked"),
        (masked(b"x", rsv=0x40), "reserved bits"),
        (masked(b"x", 0x3), "unknown opcode"),
        (masked(b"x", OP_CONTINUATION), "continuation without"),
        (masked(b"a", fin=False) + masked(b"b"), "expected a continuation"),
        (masked(b"p" * 126, OP_PING), "bad control frame"),
        (masked(b"", OP_CLOSE, fin=False), "bad control frame"),
    ],
)
def test_protocol_violations_close_with_1002(frame: bytes, message: str) -> None:
    parser = WsParser(1000)
    with pytest.raises(WsProtocolError) as info:
        parser.feed(masked(b"before") + frame)
    assert info.value.code == CLOSE_PROTOCOL_ERROR
    assert message in info.value.message
    assert info.value.frames == [(OP_TEXT, b"before")]


def test_a_message_over_the_limit_is_refused_from_its_header() -> None:
    parser = WsParser(1000)
    assert parser.feed(masked(b"z" * 1000)) == [(OP_TEXT, b"z" * 1000)]
    header = masked(b"z" * 70_000)[:14]  # the payload never arrives
    with pytest.raises(WsProtocolError) as info:
        parser.feed(header)
    assert info.value.code == CLOSE_TOO_BIG


def test_fragments_count_toward_the_limit_together() -> None:
    parser = WsParser(1000)
    assert parser.feed(masked(b"a" * 600, fin=False)) == []
    with pytest.raises(WsProtocolError) as info:
        parser.feed(masked(b"b" * 401, OP_CONTINUATION)[:8])
    assert info.value.code == CLOSE_TOO_BIG


# --- close frames (§5.5.1, §7.4) --------------------------------------------------------

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CLOSE_CODES += [3000, 3001, 3999, 4000, 4998, 4999]
INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999]
INVALID_CLOSE_CODES += [5000, 5001, 65535]


def close(code: int, reason: bytes = b"") -> bytes:
    return masked(struct.pack("!H", code) + reason, OP_CLOSE)


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_a_close_frame_with_a_valid_code_is_delivered(code: int) -> None:
    parser = WsParser(1000)
    payload = struct.pack("!H", code) + b"bye"
    assert parser.feed(masked(b"before") + close(code, b"bye")) == [
        (OP_TEXT, b"before"),
        (OP_CLOSE, payload),
    ]


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_a_close_frame_with_an_invalid_code_is_a_protocol_error(code: int) -> None:
    parser = WsParser(1000)
    with pytest.raises(WsProtocolError) as info:
        parser.feed(masked(b"before") + close(code))
    assert info.value.code == CLOSE_PROTOCOL_ERROR
    assert f"invalid close code {code}" in info.value.message
    assert info.value.frames == [(OP_TEXT, b"before")]


def test_every_close_code_from_0_to_65535() -> None:
    """The rule as RFC 6455 §7.4 and the IANA registry state it, over the whole range."""
    for code in range(65536):
        valid = 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
        parser = WsParser(1000)
        if valid:
            assert parser.feed(close(code)) == [(OP_CLOSE, struct.pack("!H", code))], code
        else:
            with pytest.raises(WsProtocolError) as info:
                parser.feed(close(code))
            assert info.value.code == CLOSE_PROTOCOL_ERROR, code


def test_an_empty_close_frame_is_delivered() -> None:
    """No status code at all is allowed (it reads as 1005 to the application)."""
    assert WsParser(1000).feed(masked(b"", OP_CLOSE)) == [(OP_CLOSE, b"")]


def test_a_one_byte_close_payload_is_a_protocol_error() -> None:
    parser = WsParser(1000)
    with pytest.raises(WsProtocolError) as info:
        parser.feed(masked(b"before") + masked(b"\x03", OP_CLOSE))
    assert info.value.code == CLOSE_PROTOCOL_ERROR
    assert info.value.frames == [(OP_TEXT, b"before")]


@pytest.mark.parametrize(
    "reason",
    [
        b"going away",
        "au revoir, à bientôt 👋".encode(),
        b"x" * 123,  # the longest reason a control frame can carry
    ],
)
def test_a_close_reason_in_utf8_is_delivered(reason: bytes) -> None:
    frames = WsParser(1000).feed(close(1001, reason))
    assert frames == [(OP_CLOSE, struct.pack("!H", 1001) + reason)]


@pytest.mark.parametrize(
    "reason",
    [
        b"\xff",  # never in UTF-8
        b"caf\xe9",  # latin-1
        b"\xc3",  # a truncated sequence
        b"\xc0\xaf",  # an overlong "/"
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"ok\x80",
    ],
)
def test_a_close_reason_that_is_not_utf8_closes_with_1007(reason: bytes) -> None:
    parser = WsParser(1000)
    with pytest.raises(WsProtocolError) as info:
        parser.feed(masked(b"before") + close(1000, reason))
    assert info.value.code == CLOSE_INVALID_DATA
    assert info.value.frames == [(OP_TEXT, b"before")]


def test_a_bad_close_frame_split_across_feeds() -> None:
    """The check runs on the whole frame, however its bytes arrive."""
    data = close(1004, b"reserved")
    parser = WsParser(1000)
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) == []
    with pytest.raises(WsProtocolError) as info:
        parser.feed(data[-1:])
    assert info.value.code == CLOSE_PROTOCOL_ERROR
