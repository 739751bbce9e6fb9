"""Presence: who is online, and when each user was last seen.

The online set is an :class:`~imserver.services.user.online.OnlineStore`: in
memory for one process (a restart means nobody is online), in Redis for several,
where a user is online while any instance holds a live session. ``last_seen`` is
cached, and written to the database in batches at most :data:`LAST_SEEN_FLUSH_S`
after the disconnect (and on close), so a storm of reconnects costs one commit per
interval, not one per disconnect. A crash loses at most that interval of
``last_seen`` updates; the values are advisory.

:class:`Presence` takes users the service has already checked exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from imserver.protocol.models import PresenceInfo
from imserver.services.user.bounded import Bounded
from imserver.services.user.online import OnlineStore
from imserver.services.user.store import SqlUserStore
from imserver.utils.errors import Unavailable
from imserver.utils.ids import UserId

LAST_SEEN_CACHE_SIZE = 100_000
LAST_SEEN_FLUSH_S = 1.0
"""Most seconds a ``last_seen`` waits in memory before its batch is written."""

logger = logging.getLogger(__name__)


class Presence:
    """The online set and the ``last_seen`` cache of one user service, with the
    batched writer of ``last_seen`` to ``store``."""

    def __init__(self, store: SqlUserStore, clock: Callable[[], int], online: OnlineStore) -> None:
        self._store = store
        self._clock = clock
        self._online = online
        self._seen_pending: dict[UserId, int] = {}
        self._seen_flusher: asyncio.Task[None] | None = None
        self._seen_now = asyncio.Event()  # set by close(): flush without waiting
        self._last_seen: Bounded[UserId, int | None] = Bounded(LAST_SEEN_CACHE_SIZE)

    def registered(self, user: UserId) -> None:
        """A new account: never seen, known without reading the database."""
        self._last_seen.put(user, None)

    async def set_online(self, user: UserId) -> PresenceInfo | None:
        """Mark ``user`` online (their first live session on a gateway opened);
        ``None`` when another instance holds one already (no change to announce)."""
        if await self._online.add(user):
            return None
        return PresenceInfo(user=user, status="online", last_seen=self._clock())

    async def set_offline(self, user: UserId) -> PresenceInfo:
        """Their last live session on a gateway closed: offline with ``last_seen`` =
        now, written with the next batch, unless another instance still holds one."""
        now = self._clock()
        if await self._online.remove(user):
            return PresenceInfo(user=user, status="online", last_seen=now)
        self._last_seen.put(user, now)
        self._seen_pending[user] = now
        if self._seen_flusher is None or self._seen_flusher.done():
            self._seen_flusher = asyncio.get_running_loop().create_task(self._flush_seen_later())
        return PresenceInfo(user=user, status="offline", last_seen=now)

    async def _flush_seen_later(self) -> None:
        # close() cuts the wait short instead of cancelling the task: cancelled in the
        # middle of its transaction, the write leaves the database locked for the one
        # close() starts next.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAST_SEEN_FLUSH_S):
                await self._seen_now.wait()
        await self._flush_seen()

    async def _flush_seen(self) -> None:
        """Write the pending ``last_seen`` values in one transaction."""
        pending, self._seen_pending = self._seen_pending, {}
        try:
            await self._store.set_last_seen_many(pending)
        except BaseException as exc:
            # Keep them for the next batch, unless a newer value arrived meanwhile.
            for user, when in pending.items():
                self._seen_pending.setdefault(user, when)
            if not isinstance(exc, Exception):
                raise  # cancelled: close() writes them
            if isinstance(exc, Unavailable):  # the store logged the cause
                logger.warning("storing last_seen of %d users postponed", len(pending))
            else:
                logger.exception("storing last_seen of %d users failed", len(pending))

    async def get(self, known: Iterable[UserId]) -> list[PresenceInfo]:
        """Presence of each of ``known`` (existing users, no repeats), in that order.

        Online users have ``last_seen`` = now; offline ones the time their last
        session closed, or ``None`` if they were never seen.
        """
        ids = list(known)
        online = await self._online.online(ids)
        missing = [u for u in ids if u not in online and u not in self._last_seen]
        if missing:
            stored = await self._store.last_seen(missing)
            for uid in missing:
                self._last_seen.put(uid, self._seen_pending.get(uid, stored.get(uid)))
        now = self._clock()
        return [
            PresenceInfo(user=uid, status="online", last_seen=now)
            if uid in online
            else PresenceInfo(user=uid, status="offline", last_seen=self._last_seen.get(uid))
            for uid in ids
        ]

    async def close(self) -> None:
        """Write the pending ``last_seen`` values (a batch write in progress finishes)
        and release the online set."""
        self._seen_now.set()
        if self._seen_flusher is not None:
            await self._seen_flusher
        await self._flush_seen()
        await self._online.close()
