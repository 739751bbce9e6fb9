"""Server → client frames: the reply envelope and the events of docs/protocol.md §4."""

from __future__ import annotations

from typing import Any

import msgspec

from imserver.protocol.models import Message, PresenceStatus, ReceiptKind
from imserver.utils.ids import ConvId


class Event(msgspec.Struct, tag_field="op", kw_only=True):
    """Base of every server → client frame."""


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``error`` of a failed reply. ``field`` names the offending field when known."""

    code: str
    message: str
    retry_after: float | None = None
    field: str | None = None


class Reply(Event, tag="reply", omit_defaults=True, kw_only=True):
    """The answer to an op that carried a ``rid`` (or that failed)."""

    rid: str | None = None
    ok: bool
    data: Any = None
    error: ErrorBody | None = None


class Msg(Event, tag="msg", omit_defaults=True, kw_only=True):
    """A stored message pushed to the members' live sessions."""

    conv: ConvId
    seq: int
    from_: str = msgspec.field(name="from")
    ts: int
    type: str
    body: str
    cid: str
    meta: dict[str, Any] | None = None
    reply_to: int | None = None
    mentions: list[str] | None = None

    @classmethod
    def of(cls, m: Message) -> Msg:
        """The event for a stored message."""
        return cls(
            conv=m.conv,
            seq=m.seq,
            from_=m.from_,
            ts=m.ts,
            type=m.type,
            body=m.body,
            cid=m.cid,
            meta=m.meta,
            reply_to=m.reply_to,
            mentions=m.mentions,
        )


class Receipt(Event, tag="receipt", kw_only=True):
    conv: ConvId
    user: str
    seq: int
    kind: ReceiptKind


class TypingEvent(Event, tag="typing", kw_only=True):
    conv: ConvId
    user: str


class PresenceEvent(Event, tag="presence", kw_only=True):
    user: str
    status: PresenceStatus
    last_seen: int | None


class Closed(Event, tag="closed", kw_only=True):
    reason: str
