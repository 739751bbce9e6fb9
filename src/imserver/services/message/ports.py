"""What the message service needs of its storage: :class:`MessageStore`.

The service owns this interface; :class:`~imserver.services.message.store.SqlMessageStore`
implements it. Writes go through one transaction per batch (:meth:`MessageStore.begin`),
used only by the service's single writer; reads see exactly what has been committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from imserver.protocol.models import Message
from imserver.services.message.api import CommittedMessage
from imserver.services.message.reads import ConvState
from imserver.services.message.schema import IdemKey, MarkerKey, MessageKey, StoredMessage
from imserver.services.message.writes import Loaded, WriteBatch
from imserver.utils.ids import ConvId, UserId


class WriteTransaction(Protocol):
    """One batch's transaction: :meth:`load` (optional), then :meth:`commit`."""

    async def load(
        self,
        idem_keys: Sequence[IdemKey],
        convs: Sequence[ConvId],
        target_keys: Sequence[MessageKey],
        marker_keys: Sequence[MarkerKey],
    ) -> Loaded:
        """Open the transaction and read the stored idempotency keys, the last seqs of
        ``convs``, the targets and the markers the batch needs, in one step."""
        ...

    async def commit(self, batch: WriteBatch) -> None:
        """Write ``batch`` and commit; raises
        :class:`~imserver.services.message.writes.KeyConflict` when a unique key exists."""
        ...


class MessageStore(Protocol):
    """The message service's storage: one writer's transactions and the read queries."""

    shared: bool
    """Whether other processes may write the same database. The writer then takes
    every conversation's last seq from the transaction (which locks it) instead of
    its memory."""

    def begin(self) -> AbstractAsyncContextManager[WriteTransaction]:
        """One write transaction, rolled back unless committed."""
        ...

    async def history(
        self, conv: ConvId, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A page of ``conv`` ascending by seq, and whether more lie beyond it."""
        ...

    async def conv_states(self, user: str, convs: Sequence[ConvId]) -> dict[ConvId, ConvState]:
        """Last seq, ``user``'s markers, unread and mention counts and the last message
        of each of ``convs``."""
        ...

    async def unread_totals(self, wanted: Mapping[str, Sequence[ConvId]]) -> dict[str, int]:
        """user -> unread messages over ``wanted[user]`` and the user's direct
        conversations."""
        ...

    async def direct_convs(self, user: str) -> dict[UserId, ConvId]:
        """peer -> conv of every direct conversation of ``user`` that has messages."""
        ...

    async def stored_since(self, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
        """Messages stored at ``ts`` or later with an id above ``after_id``, by id."""
        ...

    async def search(
        self, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[StoredMessage]:
        """Matching messages of ``convs`` with id < ``before``, newest first."""
        ...

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` named by a stored message."""
        ...

    async def check(self) -> None:
        """Raise if the database cannot be reached."""
        ...

    async def close(self) -> None:
        """Release every connection."""
        ...
