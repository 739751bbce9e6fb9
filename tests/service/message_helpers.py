"""Plain data doubles of the interfaces the message service consumes, and small builders.

``Directory`` and ``Rooms`` are in-memory implementations of the ``UserDirectory`` and
``RoomDirectory`` protocols (dicts and sets, no mocking); the database and the live bus
used with them in the tests are real. :func:`open_backend` opens the service on one
of :data:`BACKENDS`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from databases import ServerDatabases

from imserver.protocol import ops
from imserver.protocol.events import Event
from imserver.protocol.models import Message, PresenceInfo, User
from imserver.services.caller import Caller
from imserver.services.gateway.channels import Channels
from imserver.services.message.api import FileRef, Members
from imserver.services.message.search import Fts5Search, LikeSearch
from imserver.services.message.service import (
    MIGRATIONS,
    LocalMessageService,
    open_message_service,
)
from imserver.services.message.store import SqlMessageStore
from imserver.storage.bus import LiveBus, MemoryLiveBus, Publication
from imserver.storage.runners import AsyncRunner, ThreadRunner, sqlite_engine
from imserver.storage.sql import make_engine, sqlite_url, upgrade
from imserver.utils.errors import NotFound, Unavailable
from imserver.utils.ids import LoginId, RoomId, SessionId, UserId


class Directory:
    """A ``UserDirectory``: a dict of users, a set of (blocker, blocked) pairs and the
    set of users online."""

    def __init__(self, *ids: str) -> None:
        self.users: dict[UserId, User] = {}
        self.blocks: set[tuple[str, str]] = set()
        self.online: set[str] = set()
        for i in ids:
            self.add(i)

    def add(self, user: str, display_name: str | None = None) -> None:
        self.users[UserId(user)] = User(
            id=user, username=user, display_name=display_name or f"User {user}", created=0
        )

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]:
        return {u: self.users[u] for u in users if u in self.users}

    async def is_blocked(self, blocker: UserId, blocked: UserId) -> bool:
        return (blocker, blocked) in self.blocks

    async def blocked_pairs(
        self, blockers: Sequence[UserId], blocked: Sequence[UserId]
    ) -> list[bool]:
        return [(a, b) in self.blocks for a, b in zip(blockers, blocked, strict=True)]

    async def get_presence(self, users: Sequence[UserId]) -> list[PresenceInfo]:
        return [
            PresenceInfo(user=u, status="online" if u in self.online else "offline", last_seen=None)
            for u in dict.fromkeys(users)
            if u in self.users
        ]


class Rooms:
    """A ``RoomDirectory``: room id -> {user: role}, room id -> the version of its member
    list (0 unless set), and room id -> title."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, str]] = {}
        self.versions: dict[str, int] = {}
        self.titles: dict[str, str] = {}
        self.invited: dict[str, set[str]] = {}

    def add(
        self, room: str, title: str, owner: str, *members: str, admins: Sequence[str] = ()
    ) -> None:
        roles = {owner: "owner"}
        roles.update({m: "member" for m in members})
        roles.update({a: "admin" for a in admins})
        self.members[room] = roles
        self.titles[room] = title

    async def room_members(self, room: str) -> Members:
        if room not in self.members:
            raise NotFound(f"no room {room}")
        return Members.of(self.members[room], self.versions.get(room, 0))

    async def room_role(self, room: str, user: UserId) -> str | None:
        return self.members.get(room, {}).get(user)

    async def room_title(self, room: str) -> str:
        if room not in self.titles:
            raise NotFound(f"no room {room}")
        return self.titles[room]

    async def rooms_of(self, user: UserId) -> Sequence[str]:
        return [room for room, roles in self.members.items() if user in roles]

    async def invitations_of(self, user: UserId) -> Sequence[str]:
        return [room for room, users in self.invited.items() if user in users]

    async def listed_rooms(self, users: Sequence[UserId]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for user in users:
            rooms = [*await self.rooms_of(user), *await self.invitations_of(user)]
            if rooms:
                found[user] = list(dict.fromkeys(rooms))
        return found


@dataclass
class Delivery:
    """One event as a gateway fans it out: to the sessions of ``users`` but the
    excluded ones. An event that reaches them on several channels (a direct message
    on both users' channels, a room message and its notices) is one delivery."""

    users: list[str]
    event: Event
    exclude_session: str | None
    exclude_user: str | None


class Recorder:
    """A gateway's routing of the live bus (the real :class:`Channels`) for users
    attached with :meth:`attach`, recording deliveries instead of writing them to
    sessions."""

    def __init__(self, bus: LiveBus) -> None:
        self.deliveries: list[Delivery] = []
        self.resyncs: list[list[str]] = []
        self.channels = Channels(
            bus, self._deliver, lambda users: self.resyncs.append([*users]), self._read
        )

    @staticmethod
    async def _read(user: str, conv: str, after: int) -> tuple[list[Message], bool]:
        """No record behind this routing: a gap cannot be filled, its users resync."""
        raise Unavailable("no message service behind this recorder")

    def attach(self, user: str, rooms: Iterable[str] = ()) -> None:
        """A first session of ``user``, a member of ``rooms``."""
        self.channels.add_user(user)
        self.channels.add_rooms(user, [RoomId(r) for r in rooms])

    def _deliver(self, users: Iterable[str], pub: Publication) -> None:
        last = self.deliveries[-1] if self.deliveries else None
        if last is not None and last.event is pub.event:
            last.users.extend(u for u in users if u not in last.users)
            return
        self.deliveries.append(
            Delivery(list(users), pub.event, pub.exclude_session, pub.exclude_user)
        )


class Files:
    """A ``FileDirectory``: file id -> :class:`FileRef`."""

    def __init__(self) -> None:
        self.refs: dict[str, FileRef] = {}

    def add(self, file_id: str, conv: str, name: str = "f.bin", mime: str = "image/png") -> None:
        thumb = f"/api/v1/files/{file_id}/thumb" if mime.startswith("image/") else None
        self.refs[file_id] = FileRef(
            id=file_id, conv=conv, name=name, size=123, mime=mime, thumb_url=thumb
        )

    async def file_refs(self, file_ids: Sequence[str]) -> dict[str, FileRef]:
        return {f: self.refs[f] for f in file_ids if f in self.refs}


def caller(user: str, session: str | None = None) -> Caller:
    """The identity of ``user`` on connection ``session`` (default ``<user>-s1``)."""
    return Caller(
        user=UserId(user),
        login=LoginId(f"{user}-login"),
        session=SessionId(session or f"{user}-s1"),
    )


def send(conv: str, cid: str, body: str = "hi", **fields: Any) -> ops.Send:
    """A ``send`` op of type ``text`` unless ``type`` is given, with the ``rid`` of a
    client's frame (which never reaches the service over the loopback)."""
    fields.setdefault("type", "text")
    fields.setdefault("rid", f"rid-{cid}")
    return ops.Send(conv=conv, cid=cid, body=body, **fields)


BACKENDS = ["sqlite", "sqlite-async", "sqlite-like", "postgresql", "mariadb"]
"""``sqlite``: what ``open_message_service`` builds (thread runners, FTS5);
``sqlite-async``: the async-engine runner the servers use (here on aiosqlite);
``sqlite-like``: the portable ``LIKE`` search; ``postgresql`` and ``mariadb``: what
``open_message_service`` builds on the session's database on that server (see
``tests/databases.py``; deselected when ``--databases`` leaves the server out)."""

SERVERS = ("postgresql", "mariadb")


async def backend_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The message database of ``backend`` for one test: a SQLite file in ``tmp_path``,
    or the session's database on the server, emptied."""
    if backend not in SERVERS:
        return sqlite_url(tmp_path, "message")
    servers: ServerDatabases = request.getfixturevalue("server_databases")
    database = await servers.get(backend)
    await servers.empty(database)
    return database.url


async def open_backend(
    backend: str,
    url: str,
    *,
    bus: MemoryLiveBus,
    users: Directory,
    rooms: Rooms,
    files: Files,
    max_body: int = 100,
) -> LocalMessageService:
    """The message service on the database at ``url``, built as ``backend`` says."""
    if backend == "sqlite" or backend in SERVERS:
        return await open_message_service(
            url, bus=bus, users=users, rooms=rooms, files=files, max_body=max_body
        )
    await upgrade(url, MIGRATIONS)
    if backend == "sqlite-async":
        engine = make_engine(url)
        store = SqlMessageStore(
            reads=AsyncRunner(engine), writes=AsyncRunner(engine, pinned=True), search=Fts5Search()
        )
    else:
        # No FTS5 index on this "dialect": drop its triggers as a non-SQLite schema would lack them.
        with sqlite3.connect(url.split("///", 1)[1]) as conn:
            conn.execute("DROP TRIGGER IF EXISTS messages_fts_update")
            conn.execute("DROP TRIGGER IF EXISTS messages_fts_delete")
        store = SqlMessageStore(
            reads=ThreadRunner(sqlite_engine(url, writer=False), threads=2),
            writes=ThreadRunner(sqlite_engine(url, writer=True), pinned=True),
            search=LikeSearch(),
        )
    svc = LocalMessageService(
        store, bus=bus, users=users, rooms=rooms, files=files, max_body=max_body
    )
    svc.start()
    return svc
