"""The message service's API, and the interfaces it needs from other services.

Every method can be called across a process boundary: it is async (or returns an
awaitable), and its arguments and results are msgspec structs and plain values —
:mod:`imserver.services.loopback` proves it in the contract tests. Nothing relies on
object identity or on sharing the caller's process: room membership carries a
``version`` instead, and the one ordering guarantee another service needs of the
writer is an explicit request, :meth:`MessageService.write_barrier`.

Writes (``send``, ``edit``, ``recall``, ``react``) are plain methods returning an
awaitable that resolves after the message is committed: the in-process service
returns an ``asyncio.Future`` fed by its group-commit writer, so the gateway can
attach the reply as a callback instead of parking a task per message. The awaitable
fails with an :class:`~imserver.utils.errors.IMError` for a refused write.

Requests and replies are the protocol's own structs (``imserver.protocol.ops``): the
service API has exactly the op's shape, so a second copy would only drift.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from functools import cached_property
from typing import Any, Protocol

import msgspec

from imserver.protocol import ops
from imserver.protocol.models import ConvSummary, ReceiptKind, User
from imserver.services.caller import Caller
from imserver.storage.events import Event
from imserver.utils.ids import ConvId, RoomId, UserId


class UserDirectory(Protocol):
    """What the message service needs from the user service."""

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]: ...

    async def blocked_pairs(
        self, blockers: Sequence[UserId], blocked: Sequence[UserId]
    ) -> list[bool]:
        """For each ``i``, whether ``blockers[i]`` has blocked ``blocked[i]`` (the
        writer asks once per batch)."""


class Members(msgspec.Struct, frozen=True, dict=True):
    """The members of a conversation, in order for delivery, and the ``version`` of
    that list.

    The room service counts the versions of each room's member list: every membership
    change makes a list with a higher ``version``. The message writer pins the list a
    committed change carries until the room directory answers that version or a later
    one, so the directory and the writer agree without comparing objects (a remote
    directory answers a copy each time). Direct and system conversations have fixed
    members, version 0.

    Immutable, so an owner can hand out the same object on every call until the
    membership changes, and the send path never copies a member list.
    """

    users: tuple[str, ...]
    version: int = 0

    @cached_property
    def set(self) -> frozenset[str]:
        """The members as a set, for checks (built once per object, not sent)."""
        return frozenset(self.users)

    @classmethod
    def of(cls, users: Iterable[str], version: int = 0) -> Members:
        return cls(tuple(users), version)


class RoomDirectory(Protocol):
    """What the message service needs from the room service (``r:`` conversations).

    ``room_members`` is on the send path of every room message: an implementation
    answers from memory (the same :class:`Members` object until the membership
    changes), never with a query per call.
    """

    async def room_members(self, room: RoomId) -> Members:
        """Current members of a room; ``not_found`` for an unknown room."""

    async def room_role(self, room: RoomId, user: UserId) -> str | None:
        """``owner``/``admin``/``member``, or None when not a member."""

    async def room_title(self, room: RoomId) -> str:
        """The room's name."""

    async def rooms_of(self, user: UserId) -> Sequence[RoomId]:
        """Rooms the user belongs to (for ``convs`` and ``search``)."""

    async def invitations_of(self, user: UserId) -> Sequence[RoomId]:
        """Rooms the user is invited to and has not joined (listed in ``convs``)."""

    async def listed_rooms(self, users: Sequence[UserId]) -> dict[str, list[RoomId]]:
        """user -> the rooms ``convs`` lists for the user (joined or invited to), for
        many users in one call (the badges of a push batch); users without any are
        left out."""


class FileRef(msgspec.Struct, frozen=True, kw_only=True):
    """What a ``file``/``image`` message needs to know about the file it names."""

    id: str
    conv: ConvId
    """The conversation the file was uploaded to; only messages there may name it."""
    name: str
    size: int
    mime: str
    thumb_url: str | None


class FileDirectory(Protocol):
    """What the message service needs from the file service."""

    async def file_refs(self, file_ids: Sequence[str]) -> dict[str, FileRef]:
        """The known files among ``file_ids`` (unknown ids are absent)."""


class CommittedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message the writer committed, as a commit listener sees it."""

    conv: ConvId
    seq: int
    ts: int
    sender: str
    type: str
    body: str
    """The body, cut to :data:`PREVIEW_CHARS` characters (a push's preview)."""
    mentions: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    """The conversation's members at this message's seq (for a message read back
    by :meth:`MessageService.stored_since`: its members now)."""
    id: int = 0
    """The storage id, in :meth:`MessageService.stored_since`'s answers (0 in a
    commit listener's events)."""


class ReadMoved(msgspec.Struct, frozen=True, kw_only=True):
    """A user's read marker moved forward to ``seq`` (from the session ``login``)."""

    conv: ConvId
    user: str
    seq: int
    login: str = ""
    """The login session that read, when known: its device needs no ``read`` push."""


PREVIEW_CHARS = 200
"""Characters of a body a :class:`CommittedMessage` carries."""


class MessageStored(Event, frozen=True, kw_only=True):
    """The ``message.stored`` event (version 1): a message the writer committed,
    published through the message database's outbox when the event stream is on.
    Consumers that need idempotency have (``message.conv``, ``message.seq``), unique
    per stored message, besides the event ``id``."""

    message: CommittedMessage


class RoomPost(msgspec.Struct, frozen=True, kw_only=True):
    """One system message of :meth:`MessageService.post_room_systems`."""

    body: str
    meta: dict[str, Any] | None = None
    notify: tuple[UserId, ...] = ()
    cid: str | None = None
    members: Members | None = None


class CommitListener(Protocol):
    """What the message writer tells another service after each commit (the
    notification service implements it).

    Called once per committed batch, after its publications, with every message it
    stored and every read marker it moved, in commit order. The call only hands the
    events over: an implementation queues them and answers at once, so a slow or
    failing listener never delays the writer's next batch. A failure is logged and
    the events are lost to that listener (best effort: durability of what follows a
    commit is the listener's own concern).
    """

    async def committed(
        self, messages: Sequence[CommittedMessage], reads: Sequence[ReadMoved]
    ) -> None: ...


class MessageService(Protocol):
    """Conversations, messages and markers."""

    def send(self, caller: Caller, req: ops.Send) -> Awaitable[ops.SendData]:
        """Store a message; resolves after commit. Idempotent on (conv, sender, cid)."""

    def edit(self, caller: Caller, req: ops.Edit) -> Awaitable[ops.SendData]:
        """Store an ``edit`` of the caller's own message ``target``."""

    def recall(self, caller: Caller, req: ops.Recall) -> Awaitable[ops.SendData]:
        """Store a ``recall`` of ``target`` (its sender, or a room owner/admin)."""

    def react(self, caller: Caller, req: ops.React) -> Awaitable[ops.SendData]:
        """Store a ``reaction`` (add or remove one emoji of the caller on ``target``)."""

    async def history(self, caller: Caller, req: ops.History) -> ops.HistoryData:
        """A page of messages, ascending by seq, annotated with edits/recalls/reactions."""

    async def convs(self, caller: Caller) -> list[ConvSummary]:
        """The caller's conversations, latest activity first."""

    async def mark(self, caller: Caller, conv: ConvId, seq: int, kind: ReceiptKind) -> None:
        """Move the caller's read or recv watermark forward and publish a ``receipt``."""

    async def typing(self, caller: Caller, conv: ConvId) -> None:
        """Publish a ``typing`` event to the other members' live sessions."""

    async def search(self, caller: Caller, req: ops.Search) -> ops.SearchData:
        """Full-text search over the caller's conversations, newest first."""

    async def post_system(
        self, user: UserId, body: str, meta: dict[str, Any] | None = None
    ) -> ops.SendData:
        """Store a notice in ``s:<user>`` (the user's read-only system conversation)."""

    async def post_system_many(
        self, users: Sequence[UserId], body: str, meta: dict[str, Any] | None, cid: str
    ) -> list[ops.SendData]:
        """Store the same notice in the ``s:`` conversation of each of ``users``, all
        queued at once (the writer stores them in a few batches, not one commit each);
        resolves after the last commit, with each user's result in order. ``cid`` is
        the idempotency key in every conversation: a repeat answers ``dup: true`` for
        the users who already hold it. The users are not checked: the caller knows
        they exist."""

    async def post_room_system(
        self,
        room: RoomId,
        body: str,
        meta: dict[str, Any] | None = None,
        *,
        notify: Iterable[UserId] = (),
        cid: str | None = None,
        members: Members | None = None,
    ) -> ops.SendData:
        """Store a ``system`` message (membership change, room update) in ``r:<room>``;
        resolves after commit. Delivered to the room's members plus ``notify`` (a user
        just kicked or invited). ``cid`` makes it idempotent. ``members``, for a
        membership change: the room's members from this message's seq on — messages
        before it reach the old members, it and everything after reach the new ones;
        the room directory then answers this list's ``version`` or a later one."""

    async def post_room_systems(
        self, room: RoomId, posts: Sequence[RoomPost]
    ) -> list[ops.SendData]:
        """Store several system messages of ``r:<room>`` (each as
        :meth:`post_room_system` would), in the order of ``posts``, queued at once so
        they share commits; resolves after the last commit. One call, because the
        order of concurrent calls is not kept across a process boundary."""

    async def check_member(self, user: UserId, conv: ConvId) -> None:
        """Raise unless ``user`` may read ``conv`` now: ``bad_request`` for a malformed
        id, ``not_found`` for an unknown user or room, ``forbidden`` for a non-member."""

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` that a stored message names in ``meta.file``."""

    async def write_barrier(self) -> None:
        """Answer once every write this service accepted before the request is
        committed (or refused) and published.

        The file clean-up's barrier: a send that resolved a file before the clean-up
        marked it is committed by the time this answers, so a ``referenced_files``
        asked afterwards sees its reference. Writes accepted after the request do not
        delay the answer."""

    async def direct_peers(self, user: UserId) -> list[UserId]:
        """Users who share a direct conversation with ``user`` (presence recipients)."""

    async def unread_totals(self, users: Sequence[UserId]) -> dict[str, int]:
        """user -> unread messages over every conversation of the user: the badges of
        a batch of pushes, in one call."""

    async def conv_members(self, conv: ConvId) -> list[str]:
        """The conversation's members now (``bad_request`` for a malformed id,
        ``not_found`` for an unknown room)."""

    async def stored_since(self, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
        """Up to ``limit`` messages stored at ``ts`` ms or later whose storage id is
        above ``after_id``, in storage order: what a commit listener catches up on
        after a restart (page with the last answer's ``id``)."""

    async def check(self) -> None:
        """Raise ``unavailable`` if the service's database cannot be reached."""

    async def close(self) -> None:
        """Flush pending writes and release the store."""
