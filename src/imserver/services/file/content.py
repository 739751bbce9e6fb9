"""What the file service decides from the bytes and the name, never from the client's word.

Sans-I/O except :func:`make_thumbnail` (which reads a file and writes one, and is meant
to run in a worker thread):

- :func:`sniff_mime` — the MIME type from magic bytes (PNG, JPEG, GIF, WebP, PDF, ZIP,
  gzip), then HTML/SVG/XML markup, then UTF-8 text; anything else is
  ``application/octet-stream``. The declared ``Content-Type`` of an upload plays no
  part, so an HTML page declared ``image/png`` is ``text/html``.
- :func:`sanitise_name` — a display name: no path components, no control or
  bidirectional-override characters, at most :data:`NAME_MAX` characters.
- :func:`make_thumbnail` — a ≤ 320 px JPEG/PNG of a JPEG/PNG/GIF/WebP with Pillow,
  refusing decompression bombs (:class:`ImageTooLarge`).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imserver.utils.errors import BadRequest

SNIFF_BYTES = 8192
"""How much of the start of an upload :func:`sniff_mime` looks at."""
NAME_MAX = 200
"""Longest display name kept, in characters (longer ones are cut, keeping the extension)."""
DEFAULT_NAME = "file"
THUMB_MAX = 320
"""Longest side of a thumbnail, in pixels."""

OCTET_STREAM = "application/octet-stream"
THUMBNAIL_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}
"""The only types that get thumbnails, and the one Pillow decoder each may use."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"PK\x07\x08", "application/zip"),
    (b"\x1f\x8b\x08", "application/gzip"),
)
# WHATWG MIME sniffing's HTML signatures: the tag followed by a space or ">".
_HTML_TAGS = (
    "!doctype html",
    "html",
    "head",
    "script",
    "iframe",
    "h1",
    "div",
    "font",
    "table",
    "a",
    "style",
    "title",
    "b",
    "body",
    "br",
    "p",
    "!--",
)
_TEXT_CONTROLS = frozenset("\t\n\r\f")
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
)


class ImageTooLarge(BadRequest):
    """An image whose pixel count makes it a decompression bomb (``bad_request``)."""

    def __init__(self, width: int, height: int, limit: int) -> None:
        super().__init__(
            f"image too large to process: {width}x{height} pixels exceeds the limit of "
            f"{limit} pixels",
            field="body",
        )


def sniff_mime(head: bytes) -> str:
    """The MIME type of content starting with ``head`` (its first :data:`SNIFF_BYTES`)."""
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    text = _as_text(head)
    if text is None:
        return OCTET_STREAM
    return _markup(text) or "text/plain"


def _as_text(head: bytes) -> str | None:
    """``head`` as UTF-8 text without control characters, or ``None``.

    A multi-byte character cut at the end of ``head`` is not held against it.
    """
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data" or exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    for ch in text:
        if (ch < " " and ch not in _TEXT_CONTROLS) or ch == "\x7f":
            return None
    return text


def _markup(text: str) -> str | None:
    """``text/html``, ``image/svg+xml`` or ``application/xml`` for markup, else ``None``."""
    low = text.lstrip().lower()
    if low.startswith("<?xml") or low.startswith("<!doctype svg"):
        if "<svg" in low:
            return "image/svg+xml"
        if "<html" in low:
            return "text/html"
        return "application/xml"
    if low.startswith("<svg"):
        return "image/svg+xml"
    for tag in _HTML_TAGS:
        prefix = "<" + tag
        if low.startswith(prefix) and len(low) > len(prefix) and low[len(prefix)] in " \t\n\r\f>":
            if tag == "!--" and "<svg" in low and "<html" not in low:
                return "image/svg+xml"
            return "text/html"
    return None


def sanitise_name(raw: str | None) -> str:
    """A safe display name for a client's file name.

    Keeps only the last path component (``/`` and ``\\`` both separate), drops control
    characters (NUL included), line separators and bidirectional overrides (which can
    disguise ``exe.txt`` as ``txt.exe``), trims surrounding spaces and cuts the name to
    :data:`NAME_MAX` characters, keeping a short extension. Empty, ``.`` and ``..``
    become :data:`DEFAULT_NAME`. The result is only ever shown, never used as a path.
    """
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        ch
        for ch in name
        if ch not in _BIDI_CONTROLS and unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp")
    ).strip()
    if name in ("", ".", ".."):
        return DEFAULT_NAME
    if len(name) > NAME_MAX:
        stem, dot, ext = name.rpartition(".")
        if dot and stem and 0 < len(ext) <= 16:
            name = stem[: NAME_MAX - len(ext) - 1].rstrip() + "." + ext
        else:
            name = name[:NAME_MAX].rstrip()
    return name


def max_image_pixels() -> int:
    """The largest image (width × height) decoded for a thumbnail: Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (about 89 million by default)."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else 89_478_485


def make_thumbnail(src: Path, mime: str, out: Path) -> str | None:
    """Write a thumbnail of the image at ``src`` to ``out``; return its MIME type.

    Only for the types of :data:`THUMBNAIL_FORMATS`, decoded by that type's decoder
    alone. The longer side becomes at most :data:`THUMB_MAX` px; images with
    transparency give a PNG, others a JPEG. Returns ``None`` (no thumbnail) for content
    Pillow cannot decode, and raises :class:`ImageTooLarge` for an image with more
    pixels than :func:`max_image_pixels` — checked from the header, before anything is
    decoded. An ``OSError`` of the file system (``errno`` set: a full disk) is raised,
    not taken for undecodable content. Blocking: run it in a worker thread.
    """
    fmt = THUMBNAIL_FORMATS.get(mime)
    if fmt is None:
        return None
    limit = max_image_pixels()
    try:
        with Image.open(src, formats=[fmt]) as im:
            width, height = im.size
            if width * height > limit:
                raise ImageTooLarge(width, height, limit)
            im.draft("RGB", (THUMB_MAX, THUMB_MAX))  # JPEG: decode at a reduced scale
            im.thumbnail((THUMB_MAX, THUMB_MAX))
            small = ImageOps.exif_transpose(im)
            alpha = small.mode in ("RGBA", "LA", "PA") or (
                small.mode == "P" and "transparency" in small.info
            )
            if alpha:
                small.convert("RGBA").save(out, "PNG", optimize=True)
                return "image/png"
            small.convert("RGB").save(out, "JPEG", quality=82)
            return "image/jpeg"
    except Image.DecompressionBombError as exc:
        # Pillow refuses at open (over twice its limit) with the size in the message only.
        raise BadRequest(f"image too large to process: {exc}", field="body") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        out.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system failed (a full disk), not the image
        return None
