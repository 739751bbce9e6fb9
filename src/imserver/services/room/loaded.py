"""The rooms a room service holds in memory: loaded once, then the database's state.

The first use of a room loads it (one load per room even under concurrency) into a
:class:`LoadedRoom`: its ``Room`` object, its roles in join order and its
:class:`~imserver.services.message.api.Members`. Only this process changes a room,
and every change goes through the service holding it, so memory is the database's
state. A process holds every room it has touched (memory is proportional to their
memberships).

A change builds new ``roles``, ``Members`` and ``Room`` objects and swaps them in
(:func:`replace`); nothing is mutated in place, so ``room_members`` (on the send path
of every room message) answers the same ``Members``, without a query, until the
membership changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from imserver.protocol.convs import room_conv
from imserver.protocol.models import Room, RoomRole
from imserver.services.message.api import Members
from imserver.services.room.store import RoomRecord, SqlRoomStore
from imserver.utils.errors import NotFound


@dataclass(slots=True, eq=False)
class LoadedRoom:
    """One loaded room. ``roles`` is in join order; ``roles``, ``members`` and ``info``
    are replaced together by a change (under ``lock``), never mutated."""

    info: Room
    roles: dict[str, RoomRole]
    members: Members
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def empty(self) -> bool:
        return not self.roles


def room_info(record: RoomRecord, count: int | None = None) -> Room:
    """The protocol's ``Room`` of a stored record (``count``: the member count, when
    the record's may be stale)."""
    return Room(
        id=record.id,
        conv=room_conv(record.id),
        name=record.name,
        topic=record.topic,
        public=record.public,
        owner=record.owner,
        members=record.member_count if count is None else count,
        created=record.created,
    )


def still_live(st: LoadedRoom) -> None:
    """After waiting for a room's lock: ``not_found`` if it emptied meanwhile."""
    if st.empty:
        raise NotFound(f"no room {st.info.id}", field="room")


def replace(
    st: LoadedRoom,
    roles: dict[str, RoomRole] | None = None,
    members: Members | None = None,
    **changes: Any,
) -> None:
    """Swap in a room's new state; a new ``Members`` (``members``, or built here with
    the next version) only if the member set changed."""
    if roles is not None:
        if members is not None:
            st.members = members
        elif roles.keys() != st.roles.keys():
            st.members = Members.of(roles, st.members.version + 1)
        st.roles = roles
    st.info = msgspec.structs.replace(st.info, members=len(st.roles), **changes)


class LoadedRooms:
    """Room id → :class:`LoadedRoom`, loading each room from the store on first use.

    A room's ``Members`` versions start at the time it is loaded, in milliseconds
    (``clock``), so a restarted service answers versions above those it handed out
    before.
    """

    def __init__(self, store: SqlRoomStore, clock: Callable[[], int]) -> None:
        self._store = store
        self._clock = clock
        self._rooms: dict[str, LoadedRoom] = {}
        self._loads: dict[str, asyncio.Task[LoadedRoom | None]] = {}

    def get(self, room: str) -> LoadedRoom | None:
        """The room if it is loaded already (no await: the send path's fast case)."""
        return self._rooms.get(room)

    def add(self, st: LoadedRoom) -> None:
        """Hold a room just created."""
        self._rooms[st.info.id] = st

    async def state(self, room: str) -> LoadedRoom | None:
        """The loaded room, loading it on first use; ``None`` if it never existed."""
        st = self._rooms.get(room)
        if st is not None:
            return st
        task = self._loads.get(room)
        if task is None:
            task = asyncio.ensure_future(self._load(room))
            self._loads[room] = task
        return await asyncio.shield(task)

    async def live(self, room: str) -> LoadedRoom:
        """A room that exists and is not empty (``not_found``, field ``room``, otherwise)."""
        st = await self.state(room)
        if st is None or st.empty:
            raise NotFound(f"no room {room}", field="room")
        return st

    async def _load(self, room: str) -> LoadedRoom | None:
        try:
            found = await self._store.load(room)
            if found is None:
                return None
            record, rows = found
            roles: dict[str, RoomRole] = {m.user: m.role for m in rows}
            st = LoadedRoom(room_info(record, len(roles)), roles, Members.of(roles, self._clock()))
            # Nothing else puts a room that exists in the database (create puts new ids).
            return self._rooms.setdefault(room, st)
        finally:
            del self._loads[room]
