"""What the two mobile providers (FCM, APNs) share: the payload's size budget, the
collapse identifier of a conversation, and the outcome of a transport failure.

Both services refuse a payload over 4096 bytes. Everything in a push but its title and
body is a few dozen bytes (ids, numbers), so clipping the title to
:data:`TITLE_BYTES` and the body to :data:`BODY_BYTES` keeps every payload within the
limit without encoding it twice.
"""

from __future__ import annotations

import hashlib
from typing import Final

import httpx

from imserver.services.notification.providers.base import Outcome

TITLE_BYTES: Final = 256
BODY_BYTES: Final = 2048
COLLAPSE_ID_BYTES: Final = 64
"""APNs' limit for ``apns-collapse-id``; FCM's collapse keys use the same identifier."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary, with an
    ellipsis when it was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "…"


def collapse_id(conv: str) -> str:
    """The identifier under which a device keeps only the newest push of ``conv``: the
    conversation id itself, or its SHA-256 in hex when longer than 64 bytes."""
    if len(conv.encode()) <= COLLAPSE_ID_BYTES:
        return conv
    return hashlib.sha256(conv.encode()).hexdigest()


def transport_outcome(exc: httpx.HTTPError) -> Outcome:
    """A request that got no answer (timeout, refused or reset connection, TLS failure)
    is worth another attempt."""
    if isinstance(exc, httpx.TimeoutException):
        return Outcome(status="retry", detail=f"timeout: {type(exc).__name__}")
    return Outcome(status="retry", detail=f"{type(exc).__name__}: {exc}")
