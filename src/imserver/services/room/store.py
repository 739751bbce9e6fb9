"""The room service's SQL store: rooms, members with roles, invitations.

Portable SQLAlchemy Core, so the same code runs on SQLite, PostgreSQL and MySQL/MariaDB,
but for the directory's substring match (:func:`_contains`).
The schema here must match the Alembic history in ``migrations/`` (a test compares
them).

Invariants the service relies on:

- ``rooms.member_count`` is the number of ``members`` rows of the room; every write
  that adds or removes a member changes both in one transaction.
- A room whose ``member_count`` is 0 is **empty** (``emptied`` holds when): it left
  the directory for good. Nothing adds a member to it again (the deciding ``UPDATE``s
  require ``member_count > 0``) and its invitations are deleted when it empties.
- ``members.join_order`` is unique per room and grows with every join
  (``rooms.last_join`` is the room's counter, bumped in the joining transaction), so
  "the longest-standing member" and the ``room.members`` cursor are well defined.
- Every multi-step write starts with the statement that decides it (a conditional
  ``UPDATE``): pysqlite only opens a transaction at the first write, so this takes
  SQLite's write lock up front and keeps the logic correct on every driver.
- ``rooms.name_folded`` is ``name.casefold()``, written with the name, so the
  directory search is case-insensitive for every script on every backend.
- Timestamps are integer milliseconds supplied by the caller (the service's clock).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from imserver.protocol.models import RoomRole
from imserver.services.room.api import MemberChanged
from imserver.storage.events import ROOM_MEMBER_CHANGED
from imserver.storage.outbox import Outbox, outbox_table
from imserver.storage.runners import SqlStore
from imserver.storage.statements import chunks
from imserver.utils.ids import RoomId

metadata = MetaData()

ID_LEN = 40
"""Room for a prefix plus the base-36 ids of :mod:`imserver.utils.ids`."""
NAME_LEN = 100
FOLDED_LEN = 400
"""``casefold()`` may lengthen a name (``ß`` -> ``ss``); at most 3 per character."""
TOPIC_LEN = 500

rooms = Table(
    "rooms",
    metadata,
    Column("id", String(ID_LEN), nullable=False),
    Column("name", String(NAME_LEN), nullable=False),
    Column("name_folded", String(FOLDED_LEN), nullable=False),
    Column("topic", String(TOPIC_LEN), nullable=True),
    Column("public", Boolean(name="ck_rooms_public_bool"), nullable=False),
    Column("owner", String(ID_LEN), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("member_count", Integer, nullable=False),
    Column("last_join", BigInteger, nullable=False),
    Column("emptied", BigInteger, nullable=True),
    PrimaryKeyConstraint("id", name="pk_rooms"),
    Index("ix_rooms_directory", "public", "created", "id"),
)

members = Table(
    "members",
    metadata,
    Column("room_id", String(ID_LEN), nullable=False),
    Column("user_id", String(ID_LEN), nullable=False),
    Column("role", String(8), nullable=False),
    Column("joined", BigInteger, nullable=False),
    Column("join_order", BigInteger, nullable=False),
    PrimaryKeyConstraint("room_id", "user_id", name="pk_members"),
    ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_members_room_id_rooms"),
    Index("ix_members_order", "room_id", "join_order", unique=True),
    Index("ix_members_user_id", "user_id"),
)

invitations = Table(
    "invitations",
    metadata,
    Column("room_id", String(ID_LEN), nullable=False),
    Column("user_id", String(ID_LEN), nullable=False),
    Column("inviter", String(ID_LEN), nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("room_id", "user_id", name="pk_invitations"),
    ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_invitations_room_id_rooms"),
    Index("ix_invitations_user_id", "user_id"),
)


outbox = outbox_table(metadata, "room")
"""``room.member_changed`` events waiting for the relay (:mod:`imserver.storage.outbox`),
written in the membership change's transaction when the event stream is on."""


class RoomRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One ``rooms`` row."""

    id: RoomId
    name: str
    topic: str | None
    public: bool
    owner: str
    created: int
    member_count: int


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One ``members`` row."""

    user: str
    role: RoomRole
    join_order: int


_ROOM_COLUMNS = (
    rooms.c.id,
    rooms.c.name,
    rooms.c.topic,
    rooms.c.public,
    rooms.c.owner,
    rooms.c.created,
    rooms.c.member_count,
)


def _contains(conn: Connection, folded: str) -> ColumnElement[bool]:
    """``rooms.name_folded`` holds ``folded``, any text (NUL included) taken literally.

    SQLite's ``LIKE`` stops reading its pattern at a NUL (``%<NUL>%`` would match
    every name), so SQLite asks ``instr``, which compares whole values. Elsewhere
    ``LIKE`` with ``%`` and ``_`` escaped; on PostgreSQL its pattern and the names
    pass through the same NUL-escaping codec (:mod:`imserver.storage.pg_text`).
    """
    if conn.dialect.name == "sqlite":
        return func.instr(rooms.c.name_folded, folded) > 0
    return rooms.c.name_folded.contains(folded, autoescape=True)


def _room(row: Sequence[Any]) -> RoomRecord:
    # Rows start with the columns of _ROOM_COLUMNS, in that order.
    return RoomRecord(
        id=row[0],
        name=row[1],
        topic=row[2],
        public=bool(row[3]),
        owner=row[4],
        created=row[5],
        member_count=row[6],
    )


class SqlRoomStore(SqlStore):
    """All of the room service's persistent state in one SQL database."""

    name = "room database"

    outbox: Outbox | None = None
    """Set (:meth:`with_outbox`) when the event stream is on: every membership change
    then inserts its ``room.member_changed`` events in its own transaction."""

    def with_outbox(self) -> SqlRoomStore:
        """Turn the outbox on (before the store is used); returns the store."""
        self.outbox = Outbox(outbox)
        return self

    def _changed(self, conn: Connection, events: list[MemberChanged]) -> None:
        if self.outbox is not None:
            self.outbox.insert(conn, [self.outbox.row(ROOM_MEMBER_CHANGED, e) for e in events])

    async def _changing(self, fn: Any, *args: Any) -> Any:
        """:meth:`_write` for a membership change: the relay is woken after its commit."""
        result = await self._write(fn, *args)
        if self.outbox is not None:
            self.outbox.committed()
        return result

    # --- rooms ------------------------------------------------------------------------

    async def create_room(self, room: RoomRecord, joined: Sequence[str], now: int) -> None:
        """Insert a room with its owner (join order 1) and ``joined`` (2, 3, ...)."""
        everyone = [room.owner, *joined]

        def run(conn: Connection) -> None:
            conn.execute(
                insert(rooms).values(
                    id=room.id,
                    name=room.name,
                    name_folded=room.name.casefold(),
                    topic=room.topic,
                    public=room.public,
                    owner=room.owner,
                    created=room.created,
                    member_count=len(everyone),
                    last_join=len(everyone),
                    emptied=None,
                )
            )
            conn.execute(
                insert(members),
                [
                    {
                        "room_id": room.id,
                        "user_id": user,
                        "role": "owner" if i == 0 else "member",
                        "joined": now,
                        "join_order": i + 1,
                    }
                    for i, user in enumerate(everyone)
                ],
            )
            self._changed(
                conn,
                [
                    MemberChanged(
                        room=RoomId(room.id),
                        user=user,
                        change="join",
                        role="owner" if i == 0 else "member",
                        by=room.owner,
                        ts=now,
                    )
                    for i, user in enumerate(everyone)
                ],
            )

        await self._changing(run)

    async def load(self, room: str) -> tuple[RoomRecord, list[MemberRecord]] | None:
        """A room and its members in join order, or ``None`` if it never existed."""

        def run(conn: Connection) -> tuple[RoomRecord, list[MemberRecord]] | None:
            row = conn.execute(select(*_ROOM_COLUMNS).where(rooms.c.id == room)).first()
            if row is None:
                return None
            result = conn.execute(
                select(members.c.user_id, members.c.role, members.c.join_order)
                .where(members.c.room_id == room)
                .order_by(members.c.join_order)
            )
            found = [MemberRecord(user=r[0], role=r[1], join_order=r[2]) for r in result]
            return _room(row), found

        return await self._read(run)

    async def update_room(
        self,
        room: str,
        *,
        name: str | None,
        topic: str | None,
        set_topic: bool,
        public: bool | None,
    ) -> None:
        """Change the given fields (``set_topic``: whether ``topic`` is to be written)."""
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
            values["name_folded"] = name.casefold()
        if set_topic:
            values["topic"] = topic
        if public is not None:
            values["public"] = public
        if not values:
            return

        def run(conn: Connection) -> None:
            conn.execute(update(rooms).where(rooms.c.id == room).values(**values))

        await self._write(run)

    # --- membership -------------------------------------------------------------------

    async def add_member(self, room: str, user: str, now: int, max_size: int) -> int | None:
        """Add ``user`` as a member and consume their invitation; returns the join order.

        ``None`` (and nothing written) when the room is empty or already has
        ``max_size`` members.
        """

        def run(conn: Connection) -> int | None:
            decided = conn.execute(
                update(rooms)
                .where(
                    rooms.c.id == room,
                    rooms.c.member_count > 0,
                    rooms.c.member_count < max_size,
                )
                .values(
                    member_count=rooms.c.member_count + 1,
                    last_join=rooms.c.last_join + 1,
                )
            )
            if decided.rowcount == 0:
                return None
            order = int(conn.scalar(select(rooms.c.last_join).where(rooms.c.id == room)) or 0)
            conn.execute(
                insert(members).values(
                    room_id=room, user_id=user, role="member", joined=now, join_order=order
                )
            )
            conn.execute(
                delete(invitations).where(
                    invitations.c.room_id == room, invitations.c.user_id == user
                )
            )
            self._changed(
                conn,
                [
                    MemberChanged(
                        room=RoomId(room), user=user, change="join", role="member", by=user, ts=now
                    )
                ],
            )
            return order

        result: int | None = await self._changing(run)
        return result

    async def remove_member(
        self, room: str, user: str, now: int, new_owner: str | None, *, by: str | None = None
    ) -> int:
        """Remove ``user``; ``new_owner`` (a member) becomes the owner in the same
        transaction. Returns the members left; removing the last one empties the room
        and drops its invitations. Removing a non-member changes nothing. ``by``: the
        member who kicked ``user`` (None: ``user`` left)."""

        def run(conn: Connection) -> int:
            gone = conn.execute(
                delete(members).where(members.c.room_id == room, members.c.user_id == user)
            )
            if gone.rowcount == 0:
                return int(conn.scalar(select(rooms.c.member_count).where(rooms.c.id == room)) or 0)
            values: dict[str, Any] = {"member_count": rooms.c.member_count - 1}
            change: Literal["leave", "kick"] = "leave" if by is None else "kick"
            events = [
                MemberChanged(
                    room=RoomId(room), user=user, change=change, role=None, by=by or user, ts=now
                )
            ]
            if new_owner is not None:
                values["owner"] = new_owner
                _set_role(conn, room, new_owner, "owner")
                events.append(
                    MemberChanged(
                        room=RoomId(room),
                        user=new_owner,
                        change="role",
                        role="owner",
                        by=user,
                        ts=now,
                    )
                )
            self._changed(conn, events)
            conn.execute(update(rooms).where(rooms.c.id == room).values(**values))
            left = int(conn.scalar(select(rooms.c.member_count).where(rooms.c.id == room)) or 0)
            if left == 0:
                conn.execute(update(rooms).where(rooms.c.id == room).values(emptied=now))
                conn.execute(delete(invitations).where(invitations.c.room_id == room))
            return left

        result: int = await self._changing(run)
        return result

    async def set_role(
        self, room: str, user: str, role: RoomRole, *, by: str = "", now: int = 0
    ) -> None:
        """Change a member's role (``by``: the member who changed it)."""

        def run(conn: Connection) -> None:
            _set_role(conn, room, user, role)
            self._changed(
                conn,
                [
                    MemberChanged(
                        room=RoomId(room), user=user, change="role", role=role, by=by, ts=now
                    )
                ],
            )

        await self._changing(run)

    async def members_page(self, room: str, after: int, limit: int) -> list[MemberRecord]:
        """Up to ``limit`` members with join order > ``after``, in join order."""

        def run(conn: Connection) -> list[MemberRecord]:
            result = conn.execute(
                select(members.c.user_id, members.c.role, members.c.join_order)
                .where(members.c.room_id == room, members.c.join_order > after)
                .order_by(members.c.join_order)
                .limit(limit)
            )
            return [MemberRecord(user=r[0], role=r[1], join_order=r[2]) for r in result]

        return await self._read(run)

    async def rooms_of(self, user: str) -> list[RoomId]:
        """The rooms ``user`` is a member of, in the order they joined them."""

        def run(conn: Connection) -> list[RoomId]:
            result = conn.execute(
                select(members.c.room_id)
                .where(members.c.user_id == user)
                .order_by(members.c.joined, members.c.room_id)
            )
            return [r[0] for r in result]

        return await self._read(run)

    # --- invitations ------------------------------------------------------------------

    async def invite(self, room: str, user: str, inviter: str, now: int) -> bool:
        """Record an invitation; False (nothing written) if one is already pending."""

        def run(conn: Connection) -> None:
            conn.execute(
                insert(invitations).values(room_id=room, user_id=user, inviter=inviter, created=now)
            )

        try:
            await self._write(run)
        except IntegrityError:
            # The primary key: an invitation is already pending (the room exists, the
            # service checked it under the room's lock).
            return False
        return True

    async def is_invited(self, room: str, user: str) -> bool:
        """Whether ``user`` has a pending invitation to ``room``."""

        def run(conn: Connection) -> bool:
            found = conn.scalar(
                select(invitations.c.user_id).where(
                    invitations.c.room_id == room, invitations.c.user_id == user
                )
            )
            return found is not None

        return await self._read(run)

    async def listed_rooms(self, users: Sequence[str]) -> dict[str, list[RoomId]]:
        """user -> the rooms each of ``users`` is a member of or invited to (joined
        first); users with neither are left out."""

        def run(conn: Connection) -> dict[str, list[RoomId]]:
            found: dict[str, list[RoomId]] = {}
            for chunk in chunks(sorted(set(users))):
                for table in (members, invitations):
                    rows = conn.execute(
                        select(table.c.user_id, table.c.room_id).where(table.c.user_id.in_(chunk))
                    )
                    for user, room in rows:
                        listed = found.setdefault(user, [])
                        if room not in listed:
                            listed.append(room)
            return found

        return await self._read(run)

    async def invitations_of(self, user: str) -> list[RoomId]:
        """Rooms with a pending invitation for ``user``, oldest invitation first."""

        def run(conn: Connection) -> list[RoomId]:
            result = conn.execute(
                select(invitations.c.room_id)
                .where(invitations.c.user_id == user)
                .order_by(invitations.c.created, invitations.c.room_id)
            )
            return [r[0] for r in result]

        return await self._read(run)

    # --- the directory ----------------------------------------------------------------

    async def list_public(
        self, query: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[RoomRecord]:
        """Public, non-empty rooms in creation order (oldest first), after the keyset
        ``after`` = (created, id); ``query`` matches a case-insensitive substring of the
        name, with ``%`` and ``_`` taken literally."""
        cond = [rooms.c.public.is_(True), rooms.c.member_count > 0]
        if after is not None:
            created, room_id = after
            cond.append(
                or_(
                    rooms.c.created > created,
                    and_(rooms.c.created == created, rooms.c.id > room_id),
                )
            )
        folded = query.casefold() if query else None

        def run(conn: Connection) -> list[RoomRecord]:
            where = cond if folded is None else [*cond, _contains(conn, folded)]
            stmt = select(*_ROOM_COLUMNS).where(*where)
            stmt = stmt.order_by(rooms.c.created, rooms.c.id).limit(limit)
            return [_room(row) for row in conn.execute(stmt)]

        return await self._read_replica(run)


def _set_role(conn: Connection, room: str, user: str, role: RoomRole) -> None:
    conn.execute(
        update(members)
        .where(members.c.room_id == room, members.c.user_id == user)
        .values(role=role)
    )
