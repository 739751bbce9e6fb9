"""The file service's API: uploads, downloads, thumbnails, and the files messages name.

The HTTP routes (``network/http.py``) call the file service only through
:class:`FileService`; the in-process implementation is
:class:`imserver.services.file.service.LocalFileService`. The message service sees the
same object through the narrower
:class:`~imserver.services.message.api.FileDirectory` (``file_refs``).

Decisions every implementation keeps:

- **Access is conversation membership, asked live.** A file belongs to the
  conversation it was uploaded to; uploading and downloading ask the message
  service's ``check_member`` on every request, so a user who leaves or is kicked from a
  room loses access at once. Unknown ids answer ``not_found``; a non-member naming an
  existing id answers ``forbidden``.
- **Content-addressed blobs.** A blob is stored under its SHA-256; identical content
  is stored once however many file records (uploads) name it, and deleted only when
  the last record goes.
- **Nothing the client says reaches the filesystem.** The file name is display
  metadata (sanitised); the declared ``Content-Type`` is ignored: the MIME type comes
  from the content's magic bytes.

Every method can be called across a process boundary, and two of them move bytes as
streams, the shapes gRPC calls client streaming and server streaming:

- :meth:`FileService.upload` takes the body as an ``AsyncIterable[bytes]`` and
  answers once: one call for the whole upload, so an upload has no handle that could
  outlive its caller, and a caller that stops (its stream raises) leaves nothing
  behind. The checks that need no byte (membership, declared size, quota) answer
  before the first chunk is pulled.
- :meth:`FileService.read` answers a byte range as an ``AsyncIterator[bytes]`` of
  chunks of at most 1 MiB, so a download never holds a whole file in memory on either
  side.

:mod:`imserver.services.loopback` carries both chunk by chunk through MessagePack in
the contract tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol

import msgspec

from imserver.services.message.api import FileRef
from imserver.storage.events import Event
from imserver.utils.errors import BadRequest, TooLarge
from imserver.utils.ids import ConvId, UserId


class FileStored(Event, frozen=True, kw_only=True):
    """The ``file.stored`` event (version 1): an upload's record was committed.
    Published through the file database's outbox when the event stream is on."""

    file_id: str
    conv: ConvId
    owner: str
    name: str
    size: int
    mime: str
    sha256: str
    ts: int


class FileDeleted(Event, frozen=True, kw_only=True):
    """The ``file.deleted`` event (version 1): a file record was deleted (by the
    clean-up, or an upload undone)."""

    file_id: str
    conv: ConvId
    owner: str
    ts: int


class FileInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The file object of docs/protocol.md §6, as the upload returns it.

    ``url`` and ``thumb_url`` are paths on the server that served the upload
    (``/api/v1/files/<id>``); ``thumb_url`` is null unless a thumbnail exists.
    """

    id: str
    name: str
    size: int
    mime: str
    sha256: str
    conv: ConvId
    url: str
    thumb_url: str | None


class UploadData(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a successful ``POST /api/v1/files``."""

    file: FileInfo


class Blob(msgspec.Struct, frozen=True, kw_only=True):
    """What a download needs: the record's display data and where its bytes are."""

    info: FileInfo
    key: str
    """The blob store key of the bytes (read them with :meth:`FileService.read`)."""
    size: int
    mime: str


class Thumb(msgspec.Struct, frozen=True, kw_only=True):
    """A thumbnail (small enough to be served from memory)."""

    info: FileInfo
    mime: str
    """``image/jpeg``, or ``image/png`` for images with transparency."""
    data: bytes


class QuotaExceeded(TooLarge):
    """The upload would take the user past ``files.quota_per_user`` (``too_large``,
    field ``quota``, so a client can tell it from the per-file size limit)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="quota")


class RangeNotSatisfiable(BadRequest):
    """A ``Range`` outside the file: HTTP 416 with the ``bad_request`` envelope."""

    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable: the file has {size} bytes", field="Range")
        self.size = size


class MemberDirectory(Protocol):
    """What the file service needs from the message service."""

    async def check_member(self, user: UserId, conv: ConvId) -> None:
        """Raise unless ``user`` may read ``conv`` now."""

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` a stored message names."""

    async def write_barrier(self) -> None:
        """Answer once every write accepted before the request is committed."""


class FileService(Protocol):
    """File records, blobs and thumbnails, with conversation membership as the ACL."""

    async def upload(
        self,
        user: UserId,
        conv: ConvId,
        name: str,
        declared_size: int | None,
        body: AsyncIterable[bytes],
    ) -> FileInfo:
        """Check membership, quota and the declared size, then store ``body`` and
        return the file's object.

        ``declared_size`` (the request's ``Content-Length``, if any) only allows an
        early refusal, before ``body`` is read; the limits are enforced on the bytes
        actually read (``too_large`` at the first byte past them). If ``body`` raises,
        the upload is discarded and its error raised.
        """

    async def open_file(self, user: UserId, file_id: str) -> Blob:
        """The file for a download by ``user`` (``not_found`` / ``forbidden``)."""

    async def open_thumb(self, user: UserId, file_id: str) -> Thumb:
        """The thumbnail of an image (``not_found`` when it has none)."""

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start``..``end`` (inclusive) of a blob, in chunks."""

    async def file_refs(self, file_ids: Sequence[str]) -> dict[str, FileRef]:
        """The known files among ``file_ids`` (for file/image messages)."""

    async def cleanup(self) -> int:
        """Delete file records no message names that are older than the grace period;
        returns how many went."""

    async def check(self) -> None:
        """Raise ``unavailable`` if the database or the blob store cannot be reached."""

    async def close(self) -> None:
        """Stop the clean-up task and release the store."""
