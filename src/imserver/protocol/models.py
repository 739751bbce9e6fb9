"""Objects that appear inside replies and events (the protocol's nouns).

They are the public contract of docs/protocol.md, so the services return them directly
instead of keeping a second copy of each shape.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from imserver.utils.ids import ConvId, RoomId

PresenceStatus = Literal["online", "offline"]
ConvKind = Literal["direct", "room", "system"]
ReceiptKind = Literal["read", "recv"]


class User(msgspec.Struct, kw_only=True):
    """A user as clients see it."""

    id: str
    username: str
    display_name: str
    created: int


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A stored message, as ``history`` and ``search`` return it.

    ``edited``, ``recalled`` and ``reactions`` are annotations computed from later
    messages of type ``edit``/``recall``/``reaction``; they are omitted while unset.
    """

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
    edited: bool = False
    recalled: bool = False
    reactions: dict[str, list[str]] | None = None


class ConvSummary(msgspec.Struct, kw_only=True):
    """One entry of the ``convs`` reply."""

    conv: ConvId
    kind: ConvKind
    title: str
    last_seq: int
    read_seq: int
    recv_seq: int
    unread: int
    mentions: int
    last: Message | None


RoomRole = Literal["owner", "admin", "member"]


class Room(msgspec.Struct, kw_only=True):
    """A room (group conversation) as clients see it; ``members`` is the member count."""

    id: RoomId
    conv: ConvId
    name: str
    topic: str | None
    public: bool
    owner: str
    members: int
    created: int


class RoomMember(msgspec.Struct, kw_only=True):
    """One entry of ``room.members``."""

    user: str
    role: RoomRole
    online: bool


class PresenceInfo(msgspec.Struct, kw_only=True):
    """A user's presence: ``last_seen`` is when the last session closed (now while online)."""

    user: str
    status: PresenceStatus
    last_seen: int | None


class RateLimits(msgspec.Struct, kw_only=True):
    per_s: float
    burst: int


class Limits(msgspec.Struct, kw_only=True):
    max_frame: int
    max_body: int
    max_meta: int
    rate: RateLimits


class ServerInfo(msgspec.Struct, kw_only=True):
    name: str
    version: str


class PushRegistration(msgspec.Struct, kw_only=True):
    """One of the caller's push registrations (``push.list``)."""

    provider: str
    device: str
    """The login session it belongs to."""
    target: dict[str, Any]
    created: int


class PushAttempt(msgspec.Struct, kw_only=True):
    """One attempt to deliver a push, with the provider's answer."""

    n: int
    at: int
    status: str
    """``sent``, ``retry``, ``gone`` or ``failed``."""
    code: int | None
    detail: str


class PushJob(msgspec.Struct, kw_only=True):
    """One push in the outbox, as ``push.trace`` shows it."""

    key: str
    """Its idempotency key, ``<user>:<device>:<conv>:<first seq>``."""
    kind: str
    device: str
    provider: str
    seq: int
    """The last seq it covers."""
    count: int
    state: str
    """``queued``, ``sending``, ``sent``, ``retry-wait``, ``dead``, ``dropped``,
    ``gone`` or ``failed``."""
    collapsed: bool
    """The message joined a push that was already waiting."""
    attempts: list[PushAttempt]


class PushRecipient(msgspec.Struct, kw_only=True):
    """Why one member of a conversation did or did not get a push for a message."""

    user: str
    due: bool
    reason: str
    """``due``, ``sender``, ``online``, ``muted``, ``level`` or ``no_registration``."""
    online: list[str]
    """Devices (login sessions) with a live session when the message was stored."""
    muted_until: int
    level: str
    mentioned: bool
    pushes: list[PushJob]
