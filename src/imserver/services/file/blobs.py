"""Blob stores: where the bytes of uploaded files and thumbnails live.

One small interface, :class:`BlobStore`, and two backends:

- :class:`LocalBlobStore` — a directory (``<data_dir>/files/blobs`` by default);
- :class:`S3BlobStore` — any S3 API endpoint (AWS, MinIO, Ceph, moto, …) through boto3.

Keys are chosen by the file service (content hashes), never by clients; both
backends still refuse any key outside :data:`KEY_RE`, so no key can name a path
outside the store. A blob is written once from a finished temporary file
(:meth:`BlobStore.put_file`), read by byte ranges, and deleted; there is no
in-place update, which is what makes content addressing safe.

boto3 is synchronous: every S3 call runs in a worker thread, and the client (which
is thread-safe) is shared by all of them.

A store that cannot serve (a full or failing disk, an unreachable endpoint, a bucket
gone) raises ``unavailable`` (:mod:`imserver.storage.failures`); only a missing blob
is ``FileNotFoundError``, which callers answer ``not_found``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from imserver.storage.failures import unavailable
from imserver.utils.errors import Unavailable

CHUNK = 1024 * 1024
"""Bytes per read when streaming a blob out."""

LOCAL = "file storage"
"""How log lines and ``unavailable`` messages name the local blob directory."""
OBJECT_STORE = "object store"

KEY_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
"""Keys are lower-case ``a/b.c`` paths of plain segments: no ``..``, no leading ``/``."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid blob key, else raise ``ValueError``."""
    if KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(Protocol):
    """Write-once blobs addressed by key."""

    async def put_file(self, key: str, path: Path) -> None:
        """Store the finished file at ``path`` under ``key`` and consume it (the path is
        gone afterwards). Storing a key that exists replaces it with the same bytes."""

    def read_range(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start``..``end`` (inclusive) of the blob, in chunks of at most
        :data:`CHUNK`. ``FileNotFoundError`` if there is no such blob, ``unavailable``
        if it cannot be read."""

    async def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""

    async def delete(self, key: str) -> None:
        """Delete a blob; a missing one is not an error."""

    async def check(self) -> None:
        """Raise ``unavailable`` if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents, each one's entry fsynced in its parent:
    a directory that a power loss could forget would take its files with it."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:  # made meanwhile by another put; its maker syncs the entry
        return
    _fsync_dir(path.parent)


class LocalBlobStore:
    """Blobs as files under ``root``, one per key (``ab/<sha256>`` → ``root/ab/<sha256>``).

    A put fsyncs the temporary file, renames it into place (atomic), then fsyncs the
    directory that holds the new name and, if the put created that directory, its
    parent: a blob is either absent or complete, even after a crash, and once the put
    has returned it survives a power loss too (given a disk that honours flushes). The
    temporary file must be on the same filesystem (the file service keeps its temporary
    directory beside ``root``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        _make_dirs(root)

    def path_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / check_key(key)

    async def put_file(self, key: str, path: Path) -> None:
        """Move ``path`` into place under ``key`` (fsynced, atomic)."""
        target = self.path_of(key)
        try:
            await asyncio.to_thread(self._put, target, path)
        except OSError as exc:
            raise unavailable(exc, LOCAL) from exc

    @staticmethod
    def _put(target: Path, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _make_dirs(target.parent)
        os.replace(path, target)
        _fsync_dir(target.parent)

    async def read_range(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes ``start``..``end`` of the file, each read in a worker thread."""
        path = self.path_of(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
            try:
                await asyncio.to_thread(fh.seek, start)
                left = end - start + 1
                while left > 0:
                    chunk = await asyncio.to_thread(fh.read, min(CHUNK, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    yield chunk
            finally:
                fh.close()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise unavailable(exc, LOCAL) from exc

    async def exists(self, key: str) -> bool:
        """Whether the file exists."""
        path = self.path_of(key)
        try:
            return await asyncio.to_thread(path.is_file)
        except OSError as exc:
            raise unavailable(exc, LOCAL) from exc

    async def delete(self, key: str) -> None:
        """Unlink the file (and drop its directory when it became empty)."""
        path = self.path_of(key)

        def unlink() -> None:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty, or already gone
                path.parent.rmdir()

        try:
            await asyncio.to_thread(unlink)
        except OSError as exc:
            raise unavailable(exc, LOCAL) from exc

    async def check(self) -> None:
        """The root directory must exist and be writable."""
        ok = await asyncio.to_thread(lambda: self.root.is_dir() and os.access(self.root, os.W_OK))
        if not ok:
            raise Unavailable(f"blob directory {self.root} is not writable")

    async def close(self) -> None:
        """Nothing to release."""


class S3BlobStore:
    """Blobs as objects of one bucket on any S3 API endpoint, keys under ``prefix``.

    Build it with :meth:`open` (which creates the bucket if it does not exist).
    Credentials left empty fall back to boto3's usual chain (environment, profile,
    instance role). Path-style addressing is used, which every S3 implementation
    accepts (virtual-host style needs DNS for each bucket).
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    @classmethod
    async def open(
        cls,
        *,
        bucket: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key: str = "",
        secret_key: str = "",
        prefix: str = "",
    ) -> S3BlobStore:
        """Connect, make sure the bucket exists, and return the store."""
        import boto3
        from botocore.config import Config as BotoConfig

        client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region or None,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=32,
            ),
        )
        store = cls(client, bucket, prefix)
        await store._call(store._ensure_bucket, region)
        return store

    def _ensure_bucket(self, region: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) != 404:
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self._client.create_bucket(**kwargs)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking boto3 call in a thread. A missing object raises
        ``FileNotFoundError``; every other failure (endpoint unreachable, bucket gone,
        access refused, an upload that failed, the local file unreadable) raises
        ``unavailable``."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as exc:
            code = _code(exc)
            if code != "NoSuchBucket" and (
                _status(exc) == 404 or code in ("NoSuchKey", "NotFound")
            ):
                raise FileNotFoundError(str(exc)) from exc
            raise unavailable(exc, OBJECT_STORE) from exc
        except (BotoCoreError, Boto3Error, OSError) as exc:
            raise unavailable(exc, OBJECT_STORE) from exc

    async def put_file(self, key: str, path: Path) -> None:
        """Upload the file (multipart when large) and delete it."""
        await self._call(self._client.upload_file, str(path), self.bucket, self._name(key))
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def read_range(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """One ranged ``GetObject``, its body read in chunks in worker threads."""
        reply = await self._call(
            self._client.get_object,
            Bucket=self.bucket,
            Key=self._name(key),
            Range=f"bytes={start}-{end}",
        )
        body = reply["Body"]
        try:
            while True:
                chunk = await self._call(body.read, CHUNK)
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    async def exists(self, key: str) -> bool:
        """``HeadObject``."""
        try:
            await self._call(self._client.head_object, Bucket=self.bucket, Key=self._name(key))
        except FileNotFoundError:
            return False
        return True

    async def delete(self, key: str) -> None:
        """``DeleteObject`` (idempotent in S3)."""
        with contextlib.suppress(FileNotFoundError):
            await self._call(self._client.delete_object, Bucket=self.bucket, Key=self._name(key))

    async def check(self) -> None:
        """``HeadBucket``."""
        try:
            await self._call(self._client.head_bucket, Bucket=self.bucket)
        except FileNotFoundError as exc:
            raise Unavailable(f"bucket {self.bucket} does not exist") from exc

    async def close(self) -> None:
        """Close the client's connection pool."""
        await asyncio.to_thread(self._client.close)


def _status(exc: Any) -> int:
    status: int = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "?"))
