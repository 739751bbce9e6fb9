"""The in-process file service: streamed uploads, content-addressed blobs, thumbnails,
membership-checked downloads and the clean-up of files no message names.

How an upload goes (:meth:`LocalFileService.upload`, through an :class:`_Upload`):

1. membership of the conversation (asked live from the message service), the
   declared ``Content-Length`` and the quota are checked before a byte is read;
2. the body streams into a temporary file under ``<data_dir>/files/tmp`` while its
   SHA-256 and size are computed in worker threads; the first byte past the limit
   (``files.max_size``, or what is left of the user's quota if that is less) aborts
   the upload and deletes the temporary file, whatever ``Content-Length`` said;
3. the type is sniffed from the first bytes; JPEG/PNG/GIF/WebP get a thumbnail in a
   worker thread (a decompression bomb refuses the whole upload, see
   :mod:`imserver.services.file.content`);
4. under a lock per content hash, the blob is stored under ``<sha[:2]>/<sha>`` unless
   identical content is already stored, and the record is inserted (the quota is
   checked again inside that transaction).

A storage failure at any step (a full disk under the temporary file, the thumbnail or
the blob; the database refusing the record) answers ``unavailable`` and leaves
nothing behind: the temporary file is deleted, and so are the blobs this upload
stored when no record names their content.

Blob lifetime: a blob (and its thumbnail ``<key>.thumb``) is deleted only when no
record names its hash. The per-hash lock orders an upload of content X against the
clean-up of the last record of X, so neither deletes a blob the other relies on. The
lock is per process: two processes sharing one blob store and database would need a
database-level guard (the embedded mode runs one).

Clean-up (:meth:`LocalFileService.cleanup`, every ``cleanup_interval`` seconds):
records older than ``orphan_grace`` that no message names are first marked
``doomed`` (invisible to downloads and to ``file_refs``, so no new message can name
them), then the message service's ``write_barrier`` is awaited and it is asked again —
a send that resolved the file just before the mark is committed by then and saves
it — and only then deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from weakref import WeakValueDictionary

from imserver.services.file.api import Blob, FileInfo, MemberDirectory, QuotaExceeded, Thumb
from imserver.services.file.blobs import BlobStore, LocalBlobStore, S3BlobStore
from imserver.services.file.content import (
    SNIFF_BYTES,
    THUMBNAIL_FORMATS,
    make_thumbnail,
    sanitise_name,
    sniff_mime,
)
from imserver.services.file.store import DOOMED, KEPT, NEW, FileRecord, SqlFileStore
from imserver.services.message.api import FileRef
from imserver.services.peers import Peer
from imserver.storage.failures import unavailable
from imserver.storage.outbox import Outbox
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.clock import now_ms
from imserver.utils.config import FilesConfig
from imserver.utils.errors import IMError, NotFound, TooLarge, Unavailable
from imserver.utils.ids import ConvId, FileId, UserId, random_id
from imserver.utils.live import Live, cell

logger = logging.getLogger(__name__)

MIGRATIONS = "imserver.services.file.migrations"
FILES_PATH = "/api/v1/files"
"""Where the HTTP API serves files: ``url`` is ``FILES_PATH/<id>``, ``thumb_url`` that
plus ``/thumb``."""
WRITE_BUFFER = 1024 * 1024
"""Bytes gathered before one write + hash step in a worker thread."""
CLEANUP_BATCH = 500
THUMB_BYTES_MAX = 4 * 1024 * 1024
"""More than a 320 px thumbnail can take; bounds what serving one reads into memory."""
TMP = "upload storage"
"""How log lines and ``unavailable`` messages name the temporary upload directory."""


def new_file_id() -> FileId:
    """A fresh file id: ``f`` and 128 random bits in base 36 (not guessable)."""
    return FileId(random_id("f", 16))


def blob_key(sha256: str) -> str:
    """The blob store key of content with this hash."""
    return f"{sha256[:2]}/{sha256}"


def thumb_key(sha256: str) -> str:
    """The blob store key of the thumbnail of content with this hash."""
    return f"{sha256[:2]}/{sha256}.thumb"


def file_info(rec: FileRecord) -> FileInfo:
    """The protocol's file object for a record."""
    url = f"{FILES_PATH}/{rec.id}"
    return FileInfo(
        id=rec.id,
        name=rec.name,
        size=rec.size,
        mime=rec.mime,
        sha256=rec.sha256,
        conv=rec.conv,
        url=url,
        thumb_url=f"{url}/thumb" if rec.thumb_mime else None,
    )


class _Upload:
    """One upload streaming into a temporary file (see the module docstring)."""

    def __init__(
        self,
        service: LocalFileService,
        *,
        user: UserId,
        conv: ConvId,
        name: str,
        limit: int,
        quota_limited: bool,
        fd: int,
        path: Path,
    ) -> None:
        self._service = service
        self.user = user
        self.conv = conv
        self.name = name
        self._limit = limit
        self._quota_limited = quota_limited
        self._fd: int | None = fd
        self.path = path
        self.size = 0
        self.head = b""
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._io = threading.Lock()

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; past the limit, abort and raise ``too_large``."""
        if self._done:
            raise RuntimeError("upload already finished")
        self.size += len(chunk)
        if self.size > self._limit:
            await self.abort()
            raise self._over_limit()
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= WRITE_BUFFER:
            await self._flush()

    def _over_limit(self) -> TooLarge:
        if self._quota_limited:
            return QuotaExceeded(
                f"storage quota exceeded: the upload needs more than the {self._limit} "
                f"bytes left of {self._service.quota} per user"
            )
        return TooLarge(f"file exceeds the limit of {self._limit} bytes")

    async def _flush(self) -> None:
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if data and self._fd is not None:
            try:
                await asyncio.to_thread(self._write_and_hash, self._fd, data)
            except OSError as exc:
                await self.abort()
                raise unavailable(exc, TMP) from exc

    def _write_and_hash(self, fd: int, data: bytes) -> None:
        with self._io:
            if self._fd != fd:  # aborted while this step waited for a thread
                return
            self._hash.update(data)  # hashlib releases the GIL for large buffers
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]

    async def finish(self) -> FileInfo:
        """Store the file (see :meth:`LocalFileService._commit_upload`)."""
        try:
            await self._flush()
            with self._io:
                fd, self._fd = self._fd, None
                if fd is not None:
                    try:
                        os.close(fd)  # may report a failed deferred write (NFS, quotas)
                    except OSError as exc:
                        raise unavailable(exc, TMP) from exc
            self._done = True
            return await self._service._commit_upload(self, self._hash.hexdigest())
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Close and delete the temporary file (idempotent).

        No thread hand-off: it runs in cleanup paths of cancelled requests too, and a
        close and an unlink are single quick system calls.
        """
        self._done = True
        self._buffer.clear()
        # A write step of a cancelled request may still run in its thread: closing the
        # descriptor under it could let the number be reused for another file.
        with self._io:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


class LocalFileService:
    """:class:`~imserver.services.file.api.FileService` in process, and the message
    service's :class:`~imserver.services.message.api.FileDirectory`.

    The file and message services use each other: this one is built first (with
    :func:`open_file_service`) and reaches the message service (membership,
    references, the write barrier) through ``messages``, a
    :data:`~imserver.services.peers.Peer` asked on every use; the message service is
    then built with this one as its ``files``. :meth:`start` starts the clean-up task.
    """

    def __init__(
        self,
        store: SqlFileStore,
        blobs: BlobStore,
        *,
        messages: Peer[MemberDirectory],
        tmp_dir: Path,
        max_size: int | Live[int] = 20 * 1024 * 1024,
        quota: int | Live[int] = 1024 * 1024 * 1024,
        orphan_grace: float = 86400.0,
        cleanup_interval: float = 3600.0,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self.blobs = blobs
        self.tmp_dir = tmp_dir
        self._max_size = cell(max_size)
        self._quota = cell(quota)
        self._grace_ms = int(orphan_grace * 1000)
        self._interval = cleanup_interval
        self._clock = clock
        self._messages = messages
        self._locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        self._thumb_slots = asyncio.Semaphore(os.cpu_count() or 1)
        self._cleaner: asyncio.Task[None] | None = None
        tmp_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start the clean-up task (every ``cleanup_interval`` seconds)."""
        if self._cleaner is None:
            self._cleaner = asyncio.get_running_loop().create_task(
                self._cleanup_loop(), name="file-cleanup"
            )

    @property
    def max_size(self) -> int:
        """The largest upload in force (``files.max_size``, a dynamic setting)."""
        return self._max_size.value

    @property
    def quota(self) -> int:
        """The quota per user in force (``files.quota_per_user``, a dynamic setting)."""
        return self._quota.value

    @property
    def messages(self) -> MemberDirectory:
        """The message service, as found now."""
        return self._messages()

    def _lock(self, sha256: str) -> asyncio.Lock:
        lock = self._locks.get(sha256)
        if lock is None:
            lock = self._locks[sha256] = asyncio.Lock()
        return lock

    # --- uploads ----------------------------------------------------------------------

    async def upload(
        self,
        user: UserId,
        conv: ConvId,
        name: str,
        declared_size: int | None,
        body: AsyncIterable[bytes],
    ) -> FileInfo:
        """Check, stream ``body`` into a temporary file, store it (see the module
        docstring). ``too_large`` at the first byte past the limit; if ``body`` raises,
        nothing is kept and its error propagates."""
        up = await self._begin_upload(user, conv, name, declared_size)
        chunks = aiter(body)
        try:
            async for chunk in chunks:
                await up.write(chunk)
            return await up.finish()
        finally:
            await up.abort()
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    async def _begin_upload(
        self, user: UserId, conv: ConvId, name: str, declared_size: int | None
    ) -> _Upload:
        """Check membership, the declared size and the quota, then open a temporary file.

        ``forbidden``/``not_found``/``bad_request`` from the membership check; ``too_large``
        for a declared size over the limit, or over the quota left (field ``quota``).
        """
        await self.messages.check_member(user, conv)
        limit = self.max_size
        quota_limited = False
        if self.quota > 0:
            left = max(0, self.quota - await self._store.usage(user))
            if left < limit:
                limit, quota_limited = left, True
        if declared_size is not None and declared_size > limit:
            if quota_limited:
                raise QuotaExceeded(
                    f"storage quota exceeded: {declared_size} bytes do not fit in the "
                    f"{limit} bytes left of {self.quota} per user"
                )
            raise TooLarge(f"file of {declared_size} bytes exceeds the limit of {limit} bytes")
        try:
            fd, raw_path = await asyncio.to_thread(
                tempfile.mkstemp, prefix="upload-", suffix=".part", dir=self.tmp_dir
            )
        except OSError as exc:
            raise unavailable(exc, TMP) from exc
        return _Upload(
            self,
            user=user,
            conv=conv,
            name=sanitise_name(name),
            limit=limit,
            quota_limited=quota_limited,
            fd=fd,
            path=Path(raw_path),
        )

    async def _commit_upload(self, up: _Upload, sha256: str) -> FileInfo:
        """Put the finished upload's blob (unless already stored) and insert its record.

        If either fails, the blobs this upload stored go again (unless a record names
        their content) before the error is raised."""
        mime = sniff_mime(up.head)
        key = blob_key(sha256)
        async with self._lock(sha256):
            existing = await self._store.by_sha256(sha256)
            stored = False
            try:
                if existing is not None and await self.blobs.exists(key):
                    # Identical content: same type, same thumbnail, no second copy.
                    mime, thumb_mime = existing.mime, existing.thumb_mime
                else:
                    stored = True
                    thumb_mime = await self._thumbnail(up.path, mime, sha256)
                    await self.blobs.put_file(key, up.path)
                record = FileRecord(
                    id=new_file_id(),
                    conv=up.conv,
                    owner=up.user,
                    name=up.name,
                    size=up.size,
                    mime=mime,
                    sha256=sha256,
                    thumb_mime=thumb_mime,
                    created=self._clock(),
                    state=NEW,
                )
                used = await self._store.insert(record, self.quota)
            except Exception:
                if stored:
                    await self._undo_blobs(sha256)
                raise
            if used is not None:
                await self._drop_blobs_if_unused(sha256)
                raise QuotaExceeded(
                    f"storage quota exceeded: {used} of {self.quota} bytes used, "
                    f"the upload needs {up.size}"
                )
        return file_info(record)

    async def _thumbnail(self, src: Path, mime: str, sha256: str) -> str | None:
        """Make and store the thumbnail of an image; ``None`` when it gets none.

        Raises ``bad_request`` for a decompression bomb (the caller then refuses the
        upload)."""
        if mime not in THUMBNAIL_FORMATS:
            return None
        out = src.with_name(src.name + ".thumb")
        try:
            async with self._thumb_slots:
                try:
                    thumb_mime = await asyncio.to_thread(make_thumbnail, src, mime, out)
                except OSError as exc:
                    raise unavailable(exc, TMP) from exc
            if thumb_mime is not None:
                await self.blobs.put_file(thumb_key(sha256), out)
            return thumb_mime
        finally:
            await asyncio.to_thread(out.unlink, missing_ok=True)

    # --- downloads --------------------------------------------------------------------

    async def _visible(self, user: UserId, file_id: str) -> FileRecord:
        rec = await self._store.get(file_id)
        if rec is None:
            raise NotFound(f"no file {file_id}", field="id")
        await self.messages.check_member(user, rec.conv)
        return rec

    async def open_file(self, user: UserId, file_id: str) -> Blob:
        """The file for a download: ``not_found`` for unknown ids, ``forbidden`` for
        someone who is not (or no longer) a member of its conversation."""
        rec = await self._visible(user, file_id)
        return Blob(info=file_info(rec), key=blob_key(rec.sha256), size=rec.size, mime=rec.mime)

    async def open_thumb(self, user: UserId, file_id: str) -> Thumb:
        """The thumbnail, with the same checks; ``not_found`` when the file has none."""
        rec = await self._visible(user, file_id)
        if rec.thumb_mime is None:
            raise NotFound(f"file {file_id} has no thumbnail", field="id")
        parts: list[bytes] = []
        try:
            async for chunk in self.blobs.read_range(thumb_key(rec.sha256), 0, THUMB_BYTES_MAX):
                parts.append(chunk)
        except FileNotFoundError:
            raise NotFound(f"thumbnail of {file_id} is missing", field="id") from None
        return Thumb(info=file_info(rec), mime=rec.thumb_mime, data=b"".join(parts))

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start``..``end`` (inclusive) of a blob."""
        return self.blobs.read_range(key, start, end)

    async def file_refs(self, file_ids: Sequence[str]) -> dict[str, FileRef]:
        """The known (not doomed) files among ``file_ids``."""
        refs: dict[str, FileRef] = {}
        for rec in await self._store.get_many(list(dict.fromkeys(file_ids))):
            info = file_info(rec)
            refs[rec.id] = FileRef(
                id=rec.id,
                conv=rec.conv,
                name=rec.name,
                size=rec.size,
                mime=rec.mime,
                thumb_url=info.thumb_url,
            )
        return refs

    # --- clean-up ---------------------------------------------------------------------

    async def cleanup(self) -> int:
        """Delete the records older than the grace period that no message names, and
        the blobs no record names any more; returns how many records went."""
        messages = self.messages
        cutoff = self._clock() - self._grace_ms
        deleted = 0
        while True:
            ids = await self._store.candidates(cutoff, CLEANUP_BATCH)
            if not ids:
                break
            named = await messages.referenced_files(ids)
            if named:
                await self._store.set_state(list(named), KEPT, was=(NEW, DOOMED))
            doomed = [i for i in ids if i not in named]
            if doomed:
                await self._store.set_state(doomed, DOOMED, was=(NEW,))
                # A send that resolved one of these files before the mark is queued by
                # now; past the barrier, its reference is visible.
                await messages.write_barrier()
                saved = await messages.referenced_files(doomed)
                if saved:
                    await self._store.set_state(list(saved), KEPT, was=(DOOMED,))
                shas = await self._store.delete_doomed(
                    [i for i in doomed if i not in saved], self._clock()
                )
                deleted += len(shas)
                for sha in dict.fromkeys(shas):
                    async with self._lock(sha):
                        await self._drop_blobs_if_unused(sha)
            if len(ids) < CLEANUP_BATCH:
                break
        if deleted:
            logger.info("file clean-up deleted %d unreferenced uploads", deleted)
        return deleted

    async def _drop_blobs_if_unused(self, sha256: str) -> None:
        """Delete the blob and thumbnail of a hash no record names (caller holds the lock)."""
        if not await self._store.sha256_in_use(sha256):
            await self.blobs.delete(blob_key(sha256))
            await self.blobs.delete(thumb_key(sha256))

    async def _undo_blobs(self, sha256: str) -> None:
        """:meth:`_drop_blobs_if_unused` for an upload that failed: the client gets the
        upload's own error, so a failure here is only logged (the blobs stay, unnamed)."""
        try:
            await self._drop_blobs_if_unused(sha256)
        except Exception as exc:
            logger.warning("blobs of a failed upload of %s left in place: %r", sha256, exc)

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.cleanup()
            except Unavailable:  # the store logged the cause; the next run retries
                logger.warning("file clean-up postponed: storage unavailable")
            except Exception:
                logger.exception("file clean-up failed")

    # --- lifecycle --------------------------------------------------------------------

    async def check(self) -> None:
        """Raise ``unavailable`` if the database or the blob store is unreachable."""
        try:
            await self._store.check()
        except Exception as exc:
            raise Unavailable("file database unreachable") from exc
        try:
            await self.blobs.check()
        except IMError:
            raise
        except Exception as exc:
            raise Unavailable("blob store unreachable") from exc

    @property
    def outbox(self) -> Outbox | None:
        """Where file events wait for the relay (None: the event stream is off)."""
        return self._store.outbox

    async def close(self) -> None:
        """Stop the clean-up task, release the blob store and the database."""
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleaner
            self._cleaner = None
        await self.blobs.close()
        await self._store.close()


def local_blob_root(data_dir: Path) -> Path:
    """The directory of the ``local`` blob backend under ``data_dir``."""
    return data_dir / "files" / "blobs"


async def open_blob_store(cfg: FilesConfig, data_dir: Path) -> BlobStore:
    """The blob store ``files.backend`` names."""
    if cfg.backend == "s3":
        return await S3BlobStore.open(
            bucket=cfg.s3_bucket,
            endpoint=cfg.s3_endpoint,
            region=cfg.s3_region,
            access_key=cfg.s3_access_key,
            secret_key=cfg.s3_secret_key,
            prefix=cfg.s3_prefix,
        )
    return LocalBlobStore(local_blob_root(data_dir))


async def open_file_service(
    url: str,
    *,
    data_dir: Path,
    config: FilesConfig,
    messages: Peer[MemberDirectory],
    max_size: Live[int] | None = None,
    quota: Live[int] | None = None,
    events: bool = False,
) -> LocalFileService:
    """Migrate the database at ``url``, open the blob store, build the service and
    start its clean-up task. ``events``: write ``file.stored``/``file.deleted`` events
    into the outbox, in the record's transaction (the service's ``outbox``; a relay
    publishes them).

    Temporary upload files live in ``<data_dir>/files/tmp`` (beside the local blob
    directory, so storing one is a rename); leftovers of a crash are removed here.
    ``max_size`` and ``quota``: the live cells of the dynamic limits, else the fixed
    values of ``config``.
    """
    await upgrade(url, MIGRATIONS)
    tmp_dir = data_dir / "files" / "tmp"

    def clear_tmp() -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    await asyncio.to_thread(clear_tmp)
    blobs = await open_blob_store(config, data_dir)
    store = SqlFileStore.on_engine(make_engine(url))
    if events:
        store.with_outbox()
    service = LocalFileService(
        store,
        blobs,
        messages=messages,
        tmp_dir=tmp_dir,
        max_size=config.max_size if max_size is None else max_size,
        quota=config.quota_per_user if quota is None else quota,
        orphan_grace=config.orphan_grace,
        cleanup_interval=config.cleanup_interval,
    )
    service.start()
    return service
