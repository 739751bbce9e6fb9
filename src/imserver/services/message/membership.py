"""Who may read and write a conversation, as the message service sees it.

Direct and system conversations have fixed members (a direct conversation's two
users must exist); a room's members come from the room directory, except while a
committed membership change (a room ``system`` message posted with ``members``) is
pinned here: the writer pins the new list at the seq of that message, and it stays
pinned until the room directory answers that list's ``version`` or a later one, so
later batches, ``typing`` and reads agree. Versions, not object identity: a directory
in another process answers a fresh copy on every call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

from imserver.protocol.convs import ConvRef
from imserver.services.message.api import Members, RoomDirectory, UserDirectory
from imserver.services.message.lru import LRU
from imserver.utils.errors import IMError, NotFound, Unavailable
from imserver.utils.ids import RoomId, UserId

logger = logging.getLogger(__name__)

K = TypeVar("K")

USER_CACHE = 100_000
"""Users known to exist, and users whose direct peers are cached."""


async def ask(call: Awaitable[K]) -> K:
    """Await another service, translating foreign failures to ``unavailable``."""
    try:
        return await call
    except IMError:
        raise
    except Exception as exc:
        logger.warning("directory call failed: %r", exc)
        raise Unavailable("a backend service is unavailable") from exc


class Membership:
    """The members of conversations, from the user and room directories."""

    def __init__(self, users: UserDirectory, rooms: RoomDirectory | None) -> None:
        self._users = users
        self._rooms = rooms
        self._known_users: LRU[str, bool] = LRU(USER_CACHE)
        self.pinned: dict[str, Members] = {}
        """Room members set by a committed system message (``post_room_system(members=)``)
        that the room directory may not answer yet; dropped once it does."""

    async def room_role(self, room: RoomId, user: str) -> str | None:
        """``user``'s role in ``room`` (None when not a member)."""
        if self._rooms is None:
            raise NotFound(f"no room {room}", field="conv")
        return await ask(self._rooms.room_role(room, UserId(user)))

    async def members(self, conv: ConvRef) -> Members:
        """Every member of ``conv`` (``not_found`` for unknown users or rooms)."""
        if conv.kind == "direct":
            missing = [u for u in (conv.a, conv.b) if self._known_users.get(u) is None]
            if missing:
                found = await ask(self._users.get_users([UserId(u) for u in missing]))
                for u in missing:
                    if u not in found:
                        raise NotFound(f"no user {u}", field="conv")
                    self._known_users.put(u, True)
            return Members((conv.a, conv.b))
        if conv.kind == "system":
            return Members((conv.a,))
        if self._rooms is None:
            raise NotFound(f"no room {conv.a}", field="conv")
        current = await ask(self._rooms.room_members(RoomId(conv.a)))
        pinned = self.pinned.get(conv.a)
        if pinned is None:
            return current
        if current.version >= pinned.version:  # the room service has caught up
            del self.pinned[conv.a]
            return current
        return pinned
