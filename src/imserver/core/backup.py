"""``imserver backup DIR`` and ``imserver restore DIR``: an embedded deployment's data
directory, copied while the server runs and put back into an empty one.

What a backup holds (``DIR/manifest.json`` lists every file with its size and SHA-256):

- every service's SQLite database (``user.db``, ``message.db``, ``room.db``,
  ``file.db``, ``notification.db``), all as of one instant
  (:func:`imserver.storage.snapshot.snapshot`: SQLite's online backup API under read
  transactions opened while every writer is held for a few milliseconds). A service
  whose ``storage`` URL names a PostgreSQL or MariaDB database is not copied (that
  database is backed up with its own tools); the manifest names it under
  ``elsewhere``, password masked;
- the blobs (and thumbnails) of the local blob store that the copied ``file.db``
  names, under ``files/blobs``; with ``files.backend = "s3"`` the bucket is backed up
  by the object store's own means and the manifest says so;
- the VAPID private key (``notification/vapid_private.pem``), when web push made one.

Why blobs copied after the databases lose nothing:

1. an upload stores its blob (fsync, atomic rename) before its record's transaction
   commits, so every record in the snapshot had its blob on disk at the snapshot's
   instant;
2. blobs are content-addressed and written once: the bytes under a key never change,
   so copying them later copies what the instant had;
3. a blob is deleted only once no record names its hash, and the clean-up deletes
   only records that no message names (``message_files`` rows are never deleted). A
   file named by a message in the snapshot is therefore never deleted, before or
   after the instant, and its blob is always there to copy. Only an upload that no
   message names can lose its blob between the snapshot and the copy (the clean-up
   deleted it meanwhile, as the restored server's clean-up would have); such hashes
   are listed in the manifest as ``missing_blobs``.

Blobs written after the instant are not copied: only the hashes of the copied
``file.db`` are. Temporary uploads (``files/tmp``) are never part of a backup.

A restore checks every file of the manifest (size and SHA-256) before it writes
anything, copies them into a new directory beside the data directory and renames that
into place, so a data directory is either untouched or completely restored. It
refuses a data directory that is not empty: a running server's data directory never
is, and a restore never mixes two deployments' files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec
from sqlalchemy import create_engine, make_url, select

from imserver import __version__
from imserver.core.server import SERVICES_WITH_DATABASES
from imserver.services.file.service import blob_key, local_blob_root, thumb_key
from imserver.services.file.store import files as file_records
from imserver.services.notification.providers.vapid import key_path
from imserver.storage.databases import redacted, service_database
from imserver.storage.snapshot import LOCK_TIMEOUT, integrity, snapshot
from imserver.utils.config import StorageConfig
from imserver.utils.errors import BadRequest, Conflict, Internal, NotFound, Unavailable

SERVICES = tuple(SERVICES_WITH_DATABASES)
"""The services whose SQLite database a backup copies (as ``<service>.db``)."""
MANIFEST = "manifest.json"
FORMAT = 1
"""The manifest's format version; a restore refuses any other."""
CHUNK = 1024 * 1024

Kind = Literal["database", "blob", "key"]


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One file of a backup: its path under the backup (and the data) directory."""

    path: str
    kind: Kind
    size: int
    sha256: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """``manifest.json``: what a backup holds; written last, so its presence marks a
    complete backup."""

    format: int
    imserver: str
    """The version that wrote the backup."""
    snapshot_at: str
    """The instant of the databases' snapshot, ISO 8601 UTC."""
    source: str
    """The data directory backed up."""
    files_backend: Literal["local", "s3"]
    entries: list[Entry]
    integrity: dict[str, str]
    """``PRAGMA integrity_check`` of each copied database (``ok``)."""
    missing_blobs: list[str]
    """Keys named by a copied file record whose blob the clean-up deleted before it
    could be copied (module docstring); each belongs to an upload no message names."""
    elsewhere: dict[str, str] = {}
    """Service → the server database it uses (password masked): not in this backup."""

    @property
    def total_bytes(self) -> int:
        """The size of every file listed."""
        return sum(e.size for e in self.entries)

    def count(self, kind: Kind) -> int:
        """How many files of ``kind`` the backup holds."""
        return sum(1 for e in self.entries if e.kind == kind)


# --- files ----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _copy(src: Path, dst: Path, *, mode: int = 0o644) -> tuple[int, str]:
    """Copy ``src`` to the new file ``dst`` (fsynced); its size and SHA-256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    return size, h.hexdigest()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (its files were fsynced when written)."""
    for dirpath, _, _ in os.walk(root, topdown=False):
        _fsync_dir(Path(dirpath))


# --- backup ---------------------------------------------------------------------------


def _blob_keys(file_db: Path) -> Iterator[str]:
    """The keys of the blobs and thumbnails the records of ``file_db`` name."""
    engine = create_engine(f"sqlite:///{file_db}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(file_records.c.sha256, file_records.c.thumb_mime)
                .distinct()
                .order_by(file_records.c.sha256)
            ).all()
    finally:
        engine.dispose()
    seen: set[str] = set()
    for sha256, thumb_mime in rows:
        if sha256 not in seen:
            seen.add(sha256)
            yield blob_key(sha256)
            if thumb_mime is not None:
                yield thumb_key(sha256)


def backup(
    data_dir: Path,
    target: Path,
    *,
    storage: StorageConfig | None = None,
    files_backend: Literal["local", "s3"] = "local",
    lock_timeout: float = LOCK_TIMEOUT,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Back up the SQLite databases of the deployment with this data directory and
    ``storage`` settings (default: every service in ``data_dir``) into ``target``
    (absent or empty); its manifest.

    ``not_found`` when ``data_dir`` is missing or holds no database, ``conflict`` when
    ``target`` exists and is not an empty directory, ``unavailable`` when the
    databases stay locked for ``lock_timeout`` seconds. A backup that fails leaves
    ``target`` as it found it.
    """
    if not data_dir.is_dir():
        raise NotFound(f"no data directory at {data_dir}")
    storage = storage or StorageConfig()
    files: dict[str, Path] = {}
    elsewhere: dict[str, str] = {}
    for service in SERVICES:
        url = service_database(storage, data_dir, service).url
        if make_url(url).get_backend_name() != "sqlite":
            elsewhere[service] = redacted(url)
        elif (path := Path(str(make_url(url).database))).is_file():
            files[service] = path
    if not files and len(elsewhere) == len(SERVICES):
        raise NotFound(
            "every service's database is on a database server: back them up with its "
            "tools (docs/operations.md)"
        )
    if not files:
        raise NotFound(f"{data_dir} holds no IMServer database (user.db, message.db, …)")
    if target.exists() and not _is_empty_dir(target):
        raise Conflict(f"backup target {target} is not an empty directory")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        say = progress or (lambda _line: None)
        return _fill(data_dir, target, files, elsewhere, files_backend, lock_timeout, say)
    except BaseException:
        # A failed backup leaves nothing behind: the target was empty or absent.
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in list(target.iterdir()):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _fill(
    data_dir: Path,
    target: Path,
    files: dict[str, Path],
    elsewhere: dict[str, str],
    files_backend: Literal["local", "s3"],
    lock_timeout: float,
    say: Callable[[str], None],
) -> Manifest:
    """Write the backup of the SQLite ``files`` (service → path), the blobs and the
    key into the empty ``target``."""
    entries: list[Entry] = []
    present = list(files)
    try:
        # The message database last: its writer, the busiest, is held the shortest.
        order = sorted(present, key=lambda s: s == "message")
        copies = {files[s]: target / f"{s}.db" for s in order}
        instant = snapshot(copies, lock_timeout=lock_timeout)
    except (sqlite3.Error, TimeoutError) as exc:
        raise Unavailable(f"snapshot of {data_dir} failed: {exc}") from exc
    snapshot_at = datetime.fromtimestamp(instant, UTC).isoformat(timespec="milliseconds")
    checks: dict[str, str] = {}
    for service in present:
        path = target / f"{service}.db"
        checks[path.name] = integrity(path)
        if checks[path.name] != "ok":
            raise Internal(f"integrity check of the copy of {path.name}: {checks[path.name]}")
        size, sha = _digest(path)
        entries.append(Entry(path=path.name, kind="database", size=size, sha256=sha))
        say(f"{path.name}: {size} bytes, integrity ok")
    for service, url in elsewhere.items():
        say(f"{service}: on {url}, not in this backup (back it up with the database's tools)")

    missing: list[str] = []
    if files_backend == "local" and "file" in present:
        source_root = local_blob_root(data_dir)
        target_root = local_blob_root(target)
        copied = 0
        for key in _blob_keys(target / "file.db"):
            try:
                size, sha = _copy(source_root / key, target_root / key)
            except FileNotFoundError:
                missing.append(key)
                continue
            rel = target_root.relative_to(target) / key
            entries.append(Entry(path=rel.as_posix(), kind="blob", size=size, sha256=sha))
            copied += 1
        say(f"files/blobs: {copied} blobs" + (f", {len(missing)} missing" if missing else ""))
    elif files_backend == "local" and "file" in elsewhere:
        say("files/blobs: not in this backup (copy it after the file database's backup)")

    key_file = key_path(data_dir)
    if key_file.is_file():
        rel = key_file.relative_to(data_dir)
        size, sha = _copy(key_file, target / rel, mode=0o600)
        entries.append(Entry(path=rel.as_posix(), kind="key", size=size, sha256=sha))
        say(f"{rel.as_posix()}: the VAPID key")

    manifest = Manifest(
        format=FORMAT,
        imserver=__version__,
        snapshot_at=snapshot_at,
        source=str(data_dir.resolve()),
        files_backend=files_backend,
        entries=entries,
        integrity=checks,
        missing_blobs=missing,
        elsewhere=elsewhere,
    )
    _fsync_tree(target)
    tmp = target / f".{MANIFEST}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(msgspec.json.format(msgspec.json.encode(manifest)))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target / MANIFEST)
    _fsync_dir(target)
    return manifest


# --- restore --------------------------------------------------------------------------


def read_manifest(source: Path) -> Manifest:
    """The manifest of the backup in ``source``: ``not_found`` when there is none,
    ``bad_request`` when it cannot be read or names a path outside the backup."""
    path = source / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{source} holds no backup ({MANIFEST} is missing)") from None
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"unreadable backup manifest {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"unreadable backup manifest {path}: {exc}") from None
    if manifest.format != FORMAT:
        raise BadRequest(f"backup format {manifest.format} is not {FORMAT}")
    for entry in manifest.entries:
        rel = PurePosixPath(entry.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BadRequest(f"backup manifest names a path outside the backup: {entry.path!r}")
    return manifest


def verify(source: Path, manifest: Manifest) -> None:
    """Check every file of the backup against the manifest; ``bad_request`` naming the
    first that is missing or differs."""
    for entry in manifest.entries:
        path = source / entry.path
        try:
            size, sha = _digest(path)
        except FileNotFoundError:
            raise BadRequest(f"damaged backup: {entry.path} is missing") from None
        if (size, sha) != (entry.size, entry.sha256):
            raise BadRequest(
                f"damaged backup: {entry.path} has {size} bytes, SHA-256 {sha}; "
                f"the manifest says {entry.size} bytes, {entry.sha256}"
            )


def restore(source: Path, data_dir: Path) -> Manifest:
    """Restore the backup in ``source`` into ``data_dir`` (absent or empty); its manifest.

    ``conflict`` when ``data_dir`` is not an empty directory (a running server's
    never is); ``not_found`` / ``bad_request`` for a missing, unreadable or damaged
    backup. Nothing is written before every file has been verified.
    """
    manifest = read_manifest(source)
    if data_dir.exists() and not _is_empty_dir(data_dir):
        raise Conflict(f"data directory {data_dir} is not empty: restore needs an empty one")
    verify(source, manifest)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
    try:
        for entry in manifest.entries:
            mode = 0o600 if entry.kind == "key" else 0o644
            size, sha = _copy(source / entry.path, staging / entry.path, mode=mode)
            if (size, sha) != (entry.size, entry.sha256):
                raise BadRequest(f"damaged backup: {entry.path} changed while restoring")
        _fsync_tree(staging)
        # Renaming a directory onto an empty one replaces it; a non-empty one (a file
        # written meanwhile) makes the rename fail and leaves it as it was.
        os.rename(staging, data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(data_dir.parent)
    return manifest
