"""Every write on a full disk answers ``unavailable`` (docs/protocol.md §2.5), logs no
traceback, leaves the connection usable and changes nothing; once the space is back
the same write succeeds and nothing stored before is lost.

The user, room and message services run on real SQLite files on a small tmpfs of
their own (``tests/disks.py``), behind a real gateway driven through the in-memory
session harness (:mod:`imserver.testing.sessions`): each op is a JSON frame into a
session and each answer the reply frame it writes.
The file service is driven through its API (the HTTP route is in
``tests/e2e/test_full_disk_server.py``), with its database and its files on the full
disk in turn, so that each of the upload's writes meets the full disk first once.

Every commit appends at least one WAL frame (a 4 KiB page and its header: always at
least one more 4 KiB block of the tmpfs), and the user, room and file databases never
checkpoint during a test, so their first write on the filled disk fails. The message
store checkpoints in the background, after which SQLite rewrites the log in place:
see its test.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from disks import SmallDisk
from PIL import Image

from imserver.services.file.blobs import BlobStore, LocalBlobStore, S3BlobStore
from imserver.services.file.service import (
    MIGRATIONS as FILE_MIGRATIONS,
)
from imserver.services.file.service import (
    WRITE_BUFFER,
    LocalFileService,
    blob_key,
)
from imserver.services.file.store import SqlFileStore
from imserver.services.gateway.service import Gateway
from imserver.services.message.api import MessageService
from imserver.services.room.api import RoomService
from imserver.services.user.api import UserService
from imserver.storage.sql import make_engine, sqlite_url, upgrade
from imserver.testing.sessions import GatewayHarness, Peer
from imserver.utils.errors import IMError, Unavailable
from imserver.utils.ids import UserId

Frame = dict[str, Any]
PASSWORD = "correct-horse"
FULL = "database or disk is full"
"""What SQLite says (SQLITE_FULL), and what the storage boundary's log line names."""
NOSPC = os.strerror(errno.ENOSPC)
"""What the file system says (``No space left on device``)."""


class Conn(Peer):
    """One client connection to the in-process gateway."""

    async def unavailable(self, op: str, **fields: Any) -> None:
        """Require the documented answer to a write the storage cannot take."""
        reply = await self.call(op, **fields)
        assert reply == {
            "op": "reply",
            "rid": reply["rid"],
            "ok": False,
            "error": {"code": "unavailable", "message": reply["error"]["message"]},
        }, (op, reply)
        assert reply["error"]["message"], reply

    def usable(self) -> None:
        assert not self.link.closed and not self.session.closing


@dataclass
class World:
    disk: SmallDisk
    harness: GatewayHarness

    @property
    def gateway(self) -> Gateway:
        return self.harness.gateway

    @property
    def users(self) -> UserService:
        return self.harness.users

    @property
    def rooms(self) -> RoomService:
        return self.harness.rooms

    @property
    def messages(self) -> MessageService:
        return self.harness.messages

    async def conn(self) -> Conn:
        """A new connection, greeted."""
        c = Conn(self.gateway)
        await c.ok("hello", v=1)
        return c

    async def user(self, name: str) -> tuple[Conn, Frame]:
        """A registered user logged in on a connection of its own; the login reply."""
        c = await self.conn()
        await c.ok("register", username=name, password=PASSWORD)
        return c, await c.ok("login", username=name, password=PASSWORD)


@pytest.fixture
async def world(disk: SmallDisk) -> AsyncIterator[World]:
    async with GatewayHarness.open(disk.path) as harness:
        yield World(disk, harness)
        if disk.full:
            disk.free()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged with a traceback, nothing at ERROR or above."""
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]


def no_internal_and_logged_once(
    world: World, caplog: pytest.LogCaptureFixture, cause: str = FULL
) -> None:
    """No traceback anywhere in the log, no op answered ``internal``, and the storage
    failures were logged as warnings naming ``cause``."""
    no_tracebacks(caplog)
    internal = [op for (op, result) in world.gateway.metrics.ops if result == "internal"]
    assert internal == [], internal
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(cause in w for w in warnings), warnings


# --- the user service -----------------------------------------------------------------


async def test_user_writes_on_a_full_disk(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    alice, login = await world.user("alice")
    bob, bob_login = await world.user("bob")
    bob_id = bob_login["user"]["id"]
    other = await world.conn()

    world.disk.fill()
    await other.unavailable("register", username="carol", password=PASSWORD)
    await other.unavailable("login", username="alice", password=PASSWORD)
    await other.unavailable("refresh", refresh_token=login["refresh_token"])
    await alice.unavailable("user.update", display_name="Alice Two")
    await alice.unavailable("block", user=bob_id)
    await alice.unavailable("logout")
    # Reads still work, and showed no change.
    me = await alice.ok("user.get", user=login["user"]["id"])
    assert me["user"]["display_name"] == "alice"
    assert not await world.users.is_blocked(login["user"]["id"], bob_id)
    await (await world.conn()).ok("auth", token=login["token"])  # logout did not happen
    await other.ok("ping")
    for c in (alice, bob, other):
        c.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    await other.ok("register", username="carol", password=PASSWORD)
    await other.ok("login", username="alice", password=PASSWORD)
    # The refresh token was not spent by the refused rotation.
    pair = await (await world.conn()).ok("refresh", refresh_token=login["refresh_token"])
    assert pair["token"] != login["token"]
    got = await alice.ok("user.update", display_name="Alice Two")
    assert got["user"]["display_name"] == "Alice Two"
    await alice.ok("block", user=bob_id)
    assert await world.users.is_blocked(login["user"]["id"], bob_id)
    world.disk.fill()
    await alice.unavailable("unblock", user=bob_id)
    assert await world.users.is_blocked(login["user"]["id"], bob_id)
    world.disk.free()
    await alice.ok("unblock", user=bob_id)
    assert not await world.users.is_blocked(login["user"]["id"], bob_id)
    # Earlier data: both accounts still log in, bob's token still works.
    await (await world.conn()).ok("login", username="bob", password=PASSWORD)
    await (await world.conn()).ok("auth", token=bob_login["token"])
    await alice.ok("logout")


# --- the room service -----------------------------------------------------------------


async def test_room_writes_on_a_full_disk(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    alice, a = await world.user("alice")
    bob, b = await world.user("bob")
    _, c = await world.user("carol")
    bob_id, carol_id = b["user"]["id"], c["user"]["id"]
    public = (await alice.ok("room.create", name="lobby", public=True, members=[carol_id]))["room"]
    private = (await alice.ok("room.create", name="attic", public=False))["room"]
    rid = public["id"]

    world.disk.fill()
    await alice.unavailable("room.create", name="new room")
    await bob.unavailable("room.join", room=rid)
    await alice.unavailable("room.invite", room=private["id"], user=bob_id)
    await alice.unavailable("room.role", room=rid, user=carol_id, role="admin")
    await alice.unavailable("room.kick", room=rid, user=carol_id)
    await alice.unavailable("room.update", room=rid, name="renamed")
    # Nothing changed, in memory or on disk.
    assert (await alice.ok("room.get", room=rid))["room"] == public
    members = (await alice.ok("room.members", room=rid))["members"]
    assert [(m["user"], m["role"]) for m in members] == [
        (a["user"]["id"], "owner"),
        (carol_id, "member"),
    ]
    rooms = (await bob.ok("room.list"))["rooms"]
    assert [r["name"] for r in rooms] == ["lobby"]
    for conn in (alice, bob):
        conn.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    created = (await alice.ok("room.create", name="new room"))["room"]
    await bob.ok("room.join", room=rid)
    await alice.ok("room.invite", room=private["id"], user=bob_id)
    await alice.ok("room.role", room=rid, user=carol_id, role="admin")
    await alice.ok("room.kick", room=rid, user=carol_id)
    renamed = (await alice.ok("room.update", room=rid, name="renamed"))["room"]
    assert (renamed["name"], renamed["members"]) == ("renamed", 2)
    assert (await alice.ok("room.get", room=created["id"]))["room"]["name"] == "new room"
    # The room's history holds each change once, and none of the refused ones.
    page = await alice.ok("history", conv=f"r:{rid}")
    events = [m["meta"]["event"] for m in page["messages"]]
    assert events == ["created", "joined", "joined", "role", "kicked", "updated"]


# --- the message service --------------------------------------------------------------


async def test_message_writes_on_a_full_disk(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    alice, a = await world.user("alice")
    bob, b = await world.user("bob")
    conv = "d:" + ":".join(sorted((a["user"]["id"], b["user"]["id"])))
    for i in range(3):
        await alice.ok("send", conv=conv, cid=f"before-{i}", type="text", body=f"hello {i}")
    body = "x" * 16_000

    world.disk.fill()
    # The first write fails unless a WAL checkpoint emptied the log just before the
    # fill: SQLite then rewrites the log in place, and a few writes fit in that room.
    # Every one acknowledged must survive; the first refused one is the test's write.
    acked: list[int] = []
    for i in range(200):
        reply = await alice.call("send", conv=conv, cid=f"full-{i}", type="text", body=body)
        if not reply["ok"]:
            assert reply["error"]["code"] == "unavailable", reply
            refused = i
            break
        acked.append(reply["data"]["seq"])
    else:
        pytest.fail("200 writes of 16 KB on a full disk all succeeded")
    # Reads still work; the session too.
    page = await bob.ok("history", conv=conv)
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, *acked]
    for conn in (alice, bob):
        conn.usable()
    no_internal_and_logged_once(world, caplog)

    world.disk.free()
    again = await alice.ok("send", conv=conv, cid=f"full-{refused}", type="text", body=body)
    assert (again["seq"], again["dup"]) == (4 + len(acked), False)
    page = await bob.ok("history", conv=conv, limit=200)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 5 + len(acked)))
    assert [m["body"] for m in page["messages"][:3]] == ["hello 0", "hello 1", "hello 2"]


# --- writes in the background ---------------------------------------------------------


async def test_last_seen_on_a_full_disk_is_postponed_quietly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, a = await world.user("alice")
    world.disk.fill()
    await world.users.set_offline(a["user"]["id"])
    await world.users.close()  # writes the pending last_seen: refused
    no_tracebacks(caplog)
    assert any("last_seen" in r.getMessage() for r in caplog.records), caplog.records


# --- the file service -----------------------------------------------------------------


def noisy_png(total: int) -> bytes:
    """A PNG of random pixels, padded after its end to exactly ``total`` bytes (image
    decoders stop at IEND; the sniffed type stays ``image/png``)."""
    out = io.BytesIO()
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(out, "PNG")
    data = out.getvalue()
    assert len(data) <= total
    return data + b"\0" * (total - len(data))


class Files:
    """A file service whose database and files live where the test says, bound to the
    real message service for membership."""

    def __init__(self, svc: LocalFileService, db: Path, blobs_dir: Path | None) -> None:
        self.svc = svc
        self.db = db
        self.blobs_dir = blobs_dir

    async def put(self, user: UserId, conv: str, data: bytes) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield data

        return await self.svc.upload(user, conv, "f.bin", len(data), body())

    async def read(self, user: UserId, file_id: str) -> bytes:
        blob = await self.svc.open_file(user, file_id)
        return b"".join([c async for c in self.svc.read(blob.key, 0, blob.size - 1)])

    def rows(self) -> int:
        with sqlite3.connect(self.db) as conn:
            return int(conn.execute("SELECT count(*) FROM files").fetchone()[0])

    def tmp_files(self) -> list[Path]:
        return list(self.svc.tmp_dir.iterdir())


async def refused(aw: Any) -> Unavailable:
    with pytest.raises(IMError) as info:
        await aw
    assert type(info.value) is Unavailable, repr(info.value)
    return info.value


@pytest.mark.parametrize(
    ("full", "backend"), [("files", "local"), ("database", "local"), ("database", "s3")]
)
async def test_uploads_on_a_full_disk(
    world: World,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    full: str,
    backend: str,
) -> None:
    """``full``: which of the upload's homes is on the full disk (the other has room)."""
    caplog.set_level(logging.WARNING)
    _, a = await world.user("alice")
    _, b = await world.user("bob")
    alice, bob = UserId(a["user"]["id"]), UserId(b["user"]["id"])
    conv = "d:" + ":".join(sorted((alice, bob)))
    on_disk, elsewhere = world.disk.path / "files", tmp_path / "files"
    files_home = on_disk if full == "files" else elsewhere
    db_home = on_disk if full == "database" else elsewhere
    db_home.mkdir(exist_ok=True)
    url = sqlite_url(db_home, "file")
    await upgrade(url, FILE_MIGRATIONS)
    blobs: BlobStore
    if backend == "local":
        blobs = LocalBlobStore(files_home / "blobs")
    else:
        blobs = await S3BlobStore.open(
            bucket=f"full-{secrets.token_hex(6)}",
            endpoint=request.getfixturevalue("s3_endpoint"),
            access_key="testing",
            secret_key="testing",
        )
    svc = LocalFileService(
        SqlFileStore.on_engine(make_engine(url)),
        blobs,
        messages=lambda: world.messages,
        tmp_dir=files_home / "tmp",
    )
    files = Files(svc, db_home / "file.db", files_home / "blobs" if backend == "local" else None)
    try:
        first_bytes = os.urandom(300_000)
        first = await files.put(alice, conv, first_bytes)
        blobs_before = sorted(files.blobs_dir.rglob("*")) if files.blobs_dir else []
        plain = os.urandom(300_000)
        image = noisy_png(WRITE_BUFFER)  # written to the temporary file before finish()

        world.disk.fill()
        # The bytes (files full) or the record (database full) cannot be stored.
        await refused(files.put(alice, conv, plain))
        # An image whose bytes are already in its temporary file: the thumbnail (files
        # full) or the record (database full) cannot be stored.
        world.disk.free()

        async def image_then_full() -> AsyncIterator[bytes]:
            yield image
            world.disk.fill()

        await refused(svc.upload(alice, conv, "cat.png", len(image), image_then_full()))
        # Nothing is left behind: no temporary file, no blob, no record.
        assert files.tmp_files() == []
        assert files.rows() == 1
        for data in (plain, image):
            assert not await blobs.exists(blob_key(hashlib.sha256(data).hexdigest()))
        if files.blobs_dir:
            assert sorted(files.blobs_dir.rglob("*")) == blobs_before
        # Reads still work.
        assert await files.read(bob, first.id) == first_bytes
        no_internal_and_logged_once(world, caplog, NOSPC if full == "files" else FULL)

        world.disk.free()
        again = await files.put(alice, conv, plain)
        assert await files.read(bob, again.id) == plain
        img = await files.put(alice, conv, image)
        assert (img.mime, img.thumb_url is not None) == ("image/png", True)
        assert files.rows() == 3
        assert await files.read(bob, first.id) == first_bytes
    finally:
        await svc.close()


async def test_file_cleanup_on_a_full_disk_waits_for_space(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, a = await world.user("alice")
    _, b = await world.user("bob")
    alice = UserId(a["user"]["id"])
    conv = "d:" + ":".join(sorted((alice, b["user"]["id"])))
    url = sqlite_url(world.disk.path, "file")
    await upgrade(url, FILE_MIGRATIONS)
    home = world.disk.path / "files"
    svc = LocalFileService(
        SqlFileStore.on_engine(make_engine(url)),
        LocalBlobStore(home / "blobs"),
        messages=lambda: world.messages,
        tmp_dir=home / "tmp",
        orphan_grace=0,
        cleanup_interval=0.02,
    )
    files = Files(svc, world.disk.path / "file.db", home / "blobs")
    try:
        orphan = await files.put(alice, conv, b"no message names this")
        world.disk.fill()
        svc.start()  # the clean-up task
        for _ in range(250):
            if any("clean-up postponed" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the clean-up never ran on the full disk")
        no_tracebacks(caplog)
        assert files.rows() == 1
        world.disk.free()
        for _ in range(250):
            if files.rows() == 0:
                break
            await asyncio.sleep(0.02)
        assert files.rows() == 0, "the clean-up did not resume once the space was back"
        assert not await svc.blobs.exists(blob_key(orphan.sha256))
    finally:
        await svc.close()
