"""Client → server operations, one frozen struct per op, tagged by the ``op`` field.

Field constraints here are the protocol's validation rules; a frame that breaks one
is answered ``bad_request`` naming the field. Limits that depend on configuration
(``max_body``) are checked by the handler. Unknown fields are ignored so that newer
clients keep working (docs/protocol.md §8).

Each op also names the struct of its reply ``data`` in :data:`REPLY_TYPES`, which
drives both the HTTP API and the generated OpenAPI description.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from imserver.protocol.models import (
    ConvSummary,
    Limits,
    Message,
    PresenceInfo,
    PushRecipient,
    PushRegistration,
    Room,
    RoomMember,
    ServerInfo,
    User,
)
from imserver.utils.ids import ConvId, RoomId

Rid = Annotated[str, Meta(max_length=64)]
ConvStr = Annotated[ConvId, Meta(min_length=3, max_length=200)]
Cid = Annotated[str, Meta(min_length=1, max_length=64)]
# Seqs are stored as signed 64-bit integers: a larger one must be a bad_request here, not
# an overflow (answered `internal`) in the storage layer.
MAX_SEQ = 2**63 - 1
Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ)]
Marker = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
# msgspec matches patterns with re.search, where "$" also matches before a final "\n"
# ("bob\n" would pass); "(?!\n)" closes that gap and stays valid ECMA-262 for the OpenAPI.
Username = Annotated[str, Meta(min_length=3, max_length=32, pattern=r"^[a-z0-9_.-]+$(?!\n)")]
Password = Annotated[str, Meta(min_length=8, max_length=256)]
DisplayName = Annotated[str, Meta(min_length=1, max_length=64)]
UserIdStr = Annotated[str, Meta(min_length=1, max_length=64)]
Token = Annotated[str, Meta(min_length=1, max_length=512)]
Device = Annotated[str, Meta(max_length=128)]
MessageType = Literal["text", "image", "file", "custom"]


class Op(msgspec.Struct, tag_field="op", kw_only=True, frozen=True):
    """Base of every op: the envelope's optional ``rid``."""

    rid: Rid | None = None


# --- §3 session lifecycle -------------------------------------------------------------


class Hello(Op, tag="hello", frozen=True):
    v: int
    client: Annotated[str, Meta(max_length=128)] | None = None
    device: Device | None = None


class Register(Op, tag="register", frozen=True):
    username: Username
    password: Password
    display_name: DisplayName | None = None


class Login(Op, tag="login", frozen=True):
    username: Annotated[str, Meta(min_length=1, max_length=64)]
    password: Annotated[str, Meta(min_length=1, max_length=256)]
    device: Device | None = None


class Auth(Op, tag="auth", frozen=True):
    token: Token


class Refresh(Op, tag="refresh", frozen=True):
    refresh_token: Token


class Logout(Op, tag="logout", frozen=True):
    pass


class Ping(Op, tag="ping", frozen=True):
    pass


# --- §4 conversations and messages ---------------------------------------------------


class Send(Op, tag="send", frozen=True):
    conv: ConvStr
    cid: Cid
    type: MessageType
    body: str
    meta: dict[str, Any] | None = None
    reply_to: Seq | None = None
    mentions: Annotated[list[UserIdStr], Meta(max_length=200)] | None = None


class Edit(Op, tag="edit", frozen=True):
    conv: ConvStr
    cid: Cid
    target: Seq
    body: str


class Recall(Op, tag="recall", frozen=True):
    conv: ConvStr
    cid: Cid
    target: Seq


class History(Op, tag="history", frozen=True):
    conv: ConvStr
    after: Marker | None = None
    before: Seq | None = None
    limit: Annotated[int, Meta(ge=1, le=200)] = 50


class Convs(Op, tag="convs", frozen=True):
    pass


class Read(Op, tag="read", frozen=True):
    conv: ConvStr
    seq: Marker


class Recv(Op, tag="recv", frozen=True):
    conv: ConvStr
    seq: Marker


class React(Op, tag="react", frozen=True):
    conv: ConvStr
    cid: Cid
    target: Seq
    emoji: Annotated[str, Meta(min_length=1, max_length=16)]
    remove: bool = False


class Search(Op, tag="search", frozen=True):
    query: Annotated[str, Meta(min_length=1, max_length=200)]
    conv: ConvStr | None = None
    before: Annotated[str, Meta(max_length=64)] | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20


class Typing(Op, tag="typing", frozen=True):
    conv: ConvStr


# --- §5 rooms -------------------------------------------------------------------------

RoomIdStr = Annotated[RoomId, Meta(min_length=1, max_length=64)]
RoomName = Annotated[str, Meta(min_length=1, max_length=100)]
RoomTopic = Annotated[str, Meta(max_length=500)]
Cursor = Annotated[str, Meta(min_length=1, max_length=128)]


class RoomCreate(Op, tag="room.create", frozen=True):
    name: RoomName
    topic: RoomTopic | None = None
    public: bool = False
    members: Annotated[list[UserIdStr], Meta(max_length=1000)] | None = None


class RoomGet(Op, tag="room.get", frozen=True):
    room: RoomIdStr


class RoomUpdate(Op, tag="room.update", frozen=True):
    room: RoomIdStr
    name: RoomName | None = None
    topic: RoomTopic | None = None
    public: bool | None = None


class RoomList(Op, tag="room.list", frozen=True):
    query: Annotated[str, Meta(max_length=100)] | None = None
    after: Cursor | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20


class RoomJoin(Op, tag="room.join", frozen=True):
    room: RoomIdStr


class RoomLeave(Op, tag="room.leave", frozen=True):
    room: RoomIdStr


class RoomInvite(Op, tag="room.invite", frozen=True):
    room: RoomIdStr
    user: UserIdStr


class RoomKick(Op, tag="room.kick", frozen=True):
    room: RoomIdStr
    user: UserIdStr


class RoomSetRole(Op, tag="room.role", frozen=True):
    room: RoomIdStr
    user: UserIdStr
    role: Literal["admin", "member"]


class RoomMembers(Op, tag="room.members", frozen=True):
    room: RoomIdStr
    after: Cursor | None = None
    limit: Annotated[int, Meta(ge=1, le=500)] = 100


# --- §6 users, presence, blocking --------------------------------------------


class UserGet(Op, tag="user.get", frozen=True):
    user: UserIdStr | None = None
    username: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class UserUpdate(Op, tag="user.update", frozen=True):
    display_name: DisplayName | None = None
    password: Password | None = None
    old_password: Annotated[str, Meta(max_length=256)] | None = None


class PresenceGet(Op, tag="presence.get", frozen=True):
    users: Annotated[list[UserIdStr], Meta(max_length=200)]


class Block(Op, tag="block", frozen=True):
    user: UserIdStr


class Unblock(Op, tag="unblock", frozen=True):
    user: UserIdStr


# --- admin notices -------------------------------------------------------------------

BROADCAST_MAX_USERS = 10_000
"""Most users one ``notice.broadcast`` may name (``to: "all"`` has no bound)."""


class NoticeBroadcast(Op, tag="notice.broadcast", frozen=True):
    """An admin's notice, posted into the ``s:`` conversation of every user named
    (``to``: a list of user ids) or of every user (``to: "all"``)."""

    body: str
    to: (
        Literal["all"]
        | Annotated[list[UserIdStr], Meta(min_length=1, max_length=BROADCAST_MAX_USERS)]
    )
    cid: Cid | None = None


# --- §push notifications ---------------------------------------------------------------

PushProvider = Annotated[str, Meta(min_length=1, max_length=16)]
NotifyLevel = Literal["all", "mentions", "none"]


class PushRegister(Op, tag="push.register", frozen=True):
    """Register the caller's device (its login session) with a push provider."""

    provider: PushProvider
    target: dict[str, Any]


class PushUnregister(Op, tag="push.unregister", frozen=True):
    """Remove the caller's device's registration with ``provider`` (every one when
    absent)."""

    provider: PushProvider | None = None


class PushList(Op, tag="push.list", frozen=True):
    pass


class PushVapidKey(Op, tag="push.vapid_key", frozen=True):
    pass


class ConvMute(Op, tag="conv.mute", frozen=True):
    """Mute ``conv`` for the caller until ``until`` (ms since the epoch; 0 unmutes)."""

    conv: ConvStr
    until: Marker


class ConvNotify(Op, tag="conv.notify", frozen=True):
    conv: ConvStr
    level: NotifyLevel


class PushTrace(Op, tag="push.trace", frozen=True):
    conv: ConvStr
    seq: Seq


# --- reply payloads -------------------------------------------------------------------


class Empty(msgspec.Struct):
    """The ``{}`` reply."""


class HelloData(msgspec.Struct, kw_only=True):
    v: int
    server: ServerInfo
    session: str
    heartbeat: int
    limits: Limits


class UserData(msgspec.Struct, kw_only=True):
    user: User


class LoginData(msgspec.Struct, kw_only=True):
    user: User
    token: str
    refresh_token: str
    expires_in: int


class TokenData(msgspec.Struct, kw_only=True):
    token: str
    refresh_token: str
    expires_in: int


class SendData(msgspec.Struct, kw_only=True):
    conv: ConvId
    seq: int
    ts: int
    cid: str
    dup: bool


class HistoryData(msgspec.Struct, kw_only=True):
    messages: list[Message]
    has_more: bool


class ConvsData(msgspec.Struct, kw_only=True):
    convs: list[ConvSummary]


class SearchData(msgspec.Struct, kw_only=True):
    messages: list[Message]
    next: str | None


class PresenceData(msgspec.Struct, kw_only=True):
    presence: list[PresenceInfo]


class RoomData(msgspec.Struct, kw_only=True):
    room: Room


class RoomListData(msgspec.Struct, kw_only=True):
    rooms: list[Room]
    next: str | None


class RoomMembersData(msgspec.Struct, kw_only=True):
    members: list[RoomMember]
    next: str | None


class BroadcastData(msgspec.Struct, kw_only=True):
    id: str
    reached: int
    unknown: list[str]
    dup: bool


class PushListData(msgspec.Struct, kw_only=True):
    registrations: list[PushRegistration]


class VapidKeyData(msgspec.Struct, kw_only=True):
    key: str
    """The Web Push application server key (base64url, uncompressed P-256 point)."""


class PushTraceData(msgspec.Struct, kw_only=True):
    conv: ConvId
    seq: int
    recipients: list[PushRecipient]


REPLY_TYPES: dict[type[Op], type[msgspec.Struct]] = {
    Hello: HelloData,
    Register: UserData,
    Login: LoginData,
    Auth: UserData,
    Refresh: TokenData,
    Logout: Empty,
    Ping: Empty,
    Send: SendData,
    Edit: SendData,
    Recall: SendData,
    History: HistoryData,
    Convs: ConvsData,
    Read: Empty,
    Recv: Empty,
    React: SendData,
    Search: SearchData,
    Typing: Empty,
    RoomCreate: RoomData,
    RoomGet: RoomData,
    RoomUpdate: RoomData,
    RoomList: RoomListData,
    RoomJoin: RoomData,
    RoomLeave: Empty,
    RoomInvite: Empty,
    RoomKick: Empty,
    RoomSetRole: Empty,
    RoomMembers: RoomMembersData,
    UserGet: UserData,
    UserUpdate: UserData,
    PresenceGet: PresenceData,
    Block: Empty,
    Unblock: Empty,
    NoticeBroadcast: BroadcastData,
    PushRegister: Empty,
    PushUnregister: Empty,
    PushList: PushListData,
    PushVapidKey: VapidKeyData,
    ConvMute: Empty,
    ConvNotify: Empty,
    PushTrace: PushTraceData,
}
"""Every op and the struct of its successful reply's ``data``."""

ALL_OPS: tuple[type[Op], ...] = tuple(REPLY_TYPES)


def op_name(op_type: type[Op]) -> str:
    """The wire name of an op struct (its tag)."""
    tag = op_type.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
