"""The file service's SQL store: one row per upload (file record).

Portable SQLAlchemy Core (the lock row's "insert or ignore" aside); the schema must
match the Alembic history in ``migrations/`` (a test compares them).

Invariants:

- Many records may name the same ``sha256`` (identical content uploaded twice, or to
  two conversations): the blob is shared, and the service deletes it only once no
  record names that hash (see ``LocalFileService``).
- ``state`` moves ``new`` → ``kept`` (a message names the file; final) or ``new`` →
  ``doomed`` → deleted (clean-up found no message naming it). A doomed record is
  invisible to downloads and to ``file_refs``, so no new message can start naming it
  while the clean-up makes sure no message already does.
- Per-user usage is the sum of the sizes of the user's records (each upload counts,
  deduplicated or not); the insert checks it in the same transaction, holding the
  user's row of ``file_owner_locks`` (:mod:`imserver.storage.locks`), so that two
  uploads of one user check the quota one at a time on every database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)

from imserver.services.file.api import FileDeleted, FileStored
from imserver.storage.events import FILE_DELETED, FILE_STORED
from imserver.storage.locks import lock_key
from imserver.storage.outbox import Outbox, outbox_table
from imserver.storage.runners import SqlStore
from imserver.storage.statements import chunks
from imserver.utils.ids import ConvId

metadata = MetaData()

ID_LEN = 40
CONV_LEN = 200
NAME_LEN = 255

NEW, KEPT, DOOMED = "new", "kept", "doomed"

files = Table(
    "files",
    metadata,
    Column("id", String(ID_LEN), nullable=False),
    Column("conv", String(CONV_LEN), nullable=False),
    Column("owner", String(ID_LEN), nullable=False),
    Column("name", String(NAME_LEN), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mime", String(100), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("thumb_mime", String(32), nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("state", String(8), nullable=False),
    PrimaryKeyConstraint("id", name="pk_files"),
    Index("ix_files_sha256", "sha256"),
    Index("ix_files_owner", "owner"),
    Index("ix_files_state_created", "state", "created"),
)

file_owner_locks = Table(
    "file_owner_locks",
    metadata,
    Column("owner", String(ID_LEN), nullable=False),
    PrimaryKeyConstraint("owner", name="pk_file_owner_locks"),
)
"""One row per user who has uploaded: the row an upload holds while it checks the
user's quota (:func:`imserver.storage.locks.lock_key`)."""

outbox = outbox_table(metadata, "file")
"""``file.stored``/``file.deleted`` events waiting for the relay
(:mod:`imserver.storage.outbox`), written in the record's transaction when the event
stream is on."""


class _OverQuota(Exception):
    def __init__(self, usage: int) -> None:
        self.usage = usage


class FileRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One stored upload."""

    id: str
    conv: ConvId
    owner: str
    name: str
    size: int
    mime: str
    sha256: str
    thumb_mime: str | None
    created: int
    state: str = NEW


_COLUMNS = (
    files.c.id,
    files.c.conv,
    files.c.owner,
    files.c.name,
    files.c.size,
    files.c.mime,
    files.c.sha256,
    files.c.thumb_mime,
    files.c.created,
    files.c.state,
)


def _record(row: Sequence[Any]) -> FileRecord:
    return FileRecord(
        id=row[0],
        conv=row[1],
        owner=row[2],
        name=row[3],
        size=row[4],
        mime=row[5],
        sha256=row[6],
        thumb_mime=row[7],
        created=row[8],
        state=row[9],
    )


class SqlFileStore(SqlStore):
    """All of the file service's persistent state in one SQL database."""

    name = "file database"

    outbox: Outbox | None = None
    """Set (:meth:`with_outbox`) when the event stream is on: inserting and deleting
    a record then inserts its event in the same transaction."""

    def with_outbox(self) -> SqlFileStore:
        """Turn the outbox on (before the store is used); returns the store."""
        self.outbox = Outbox(outbox)
        return self

    def _deleted(self, conn: Connection, gone: Sequence[Any], now: int) -> None:
        """The ``file.deleted`` events of the records ``gone`` (id, conv, owner rows)."""
        if self.outbox is not None and gone:
            self.outbox.insert(
                conn,
                [
                    self.outbox.row(
                        FILE_DELETED,
                        FileDeleted(file_id=r[0], conv=ConvId(r[1]), owner=r[2], ts=now),
                    )
                    for r in gone
                ],
            )

    async def _write_events(self, fn: Any, *args: Any) -> Any:
        """:meth:`_write`, then wake the relay when the outbox is on."""
        result = await self._write(fn, *args)
        if self.outbox is not None:
            self.outbox.committed()
        return result

    async def usage(self, owner: str) -> int:
        """Bytes the user's records add up to."""
        return await self._read(_usage, owner)

    async def insert(self, record: FileRecord, quota: int) -> int | None:
        """Insert a record unless it takes its owner past ``quota`` bytes (0: no quota).

        Returns ``None`` when stored, else the owner's usage without it (and nothing
        is stored). The owner's lock row is taken first, so the sum is read by one
        upload of the owner at a time and two concurrent uploads cannot both squeeze
        under the quota.
        """

        def run(conn: Connection) -> None:
            if quota > 0:
                lock_key(conn, file_owner_locks.c.owner, record.owner)
            conn.execute(insert(files).values(**msgspec.structs.asdict(record)))
            if quota > 0:
                total = _usage(conn, record.owner)
                if total > quota:
                    raise _OverQuota(total - record.size)  # rolls the insert back
            if self.outbox is not None:
                event = FileStored(
                    file_id=record.id,
                    conv=record.conv,
                    owner=record.owner,
                    name=record.name,
                    size=record.size,
                    mime=record.mime,
                    sha256=record.sha256,
                    ts=record.created,
                )
                self.outbox.insert(conn, [self.outbox.row(FILE_STORED, event)])

        try:
            await self._write_events(run)
        except _OverQuota as over:
            return over.usage
        return None

    async def get(self, file_id: str) -> FileRecord | None:
        """A visible (not doomed) record, or ``None``."""
        return await self._read(_one, files.c.id == file_id)

    async def get_many(self, ids: Sequence[str]) -> list[FileRecord]:
        """The visible records among ``ids`` (any order)."""

        def run(conn: Connection) -> list[FileRecord]:
            found: list[FileRecord] = []
            for chunk in chunks(ids):
                result = conn.execute(
                    select(*_COLUMNS).where(files.c.id.in_(chunk), files.c.state != DOOMED)
                )
                found.extend(_record(row) for row in result)
            return found

        return await self._read(run)

    async def by_sha256(self, sha256: str) -> FileRecord | None:
        """Any visible record of this content (to reuse its type and thumbnail)."""
        return await self._read(_one, files.c.sha256 == sha256)

    async def sha256_in_use(self, sha256: str) -> bool:
        """Whether any record (doomed ones included) still names this content."""

        def run(conn: Connection) -> bool:
            found = conn.execute(select(files.c.id).where(files.c.sha256 == sha256).limit(1))
            return found.first() is not None

        return await self._read(run)

    async def candidates(self, cutoff: int, limit: int) -> list[str]:
        """Ids of records created before ``cutoff`` not known to be referenced (``new``,
        or ``doomed`` by a clean-up that did not finish), oldest first."""

        def run(conn: Connection) -> list[str]:
            result = conn.execute(
                select(files.c.id)
                .where(files.c.state.in_((NEW, DOOMED)), files.c.created < cutoff)
                .order_by(files.c.created, files.c.id)
                .limit(limit)
            )
            return [row[0] for row in result]

        return await self._read(run)

    async def set_state(self, ids: Sequence[str], state: str, *, was: Sequence[str]) -> None:
        """Move those of the records ``ids`` whose state is one of ``was`` to ``state``."""

        def run(conn: Connection) -> None:
            for chunk in chunks(ids):
                conn.execute(
                    update(files)
                    .where(files.c.id.in_(chunk), files.c.state.in_(was))
                    .values(state=state)
                )

        await self._write(run)

    async def delete_doomed(self, ids: Sequence[str], now: int = 0) -> list[str]:
        """Delete the doomed records among ``ids``; returns their content hashes."""
        c = files.c

        def run(conn: Connection) -> list[str]:
            shas: list[str] = []
            for chunk in chunks(ids):
                cond = (c.id.in_(chunk), c.state == DOOMED)
                gone = conn.execute(select(c.id, c.conv, c.owner, c.sha256).where(*cond)).all()
                shas.extend(r[3] for r in gone)
                conn.execute(delete(files).where(*cond))
                self._deleted(conn, gone, now)
            return shas

        result: list[str] = await self._write_events(run)
        return result

    async def delete(self, file_id: str, now: int = 0) -> None:
        """Delete one record whatever its state (an upload undone)."""
        c = files.c

        def run(conn: Connection) -> None:
            gone = conn.execute(select(c.id, c.conv, c.owner).where(c.id == file_id)).all()
            conn.execute(delete(files).where(c.id == file_id))
            self._deleted(conn, gone, now)

        await self._write_events(run)


def _usage(conn: Connection, owner: str) -> int:
    total = conn.scalar(
        select(func.coalesce(func.sum(files.c.size), 0)).where(files.c.owner == owner)
    )
    return int(total or 0)


def _one(conn: Connection, where: Any) -> FileRecord | None:
    """Any visible record matching ``where``."""
    row = conn.execute(select(*_COLUMNS).where(where, files.c.state != DOOMED).limit(1)).first()
    return None if row is None else _record(row)
