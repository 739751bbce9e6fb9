"""The room service's API: rooms, their membership and roles (docs/protocol.md §5).

The room service owns rooms, members, roles and invitations. It reaches the message
service only through :class:`~imserver.services.message.api.MessageService`
(``post_room_system`` stores every membership change and update as a ``system``
message of the room's conversation), and it serves the message service as its
:class:`~imserver.services.message.api.RoomDirectory`.

Requests and replies are the protocol's own structs (``imserver.protocol.ops``).
Every method can be called across a process boundary (async, msgspec-serialisable
arguments and results; :mod:`imserver.services.loopback` proves it in the contract
tests).

Who is online (``room.members``) is answered from the user service's presence
records, which the gateway keeps (``set_online``/``set_offline``) and ``presence.get``
reads: the one view of presence that holds however many gateways there are, where
a gateway's hub only knows its own connections. So the room service asks the user
service, never the gateway, and the gateway depends on the room service, not the
other way round.

Permission matrix (owner > admin > member):

====================  ==========================================================
op                    who
====================  ==========================================================
``room.create``       any user; the caller becomes the owner
``room.get``          members and invitees; anyone for a public room
``room.update``       owner, admin
``room.list``         any user (public rooms only)
``room.join``         anyone for a public room; invitees for a private one
``room.leave``        members
``room.invite``       owner, admin
``room.kick``         owner, admin; never someone of equal or higher role
``room.role``         owner only; never on the owner
``room.members``      members; anyone for a public room
====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from imserver.protocol import ops
from imserver.protocol.models import PresenceInfo, Room, User
from imserver.services.caller import Caller
from imserver.services.message.api import RoomDirectory
from imserver.storage.events import Event
from imserver.utils.ids import RoomId, UserId

SYSTEM_EVENTS = ("created", "joined", "left", "invited", "kicked", "role", "updated")
"""``meta.event`` of the room's ``system`` messages. ``meta`` also carries ``actor``
(who did it), ``user`` (to whom, for membership events), ``role`` (for ``role`` and for
an ownership hand-over: ``{"event": "role", "role": "owner"}``) and ``changes`` (the
fields an ``updated`` set)."""


class MemberChanged(Event, frozen=True, kw_only=True):
    """The ``room.member_changed`` event (version 1): ``user`` joined, left, was kicked
    from ``room`` or got a new role, by ``by``, at ``ts`` ms. Published through the
    room database's outbox when the event stream is on."""

    room: RoomId
    user: str
    change: Literal["join", "leave", "kick", "role"]
    role: str | None
    """The user's role after the change; None once no longer a member."""
    by: str
    ts: int


class UserDirectory(Protocol):
    """What the room service needs from the user service: whether users exist, their
    display names for the text of system messages, and who is online (the ``online``
    of ``room.members``)."""

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]: ...

    async def get_presence(self, users: Sequence[UserId]) -> list[PresenceInfo]: ...


class RoomService(RoomDirectory, Protocol):
    """Rooms and membership; also the message service's room directory."""

    async def create(self, caller: Caller, req: ops.RoomCreate) -> Room: ...

    async def get(self, caller: Caller, room: RoomId) -> Room: ...

    async def update(self, caller: Caller, req: ops.RoomUpdate) -> Room: ...

    async def list(self, caller: Caller, req: ops.RoomList) -> ops.RoomListData: ...

    async def join(self, caller: Caller, room: RoomId) -> Room: ...

    async def leave(self, caller: Caller, room: RoomId) -> None: ...

    async def invite(self, caller: Caller, room: RoomId, user: UserId) -> None: ...

    async def kick(self, caller: Caller, room: RoomId, user: UserId) -> None: ...

    async def set_role(self, caller: Caller, room: RoomId, user: UserId, role: str) -> None: ...

    async def members(self, caller: Caller, req: ops.RoomMembers) -> ops.RoomMembersData: ...

    async def check(self) -> None:
        """Raise ``unavailable`` if the room database cannot be reached."""

    async def close(self) -> None: ...
