"""The WebSocket transport byte for byte (RFC 6455, docs/protocol.md §1.1): the opening
handshake on the shared HTTP port, fragmentation, control frames, the close handshake
and the close codes of protocol violations — with a raw socket, so that nothing a
client library does for us hides what the server sends."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerFactory, ServerProcess

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def masked(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, mask: bool = True) -> bytes:
    key = os.urandom(4) if mask else b""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    return head + key + body


def upgrade_request(path: str = "/ws", **headers: str) -> bytes:
    fields = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items() if v)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: ServerProcess, first: bytes = b"") -> tuple[RawWebSocket, bytes]:
        """Connect and upgrade (``first`` goes in the same write as the request);
        returns the connection and the response head."""
        reader, writer = await asyncio.open_connection(server.host, server.http_port)
        writer.write(upgrade_request() + first)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer), head

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def recv(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames are never masked"
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert b0 & 0x80, "the server does not fragment"
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def recv_json(self) -> Any:
        opcode, payload = await self.recv()
        assert opcode == OP_TEXT
        return msgspec.json.decode(payload)

    async def expect_close(self, code: int, *, answer: bool = True) -> None:
        """The server's close frame with ``code``, then the end of the stream (after
        the client's answering close frame if ``answer``)."""
        opcode, payload = await self.recv()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, code), payload
        if answer:
            self.send(masked(payload[:2], OP_CLOSE))
        async with asyncio.timeout(5):
            assert await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


async def hello(ws: RawWebSocket) -> None:
    ws.send(masked(b'{"op":"hello","rid":"h","v":1}'))
    reply = await ws.recv_json()
    assert reply["ok"] is True, reply


async def test_upgrade_answer_and_frames_sent_with_the_request(
    shared_server: ServerProcess,
) -> None:
    """Frames that arrive in the same packet as the upgrade request are not lost."""
    first = masked(b'{"op":"hello","rid":"h","v":1}') + masked(b'{"op":"ping","rid":"p"}')
    ws, head = await RawWebSocket.open(shared_server, first)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nsec-websocket-accept: " in head.lower()
    assert (await ws.recv_json())["rid"] == "h"
    assert await ws.recv_json() == {"op": "reply", "rid": "p", "ok": True, "data": {}}
    ws.close()


async def test_fragments_and_interleaved_control_frames(shared_server: ServerProcess) -> None:
    ws, _ = await RawWebSocket.open(shared_server)
    await hello(ws)
    ws.send(
        masked(b'{"op":"pi', fin=False),
        masked(b"are you there", OP_PING),
        masked(b'ng","r', OP_CONT, fin=False),
        masked(b"", OP_PONG),  # unsolicited pongs are ignored
        masked(b'id":"f"}', OP_CONT),
    )
    assert await ws.recv() == (OP_PONG, b"are you there")
    assert await ws.recv_json() == {"op": "reply", "rid": "f", "ok": True, "data": {}}
    ws.close()


async def test_client_close_is_echoed_then_the_socket_closes(shared_server: ServerProcess) -> None:
    ws, _ = await RawWebSocket.open(shared_server)
    await hello(ws)
    ws.send(masked(struct.pack("!H", 1001) + b"going away", OP_CLOSE))
    opcode, payload = await ws.recv()
    assert (opcode, payload) == (OP_CLOSE, struct.pack("!H", 1001))
    async with asyncio.timeout(5):
        assert await ws.reader.read() == b""  # no `closed`: the client closed, not us


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(b'{"op":"ping"}', mask=False), 1002),  # client frames must be masked
        (masked(b"x", 0x3), 1002),  # reserved opcode
        (masked(b"x", OP_CONT), 1002),  # continuation of nothing
        (masked(b"p" * 126, OP_PING), 1002),  # control frame too long
        (masked(b'{"op":"ping","x":"\xff"}'), 1007),  # text that is not UTF-8
    ],
)
async def test_protocol_violations_close_with_their_code(
    shared_server: ServerProcess, frame: bytes, code: int
) -> None:
    """No ``closed`` event (the connection cannot be trusted to frame one), the close
    frame with the code, then the end of the stream without waiting for the client's
    answer (RFC 6455 §7.1.7: the server fails the connection)."""
    ws, _ = await RawWebSocket.open(shared_server)
    await hello(ws)
    ws.send(masked(b'{"op":"ping","rid":"before"}'), frame)
    assert (await ws.recv_json())["rid"] == "before"
    await ws.expect_close(code, answer=False)
    ws.close()


def code(n: int) -> bytes:
    return struct.pack("!H", n)


CLOSE_FRAMES = [
    *((code(n), code(1002)) for n in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000)),
    *((code(n), code(1002)) for n in (2999, 5000, 65535)),
    (b"\x03", code(1002)),  # a one-byte payload: half a code
    (code(1000) + b"caf\xe9", code(1007)),  # a reason that is not UTF-8
    (code(1000) + b"\xed\xa0\x80", code(1007)),  # an encoded surrogate
    *((code(n), code(n)) for n in (1000, 1003, 1007, 1014, 3000, 4999)),
    (code(4000) + "à bientôt".encode(), code(4000)),
    (b"", b""),  # no code at all
]
"""A client's close payload and the server's answer: the code echoed when the frame is
valid, 1002 or 1007 when it is not (RFC 6455 §5.5.1, §7.4)."""


async def test_the_clients_close_frame_is_validated(server_factory: ServerFactory) -> None:
    """An invalid close frame is answered with the close code of the error, and the
    server then closes the connection without waiting for anything more: the client
    has sent its close frame already. The grace is long, so a server that waited for
    a second close frame would fail the read's timeout."""
    server = server_factory({"shutdown_grace": 60})
    for payload, expected in CLOSE_FRAMES:
        ws, _ = await RawWebSocket.open(server)
        await hello(ws)
        ws.send(masked(b'{"op":"ping","rid":"before"}'), masked(payload, OP_CLOSE))
        assert (await ws.recv_json())["rid"] == "before", payload
        assert await ws.recv() == (OP_CLOSE, expected), payload
        async with asyncio.timeout(5):
            assert await ws.reader.read() == b"", payload  # no `closed`, then the end
        ws.close()
    # The server goes on.
    ws, _ = await RawWebSocket.open(server)
    await hello(ws)
    ws.close()


async def test_server_close_waits_for_the_clients_close_frame(
    shared_server: ServerProcess,
) -> None:
    """After ``closed`` and its close frame the server keeps the socket open, discarding
    what still arrives, until the client's close frame."""
    ws, _ = await RawWebSocket.open(shared_server)
    await hello(ws)
    ws.send(*(masked(b"not json") for _ in range(32)))  # limits.bad_frames in a row
    for _ in range(32):
        assert (await ws.recv_json())["error"]["code"] == "bad_request"
    assert await ws.recv_json() == {"op": "closed", "reason": "bad_frames"}
    ws.send(masked(b'{"op":"ping","rid":"ignored"}'))
    await asyncio.sleep(0.2)
    assert not ws.reader.at_eof()
    await ws.expect_close(1000)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Upgrade": "", "Connection": ""}, 400, "bad_request"),  # a plain GET /ws
        ({"Sec-WebSocket-Version": "8"}, 400, "bad_request"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, "bad_request"),
    ],
)
async def test_requests_to_ws_that_are_not_valid_upgrades(
    shared_server: ServerProcess, headers: dict[str, str], status: int, code: str
) -> None:
    reader, writer = await asyncio.open_connection(shared_server.host, shared_server.http_port)
    writer.write(upgrade_request(**headers))
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith(f"HTTP/1.1 {status} "), head
        length = int(
            next(
                line for line in head.split("\r\n") if line.lower().startswith("content-length")
            ).split(":")[1]
        )
        body = msgspec.json.decode(await reader.readexactly(length))
    assert body["error"]["code"] == code
    # The connection is plain HTTP now and serves the next request.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_an_oversized_request_head_is_refused_and_the_server_goes_on(
    shared_server: ServerProcess,
) -> None:
    """A head past 16 KiB is not buffered further by the front door: aiohttp gets it
    and refuses it; the server keeps serving."""
    reader, writer = await asyncio.open_connection(shared_server.host, shared_server.http_port)
    writer.write(upgrade_request(X_Pad="a" * 40_000))
    async with asyncio.timeout(5):
        status = await reader.readuntil(b"\r\n")
    assert status.split()[1] in (b"400", b"431"), status
    writer.close()
    ws, head = await RawWebSocket.open(shared_server)
    assert head.startswith(b"HTTP/1.1 101 ")
    await hello(ws)
    ws.close()


async def test_a_connection_that_never_sends_a_request_head_is_dropped(
    server_factory: ServerFactory,
) -> None:
    """After ``hello_timeout``, like a connection that never says hello; a WebSocket
    whose upgrade completed in time is not affected."""
    server = server_factory({"limits": {"hello_timeout": 0.5}})
    ws, _ = await RawWebSocket.open(server)
    await hello(ws)
    reader, writer = await asyncio.open_connection(server.host, server.http_port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: local")  # and nothing more
    async with asyncio.timeout(20):
        assert await reader.read() == b""
    writer.close()
    ws.send(masked(b'{"op":"ping","rid":"alive"}'))  # opened before, greeted, still served
    assert (await ws.recv_json())["rid"] == "alive"
    ws.close()


async def test_upgrade_on_a_keep_alive_connection_after_http_requests(
    shared_server: ServerProcess,
) -> None:
    """Clients that pool connections (aiohttp's ClientSession, for one) may send the
    upgrade on a connection that already carried HTTP requests: it is served the same."""
    reader, writer = await asyncio.open_connection(shared_server.host, shared_server.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 200 "), head
        length = next(
            int(line.split(":")[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length")
        )
        await reader.readexactly(length)
        # The upgrade, with a frame in the same write.
        writer.write(upgrade_request() + masked(b'{"op":"hello","rid":"h","v":1}'))
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
    assert head.startswith("HTTP/1.1 101 "), head
    assert "transfer-encoding" not in head.lower()
    ws = RawWebSocket(reader, writer)
    assert (await ws.recv_json())["rid"] == "h"
    ws.send(masked(b"still there?", OP_PING), masked(b'{"op":"ping","rid":"p"}'))
    assert await ws.recv() == (OP_PONG, b"still there?")
    assert await ws.recv_json() == {"op": "reply", "rid": "p", "ok": True, "data": {}}
    ws.send(masked(b"not json"))
    assert (await ws.recv_json())["error"]["code"] == "bad_request"
    ws.send(masked(struct.pack("!H", 1000), OP_CLOSE))
    assert await ws.recv() == (OP_CLOSE, struct.pack("!H", 1000))
    async with asyncio.timeout(5):
        assert await reader.read() == b""


async def test_a_pooling_http_client_gets_its_websocket(shared_server: ServerProcess) -> None:
    """The same through aiohttp's client: an HTTP call, then ``ws_connect`` on the
    same session (which reuses the pooled connection), then a server-side close."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{shared_server.http_url}/healthz") as response:
            assert response.status == 200
        ws = await http.ws_connect(shared_server.ws_url)
        await ws.send_str('{"op":"hello","rid":"h","v":1}')
        assert msgspec.json.decode((await ws.receive(timeout=5)).data)["rid"] == "h"
        for _ in range(32):  # limits.bad_frames: the server closes with `closed`
            await ws.send_str("not json")
        events = []
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            events.append(msgspec.json.decode(msg.data))
        assert events[-1] == {"op": "closed", "reason": "bad_frames"}
        assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
