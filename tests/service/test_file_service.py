"""The file service against a real database (each selected one: ``tests/databases.py``)
and real blob stores (a local directory, and S3 through a moto server): uploads,
limits, quota, content addressing, access, ``file_refs`` and the clean-up of
unreferenced uploads.

The message service is replaced by :class:`Conversations`, a small in-memory
stand-in for its membership and reference answers (the message service is another
service here, not storage); it can also simulate a send that lands while the clean-up
is running.

Contract tests: each runs over the ``local`` and ``loopback`` transports
(``transports.py``); in the loopback run the file service and ``Conversations`` are
reached through the serialising adapter. The checks of the service's storage (its
blob store, its temporary directory) look at the storage itself, the same in both.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conformance import signature_mismatches
from databases import Databases
from PIL import Image
from sqlalchemy import create_engine
from transports import in_step, through

from imserver.services.file.api import FileService, MemberDirectory, QuotaExceeded
from imserver.services.file.blobs import BlobStore, LocalBlobStore, S3BlobStore
from imserver.services.file.service import (
    MIGRATIONS,
    LocalFileService,
    blob_key,
    open_file_service,
    thumb_key,
)
from imserver.services.file.store import SqlFileStore, metadata
from imserver.services.message.api import FileDirectory
from imserver.storage.sql import make_engine, sqlite_url, sync_url, upgrade, upgrade_sync
from imserver.utils.config import FilesConfig
from imserver.utils.errors import BadRequest, Forbidden, NotFound, TooLarge
from imserver.utils.ids import UserId

T0 = 1_700_000_000_000
ALICE, BOB, CAROL = UserId("ualice"), UserId("ubob"), UserId("ucarol")
CONV = "d:ualice:ubob"
OTHER = "d:ualice:ucarol"


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


class Conversations:
    """The message service's answers: members per conversation, referenced file ids.

    ``on_flush`` runs inside :meth:`write_barrier` (a send committing while clean-up
    waits).
    """

    def __init__(self) -> None:
        self.members: dict[str, set[UserId]] = {CONV: {ALICE, BOB}, OTHER: {ALICE, CAROL}}
        self.referenced: set[str] = set()
        self.on_flush: Callable[[], None] | None = None
        self.flushes = 0

    async def check_member(self, user: UserId, conv: str) -> None:
        if conv not in self.members:
            raise NotFound(f"no conversation {conv}")
        if user not in self.members[conv]:
            raise Forbidden(f"not a member of {conv}")

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        return {f for f in file_ids if f in self.referenced}

    async def write_barrier(self) -> None:
        self.flushes += 1
        if self.on_flush is not None:
            self.on_flush()


class Served:
    """The file service over the test's transport, and beside it the storage the
    local service keeps its state in (its blob store and temporary directory)."""

    def __init__(self, api: FileService, local: LocalFileService) -> None:
        self.api = api
        self.blobs = local.blobs
        self.tmp_dir = local.tmp_dir

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


Opener = Callable[..., Awaitable[Served]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def convs() -> Conversations:
    return Conversations()


@pytest.fixture(params=["local", "s3"])
async def open_service(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    clock: FakeClock,
    convs: Conversations,
    transport: str,
    databases: Databases,
) -> AsyncIterator[Opener]:
    opened: list[LocalFileService] = []
    url = databases.url("file")

    async def opener(**kwargs: Any) -> Served:
        await upgrade(url, MIGRATIONS)
        if request.param == "local":
            blobs: BlobStore = LocalBlobStore(tmp_path / "files" / "blobs")
        else:
            blobs = await S3BlobStore.open(
                bucket=f"t-{secrets.token_hex(6)}",
                endpoint=request.getfixturevalue("s3_endpoint"),
                access_key="testing",
                secret_key="testing",
            )
        kwargs.setdefault("clock", clock)
        service = LocalFileService(
            SqlFileStore.on_engine(make_engine(url)),
            blobs,
            messages=lambda: through(transport, MemberDirectory, convs),
            tmp_dir=tmp_path / "files" / "tmp",
            **kwargs,
        )
        opened.append(service)
        return Served(through(transport, FileService, service), service)

    yield opener
    for service in opened:
        await service.close()


@pytest.fixture
async def svc(open_service: Opener) -> Served:
    return await open_service(max_size=1 << 20, quota=4 << 20, orphan_grace=60)


async def put(
    svc: Served,
    data: bytes,
    *,
    user: UserId = ALICE,
    conv: str = CONV,
    name: str = "f.bin",
    declared: int | None = None,
    chunk: int = 100_000,
) -> Any:
    return await svc.upload(user, conv, name, declared, chunks(data, chunk))


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    """An upload's body: ``data`` in pieces of ``size``."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def nothing() -> AsyncIterator[bytes]:
    """An empty body."""
    return chunks(b"")


async def read(svc: Served, user: UserId, file_id: str) -> bytes:
    blob = await svc.open_file(user, file_id)
    return b"".join([c async for c in svc.read(blob.key, 0, blob.size - 1)])


def png(size: tuple[int, int] = (400, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def tmp_files(svc: Served) -> list[Path]:
    return list(svc.tmp_dir.iterdir())


# --- schema and protocols ------------------------------------------------------------------


def test_migrations_match_the_store_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, "file")
    upgrade_sync(url, MIGRATIONS)
    upgrade_sync(url, MIGRATIONS)
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": "alembic_version_file"}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("proto", [FileService, FileDirectory])
def test_satisfies_file_service_and_file_directory(proto: type) -> None:
    assert signature_mismatches(proto, LocalFileService) == []


async def test_open_file_service_from_config(tmp_path: Path, convs: Conversations) -> None:
    stale = tmp_path / "files" / "tmp" / "upload-crashed.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a crash")
    svc = await open_file_service(
        sqlite_url(tmp_path, "file"),
        data_dir=tmp_path,
        config=FilesConfig(max_size=10),
        messages=lambda: convs,
    )
    try:
        assert not stale.exists()
        await svc.check()
        info = await put(svc, b"0123456789")
        assert (tmp_path / "files" / "blobs" / blob_key(info.sha256)).is_file()
        with pytest.raises(TooLarge):
            await put(svc, b"0123456789!")
    finally:
        await svc.close()


# --- uploads ---------------------------------------------------------------------------------


async def test_upload_and_download(svc: Served) -> None:
    data = os.urandom(300_000)
    info = await put(svc, data, name="../x/report.bin")
    assert info.name == "report.bin"
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.mime == "application/octet-stream"
    assert info.url == f"/api/v1/files/{info.id}"
    assert await read(svc, BOB, info.id) == data
    assert tmp_files(svc) == []


async def test_upload_needs_membership(svc: Served) -> None:
    with pytest.raises(Forbidden):
        await svc.upload(CAROL, CONV, "x", None, nothing())
    with pytest.raises(NotFound):
        await svc.upload(ALICE, "r:nothere", "x", None, nothing())
    assert tmp_files(svc) == []


async def test_size_limit_counts_bytes_not_declarations(svc: Served) -> None:
    with pytest.raises(TooLarge):
        await svc.upload(ALICE, CONV, "x", (1 << 20) + 1, nothing())
    # A declaration that lies low does not help: the bytes are counted.
    with pytest.raises(TooLarge) as info:
        await put(svc, b"x" * ((1 << 20) + 1), declared=10)
    assert not isinstance(info.value, QuotaExceeded)
    assert tmp_files(svc) == []
    await put(svc, b"x" * (1 << 20))


async def test_quota(svc: Served) -> None:
    for i in range(4):
        await put(svc, bytes([i]) * (1 << 20))
    with pytest.raises(QuotaExceeded) as info:
        await put(svc, b"y")
    assert (info.value.code, info.value.status, info.value.field) == ("too_large", 413, "quota")
    with pytest.raises(QuotaExceeded):
        await svc.upload(ALICE, CONV, "x", 1, nothing())
    await put(svc, b"bob has his own quota", user=BOB)


async def test_concurrent_uploads_cannot_squeeze_past_the_quota(open_service: Opener) -> None:
    svc = await open_service(max_size=1 << 20, quota=(3 << 20) + 10)
    # Each checks the quota up front with room for one more (no body is read before all
    # five have passed the check); the insert decides.
    started: list[int] = []
    go = asyncio.Event()

    async def body(i: int) -> AsyncIterator[bytes]:
        started.append(i)
        if len(started) == 5:
            go.set()
        await go.wait()
        yield bytes([i]) * (1 << 20)

    results = await asyncio.gather(
        *(svc.upload(ALICE, CONV, f"{i}", None, body(i)) for i in range(5)),
        return_exceptions=True,
    )
    stored = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert (len(stored), len(refused)) == (3, 2)
    assert tmp_files(svc) == []
    # Refused uploads left no blob behind.
    for i in range(5):
        sha = hashlib.sha256(bytes([i]) * (1 << 20)).hexdigest()
        assert await svc.blobs.exists(blob_key(sha)) == any(s.sha256 == sha for s in stored)


@in_step
async def test_aborted_upload_leaves_nothing(svc: Served) -> None:
    seen: list[Path] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"partial" * 100_000
        yield b"more" * 50_000
        seen.extend(tmp_files(svc))
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await svc.upload(ALICE, CONV, "x", None, body())
    assert seen
    assert tmp_files(svc) == []


async def test_bomb_refuses_the_upload(svc: Served) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 3751))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(BadRequest, match="too large to process"):
        await put(svc, bomb, name="bomb.png")
    assert tmp_files(svc) == []
    assert not await svc.blobs.exists(blob_key(hashlib.sha256(bomb).hexdigest()))


# --- content addressing -------------------------------------------------------------------------


async def test_identical_content_is_stored_once(svc: Served) -> None:
    data = png()
    first = await put(svc, data, name="a.png")
    assert first.thumb_url == first.url + "/thumb"
    second = await put(svc, data, name="b.png", user=BOB)
    third = await put(svc, data, name="c.png", conv=OTHER)
    assert len({first.id, second.id, third.id}) == 3
    assert first.sha256 == second.sha256 == third.sha256
    assert (second.mime, second.thumb_url) == ("image/png", second.url + "/thumb")
    assert await svc.blobs.exists(blob_key(first.sha256))
    assert await svc.blobs.exists(thumb_key(first.sha256))
    if isinstance(svc.blobs, LocalBlobStore):
        assert sorted(p.name for p in svc.blobs.root.rglob("*") if p.is_file()) == [
            first.sha256,
            first.sha256 + ".thumb",
        ]
    thumb = await svc.open_thumb(BOB, first.id)
    with Image.open(io.BytesIO(thumb.data)) as im:
        assert im.size == (320, 160)


# --- access and refs ------------------------------------------------------------------------------


async def test_access_follows_membership_live(svc: Served, convs: Conversations) -> None:
    info = await put(svc, png())
    with pytest.raises(Forbidden):
        await svc.open_file(CAROL, info.id)
    with pytest.raises(Forbidden):
        await svc.open_thumb(CAROL, info.id)
    with pytest.raises(NotFound):
        await svc.open_file(ALICE, "fnope")
    convs.members[CONV].discard(BOB)  # Bob left
    with pytest.raises(Forbidden):
        await svc.open_file(BOB, info.id)
    convs.members[CONV].add(CAROL)  # Carol joined
    assert await read(svc, CAROL, info.id) == png()


async def test_file_refs(svc: Served) -> None:
    pic = await put(svc, png(), name="pic.png")
    doc = await put(svc, b"%PDF-1.4", name="doc.pdf", conv=OTHER)
    refs = await svc.file_refs([pic.id, doc.id, "fnope", pic.id])
    assert set(refs) == {pic.id, doc.id}
    assert refs[pic.id].conv == CONV
    assert (refs[pic.id].name, refs[pic.id].mime) == ("pic.png", "image/png")
    assert refs[pic.id].thumb_url == pic.thumb_url
    assert (refs[doc.id].conv, refs[doc.id].size, refs[doc.id].thumb_url) == (OTHER, 8, None)


# --- clean-up -------------------------------------------------------------------------------------


async def test_cleanup_waits_for_the_grace_period(
    svc: Served, clock: FakeClock, convs: Conversations
) -> None:
    info = await put(svc, b"young")
    clock.advance(59)
    assert await svc.cleanup() == 0
    assert await read(svc, ALICE, info.id) == b"young"
    clock.advance(2)
    assert await svc.cleanup() == 1
    with pytest.raises(NotFound):
        await svc.open_file(ALICE, info.id)
    assert not await svc.blobs.exists(blob_key(info.sha256))
    assert await svc.file_refs([info.id]) == {}


async def test_cleanup_keeps_referenced_files_and_shared_blobs(
    svc: Served, clock: FakeClock, convs: Conversations
) -> None:
    data = png()
    kept = await put(svc, data, name="kept.png")
    orphan_same_blob = await put(svc, data, name="dup.png", conv=OTHER)
    orphan_own_blob = await put(svc, b"alone")
    convs.referenced.add(kept.id)
    clock.advance(61)
    assert await svc.cleanup() == 2
    assert await read(svc, BOB, kept.id) == data
    await svc.open_thumb(BOB, kept.id)
    for gone in (orphan_same_blob, orphan_own_blob):
        with pytest.raises(NotFound):
            await svc.open_file(ALICE, gone.id)
    assert await svc.blobs.exists(blob_key(kept.sha256))
    assert await svc.blobs.exists(thumb_key(kept.sha256))
    assert not await svc.blobs.exists(blob_key(orphan_own_blob.sha256))
    # Kept files are settled: later runs do not ask about them again.
    convs.referenced.clear()
    clock.advance(3600)
    assert await svc.cleanup() == 0
    assert await read(svc, BOB, kept.id) == data


async def test_last_record_takes_the_shared_blob_with_it(svc: Served, clock: FakeClock) -> None:
    data = png((50, 50))
    one = await put(svc, data)
    clock.advance(30)
    two = await put(svc, data, conv=OTHER)
    clock.advance(31)
    assert await svc.cleanup() == 1  # only the older one is past the grace period
    assert await svc.blobs.exists(blob_key(one.sha256))
    assert await read(svc, CAROL, two.id) == data
    clock.advance(60)
    assert await svc.cleanup() == 1
    assert not await svc.blobs.exists(blob_key(one.sha256))
    assert not await svc.blobs.exists(thumb_key(one.sha256))


async def test_a_send_landing_during_cleanup_saves_the_file(
    svc: Served, clock: FakeClock, convs: Conversations
) -> None:
    info = await put(svc, b"named just in time")
    clock.advance(61)
    # The message service committed a send naming the file while the clean-up waited
    # on its flush: the second look finds the reference.
    convs.on_flush = lambda: convs.referenced.add(info.id)
    assert await svc.cleanup() == 0
    assert convs.flushes == 1
    assert await read(svc, BOB, info.id) == b"named just in time"
    convs.on_flush = None
    convs.referenced.clear()
    clock.advance(3600)
    assert await svc.cleanup() == 0  # kept for good


async def test_doomed_files_are_invisible_while_the_cleanup_decides(
    svc: Served, clock: FakeClock, convs: Conversations
) -> None:
    info = await put(svc, b"doomed")
    clock.advance(61)
    seen: dict[str, Any] = {}

    def during_flush() -> None:
        seen["refs"] = asyncio.get_running_loop().create_task(svc.file_refs([info.id]))

    convs.on_flush = during_flush
    assert await svc.cleanup() == 1
    assert await seen["refs"] == {}


async def test_upload_racing_the_cleanup_of_the_same_content(
    svc: Served, clock: FakeClock, convs: Conversations
) -> None:
    data = b"same content, new upload"
    old = await put(svc, data)
    clock.advance(61)

    async def reupload() -> Any:
        return await put(svc, data, conv=OTHER)

    holder: dict[str, asyncio.Task[Any]] = {}
    convs.on_flush = lambda: holder.setdefault(
        "task", asyncio.get_running_loop().create_task(reupload())
    )
    assert await svc.cleanup() == 1
    new = await holder["task"]
    with pytest.raises(NotFound):
        await svc.open_file(ALICE, old.id)
    assert await read(svc, CAROL, new.id) == data
    assert await svc.blobs.exists(blob_key(new.sha256))


async def test_cleanup_task_runs_on_its_interval(tmp_path: Path, convs: Conversations) -> None:
    url = sqlite_url(tmp_path, "file")
    await upgrade(url, MIGRATIONS)
    svc = LocalFileService(
        SqlFileStore.on_engine(make_engine(url)),
        LocalBlobStore(tmp_path / "blobs"),
        messages=lambda: convs,
        tmp_dir=tmp_path / "tmp",
        orphan_grace=0.05,
        cleanup_interval=0.05,
    )
    svc.start()
    try:
        info = await put(svc, b"short-lived")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not await svc.file_refs([info.id]):
                break
        assert await svc.file_refs([info.id]) == {}
    finally:
        await svc.close()
