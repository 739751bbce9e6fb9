"""``storage.<service>.read_url``: lag-tolerant reads go to the replica, the others never.

The replica here is a second SQLite database with the same schema that receives no
writes until the test copies the primary into it: a replica lagging as far as one
can. What a client must see at once (``history`` after its ``send`` was acked, a
room it just joined) comes from the primary whatever the replica holds; what may lag
(message search, the room directory, the user directory listing) comes from the
replica, which the copy then brings up to date.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from message_helpers import Directory, Files, Rooms, caller, send

from imserver.protocol import ops
from imserver.services.message.service import MIGRATIONS as MESSAGE_MIGRATIONS
from imserver.services.message.service import open_message_service
from imserver.services.room.service import MIGRATIONS as ROOM_MIGRATIONS
from imserver.services.room.service import open_room_service
from imserver.services.room.store import RoomRecord
from imserver.services.user.service import MIGRATIONS as USER_MIGRATIONS
from imserver.services.user.service import open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url, upgrade
from imserver.utils.errors import Unavailable
from imserver.utils.ids import RoomId

A = caller("ua")
AB = "d:ua:ub"


def copy_database(primary: Path, replica: Path) -> None:
    """Bring the replica up to date: a consistent copy of the primary (backup API)."""
    with sqlite3.connect(primary) as src, sqlite3.connect(replica) as dst:
        src.backup(dst)


async def test_history_after_an_ack_comes_from_the_primary(tmp_path: Path) -> None:
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    replica = sqlite_url(replica_dir, "message")
    await upgrade(replica, MESSAGE_MIGRATIONS)
    svc = await open_message_service(
        sqlite_url(tmp_path, "message"),
        read_url=replica,
        bus=MemoryLiveBus(),
        users=Directory("ua", "ub"),
        rooms=Rooms(),
        files=Files(),
    )
    try:
        ack = await svc.send(A, send(AB, "c1", "zebra crossing"))
        history = await svc.history(A, ops.History(conv=AB))
        assert [(m.seq, m.body) for m in history.messages] == [(ack.seq, "zebra crossing")]
        convs = await svc.convs(A)
        assert [(c.conv, c.last_seq) for c in convs] == [(AB, ack.seq)]
        # Search tolerates lag: the replica has not seen the message yet.
        assert (await svc.search(A, ops.Search(query="zebra"))).messages == []
    finally:
        await svc.close()
    copy_database(tmp_path / "message.db", replica_dir / "message.db")
    svc = await open_message_service(
        sqlite_url(tmp_path, "message"),
        read_url=replica,
        bus=MemoryLiveBus(),
        users=Directory("ua", "ub"),
        rooms=Rooms(),
        files=Files(),
    )
    try:
        found = (await svc.search(A, ops.Search(query="zebra"))).messages
        assert [m.body for m in found] == ["zebra crossing"]
    finally:
        await svc.close()


async def test_the_room_directory_and_user_listing_read_the_replica(tmp_path: Path) -> None:
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    await upgrade(sqlite_url(replica_dir, "room"), ROOM_MIGRATIONS)
    await upgrade(sqlite_url(replica_dir, "user"), USER_MIGRATIONS)
    users = await open_user_service(
        sqlite_url(tmp_path, "user"),
        read_url=sqlite_url(replica_dir, "user"),
        argon2_memory_kib=64,
        argon2_time_cost=1,
    )

    def no_messages() -> object:
        raise Unavailable("no message service in this test")

    rooms = await open_room_service(
        sqlite_url(tmp_path, "room"),
        read_url=sqlite_url(replica_dir, "room"),
        users=users,
        messages=no_messages,  # type: ignore[arg-type]
    )
    try:
        owner = await users.register("owner", "correct horse", None)
        assert await users.get_user(owner.id) == owner  # a look-up a write relies on
        assert await users.list_users(None, 10) == []  # the listing may lag
        # The room's rows as the service writes them (its create also posts a system
        # message, and this test has no message service).
        record = RoomRecord(
            id=RoomId("r1"),
            name="Lobby",
            topic=None,
            public=True,
            owner=owner.id,
            created=1,
            member_count=1,
        )
        await rooms._store.create_room(record, [], 1)
        assert (await rooms.list(caller(owner.id), ops.RoomList())).rooms == []
    finally:
        await rooms.close()
        await users.close()
    for name in ("room", "user"):
        shutil.copyfile(tmp_path / f"{name}.db", replica_dir / f"{name}.db")
    users = await open_user_service(
        sqlite_url(tmp_path, "user"),
        read_url=sqlite_url(replica_dir, "user"),
        argon2_memory_kib=64,
        argon2_time_cost=1,
    )
    rooms = await open_room_service(
        sqlite_url(tmp_path, "room"),
        read_url=sqlite_url(replica_dir, "room"),
        users=users,
        messages=no_messages,  # type: ignore[arg-type]
    )
    try:
        assert await users.list_users(None, 10) == [owner.id]
        listed = (await rooms.list(caller(owner.id), ops.RoomList())).rooms
        assert [r.name for r in listed] == ["Lobby"]
    finally:
        await rooms.close()
        await users.close()
