"""What the file service decides from bytes and names (MIME sniffing, display names,
thumbnails, decompression bombs) and what the HTTP edge derives for a download
(``Content-Disposition``, ``Range`` parsing)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from imserver.services.file.api import RangeNotSatisfiable
from imserver.services.file.content import (
    NAME_MAX,
    ImageTooLarge,
    make_thumbnail,
    max_image_pixels,
    sanitise_name,
    sniff_mime,
)
from imserver.services.gateway.http_api import content_disposition, parse_range
from imserver.utils.errors import BadRequest


def image(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- sniffing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (image("PNG", (2, 2)), "image/png"),
        (image("JPEG", (2, 2)), "image/jpeg"),
        (image("GIF", (2, 2), "P"), "image/gif"),
        (image("WEBP", (2, 2)), "image/webp"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "application/pdf"),
        (b"PK\x03\x04\x14\x00", "application/zip"),
        (b"PK\x05\x06" + b"\x00" * 18, "application/zip"),
        (b"\x1f\x8b\x08\x00", "application/gzip"),
        (b"hello\nworld\t!\r\n", "text/plain"),
        ("Grüße, 世界 ✓".encode(), "text/plain"),
        (b"\xef\xbb\xbfwith a BOM", "text/plain"),
        (b"", "text/plain"),
        (b"<!DOCTYPE html><p>x", "text/html"),
        (b"  \n<HTML>", "text/html"),
        (b"<script>alert(1)</script>", "text/html"),
        (b"<iframe src=x>", "text/html"),
        (b"<!-- comment --><b>x</b>", "text/html"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        (b'<?xml version="1.0"?><svg/>', "image/svg+xml"),
        (b"<!DOCTYPE svg PUBLIC><svg>", "image/svg+xml"),
        (b"<!-- made by x --><svg>", "image/svg+xml"),
        (b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml">', "text/html"),
        (b'<?xml version="1.0"?><feed/>', "application/xml"),
        (b"<abbr>not an html signature", "text/plain"),
        (b"\x00\x01\x02\x03", "application/octet-stream"),
        (b"text with a NUL\x00", "application/octet-stream"),
        (b"\xff\xfe<\x00h\x00t\x00m\x00l\x00>\x00", "application/octet-stream"),  # UTF-16
        (b"\xc3\x28 invalid utf-8", "application/octet-stream"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "application/octet-stream"),
    ],
)
def test_sniff(head: bytes, mime: str) -> None:
    assert sniff_mime(head) == mime


def test_a_character_cut_by_the_sniff_window_is_still_text() -> None:
    text = ("é" * 5000).encode()
    assert sniff_mime(text[:8191]) == "text/plain"


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("C:\\Users\\me\\evil.exe", "evil.exe"),
        ("dir/", "file"),
        ("a\x00b", "ab"),
        ("\x00", "file"),
        ("..", "file"),
        (".", "file"),
        (None, "file"),
        ("  spaced  .txt  ", "spaced  .txt"),
        ("tab\there", "tabhere"),
        ("bell\x07\x7f\x9b.txt", "bell.txt"),
        ("rlo\u202egnp.exe", "rlognp.exe"),
        ("line\u2028sep", "linesep"),
        (".bashrc", ".bashrc"),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC
        ("😀 family 👨\u200d👩\u200d👧.png", "😀 family 👨\u200d👩\u200d👧.png"),
    ],
)
def test_sanitise_name(raw: str | None, shown: str) -> None:
    assert sanitise_name(raw) == shown


def test_long_names_keep_their_extension() -> None:
    assert sanitise_name("a" * 500 + ".tar.gz") == "a" * (NAME_MAX - 3) + ".gz"
    assert sanitise_name("b" * 500) == "b" * NAME_MAX
    assert sanitise_name("c" * 300 + "." + "x" * 40) == ("c" * 300 + "." + "x" * 40)[:NAME_MAX]


@given(st.text(max_size=400))
def test_sanitised_names_are_never_paths(raw: str) -> None:
    name = sanitise_name(raw)
    assert 1 <= len(name) <= NAME_MAX
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..")
    assert all(ch >= " " and ch != "\x7f" for ch in name)


@given(st.text(max_size=300))
def test_content_disposition_is_a_safe_header(name: str) -> None:
    value = content_disposition(name)
    assert value.isascii()
    assert "\r" not in value and "\n" not in value
    assert value.startswith('attachment; filename="')
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in fallback and "\\" not in fallback


def test_content_disposition_rfc6266() -> None:
    assert content_disposition("résumé 1.pdf") == (
        "attachment; filename=\"r_sum_ 1.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%201.pdf"
    )
    assert content_disposition('a"b;c%d.txt', "inline").startswith('inline; filename="a_b_c_d.txt"')


# --- Range ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=2-5", 10, (2, 5)),
        ("bytes=2-500", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        (" bytes = 1 - 2 ", 10, (1, 2)),
        ("BYTES=1-2", 10, (1, 2)),
        ("bytes=5-2", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
        ("bytes=1", 10, None),
        ("pages=1-2", 10, None),
        ("bytes=+1-2", 10, None),
        ("", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, span: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == span


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0)]
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.status == 416
    assert info.value.code == "bad_request"
    assert info.value.size == size


# --- thumbnails ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "size", "mime", "thumb_mime", "thumb_size"),
    [
        ("JPEG", "RGB", (4000, 3000), "image/jpeg", "image/jpeg", (320, 240)),
        ("JPEG", "L", (100, 50), "image/jpeg", "image/jpeg", (100, 50)),
        ("PNG", "RGBA", (300, 900), "image/png", "image/png", (107, 320)),
        ("PNG", "1", (1000, 10), "image/png", "image/jpeg", (320, 3)),
        ("GIF", "P", (640, 640), "image/gif", "image/jpeg", (320, 320)),
        ("WEBP", "RGBA", (1280, 720), "image/webp", "image/png", (320, 180)),
    ],
)
def test_thumbnails(
    tmp_path: Path,
    fmt: str,
    mode: str,
    size: tuple[int, int],
    mime: str,
    thumb_mime: str,
    thumb_size: tuple[int, int],
) -> None:
    src, out = tmp_path / "src", tmp_path / "thumb"
    src.write_bytes(image(fmt, size, mode))
    assert make_thumbnail(src, mime, out) == thumb_mime
    with Image.open(out) as thumb:
        assert thumb.format == thumb_mime.split("/")[1].upper()
        assert thumb.size == thumb_size


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "thumb"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    buf = io.BytesIO()
    Image.new("RGB", (640, 320)).save(buf, "JPEG", exif=exif)
    src.write_bytes(buf.getvalue())
    assert make_thumbnail(src, "image/jpeg", out) == "image/jpeg"
    with Image.open(out) as thumb:
        assert thumb.size == (160, 320)


def test_only_the_sniffed_decoder_is_used(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "thumb"
    src.write_bytes(image("PNG", (10, 10)))
    # Claimed (wrongly) to be a JPEG: the JPEG decoder alone refuses it, no thumbnail.
    assert make_thumbnail(src, "image/jpeg", out) is None
    assert make_thumbnail(src, "image/svg+xml", out) is None
    assert make_thumbnail(src, "application/pdf", out) is None
    assert not out.exists()


def test_corrupt_images_get_no_thumbnail(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "thumb"
    for data in (image("PNG", (100, 100))[:50], b"\xff\xd8\xff\xe0garbage", b"GIF89a"):
        src.write_bytes(data)
        assert make_thumbnail(src, sniff_mime(data), out) is None
        assert not out.exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("pixels_over", [1.2, 5.0])
def test_decompression_bombs_are_refused(tmp_path: Path, pixels_over: float) -> None:
    """Over Pillow's limit (it only warns up to twice it) and far over (it raises):
    both are refused from the header, before any pixel is decoded."""
    side = int((max_image_pixels() * pixels_over) ** 0.5) + 1
    src, out = tmp_path / "bomb.png", tmp_path / "thumb"
    src.write_bytes(png_header_only(side, side))
    assert src.stat().st_size < 10_000
    with pytest.raises(BadRequest) as info:
        make_thumbnail(src, "image/png", out)
    assert "image too large to process" in info.value.message
    assert info.value.code == "bad_request"
    assert not out.exists()
    if pixels_over < 2:
        assert isinstance(info.value, ImageTooLarge)
