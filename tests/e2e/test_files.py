"""End-to-end tests of docs/protocol.md §6 "Files" against real ``imserver serve`` processes:
uploads and downloads over HTTP, the size limit and the quota, names, types,
thumbnails, decompression bombs, access control (non-members, kicked room members),
``Range``, content addressing, file/image messages and the clean-up of orphans.

Hostile input is sent the way an attacker would: raw sockets for lying
``Content-Length`` headers, chunked bodies without one, path-traversal and NUL names,
HTML declared as PNG, SVG, and a PNG that decompresses to 400 million pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import secrets
import struct
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from PIL import Image

from imserver.client import Client, ClientError, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerProcess

Frame = dict[str, Any]
FILE_FIELDS = {"id", "name", "size", "mime", "sha256", "conv", "url", "thumb_url"}
MIB = 1024 * 1024


# --- helpers --------------------------------------------------------------------------


async def upload(
    server: ServerProcess,
    client: Client,
    conv: str,
    data: bytes,
    name: str = "file.bin",
    *,
    content_type: str = "application/octet-stream",
) -> tuple[int, Frame]:
    """POST the bytes; ``(status, JSON body)``."""
    async with HttpClient(server.http_url, token=client.token) as http:
        status, _, raw = await http.post(
            "/api/v1/files",
            data,
            params={"conv": conv, "name": name},
            headers={"Content-Type": content_type},
        )
    body: Frame = json.loads(raw)
    return status, body


async def uploaded(
    server: ServerProcess, client: Client, conv: str, data: bytes, name: str = "file.bin", **kw: Any
) -> Frame:
    """Upload and require success; returns the file object."""
    status, body = await upload(server, client, conv, data, name, **kw)
    assert status == 200, body
    info: Frame = body["file"]
    assert set(info) == FILE_FIELDS, info
    return info


async def fetch(
    server: ServerProcess,
    client: Client | None,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    """GET ``path`` with the client's token (or none); ``(status, headers, body)``."""
    async with HttpClient(server.http_url) as http:
        return await http.get(
            path, token=client.token if client is not None else None, headers=headers
        )


def error_of(status: int, body: bytes | Frame, code: str, http_status: int) -> Frame:
    """Require the protocol's error envelope with ``code`` and HTTP status."""
    frame = json.loads(body) if isinstance(body, bytes) else body
    assert status == http_status, (status, frame)
    assert frame["error"]["code"] == code, frame
    assert frame["error"]["message"]
    err: Frame = frame["error"]
    return err


async def pair(user_factory: Any, server: ServerProcess) -> tuple[Client, Client, str]:
    a = await user_factory(server, "fa")
    b = await user_factory(server, "fb")
    return a, b, Client.direct_conv(a.user_id, b.user_id)


def image_bytes(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    color: Any = (200, 30, 30, 128) if mode == "RGBA" else (30, 120, 200)
    im = Image.new(mode, size, color)
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: ~50 MB of
    pixel data that zlib squeezes into a few tens of KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def files_on_disk(server: ServerProcess) -> dict[str, list[Path]]:
    """Every file under the server's blob and temporary directories."""
    root = server.data_dir / "files"
    return {
        part: sorted(p for p in (root / part).rglob("*") if p.is_file())
        for part in ("blobs", "tmp")
    }


async def raw_exchange(server: ServerProcess, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a hand-made request on a raw socket while reading what comes back."""
    reader, writer = await asyncio.open_connection(server.host, server.http_port)
    received = bytearray()

    async def read() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    task = asyncio.create_task(read())
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server may close while we still send: what it answered is what counts
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(asyncio.shield(task), 3)
    task.cancel()
    writer.close()
    return bytes(received)


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """Split the bytes of one or more HTTP/1.x responses into (status, body)."""
    out: list[tuple[int, bytes]] = []
    while raw.startswith(b"HTTP/"):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


# --- upload and download --------------------------------------------------------------


async def test_upload_then_both_members_download(shared_server: ServerProcess, user_factory: Any):
    a, b, conv = await pair(user_factory, shared_server)
    data = b"%PDF-1.4\n" + bytes(range(256)) * 100
    info = await uploaded(shared_server, a, conv, data, "report 2026.pdf")
    assert info["id"].startswith("f")
    assert info["name"] == "report 2026.pdf"
    assert info["size"] == len(data)
    assert info["mime"] == "application/pdf"
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["conv"] == conv
    assert info["url"] == f"/api/v1/files/{info['id']}"
    assert info["thumb_url"] is None
    for who in (a, b):
        status, headers, body = await fetch(shared_server, who, info["url"])
        assert status == 200
        assert body == data
        assert headers["Content-Type"] == "application/pdf"
        assert headers["Content-Length"] == str(len(data))
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Accept-Ranges"] == "bytes"
        disposition = headers["Content-Disposition"]
        assert disposition.startswith("attachment;")
        assert "filename*=UTF-8''report%202026.pdf" in disposition


async def test_empty_file_and_unicode_name(shared_server: ServerProcess, user_factory: Any):
    a, _, conv = await pair(user_factory, shared_server)
    info = await uploaded(shared_server, a, conv, b"", "résumé ✓.txt")
    assert info["size"] == 0
    assert info["name"] == "résumé ✓.txt"
    status, headers, body = await fetch(shared_server, a, info["url"])
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "0"
    quoted = urllib.parse.quote("résumé ✓.txt", safe="")
    assert f"filename*=UTF-8''{quoted}" in headers["Content-Disposition"]
    # The plain filename= fallback is ASCII only.
    assert headers["Content-Disposition"].isascii()


async def test_upload_refusals(shared_server: ServerProcess, user_factory: Any):
    a, b, conv = await pair(user_factory, shared_server)
    outsider = await user_factory(shared_server, "out")
    status, body = await upload(shared_server, outsider, conv, b"hello")
    error_of(status, body, "forbidden", 403)
    ghost_conv = Client.direct_conv(a.user_id, "uzzzzzzzzzzzz")
    status, body = await upload(shared_server, a, ghost_conv, b"hello")
    error_of(status, body, "not_found", 404)
    status, body = await upload(shared_server, a, "x:nonsense", b"hello")
    error_of(status, body, "bad_request", 400)
    async with HttpClient(shared_server.http_url, token=a.token) as http:
        status, _, raw = await http.post("/api/v1/files", b"hello", params={"name": "x"})
        assert error_of(status, raw, "bad_request", 400)["field"] == "conv"
    async with HttpClient(shared_server.http_url) as http:
        status, _, raw = await http.post("/api/v1/files", b"hello", params={"conv": conv})
        error_of(status, raw, "unauthorized", 401)
        status, _, raw = await http.post(
            "/api/v1/files",
            b"hello",
            params={"conv": conv},
            headers={"Authorization": "Bearer not-a-token"},
        )
        error_of(status, raw, "unauthorized", 401)
    # The refused uploads left nothing: the only file in the conversation is this one.
    info = await uploaded(shared_server, b, conv, b"hello")
    assert info["size"] == 5


# --- names and types --------------------------------------------------------------------


async def test_hostile_names_are_display_metadata_only(
    server_factory: Any, user_factory: Any
) -> None:
    server = server_factory()
    a, _, conv = await pair(user_factory, server)
    cases = {
        "../../etc/passwd": "passwd",
        "..\\..\\windows\\system32\\evil.dll": "evil.dll",
        "a\x00b.txt": "ab.txt",
        "/": "file",
        "..": "file",
        "": "file",
        "line\r\nbreak\x1b[31m.txt": "linebreak[31m.txt",
        "invoice\u202etxt.exe": "invoicetxt.exe",
        "x" * 300 + ".png": "x" * 196 + ".png",
    }
    for i, (raw, shown) in enumerate(cases.items()):
        info = await uploaded(server, a, conv, f"content {i}".encode(), raw)
        assert info["name"] == shown, raw
        status, headers, _ = await fetch(server, a, info["url"])
        assert status == 200
        disposition = headers["Content-Disposition"]
        assert disposition.isascii() and "\r" not in disposition and "\n" not in disposition
        assert f"filename*=UTF-8''{urllib.parse.quote(shown, safe='')}" in disposition
    # Nothing named after a client's file name exists anywhere in the data directory.
    names = {p.name for p in server.data_dir.rglob("*")}
    assert not names & {"passwd", "evil.dll", "ab.txt", "etc", "windows"}
    assert not Path("/etc/passwd.part").exists()
    blobs = files_on_disk(server)["blobs"]
    assert len(blobs) == len(cases)
    assert all(len(p.name) == 64 and set(p.name) <= set("0123456789abcdef") for p in blobs)


async def test_html_declared_as_png_is_not_trusted(shared_server: ServerProcess, user_factory: Any):
    a, b, conv = await pair(user_factory, shared_server)
    page = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
    info = await uploaded(shared_server, a, conv, page, "cat.png", content_type="image/png")
    assert info["mime"] == "text/html"
    assert info["thumb_url"] is None
    status, headers, body = await fetch(shared_server, b, info["url"])
    assert status == 200 and body == page
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    status, _, raw = await fetch(shared_server, b, info["thumb_url"] or info["url"] + "/thumb")
    error_of(status, raw, "not_found", 404)


async def test_svg_is_an_attachment_without_thumbnail(
    shared_server: ServerProcess, user_factory: Any
):
    a, _, conv = await pair(user_factory, shared_server)
    svg = (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b"<script>alert(1)</script><rect width='10' height='10'/></svg>"
    )
    info = await uploaded(shared_server, a, conv, svg, "logo.svg", content_type="image/svg+xml")
    assert info["mime"] == "image/svg+xml"
    assert info["thumb_url"] is None
    status, headers, _ = await fetch(shared_server, a, info["url"])
    assert status == 200
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, raw = await fetch(shared_server, a, info["url"] + "/thumb")
    error_of(status, raw, "not_found", 404)


async def test_types_come_from_magic_bytes(shared_server: ServerProcess, user_factory: Any):
    a, _, conv = await pair(user_factory, shared_server)
    cases = [
        (b"PK\x03\x04" + b"\x00" * 40, "text/plain", "application/zip"),
        (b"just some text\n", "application/pdf", "text/plain"),
        (bytes(range(256)), "text/plain", "application/octet-stream"),
        (image_bytes("PNG", (4, 4)), "text/plain", "image/png"),
    ]
    for data, declared, expected in cases:
        info = await uploaded(shared_server, a, conv, data, content_type=declared)
        assert info["mime"] == expected, (data[:8], declared)


# --- thumbnails and bombs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "size", "mime", "thumb_mime"),
    [
        ("JPEG", "RGB", (1600, 900), "image/jpeg", "image/jpeg"),
        ("PNG", "RGBA", (500, 1000), "image/png", "image/png"),
        ("PNG", "RGB", (200, 100), "image/png", "image/jpeg"),
        ("GIF", "P", (640, 480), "image/gif", "image/jpeg"),
        ("WEBP", "RGB", (1000, 1000), "image/webp", "image/jpeg"),
    ],
)
async def test_thumbnails_of_real_images(
    shared_server: ServerProcess,
    user_factory: Any,
    fmt: str,
    mode: str,
    size: tuple[int, int],
    mime: str,
    thumb_mime: str,
) -> None:
    a, b, conv = await pair(user_factory, shared_server)
    info = await uploaded(shared_server, a, conv, image_bytes(fmt, size, mode), f"pic.{fmt}")
    assert info["mime"] == mime
    assert info["thumb_url"] == info["url"] + "/thumb"
    status, headers, body = await fetch(shared_server, b, info["thumb_url"])
    assert status == 200
    assert headers["Content-Type"] == thumb_mime
    assert headers["X-Content-Type-Options"] == "nosniff"
    thumb = Image.open(io.BytesIO(body))
    assert thumb.format == ("PNG" if thumb_mime == "image/png" else "JPEG")
    assert max(thumb.size) == min(320, max(size))
    ratio_in, ratio_out = size[0] / size[1], thumb.size[0] / thumb.size[1]
    assert abs(ratio_in - ratio_out) < 0.05


async def test_decompression_bomb_is_refused(server_factory: Any, user_factory: Any) -> None:
    server = server_factory()
    a, _, conv = await pair(user_factory, server)
    bomb = png_bomb()
    assert len(bomb) < 200_000
    started = time.monotonic()
    status, body = await upload(server, a, conv, bomb, "bomb.png", content_type="image/png")
    err = error_of(status, body, "bad_request", 400)
    assert "too large to process" in err["message"]
    assert time.monotonic() - started < 10
    assert files_on_disk(server) == {"blobs": [], "tmp": []}
    # The server is still fine.
    info = await uploaded(server, a, conv, image_bytes("PNG", (50, 50)), "ok.png")
    assert info["thumb_url"] is not None


async def test_corrupt_image_is_stored_without_thumbnail(
    shared_server: ServerProcess, user_factory: Any
):
    a, _, conv = await pair(user_factory, shared_server)
    broken = image_bytes("PNG", (100, 100))[:60]
    info = await uploaded(shared_server, a, conv, broken, "broken.png")
    assert info["mime"] == "image/png"
    assert info["thumb_url"] is None


# --- size limit and quota -----------------------------------------------------------------


LIMITED = {"files": {"max_size": MIB, "quota_per_user": 3 * MIB}}


async def test_size_limit_is_enforced_on_the_bytes(server_factory: Any, user_factory: Any):
    server = server_factory(LIMITED)
    a, _, conv = await pair(user_factory, server)
    path = f"/api/v1/files?conv={urllib.parse.quote(conv)}&name=big.bin"

    # Exactly the limit passes.
    await uploaded(server, a, conv, b"\x01" * MIB)
    # One byte more with an honest Content-Length: refused before the body is read.
    status, body = await upload(server, a, conv, b"\x02" * (MIB + 1))
    error_of(status, body, "too_large", 413)

    # Chunked, no Content-Length at all: refused while streaming.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"\x03" * 65536

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + path,
            data=chunks(),
            headers={"Authorization": f"Bearer {a.token}"},
        ) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        error_of(resp.status, await resp.read(), "too_large", 413)

    # A small Content-Length in front of a body far over the limit: HTTP framing makes
    # the body exactly the declared 100 bytes (at most a small, legitimate file); the
    # bytes after it are not a body at all but a malformed next request, refused as
    # such (aiohttp may answer that 400 before the first request's handler is done).
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a.token}\r\n"
        f"Content-Length: 100\r\n\r\n"
    ).encode()
    # (The server may reset the connection while bytes are still in flight, losing its
    # answers: what must hold is that any answer is one of these, and the disk check.)
    raw = await raw_exchange(server, head, [b"\x04" * 65536] * 48)
    for status, body in responses(raw):
        assert status in (200, 400), (status, body[:200])
        if status == 200:
            assert json.loads(body)["file"]["size"] == 100

    # Content-Length and chunked together (request smuggling): refused outright.
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a.token}\r\n"
        f"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answers = responses(await raw_exchange(server, head, [b"10\r\n" + b"\x05" * 16 + b"\r\n"]))
    assert [status for status, _ in answers] == [400]

    # Nothing over the limit, and no partial upload, was left anywhere.
    on_disk = files_on_disk(server)
    assert on_disk["tmp"] == []
    sizes = sorted(p.stat().st_size for p in on_disk["blobs"])
    assert sizes in ([MIB], [100, MIB]), sizes
    big = [p for p in server.data_dir.rglob("*") if p.is_file() and p.stat().st_size > MIB]
    assert [p.suffix for p in big] == [".db"] * len(big)


async def test_quota_per_user(server_factory: Any, user_factory: Any) -> None:
    server = server_factory(LIMITED)
    a, b, conv = await pair(user_factory, server)
    for i in range(3):
        await uploaded(server, a, conv, bytes([i]) * MIB)
    # Declared: refused up front with field "quota".
    status, body = await upload(server, a, conv, b"\x09" * 10)
    err = error_of(status, body, "too_large", 413)
    assert err["field"] == "quota"

    # Not declared (chunked): refused while streaming, same answer.
    async def chunks() -> AsyncIterator[bytes]:
        yield b"\x0a" * 10

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + "/api/v1/files",
            params={"conv": conv},
            data=chunks(),
            headers={"Authorization": f"Bearer {a.token}"},
        ) as resp,
    ):
        assert error_of(resp.status, await resp.read(), "too_large", 413)["field"] == "quota"
    # Identical content counts for every upload (quota is per upload, not per blob).
    status, body = await upload(server, a, conv, b"\x00" * MIB)
    assert error_of(status, body, "too_large", 413)["field"] == "quota"
    # Another user has a quota of their own.
    await uploaded(server, b, conv, b"\x00" * MIB)
    assert files_on_disk(server)["tmp"] == []


# --- access control -----------------------------------------------------------------------


async def test_download_access(shared_server: ServerProcess, user_factory: Any) -> None:
    a, _b, conv = await pair(user_factory, shared_server)
    outsider = await user_factory(shared_server, "guess")
    info = await uploaded(shared_server, a, conv, image_bytes("PNG", (40, 40)), "secret.png")
    for path in (info["url"], info["thumb_url"]):
        status, _, raw = await fetch(shared_server, outsider, path)
        error_of(status, raw, "forbidden", 403)
        status, _, raw = await fetch(shared_server, None, path)
        error_of(status, raw, "unauthorized", 401)
    for path in ("/api/v1/files/fnosuchfile", "/api/v1/files/fnosuchfile/thumb"):
        status, _, raw = await fetch(shared_server, a, path)
        error_of(status, raw, "not_found", 404)
        status, _, raw = await fetch(shared_server, outsider, path)
        error_of(status, raw, "not_found", 404)
    status, _, raw = await fetch(shared_server, a, "/api/v1/files/..%2F..%2Fuser.db")
    error_of(status, raw, "not_found", 404)


async def test_kicked_and_departed_room_members_lose_access(
    shared_server: ServerProcess, user_factory: Any
):
    owner = await user_factory(shared_server, "own")
    kicked = await user_factory(shared_server, "kick")
    leaver = await user_factory(shared_server, "leave")
    data = await owner.request(
        "room.create", name="files", members=[kicked.user_id, leaver.user_id]
    )
    room = data["room"]
    info = await uploaded(shared_server, kicked, room["conv"], b"shared notes", "notes.txt")
    for who in (owner, kicked, leaver):
        status, _, body = await fetch(shared_server, who, info["url"])
        assert (status, body) == (200, b"shared notes")

    await owner.request("room.kick", room=room["id"], user=kicked.user_id)
    await leaver.request("room.leave", room=room["id"])
    for who in (kicked, leaver):
        status, _, raw = await fetch(shared_server, who, info["url"])
        error_of(status, raw, "forbidden", 403)
        status, body = await upload(shared_server, who, room["conv"], b"more")
        error_of(status, body, "forbidden", 403)
    status, _, body = await fetch(shared_server, owner, info["url"])
    assert (status, body) == (200, b"shared notes")


# --- Range ---------------------------------------------------------------------------------


async def test_range_requests(shared_server: ServerProcess, user_factory: Any) -> None:
    a, _, conv = await pair(user_factory, shared_server)
    data = bytes(range(256)) * 1000
    info = await uploaded(shared_server, a, conv, data)
    size = len(data)
    url = info["url"]
    cases = [
        ("bytes=0-9", 0, 9),
        ("bytes=100-", 100, size - 1),
        ("bytes=-5", size - 5, size - 1),
        ("bytes=5-5", 5, 5),
        (f"bytes=10-{size * 2}", 10, size - 1),
        (f"bytes=-{size * 2}", 0, size - 1),
    ]
    for header, start, end in cases:
        status, headers, body = await fetch(shared_server, a, url, {"Range": header})
        assert status == 206, header
        assert headers["Content-Range"] == f"bytes {start}-{end}/{size}", header
        assert headers["Content-Length"] == str(end - start + 1)
        assert body == data[start : end + 1], header
        assert headers["Content-Disposition"].startswith("attachment;")
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        status, headers, raw = await fetch(shared_server, a, url, {"Range": header})
        error_of(status, raw, "bad_request", 416)
        assert headers["Content-Range"] == f"bytes */{size}"
    # Ignored (RFC 9110 allows it): several ranges, other units, nonsense, stale If-Range.
    for extra in (
        {"Range": "bytes=0-1,5-6"},
        {"Range": "items=0-1"},
        {"Range": "bytes=9-1"},
        {"Range": "bytes=abc"},
        {"Range": "bytes=0-9", "If-Range": '"stale"'},
    ):
        status, headers, body = await fetch(shared_server, a, url, extra)
        assert (status, len(body)) == (200, size), extra
    status, headers, body = await fetch(
        shared_server, a, url, {"Range": "bytes=0-9", "If-Range": f'"{info["sha256"]}"'}
    )
    assert (status, body) == (206, data[:10])


# --- content addressing --------------------------------------------------------------------


async def test_identical_content_is_stored_once(server_factory: Any, user_factory: Any):
    server = server_factory()
    a, b, conv = await pair(user_factory, server)
    c = await user_factory(server, "fc")
    other_conv = Client.direct_conv(a.user_id, c.user_id)
    data = image_bytes("JPEG", (800, 600))
    first = await uploaded(server, a, conv, data, "one.jpg")
    second = await uploaded(server, b, conv, data, "two.jpg")
    third = await uploaded(server, a, other_conv, data, "three.jpg")
    assert len({first["id"], second["id"], third["id"]}) == 3
    assert first["sha256"] == second["sha256"] == third["sha256"]
    assert third["thumb_url"] is not None
    on_disk = files_on_disk(server)
    assert [p.name for p in on_disk["blobs"]] == [first["sha256"], first["sha256"] + ".thumb"]
    assert on_disk["tmp"] == []
    # Each record keeps its own name and conversation (and so its own ACL).
    status, headers, _ = await fetch(server, c, third["url"])
    assert status == 200 and "three.jpg" in headers["Content-Disposition"]
    status, _, raw = await fetch(server, c, first["url"])
    error_of(status, raw, "forbidden", 403)


# --- file and image messages ---------------------------------------------------------------


async def test_file_messages_carry_the_file(shared_server: ServerProcess, user_factory: Any):
    a, b, conv = await pair(user_factory, shared_server)
    c = await user_factory(shared_server, "fc")
    other_conv = Client.direct_conv(a.user_id, c.user_id)
    pic = await uploaded(shared_server, a, conv, image_bytes("PNG", (640, 480)), "cat.png")
    doc = await uploaded(shared_server, a, conv, b"%PDF-1.7 minimal", "doc.pdf")
    elsewhere = await uploaded(shared_server, a, other_conv, b"other", "other.txt")

    await a.send_message(conv, "look", type="image", meta={"file": pic["id"]})
    msg = await b.next_event("msg")
    assert msg["type"] == "image"
    assert msg["meta"] == {
        "file": pic["id"],
        "name": "cat.png",
        "size": pic["size"],
        "mime": "image/png",
        "thumb_url": pic["thumb_url"],
    }
    await a.send_message(conv, "", type="file", meta={"file": doc["id"]})
    msg = await b.next_event("msg")
    assert msg["meta"]["name"] == "doc.pdf"
    assert msg["meta"]["mime"] == "application/pdf"
    assert msg["meta"]["thumb_url"] is None
    history = await b.history(conv)
    assert [m["meta"]["file"] for m in history["messages"]] == [pic["id"], doc["id"]]

    for meta in ({"file": elsewhere["id"]}, {"file": "fnosuchfile"}, {}, None):
        with pytest.raises(ClientError) as info:
            await a.send_message(conv, "x", type="file", meta=meta)
        assert (info.value.code, info.value.field) == ("bad_request", "meta"), meta


# --- clean-up ------------------------------------------------------------------------------


async def test_cleanup_deletes_unreferenced_uploads(server_factory: Any, user_factory: Any):
    server = server_factory({"files": {"orphan_grace": 3.0, "cleanup_interval": 0.3}})
    a, b, conv = await pair(user_factory, server)
    c = await user_factory(server, "fc")
    other_conv = Client.direct_conv(a.user_id, c.user_id)
    kept = await uploaded(server, a, conv, b"kept: a message names me", "kept.txt")
    orphan = await uploaded(server, a, conv, b"orphan: nobody names me", "orphan.txt")
    shared = image_bytes("PNG", (64, 64))
    shared_kept = await uploaded(server, a, conv, shared, "shared-kept.png")
    shared_orphan = await uploaded(server, a, other_conv, shared, "shared-orphan.png")
    await a.send_message(conv, "", type="file", meta={"file": kept["id"]})
    await a.send_message(conv, "", type="image", meta={"file": shared_kept["id"]})

    blobs = server.data_dir / "files" / "blobs"
    orphan_blob = blobs / orphan["sha256"][:2] / orphan["sha256"]
    shared_blob = blobs / shared_kept["sha256"][:2] / shared_kept["sha256"]
    assert orphan_blob.is_file() and shared_blob.is_file()

    # Both orphans were uploaded last (the later one decides); wait for the clean-up.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        first, _, _ = await fetch(server, a, orphan["url"])
        second, _, _ = await fetch(server, c, shared_orphan["url"])
        if first == second == 404:
            break
        await asyncio.sleep(0.2)
    status, _, raw = await fetch(server, a, orphan["url"])
    error_of(status, raw, "not_found", 404)
    status, _, raw = await fetch(server, c, shared_orphan["url"])
    error_of(status, raw, "not_found", 404)
    assert not orphan_blob.exists()
    # The blob shared with a record that is still referenced stays, thumbnail too.
    assert shared_blob.is_file()
    for who, info in ((b, kept), (b, shared_kept)):
        status, _, _ = await fetch(server, who, info["url"])
        assert status == 200
    status, _, _ = await fetch(server, b, shared_kept["thumb_url"])
    assert status == 200
    # A send naming a deleted file is refused like any unknown file.
    with pytest.raises(ClientError) as info:
        await a.send_message(conv, "", type="file", meta={"file": orphan["id"]})
    assert info.value.code == "bad_request"


# --- the API description ---------------------------------------------------------------------


async def test_file_routes_are_in_openapi(shared_server: ServerProcess) -> None:
    status, _, raw = await fetch(shared_server, None, "/api/v1/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    paths = doc["paths"]
    upload_op = paths["/api/v1/files"]["post"]
    assert {p["name"] for p in upload_op["parameters"]} >= {"conv", "name"}
    assert "application/octet-stream" in upload_op["requestBody"]["content"]
    assert {"200", "400", "401", "403", "404", "413"} <= set(upload_op["responses"])
    download = paths["/api/v1/files/{id}"]["get"]
    assert {"200", "206", "404", "416"} <= set(download["responses"])
    assert "/api/v1/files/{id}/thumb" in paths
    schema_name = upload_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    upload_schema = doc["components"]["schemas"][schema_name.rsplit("/", 1)[-1]]
    assert "file" in upload_schema["properties"]


# --- the S3 backend ----------------------------------------------------------------------------


async def test_s3_backend_end_to_end(
    server_factory: Any, user_factory: Any, s3_endpoint: str
) -> None:
    import boto3

    bucket = f"imserver-{secrets.token_hex(5)}"
    server = server_factory(
        {
            "files": {
                "backend": "s3",
                "s3_endpoint": s3_endpoint,
                "s3_bucket": bucket,
                "s3_access_key": "testing",
                "s3_secret_key": "testing",
                "s3_prefix": "blobs/",
            }
        }
    )
    a, b, conv = await pair(user_factory, server)
    data = image_bytes("JPEG", (1024, 768))
    first = await uploaded(server, a, conv, data, "photo.jpg")
    second = await uploaded(server, b, conv, data, "again.jpg")
    assert first["sha256"] == second["sha256"]
    status, _, body = await fetch(server, b, first["url"])
    assert (status, body) == (200, data)
    status, headers, body = await fetch(server, b, first["url"], {"Range": "bytes=100-199"})
    assert (status, body) == (206, data[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    status, headers, thumb = await fetch(server, a, first["thumb_url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb)).size) == 320
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    sha = first["sha256"]
    assert keys == [f"blobs/{sha[:2]}/{sha}", f"blobs/{sha[:2]}/{sha}.thumb"]
    assert not (server.data_dir / "files" / "blobs").exists()
    assert files_on_disk(server)["tmp"] == []
