"""One contract test body for every blob store backend: a local directory, and S3 through
a real S3 API server (moto in server mode, on a free port of this machine).

Without the ``moto`` package the S3 runs are skipped with the reason, except under
``CI=true``, where they fail: CI must exercise every backend.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imserver.services.file.blobs import CHUNK, BlobStore, LocalBlobStore, S3BlobStore
from imserver.utils.errors import Unavailable


async def open_s3(endpoint: str, bucket: str | None = None) -> S3BlobStore:
    return await S3BlobStore.open(
        bucket=bucket or f"b-{secrets.token_hex(6)}",
        endpoint=endpoint,
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        prefix="imserver/",
    )


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        blobs: BlobStore = LocalBlobStore(tmp_path / "blobs")
    else:
        blobs = await open_s3(request.getfixturevalue("s3_endpoint"))
    try:
        yield blobs
    finally:
        await blobs.close()


def temp_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"upload-{secrets.token_hex(4)}.part"
    path.write_bytes(data)
    return path


async def read_all(blobs: BlobStore, key: str, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in blobs.read_range(key, start, end)])


# --- the contract ------------------------------------------------------------------------


async def test_put_consumes_the_file_and_reads_back(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 123)
    path = temp_file(tmp_path, data)
    assert not await store.exists("ab/abcdef")
    await store.put_file("ab/abcdef", path)
    assert not path.exists()
    assert await store.exists("ab/abcdef")
    assert await read_all(store, "ab/abcdef", 0, len(data) - 1) == data
    chunks = [c async for c in store.read_range("ab/abcdef", 0, len(data) - 1)]
    assert all(len(c) <= CHUNK for c in chunks)


async def test_ranges(store: BlobStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    await store.put_file("cd/range", temp_file(tmp_path, data))
    for start, end in [(0, 0), (0, 9), (100, 100_000), (len(data) - 5, len(data) - 1)]:
        assert await read_all(store, "cd/range", start, end) == data[start : end + 1]
    # An end past the blob is cut at the blob's end.
    assert await read_all(store, "cd/range", len(data) - 3, len(data) + 100) == data[-3:]


async def test_put_again_replaces_with_the_same_bytes(store: BlobStore, tmp_path: Path) -> None:
    await store.put_file("ef/same", temp_file(tmp_path, b"same bytes"))
    await store.put_file("ef/same", temp_file(tmp_path, b"same bytes"))
    assert await read_all(store, "ef/same", 0, 9) == b"same bytes"


async def test_delete_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    await store.put_file("aa/gone", temp_file(tmp_path, b"x"))
    await store.put_file("aa/gone.thumb", temp_file(tmp_path, b"y"))
    await store.delete("aa/gone")
    await store.delete("aa/gone")
    await store.delete("aa/never-there")
    assert not await store.exists("aa/gone")
    assert await store.exists("aa/gone.thumb")
    with pytest.raises(FileNotFoundError):
        await read_all(store, "aa/gone", 0, 0)


async def test_missing_blob_is_file_not_found(store: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        await read_all(store, "00/missing", 0, 10)


@pytest.mark.parametrize(
    "key", ["../escape", "/abs", "a/../../b", "a//b", "A/UPPER", "a/b\x00c", "", "a/./b", "."]
)
async def test_keys_cannot_leave_the_store(store: BlobStore, tmp_path: Path, key: str) -> None:
    path = temp_file(tmp_path, b"x")
    with pytest.raises(ValueError):
        await store.put_file(key, path)
    with pytest.raises(ValueError):
        await store.exists(key)
    assert path.exists()


async def test_check(store: BlobStore) -> None:
    await store.check()


# --- backend specifics ----------------------------------------------------------------------


async def test_local_layout_and_atomic_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put_file("12/1234", temp_file(tmp_path, b"content"))
    assert (tmp_path / "blobs" / "12" / "1234").read_bytes() == b"content"
    await store.delete("12/1234")
    assert not (tmp_path / "blobs" / "12").exists()  # empty fan-out directories go too


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
async def test_local_put_is_on_disk_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes, the new name and any directory the put created are fsynced before
    the put returns (the upload is acknowledged after it): a power loss then keeps the
    blob, given a disk that honours flushes."""
    fsynced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsynced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    root = tmp_path / "data" / "files" / "blobs"
    store = LocalBlobStore(root)
    # Creating the store's directories made entries in each parent.
    assert set(fsynced) >= {tmp_path, tmp_path / "data", tmp_path / "data" / "files"}
    fsynced.clear()
    upload = temp_file(tmp_path, b"content")
    await store.put_file("12/1234", upload)  # "12/" is new: an entry in root too
    assert fsynced == [upload, root, root / "12"]
    fsynced.clear()
    await store.put_file("12/5678", temp_file(tmp_path, b"more"))
    assert fsynced[1:] == [root / "12"]


async def test_local_check_fails_without_its_directory(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").rmdir()
    with pytest.raises(Unavailable):
        await store.check()


async def test_s3_creates_the_bucket_and_uses_the_prefix(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    bucket = f"fresh-{secrets.token_hex(6)}"
    store = await open_s3(s3_endpoint, bucket)
    try:
        await store.put_file("9f/9f00", temp_file(tmp_path, b"in s3"))
        client = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        body = client.get_object(Bucket=bucket, Key="imserver/9f/9f00")["Body"].read()
        assert body == b"in s3"
        # Opening again on an existing bucket is fine.
        again = await open_s3(s3_endpoint, bucket)
        assert await again.exists("9f/9f00")
        await again.close()
    finally:
        await store.close()


async def test_s3_unreachable_is_unavailable() -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",  # the discard port: nothing listens
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    store = S3BlobStore(client, "bucket")
    with pytest.raises(Unavailable):
        await store.check()
    await store.close()


async def test_local_failures_are_unavailable_and_a_missing_blob_is_not(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    # The file system refuses: a directory where the blob's file should be, a file
    # where its fan-out directory should be.
    (tmp_path / "blobs" / "ab" / "abcd").mkdir(parents=True)
    with pytest.raises(Unavailable):
        await read_all(store, "ab/abcd", 0, 10)
    (tmp_path / "blobs" / "cd").write_bytes(b"not a directory")
    path = temp_file(tmp_path, b"data")
    with pytest.raises(Unavailable):
        await store.put_file("cd/cdef", path)
    assert path.read_bytes() == b"data"  # not consumed: the caller still owns it
    with pytest.raises(FileNotFoundError):
        await read_all(store, "ef/missing", 0, 10)


async def test_s3_bucket_gone_is_unavailable(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    store = await open_s3(s3_endpoint)
    try:
        await store.put_file("9f/9f00", temp_file(tmp_path, b"in s3"))
        client = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.delete_object(Bucket=store.bucket, Key="imserver/9f/9f00")
        client.delete_bucket(Bucket=store.bucket)
        with pytest.raises(Unavailable):
            await store.put_file("9f/9f01", temp_file(tmp_path, b"nowhere to go"))
        with pytest.raises(Unavailable):
            await read_all(store, "9f/9f00", 0, 4)
        with pytest.raises(Unavailable):
            await store.check()
    finally:
        await store.close()
