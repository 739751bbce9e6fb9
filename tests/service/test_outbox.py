"""The transactional outboxes of the message, room and file services, on every
database (``dialect``): an event row commits with its change, and a change that
rolls back leaves none."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from databases import Databases
from message_helpers import Directory, caller, send
from sqlalchemy import Table, insert, select

from imserver.protocol.convs import direct_conv
from imserver.services.file.api import FileDeleted, FileStored
from imserver.services.file.service import MIGRATIONS as FILE_MIGRATIONS
from imserver.services.file.store import DOOMED, FileRecord, SqlFileStore
from imserver.services.message.api import MessageStored
from imserver.services.message.schema import messages as messages_table
from imserver.services.message.schema import outbox as message_outbox
from imserver.services.message.service import open_message_service
from imserver.services.room.api import MemberChanged
from imserver.services.room.service import MIGRATIONS as ROOM_MIGRATIONS
from imserver.services.room.store import RoomRecord, SqlRoomStore
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.events import (
    FILE_DELETED,
    FILE_STORED,
    MESSAGE_STORED,
    ROOM_MEMBER_CHANGED,
    Event,
    decode_event,
)
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.errors import Internal
from imserver.utils.ids import ConvId

E = TypeVar("E", bound=Event)


async def rows(url: str, table: Table) -> list[Any]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            t = table.c
            found = await conn.execute(select(t.id, t.event_id, t.key, t.body).order_by(t.id))
            return found.all()
    finally:
        await engine.dispose()


def decoded(found: list[Any], key: str, kind: type[E]) -> list[E]:
    assert {r.key for r in found} == {key}
    events = [decode_event(bytes(r.body), kind) for r in found]
    assert [e.id for e in events] == [r.event_id for r in found]
    assert len({e.id for e in events}) == len(events)
    return events


async def test_message_batches_commit_their_events(databases: Databases) -> None:
    url = databases.url("message")
    service = await open_message_service(
        url, bus=MemoryLiveBus(), users=Directory("alice", "bob"), events=True
    )
    conv = direct_conv("alice", "bob")
    try:
        for i in range(3):
            await service.send(caller("alice"), send(conv, f"c{i}", f"hello {i}"))
        # Another writer stores seq 4 behind the service's back: the next batch's
        # insert meets it and the whole batch rolls back.
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.execute(
                insert(messages_table).values(
                    conv=conv, seq=4, sender="bob", ts=1, type="text", body="x", cid="intruder"
                )
            )
        await engine.dispose()
        with pytest.raises(Internal):
            await service.send(caller("alice"), send(conv, "c3", "lost"))
    finally:
        await service.close()
    events = decoded(await rows(url, message_outbox), MESSAGE_STORED, MessageStored)
    assert [(e.v, e.message.conv, e.message.seq, e.message.body) for e in events] == [
        (1, conv, 1, "hello 0"),
        (1, conv, 2, "hello 1"),
        (1, conv, 3, "hello 2"),
    ]
    assert all(e.message.members == ("alice", "bob") for e in events)


async def test_no_outbox_rows_when_the_event_stream_is_off(databases: Databases) -> None:
    url = databases.url("message")
    service = await open_message_service(url, bus=MemoryLiveBus(), users=Directory("a", "b"))
    try:
        assert service.outbox is None
        await service.send(caller("a"), send(direct_conv("a", "b"), "c1"))
    finally:
        await service.close()
    assert await rows(url, message_outbox) == []


async def test_membership_changes_commit_their_events(databases: Databases) -> None:
    url = databases.url("room")
    await upgrade(url, ROOM_MIGRATIONS)
    store = SqlRoomStore.on_engine(make_engine(url)).with_outbox()
    room = RoomRecord(
        id="r1", name="Room", topic=None, public=True, owner="ann", created=5, member_count=2
    )
    try:
        await store.create_room(room, ["bea"], now=5)
        assert await store.add_member("r1", "cal", now=6, max_size=10) == 3
        await store.set_role("r1", "cal", "admin", by="ann", now=7)
        await store.remove_member("r1", "bea", now=8, new_owner=None, by="cal")
        await store.remove_member("r1", "ann", now=9, new_owner="cal")
        # Rolled back: cal is a member already, so the insert fails after the counts moved.
        with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError, any dialect
            await store.add_member("r1", "cal", now=10, max_size=10)
        # Refused (the room is full): nothing written, no event.
        assert await store.add_member("r1", "dan", now=11, max_size=1) is None
    finally:
        await store.close()
    events = decoded(await rows(url, store.outbox.table), ROOM_MEMBER_CHANGED, MemberChanged)  # type: ignore[union-attr]
    assert [(e.room, e.user, e.change, e.role, e.by, e.ts) for e in events] == [
        ("r1", "ann", "join", "owner", "ann", 5),
        ("r1", "bea", "join", "member", "ann", 5),
        ("r1", "cal", "join", "member", "cal", 6),
        ("r1", "cal", "role", "admin", "ann", 7),
        ("r1", "bea", "kick", None, "cal", 8),
        ("r1", "ann", "leave", None, "ann", 9),
        ("r1", "cal", "role", "owner", "ann", 9),
    ]


def record(file_id: str, size: int, owner: str = "ann") -> FileRecord:
    return FileRecord(
        id=file_id,
        conv=ConvId("d:ann:bob"),
        owner=owner,
        name=f"{file_id}.txt",
        size=size,
        mime="text/plain",
        sha256=f"{file_id:0>64}",
        thumb_mime=None,
        created=100,
        state="new",
    )


async def test_file_records_commit_their_events(databases: Databases) -> None:
    url = databases.url("file")
    await upgrade(url, FILE_MIGRATIONS)
    store = SqlFileStore.on_engine(make_engine(url)).with_outbox()
    try:
        assert await store.insert(record("f1", 10), quota=25) is None
        assert await store.insert(record("f2", 10), quota=25) is None
        # Over the quota: the insert is rolled back, and its event with it.
        assert await store.insert(record("f3", 10), quota=25) == 20
        await store.set_state(["f1"], DOOMED, was=["new"])
        await store.delete_doomed(["f1", "f2"], now=200)
        await store.delete("f2", now=300)
    finally:
        await store.close()
    found = await rows(url, store.outbox.table)  # type: ignore[union-attr]
    assert [r.key for r in found] == [FILE_STORED, FILE_STORED, FILE_DELETED, FILE_DELETED]
    stored = [decode_event(bytes(r.body), FileStored) for r in found[:2]]
    deleted = [decode_event(bytes(r.body), FileDeleted) for r in found[2:]]
    assert [(e.file_id, e.size, e.owner, e.conv, e.ts) for e in stored] == [
        ("f1", 10, "ann", "d:ann:bob", 100),
        ("f2", 10, "ann", "d:ann:bob", 100),
    ]
    assert [(e.file_id, e.conv, e.ts) for e in deleted] == [
        ("f1", "d:ann:bob", 200),
        ("f2", "d:ann:bob", 300),
    ]
