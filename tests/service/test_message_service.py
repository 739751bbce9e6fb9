"""Service tests of the message service on a real SQLite file and a real MemoryLiveBus.

The user and room directories are the plain data doubles of ``message_helpers``.
Contract tests: each runs over the ``local`` and ``loopback`` transports
(``transports.py``); in the loopback run the service and the directories it calls are
reached through the serialising adapter.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conformance import signature_mismatches
from databases import rows as db_rows
from message_helpers import (
    BACKENDS,
    Delivery,
    Directory,
    Files,
    Recorder,
    Rooms,
    backend_url,
    caller,
    open_backend,
    send,
)
from transports import local_only, through

from imserver.protocol import ops
from imserver.protocol.convs import direct_conv
from imserver.protocol.events import Msg, Receipt, TypingEvent
from imserver.protocol.models import Message, User
from imserver.services.file.api import MemberDirectory
from imserver.services.message.api import (
    FileDirectory,
    Members,
    MessageService,
    RoomDirectory,
    UserDirectory,
)
from imserver.services.message.search import fts5_query
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url
from imserver.utils.errors import (
    BadRequest,
    Forbidden,
    IMError,
    Internal,
    NotFound,
    TooLarge,
    Unavailable,
)
from imserver.utils.ids import RoomId, UserId

AB = "d:ua:ub"
AC = "d:ua:uc"
BC = "d:ub:uc"
ROOM = "r:r1"
A, B, C, D = caller("ua"), caller("ub"), caller("uc"), caller("ud")

FILES = Files()
FILES.add("f1", AB, "cat.png", "image/png")
FILES.add("f", AB, "notes.pdf", "application/pdf")
FILES.add("f-ac", AC, "other.png", "image/png")


async def open_service(
    backend: str,
    url: str,
    bus: MemoryLiveBus,
    users: Directory,
    rooms: Rooms,
    transport: str = "local",
) -> Any:
    """The service over ``transport``, its directories reached over it too."""
    local = await open_backend(
        backend,
        url,
        bus=bus,
        users=through(transport, UserDirectory, users),
        rooms=through(transport, RoomDirectory, rooms),
        files=through(transport, FileDirectory, FILES),
    )
    return through(transport, MessageService, local)


@dataclass
class Env:
    backend: str
    transport: str
    path: Path
    url: str
    bus: MemoryLiveBus
    users: Directory
    rooms: Rooms
    deliveries: list[Delivery]
    svc: LocalMessageService

    async def reopen(self, users: Directory | None = None) -> None:
        await self.svc.close()
        self.svc = await open_service(
            self.backend, self.url, self.bus, users or self.users, self.rooms, self.transport
        )

    def msgs(self) -> list[Msg]:
        return [d.event for d in self.deliveries if isinstance(d.event, Msg)]


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path, transport: str) -> AsyncIterator[Env]:
    url = await backend_url(request, request.param, tmp_path)
    bus = MemoryLiveBus()
    users = Directory("ua", "ub", "uc", "ud")
    rooms = Rooms()
    # r1: ua owner, ub admin, uc member; ud is an outsider.
    rooms.add("r1", "Room One", "ua", "uc", admins=["ub"])
    recorder = Recorder(bus)  # every user online on one gateway
    for user in users.users:
        recorder.attach(user, await rooms.rooms_of(user))
    deliveries = recorder.deliveries
    svc = await open_service(request.param, url, bus, users, rooms, transport)
    e = Env(
        request.param, transport, tmp_path / "message.db", url, bus, users, rooms, deliveries, svc
    )
    yield e
    await e.svc.close()
    assert recorder.resyncs == []  # every conversation's seqs were published without a gap


async def fails(aw: Awaitable[Any], cls: type[IMError], field: str | None = None) -> IMError:
    """Await ``aw`` and require it to fail with exactly ``cls`` (and ``field``)."""
    with pytest.raises(IMError) as info:
        await aw
    assert type(info.value) is cls, info.value
    assert info.value.field == field, info.value.field
    return info.value


async def history(env: Env, who: Any, conv: str, **kw: Any) -> list[Message]:
    kw.setdefault("rid", "rid-history")
    return (await env.svc.history(who, ops.History(conv=conv, **kw))).messages


async def rows(env: Env, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (named ``:params``) on the service's database."""
    return await db_rows(env.url, sql, params)


# --- conversation ids -----------------------------------------------------------------


async def test_conv_id_validation(env: Env) -> None:
    svc = env.svc
    await fails(svc.send(A, send("d:ub:ua", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("d:ua:ua", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("d:ua", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("d:ua:ub:uc", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("x:ua", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("r:", "c1")), BadRequest, "conv")
    await fails(svc.send(A, send("d:ua:zz", "c1")), NotFound, "conv")
    await fails(svc.send(A, send(BC, "c1")), Forbidden)
    await fails(svc.history(A, ops.History(conv="d:ub:ua")), BadRequest, "conv")
    await fails(svc.history(A, ops.History(conv="d:ua:zz")), NotFound, "conv")
    await fails(svc.history(A, ops.History(conv=BC)), Forbidden)
    await fails(svc.history(A, ops.History(conv="s:ub")), Forbidden)
    await fails(svc.history(A, ops.History(conv="r:nope")), NotFound)
    assert (await svc.send(A, send(AB, "c1"))).seq == 1


async def test_room_conv_without_room_directory(tmp_path: Path) -> None:
    svc = await open_message_service(
        sqlite_url(tmp_path, "m2"), bus=MemoryLiveBus(), users=Directory("ua", "ub")
    )
    try:
        await fails(svc.send(A, send(ROOM, "c1")), NotFound, "conv")
        await fails(svc.history(A, ops.History(conv=ROOM)), NotFound, "conv")
        assert [c.conv for c in await svc.convs(A)] == []
    finally:
        await svc.close()


async def test_system_conversation_is_read_only(env: Env) -> None:
    svc = env.svc
    await svc.post_system(UserId("ua"), "welcome")
    for who in (A, B):
        await fails(svc.send(who, send("s:ua", "c1")), Forbidden)
        await fails(svc.edit(who, ops.Edit(conv="s:ua", cid="c2", target=1, body="x")), Forbidden)
        await fails(svc.recall(who, ops.Recall(conv="s:ua", cid="c3", target=1)), Forbidden)
        await fails(
            svc.react(who, ops.React(conv="s:ua", cid="c4", target=1, emoji="👍")), Forbidden
        )
        await fails(svc.typing(who, "s:ua"), Forbidden)
    await fails(svc.history(B, ops.History(conv="s:ua")), Forbidden)
    await fails(svc.mark(B, "s:ua", 1, "read"), Forbidden)
    page = await history(env, A, "s:ua")
    assert [(m.seq, m.from_, m.type, m.body) for m in page] == [(1, "system", "system", "welcome")]
    await svc.mark(A, "s:ua", 1, "read")


# --- send -----------------------------------------------------------------------------


async def test_send_and_idempotent_resend(env: Env) -> None:
    first = await env.svc.send(A, send(AB, "c-1", "hello"))
    assert (first.conv, first.seq, first.cid, first.dup) == (AB, 1, "c-1", False)
    again = await env.svc.send(A, send(AB, "c-1", "hello again"))
    assert (again.seq, again.ts, again.cid, again.dup) == (1, first.ts, "c-1", True)
    # The same cid from the other participant is another key.
    other = await env.svc.send(B, send(AB, "c-1", "mine"))
    assert (other.seq, other.dup) == (2, False)
    page = await history(env, A, AB)
    assert [(m.seq, m.from_, m.body) for m in page] == [(1, "ua", "hello"), (2, "ub", "mine")]
    assert await rows(env, "SELECT count(*) FROM messages") == [(2,)]
    assert [m.seq for m in env.msgs()] == [1, 2]  # the dup published nothing


async def test_duplicate_within_one_batch(env: Env) -> None:
    f1 = env.svc.send(A, send(AB, "same", "one"))
    f2 = env.svc.send(A, send(AB, "same", "two"))
    r1, r2 = await asyncio.gather(f1, f2)
    assert (r1.seq, r1.dup) == (1, False)
    assert (r2.seq, r2.ts, r2.dup) == (1, r1.ts, True)
    assert [m.body for m in await history(env, A, AB)] == ["one"]
    assert len(env.msgs()) == 1


async def test_resend_unknown_to_the_cache_is_a_duplicate(env: Env) -> None:
    first = await env.svc.send(A, send(AB, "old", "stored before the restart"))
    await env.svc.send(B, send(AB, "b-1", "reply"))
    await env.reopen()  # a new writer: its key cache is empty
    env.deliveries.clear()
    # The resend shares its batch with new writes to the same and another conversation.
    results = await asyncio.gather(
        env.svc.send(A, send(AB, "new-1", "after")),
        env.svc.send(A, send(AB, "old", "resent")),
        env.svc.send(A, send(AC, "new-2", "elsewhere")),
        env.svc.send(B, send(AB, "new-3", "more")),
    )
    assert [(r.conv, r.seq, r.dup) for r in results] == [
        (AB, 3, False),
        (AB, 1, True),
        (AC, 1, False),
        (AB, 4, False),
    ]
    assert results[1].ts == first.ts
    page = await history(env, A, AB)
    assert [(m.seq, m.body) for m in page] == [
        (1, "stored before the restart"),
        (2, "reply"),
        (3, "after"),
        (4, "more"),
    ]
    assert [(m.conv, m.seq) for m in env.msgs()] == [(AB, 3), (AC, 1), (AB, 4)]
    # Alone in its batch, and again once the cache knows it.
    for _ in range(2):
        again = await env.svc.send(A, send(AB, "old", "once more"))
        assert (again.seq, again.ts, again.dup) == (1, first.ts, True)
    assert await rows(env, "SELECT count(*) FROM messages") == [(5,)]


async def test_concurrent_sends_are_gap_free_and_refusals_take_no_seq(env: Env) -> None:
    futures = []
    for i in range(150):
        futures.append(env.svc.send(A if i % 2 else B, send(AB, f"c{i}", f"m{i}")))
        if i % 10 == 0:  # refused in the writer: a reply_to far beyond the last seq
            futures.append(env.svc.send(A, send(AB, f"bad{i}", "x", reply_to=10_000)))
    results = await asyncio.gather(*futures, return_exceptions=True)
    good = [r for r in results if isinstance(r, ops.SendData)]
    bad = [r for r in results if isinstance(r, BaseException)]
    assert [r.seq for r in good] == list(range(1, 151))
    assert len(bad) == 15 and all(isinstance(e, BadRequest) for e in bad)
    page = await history(env, A, AB, limit=200)
    assert [m.seq for m in page] == list(range(1, 151))
    assert [m.body for m in page] == [f"m{i}" for i in range(150)]
    assert [m.seq for m in env.msgs()] == list(range(1, 151))


async def test_block_forbids_direct_sends(env: Env) -> None:
    env.users.blocks.add(("ub", "ua"))  # ub blocked ua
    await fails(env.svc.send(A, send(AB, "c1")), Forbidden)
    ok = await env.svc.send(B, send(AB, "c2", "still talking"))
    assert ok.seq == 1
    await fails(env.svc.react(A, ops.React(conv=AB, cid="c3", target=1, emoji="x")), Forbidden)
    assert [m.from_ for m in await history(env, A, AB)] == ["ub"]
    # A message stored before the block can still be recalled by its sender.
    env.users.blocks.clear()
    await env.svc.send(A, send(AB, "c4", "oops"))
    env.users.blocks.add(("ub", "ua"))
    await fails(env.svc.edit(A, ops.Edit(conv=AB, cid="c5", target=2, body="x")), Forbidden)
    assert (await env.svc.recall(A, ops.Recall(conv=AB, cid="c6", target=2))).seq == 3


@local_only  # counts the writer's calls of the directory object itself
async def test_blocks_are_checked_once_per_batch(env: Env) -> None:
    calls: list[list[tuple[str, str]]] = []

    class Counting(Directory):
        async def blocked_pairs(
            self, blockers: Sequence[UserId], blocked: Sequence[UserId]
        ) -> list[bool]:
            calls.append(list(zip(blockers, blocked, strict=True)))
            return await super().blocked_pairs(blockers, blocked)

    users = Counting("ua", "ub", "uc", "ud")
    users.blocks.add(("uc", "ua"))  # uc blocked ua
    await env.reopen(users)
    # Queued in one turn of the loop: one batch of the writer.
    sends = [
        env.svc.send(A, send(AB, "c1")),
        env.svc.send(A, send(AB, "c2")),
        env.svc.send(B, send(AB, "c3")),
        env.svc.send(A, send(AC, "c4")),
        env.svc.send(B, send(BC, "c5")),
    ]
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert [getattr(r, "seq", None) for r in results] == [1, 2, 3, None, 1]
    assert isinstance(results[3], Forbidden)
    assert len(calls) == 1
    assert sorted(calls[0]) == [("ua", "ub"), ("ub", "ua"), ("uc", "ua"), ("uc", "ub")]


async def test_non_members_are_forbidden_everywhere(env: Env) -> None:
    await env.svc.send(A, send(ROOM, "c1"))
    svc = env.svc
    await fails(svc.send(D, send(ROOM, "d1")), Forbidden)
    await fails(svc.edit(D, ops.Edit(conv=ROOM, cid="d2", target=1, body="x")), Forbidden)
    await fails(svc.recall(D, ops.Recall(conv=ROOM, cid="d3", target=1)), Forbidden)
    await fails(svc.react(D, ops.React(conv=ROOM, cid="d4", target=1, emoji="x")), Forbidden)
    await fails(svc.history(D, ops.History(conv=ROOM)), Forbidden)
    await fails(svc.mark(D, ROOM, 1, "read"), Forbidden)
    await fails(svc.mark(D, ROOM, 1, "recv"), Forbidden)
    await fails(svc.typing(D, ROOM), Forbidden)
    await fails(svc.search(D, ops.Search(query="hi", conv=ROOM)), Forbidden)
    # The same for a direct conversation the caller is not part of.
    await fails(svc.send(C, send(AB, "c1")), Forbidden)
    await fails(svc.mark(C, AB, 1, "read"), Forbidden)
    await fails(svc.typing(C, AB), Forbidden)
    assert [m.seq for m in await history(env, A, ROOM)] == [1]


async def test_body_limit_and_file_meta(env: Env) -> None:
    svc = env.svc
    await fails(svc.send(A, send(AB, "c1", "x" * 101)), TooLarge, "body")
    assert (await svc.send(A, send(AB, "c2", "é" * 100))).seq == 1
    await fails(svc.send(A, send(AB, "c3", "", type="image")), BadRequest, "meta")
    await fails(svc.send(A, send(AB, "c4", "", type="file", meta={"file": 7})), BadRequest, "meta")
    await fails(
        svc.edit(A, ops.Edit(conv=AB, cid="c5", target=1, body="y" * 101)), TooLarge, "body"
    )
    # A file of another conversation, or an unknown id: the same refusal.
    for cid, file_id in (("c7", "f-ac"), ("c8", "nope")):
        await fails(
            svc.send(A, send(AB, cid, "", type="image", meta={"file": file_id})),
            BadRequest,
            "meta",
        )
    sent = await svc.send(A, send(AB, "c6", "pic", type="image", meta={"file": "f1", "w": 3}))
    page = await history(env, B, AB)
    meta = {
        "file": "f1",
        "w": 3,
        "name": "cat.png",
        "size": 123,
        "mime": "image/png",
        "thumb_url": "/api/v1/files/f1/thumb",
    }
    assert (page[-1].seq, page[-1].type, page[-1].meta) == (sent.seq, "image", meta)
    assert env.msgs()[-1].meta == meta
    assert await svc.referenced_files(["f1", "f", "f-ac", "nope"]) == {"f1"}
    await svc.check_member(UserId("ua"), AB)
    await fails(svc.check_member(UserId("uc"), AB), Forbidden)
    await fails(svc.check_member(UserId("ud"), ROOM), Forbidden)
    await svc.check_member(UserId("uc"), ROOM)
    await fails(svc.check_member(UserId("ua"), "d:ua:zz"), NotFound, "conv")
    await fails(svc.check_member(UserId("ua"), "x:1"), BadRequest, "conv")


async def test_reply_to_and_mentions(env: Env) -> None:
    svc = env.svc
    await fails(svc.send(A, send(AB, "c1", reply_to=1)), BadRequest, "reply_to")
    await svc.send(A, send(AB, "c2", "first"))
    r = await svc.send(B, send(AB, "c3", "answer", reply_to=1, mentions=["ua"]))
    assert r.seq == 2
    await fails(svc.send(A, send(AB, "c4", reply_to=3)), BadRequest, "reply_to")
    await fails(svc.send(A, send(AB, "c5", mentions=["uc"])), BadRequest, "mentions")
    await fails(svc.send(A, send(ROOM, "c6", mentions=["ud"])), BadRequest, "mentions")
    assert (await svc.send(A, send(ROOM, "c7", mentions=["ub", "uc"]))).seq == 1
    m = (await history(env, A, AB))[-1]
    assert (m.reply_to, m.mentions) == (1, ["ua"])
    event = env.msgs()[-2]
    assert (event.seq, event.reply_to, event.mentions) == (2, 1, ["ua"])


# --- edit, recall, react --------------------------------------------------------------


async def test_edit_recall_react_annotations(env: Env) -> None:
    svc = env.svc
    await svc.send(A, send(AB, "c1", "hello"))
    await svc.send(B, send(AB, "c2", "yo"))
    e = await svc.edit(A, ops.Edit(conv=AB, cid="c3", target=1, body="hello, edited"))
    assert (e.seq, e.dup) == (3, False)
    await svc.react(B, ops.React(conv=AB, cid="c4", target=1, emoji="👍"))
    await svc.react(A, ops.React(conv=AB, cid="c5", target=1, emoji="👍"))
    await svc.react(A, ops.React(conv=AB, cid="c6", target=1, emoji="🎉"))
    await svc.react(A, ops.React(conv=AB, cid="c7", target=1, emoji="🎉", remove=True))
    await svc.react(A, ops.React(conv=AB, cid="c8", target=2, emoji="❤"))
    r = await svc.recall(B, ops.Recall(conv=AB, cid="c9", target=2))
    assert r.seq == 9
    page = await history(env, A, AB)
    by_seq = {m.seq: m for m in page}
    one, two = by_seq[1], by_seq[2]
    assert (one.body, one.edited, one.recalled) == ("hello, edited", True, False)
    assert one.reactions == {"👍": ["ub", "ua"]}
    assert (two.body, two.recalled, two.reactions, two.meta) == ("", True, None, None)
    edit = by_seq[3]
    assert (edit.type, edit.body, edit.meta, edit.from_) == (
        "edit",
        "hello, edited",
        {"target": 1},
        "ua",
    )
    react = by_seq[7]
    assert (react.type, react.body) == ("reaction", "")
    assert react.meta == {"target": 1, "emoji": "🎉", "remove": True}
    recall = by_seq[9]
    assert (recall.type, recall.body, recall.meta) == ("recall", "", {"target": 2})
    assert [m.type for m in env.msgs()][-1] == "recall"


async def test_recall_blanks_the_edits_of_the_recalled_message(env: Env) -> None:
    await env.svc.send(A, send(AB, "c1", "secret"))
    await env.svc.edit(A, ops.Edit(conv=AB, cid="c2", target=1, body="secret 2"))
    await env.svc.recall(A, ops.Recall(conv=AB, cid="c3", target=1))
    page = await history(env, B, AB)
    assert [(m.type, m.body) for m in page] == [("text", ""), ("edit", ""), ("recall", "")]
    assert page[0].recalled and page[0].edited


async def test_edit_and_recall_rules(env: Env) -> None:
    svc = env.svc
    await svc.send(A, send(AB, "c1", "mine"))
    await svc.edit(A, ops.Edit(conv=AB, cid="c2", target=1, body="mine!"))
    await fails(svc.edit(A, ops.Edit(conv=AB, cid="e1", target=9, body="x")), NotFound, "target")
    await fails(svc.edit(B, ops.Edit(conv=AB, cid="e2", target=1, body="x")), Forbidden)
    await fails(svc.edit(A, ops.Edit(conv=AB, cid="e3", target=2, body="x")), BadRequest, "target")
    await fails(svc.recall(B, ops.Recall(conv=AB, cid="e4", target=1)), Forbidden)
    await fails(svc.recall(A, ops.Recall(conv=AB, cid="e5", target=5)), NotFound, "target")
    await svc.recall(A, ops.Recall(conv=AB, cid="c3", target=1))
    await fails(svc.edit(A, ops.Edit(conv=AB, cid="e6", target=1, body="x")), BadRequest, "target")
    await fails(svc.recall(A, ops.Recall(conv=AB, cid="e7", target=1)), BadRequest, "target")
    await fails(
        svc.react(B, ops.React(conv=AB, cid="e8", target=1, emoji="x")), BadRequest, "target"
    )
    await fails(
        svc.react(B, ops.React(conv=AB, cid="e9", target=99, emoji="x")), NotFound, "target"
    )
    # None of the refusals took a seq.
    assert [m.seq for m in await history(env, A, AB)] == [1, 2, 3]


async def test_recall_in_rooms_by_admins_only(env: Env) -> None:
    svc = env.svc
    await svc.send(C, send(ROOM, "c1", "from a member"))
    await svc.send(A, send(ROOM, "c2", "from the owner"))
    await fails(svc.recall(C, ops.Recall(conv=ROOM, cid="x1", target=2)), Forbidden)
    await svc.recall(B, ops.Recall(conv=ROOM, cid="x3", target=1))  # an admin
    await svc.send(B, send(ROOM, "c3", "from the admin"))
    await svc.recall(A, ops.Recall(conv=ROOM, cid="x4", target=4))  # the owner
    page = await history(env, C, ROOM)
    assert [(m.seq, m.recalled) for m in page if m.type == "text"] == [
        (1, True),
        (2, False),
        (4, True),
    ]


async def test_same_batch_send_edit_recall(env: Env) -> None:
    svc = env.svc
    f1 = svc.send(A, send(AB, "c1", "draft"))
    f2 = svc.edit(A, ops.Edit(conv=AB, cid="c2", target=1, body="final"))
    f3 = svc.react(B, ops.React(conv=AB, cid="c3", target=1, emoji="ok"))
    f4 = svc.recall(A, ops.Recall(conv=AB, cid="c4", target=1))
    f5 = svc.edit(A, ops.Edit(conv=AB, cid="c5", target=1, body="too late"))
    results = await asyncio.gather(f1, f2, f3, f4, f5, return_exceptions=True)
    assert [r.seq for r in results[:4] if isinstance(r, ops.SendData)] == [1, 2, 3, 4]
    assert isinstance(results[4], BadRequest)
    page = await history(env, A, AB)
    assert (page[0].body, page[0].recalled, page[0].reactions) == ("", True, None)


# --- history --------------------------------------------------------------------------


async def test_history_paging(env: Env) -> None:
    for i in range(10):
        await env.svc.send(A, send(AB, f"c{i}", f"m{i + 1}"))

    async def page(**kw: Any) -> tuple[list[int], bool]:
        data = await env.svc.history(B, ops.History(conv=AB, **kw))
        return [m.seq for m in data.messages], data.has_more

    assert await page(limit=3) == ([8, 9, 10], True)
    assert await page(limit=10) == (list(range(1, 11)), False)
    assert await page(after=0, limit=4) == ([1, 2, 3, 4], True)
    assert await page(after=6, limit=4) == ([7, 8, 9, 10], False)
    assert await page(after=10) == ([], False)
    assert await page(before=5, limit=2) == ([3, 4], True)
    assert await page(before=5, limit=4) == ([1, 2, 3, 4], False)
    assert await page(before=1) == ([], False)
    await fails(env.svc.history(B, ops.History(conv=AB, after=1, before=5)), BadRequest, "before")
    assert await page() == (list(range(1, 11)), False)
    assert (await env.svc.history(A, ops.History(conv=AC))).messages == []


# --- convs and markers ----------------------------------------------------------------


async def test_convs_summaries(env: Env) -> None:
    svc = env.svc
    env.users.add("ub", "Bee")
    await svc.send(A, send(AC, "a1", "to c"))  # oldest activity
    await svc.send(B, send(AB, "b1", "one"))
    await svc.send(B, send(AB, "b2", "two @ua", mentions=["ua"]))
    await svc.send(A, send(AB, "a2", "mine"))  # not unread for ua
    await svc.send(B, send(AB, "b3", "three"))
    await svc.react(B, ops.React(conv=AB, cid="b4", target=4, emoji="x"))  # not counted
    await svc.send(B, send(AB, "b5", "gone"))
    await svc.recall(B, ops.Recall(conv=AB, cid="b6", target=6))  # recalled: not counted
    await svc.post_system(UserId("ua"), "notice")
    await svc.send(C, send(ROOM, "r1", "room news @ua", mentions=["ua"]))
    await svc.mark(A, AB, 1, "read")

    convs = await svc.convs(A)
    assert [c.conv for c in convs] == [ROOM, "s:ua", AB, AC]
    by = {c.conv: c for c in convs}
    ab = by[AB]
    assert (ab.kind, ab.title, ab.last_seq, ab.read_seq, ab.recv_seq) == ("direct", "Bee", 7, 1, 1)
    assert (ab.unread, ab.mentions) == (2, 1)  # b2 and b3; b2 mentions ua
    assert ab.last is not None and (ab.last.seq, ab.last.type) == (7, "recall")
    ac = by[AC]
    assert (ac.title, ac.last_seq, ac.unread, ac.mentions) == ("User uc", 1, 0, 0)
    system = by["s:ua"]
    assert (system.kind, system.title, system.unread, system.last_seq) == ("system", "System", 1, 1)
    room = by[ROOM]
    assert (room.kind, room.title, room.unread, room.mentions) == ("room", "Room One", 1, 1)
    assert room.last is not None and room.last.body == "room news @ua"

    # ud has no direct conversation, no notices, no rooms.
    assert await svc.convs(D) == []
    # uc: the direct conversation with ua and the room; no s: without notices.
    assert [c.conv for c in await svc.convs(C)] == [ROOM, AC]
    await svc.mark(A, AB, 100, "read")
    ab = {c.conv: c for c in await svc.convs(A)}[AB]
    assert (ab.read_seq, ab.recv_seq, ab.unread, ab.mentions) == (7, 7, 0, 0)


async def test_room_without_messages_is_listed_last(env: Env) -> None:
    env.rooms.add("r2", "Quiet", "ub", "ua")
    await env.svc.send(A, send(AB, "c1"))
    convs = await env.svc.convs(A)
    assert convs[0].conv == AB and {c.conv for c in convs[1:]} == {ROOM, "r:r2"}
    quiet = next(c for c in convs if c.conv == "r:r2")
    assert (quiet.last, quiet.last_seq, quiet.title, quiet.unread) == (None, 0, "Quiet", 0)


async def test_mark_is_forward_only_clamped_and_publishes_receipts(env: Env) -> None:
    svc = env.svc
    for i in range(5):
        await svc.send(B, send(AB, f"c{i}"))
    env.deliveries.clear()
    a2 = caller("ua", "ua-s2")
    await svc.mark(a2, AB, 3, "recv")
    await svc.mark(a2, AB, 2, "recv")  # backwards: no-op, nothing published
    await svc.mark(a2, AB, 3, "recv")  # unchanged: nothing published
    await svc.mark(a2, AB, 2, "read")  # read also raises recv (already 3)
    await svc.mark(a2, AB, 99, "read")  # clamped to 5
    await svc.mark(a2, AB, 0, "read")
    receipts = [(d.event, list(d.users), d.exclude_session) for d in env.deliveries]
    assert receipts == [
        (Receipt(conv=AB, user="ua", seq=3, kind="recv"), ["ua", "ub"], "ua-s2"),
        (Receipt(conv=AB, user="ua", seq=2, kind="read"), ["ua", "ub"], "ua-s2"),
        (Receipt(conv=AB, user="ua", seq=5, kind="read"), ["ua", "ub"], "ua-s2"),
    ]
    ab = {c.conv: c for c in await svc.convs(A)}[AB]
    assert (ab.read_seq, ab.recv_seq, ab.last_seq) == (5, 5, 5)
    # Markers work the same in rooms (group receipts).
    await svc.send(A, send(ROOM, "r1"))
    env.deliveries.clear()
    await svc.mark(C, ROOM, 1, "read")
    [d] = env.deliveries
    assert d.event == Receipt(conv=ROOM, user="uc", seq=1, kind="read")
    assert sorted(d.users) == ["ua", "ub", "uc"]
    marker = "SELECT read_seq, recv_seq FROM markers WHERE conv = :conv AND user_id = 'uc'"
    assert await rows(env, marker, conv=ROOM) == [(1, 1)]


async def test_mark_on_an_empty_conversation_is_a_no_op(env: Env) -> None:
    await env.svc.mark(A, AB, 5, "read")
    assert env.deliveries == []
    assert await rows(env, "SELECT count(*) FROM markers") == [(0,)]


async def _unread_world(env: Env) -> None:
    """ua with a direct conversation read part-way, a joined room, 70 more direct
    conversations (5 of them read); ud invited to a room and sent a notice."""
    svc = env.svc
    await svc.send(B, send(AB, "b1"))  # seq 1
    await svc.send(B, send(AB, "b2"))  # seq 2
    await svc.send(A, send(AB, "a1", "mine"))  # seq 3: not unread for ua
    await svc.send(B, send(AB, "b3"))  # seq 4
    await svc.send(B, send(AB, "b4", "gone"))  # seq 5: recalled, not unread
    await svc.recall(B, ops.Recall(conv=AB, cid="b5", target=5))  # seq 6: a recall
    await svc.react(B, ops.React(conv=AB, cid="b6", target=4, emoji="x"))  # seq 7: a reaction
    await svc.mark(A, AB, 2, "read")  # ua: only seq 4 is unread past it
    for cid in ("c1", "c2"):
        await svc.send(C, send(ROOM, cid))
    await svc.send(B, send(ROOM, "b7"))
    env.rooms.add("r2", "Two", "ua")
    env.rooms.invited["r2"] = {"ud"}  # ud is only invited to r2
    await svc.send(A, send("r:r2", "a2"))
    await svc.send(A, send("r:r2", "a3"))
    await svc.post_system(UserId("ua"), "notice for ua")
    await svc.post_system(UserId("ud"), "notice for ud")
    for i in range(70):  # past UnreadCount's 64 triples per statement, for ua alone
        peer = f"p{i:02d}"
        env.users.add(peer)
        await svc.send(caller(peer), send(direct_conv(peer, "ua"), f"p{i}"))
        if i < 5:
            await svc.mark(A, direct_conv(peer, "ua"), 1, "read")


async def test_convs_unread_counts_exactly(env: Env) -> None:
    await _unread_world(env)
    unread = {c.conv: c.unread for c in await env.svc.convs(A)}
    peers = {direct_conv(f"p{i:02d}", "ua"): int(i >= 5) for i in range(70)}
    assert unread == {AB: 1, ROOM: 3, "r:r2": 0, "s:ua": 1, **peers}
    assert {c.conv: c.unread for c in await env.svc.convs(D)} == {"r:r2": 2, "s:ud": 1}
    # ub's own messages do not count, nor does the recall or the reaction.
    assert {c.conv: c.unread for c in await env.svc.convs(B)} == {AB: 1, ROOM: 2}
    assert {c.conv: c.unread for c in await env.svc.convs(C)} == {ROOM: 1}


async def test_unread_totals_is_the_sum_over_convs(env: Env) -> None:
    await _unread_world(env)
    asked = [UserId(u) for u in ("ua", "ub", "ua", "nobody", "ud", "uc", "p07", "p02")]
    totals = await env.svc.unread_totals(asked)
    # p07 and p02 sent their only message: nothing unread for them.
    assert totals == {"ua": 70, "ub": 3, "nobody": 0, "ud": 3, "uc": 1, "p07": 0, "p02": 0}
    for user in dict.fromkeys(asked):
        convs = await env.svc.convs(caller(user))
        assert totals[user] == sum(c.unread for c in convs), user
    # A marker moved past the end, and one message more: the totals follow.
    await env.svc.mark(A, AB, 100, "read")
    await env.svc.send(caller("p69"), send(direct_conv("p69", "ua"), "p70"))
    assert await env.svc.unread_totals([UserId("ua")]) == {"ua": 70}
    assert await env.svc.unread_totals([]) == {}


# --- live deliveries ------------------------------------------------------------------


async def test_send_deliveries_exclude_the_sending_session_in_seq_order(env: Env) -> None:
    futures = [env.svc.send(caller("ua", "phone"), send(AB, f"c{i}", f"m{i}")) for i in range(20)]
    futures.append(env.svc.send(caller("ua", "phone"), send(AB, "c0", "dup")))
    await asyncio.gather(*futures)
    assert len(env.deliveries) == 20
    for i, d in enumerate(env.deliveries):
        assert (
            list(d.users) == ["ua", "ub"]
            and d.exclude_session == "phone"
            and d.exclude_user is None
        )
        assert isinstance(d.event, Msg) and d.event.seq == i + 1 and d.event.body == f"m{i}"
        assert d.event.from_ == "ua" and d.event.conv == AB
    await env.svc.send(C, send(ROOM, "r1"))
    assert sorted(env.deliveries[-1].users) == ["ua", "ub", "uc"]


async def test_typing_goes_to_the_others(env: Env) -> None:
    await env.svc.typing(C, ROOM)
    [d] = env.deliveries
    assert d.event == TypingEvent(conv=ROOM, user="uc")
    assert sorted(d.users) == ["ua", "ub", "uc"] and d.exclude_user == "uc"
    assert await rows(env, "SELECT count(*) FROM messages") == [(0,)]


# --- search ---------------------------------------------------------------------------


async def test_search(env: Env) -> None:
    svc = env.svc
    await svc.send(A, send(AB, "c1", "the quick brown fox"))
    await svc.send(B, send(AB, "c2", "a lazy dog"))
    await svc.send(B, send(BC, "c3", "fox news between b and c"))
    await svc.send(C, send(ROOM, "c4", "Fox in the room"))
    await svc.send(A, send(AB, "c5", "another fox, soon recalled"))
    await svc.recall(A, ops.Recall(conv=AB, cid="c6", target=3))
    await svc.send(A, send(AB, "c7", "cat"))
    await svc.edit(A, ops.Edit(conv=AB, cid="c8", target=5, body="now a foxtrot"))
    await svc.send(A, send(AB, "c9", "file", type="file", meta={"file": "f"}))

    def found(data: ops.SearchData) -> list[tuple[str, int]]:
        return [(m.conv, m.seq) for m in data.messages]

    data = await svc.search(A, ops.Search(query="fox"))
    # Newest first; b<->c is not ua's; the recalled one is gone; prefix finds "foxtrot".
    assert found(data) == [(AB, 5), (ROOM, 1), (AB, 1)]
    assert data.next is None
    assert data.messages[0].edited and data.messages[0].body == "now a foxtrot"
    assert found(await svc.search(A, ops.Search(query="FOX", conv=ROOM))) == [(ROOM, 1)]
    assert found(await svc.search(A, ops.Search(query="quick fox"))) == [(AB, 1)]
    assert found(await svc.search(A, ops.Search(query="recalled"))) == []
    assert found(await svc.search(B, ops.Search(query="fox"))) == [
        (AB, 5),
        (ROOM, 1),
        (BC, 1),
        (AB, 1),
    ]
    assert found(await svc.search(D, ops.Search(query="fox"))) == []
    # Paging with the opaque cursor.
    p1 = await svc.search(B, ops.Search(query="fox", limit=3))
    assert found(p1) == [(AB, 5), (ROOM, 1), (BC, 1)] and p1.next is not None
    p2 = await svc.search(B, ops.Search(query="fox", limit=3, before=p1.next))
    assert found(p2) == [(AB, 1)] and p2.next is None
    await fails(
        svc.search(B, ops.Search(query="fox", before="not a cursor!")), BadRequest, "before"
    )
    await fails(svc.search(B, ops.Search(query="fox", before="")), BadRequest, "before")
    # FTS5 syntax in the query is just text.
    for q in ['"', 'fox"', "fox OR dog", "NEAR(fox dog)", "*", "fox AND", "-fox", "a:b"]:
        await svc.search(A, ops.Search(query=q))
    assert found(await svc.search(A, ops.Search(query="fox OR dog"))) == []
    assert found(await svc.search(A, ops.Search(query="   "))) == []
    if env.backend != "sqlite-like":  # full-text indexes: diacritics
        await svc.send(C, send(ROOM, "c10", "Un café, s'il vous plaît"))
        assert found(await svc.search(A, ops.Search(query="CAFE"))) == [(ROOM, 2)]
    if env.backend in ("sqlite", "sqlite-async"):  # the FTS5 index left intact
        await rows(env, "INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")


@pytest.mark.parametrize("proto", [MessageService, MemberDirectory])
def test_the_service_satisfies_its_protocols(proto: type) -> None:
    assert signature_mismatches(proto, LocalMessageService) == []


def test_fts5_query_quoting() -> None:
    assert fts5_query("hello") == '"hello"*'
    assert fts5_query('say "hi" there') == '"say" """hi""" "there"*'
    assert fts5_query("  ") == ""


@local_only  # a foreign exception from a directory is what a client stub raises, not a callee
async def test_a_failing_directory_is_unavailable(env: Env) -> None:
    class Broken(Directory):
        async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]:
            raise ConnectionError("user service down")

    await env.reopen(Broken("ua", "ub"))
    await fails(env.svc.send(A, send(AB, "c1")), Unavailable)
    await fails(env.svc.history(A, ops.History(conv=AB)), Unavailable)
    await env.reopen()
    assert (await env.svc.send(A, send(AB, "c1"))).seq == 1


# --- notices, peers, rooms ------------------------------------------------------------


async def test_post_system(env: Env) -> None:
    r = await env.svc.post_system(UserId("ub"), "maintenance tonight", {"title": "Heads up"})
    assert (r.conv, r.seq, r.dup) == ("s:ub", 1, False)
    [d] = env.deliveries
    assert list(d.users) == ["ub"] and d.exclude_session is None
    assert isinstance(d.event, Msg) and d.event.from_ == "system" and d.event.type == "system"
    assert d.event.meta == {"title": "Heads up"}
    [m] = await history(env, B, "s:ub")
    assert (m.body, m.meta, m.cid) == ("maintenance tonight", {"title": "Heads up"}, r.cid)
    assert (await env.svc.post_system(UserId("ub"), "again")).seq == 2


async def test_post_system_many_posts_once_per_user_and_is_idempotent(env: Env) -> None:
    users = [UserId("ua"), UserId("ub"), UserId("uc")]
    first = await env.svc.post_system_many(users, "upgrade at noon", {"broadcast": "b1"}, "b1")
    assert [(r.conv, r.seq, r.cid, r.dup) for r in first] == [
        (f"s:{u}", 1, "b1", False) for u in users
    ]
    assert sorted(u for d in env.deliveries for u in d.users) == users
    assert all(isinstance(d.event, Msg) and d.event.type == "system" for d in env.deliveries)
    # A retry with ud added: the three who hold it answer dup, ud gets it now.
    again = await env.svc.post_system_many([*users, UserId("ud")], "upgrade at noon", None, "b1")
    assert [(r.seq, r.dup) for r in again] == [(1, True)] * 3 + [(1, False)]
    for who, user in ((A, "ua"), (D, "ud")):
        [m] = await history(env, who, f"s:{user}")
        assert (m.body, m.from_, m.cid) == ("upgrade at noon", "system", "b1")
    assert await env.svc.post_system_many([], "nobody", None, "b2") == []


async def test_post_room_system_reaches_members_and_notified(env: Env) -> None:
    r = await env.svc.post_room_system(
        "r1", "", {"event": "kicked", "user": "ud"}, notify=[UserId("ud")], cid="k1"
    )
    assert (r.conv, r.seq) == (ROOM, 1)
    assert sorted(env.deliveries[-1].users) == ["ua", "ub", "uc", "ud"]
    again = await env.svc.post_room_system("r1", "", {"event": "kicked"}, cid="k1")
    assert (again.seq, again.dup) == (1, True)


async def test_a_pinned_member_list_holds_until_the_directory_answers_its_version(
    env: Env,
) -> None:
    # uc leaves r1 at the seq of this message; the directory still answers the old list.
    left = Members(("ua", "ub"), 5)
    await env.svc.post_room_system(RoomId("r1"), "uc left", {"event": "left"}, members=left)
    await fails(env.svc.send(C, send(ROOM, "c1")), Forbidden)
    env.rooms.versions["r1"] = 4  # an older list, uc still in it: the pin holds
    await fails(env.svc.send(C, send(ROOM, "c2")), Forbidden)
    # The directory at the pinned version answers for itself from now on (uc is in its
    # list here, so the send shows which list decided).
    env.rooms.versions["r1"] = 5
    assert (await env.svc.send(C, send(ROOM, "c3"))).seq == 2


async def test_direct_peers(env: Env) -> None:
    await env.svc.send(A, send(AB, "c1"))
    await env.svc.send(B, send(AB, "c2"))
    await env.svc.send(C, send(AC, "c3"))
    await env.svc.send(C, send(ROOM, "c4"))
    assert sorted(await env.svc.direct_peers(UserId("ua"))) == ["ub", "uc"]
    assert await env.svc.direct_peers(UserId("ub")) == ["ua"]
    assert await env.svc.direct_peers(UserId("ud")) == []
    assert await rows(env, "SELECT count(*) FROM direct_peers") == [(4,)]
    # The answers are cached, and kept in step when a direct conversation begins.
    await env.svc.send(D, send("d:ub:ud", "c5"))
    assert sorted(await env.svc.direct_peers(UserId("ub"))) == ["ua", "ud"]
    assert await env.svc.direct_peers(UserId("ud")) == ["ub"]
    await env.svc.send(D, send("d:ub:ud", "c6"))
    assert sorted(await env.svc.direct_peers(UserId("ub"))) == ["ua", "ud"]


# --- durability -----------------------------------------------------------------------


async def test_restart_keeps_history_seqs_keys_and_markers(env: Env) -> None:
    first = await env.svc.send(A, send(AB, "c1", "before restart"))
    await env.svc.send(B, send(AB, "c2", "two"))
    await env.svc.mark(B, AB, 1, "read")
    await env.svc.post_system(UserId("ua"), "note")
    await env.reopen()
    again = await env.svc.send(A, send(AB, "c1", "resent"))
    assert (again.seq, again.ts, again.dup) == (1, first.ts, True)
    nxt = await env.svc.send(A, send(AB, "c3", "after restart"))
    assert (nxt.seq, nxt.dup) == (3, False)
    assert [m.body for m in await history(env, B, AB)] == ["before restart", "two", "after restart"]
    ab = {c.conv: c for c in await env.svc.convs(B)}[AB]
    assert (ab.read_seq, ab.recv_seq, ab.last_seq, ab.unread) == (1, 1, 3, 1)
    assert await env.svc.direct_peers(UserId("ub")) == ["ua"]
    assert (await env.svc.post_system(UserId("ua"), "second")).seq == 2
    assert [m.seq for m in (await env.svc.search(A, ops.Search(query="restart"))).messages] == [
        3,
        1,
    ]


async def test_close_flushes_queued_writes(env: Env) -> None:
    futures = [env.svc.send(A, send(AB, f"c{i}")) for i in range(50)]
    await env.svc.close()
    assert [f.result().seq for f in futures] == list(range(1, 51))
    await fails(env.svc.send(A, send(AB, "late")), Unavailable)
    await env.reopen()
    assert len(await history(env, A, AB, limit=200)) == 50


@local_only  # flush() is the local type's own (shutdown drains through it)
async def test_flush_waits_for_everything_queued(env: Env) -> None:
    await env.svc.flush()  # nothing queued: returns at once
    futures = [env.svc.send(A, send(AB, f"c{i}")) for i in range(30)]
    await env.svc.flush()
    assert all(f.done() for f in futures)
    assert [m.seq for m in env.msgs()] == list(range(1, 31))
    assert (await env.svc.send(A, send(AB, "after"))).seq == 31


@pytest.mark.sqlite_only  # the refusal is an SQLite trigger
async def test_failed_commit_fails_the_batch_and_takes_no_seq(env: Env) -> None:
    await env.svc.send(A, send(AB, "c1", "one"))
    with sqlite3.connect(env.path) as conn:  # a real database refusal, from outside
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN new.body = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    f1 = env.svc.send(B, send(AB, "c2", "innocent"))
    f2 = env.svc.send(A, send(AB, "c3", "boom"))
    f3 = env.svc.send(A, send(AB, "c1", "resend"))  # a duplicate keeps its answer
    f4 = env.svc.send(A, send(AB, "c4", reply_to=50))  # a refusal keeps its answer
    r1, r2, r3, r4 = await asyncio.gather(f1, f2, f3, f4, return_exceptions=True)
    assert isinstance(r1, Internal) and isinstance(r2, Internal)
    assert isinstance(r3, ops.SendData) and (r3.seq, r3.dup) == (1, True)
    assert isinstance(r4, BadRequest)
    assert [m.seq for m in env.msgs()] == [1]
    with sqlite3.connect(env.path) as conn:
        conn.execute("DROP TRIGGER boom")
    assert (await env.svc.send(B, send(AB, "c2", "innocent"))).seq == 2
    assert [m.body for m in await history(env, A, AB)] == ["one", "innocent"]
