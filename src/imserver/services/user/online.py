"""The online set: which users have a live session on some gateway.

:class:`OnlineStore` is what :class:`~imserver.services.user.presence.Presence`
needs of it. One process keeps it in memory (:class:`MemoryOnlineStore`); several
share :class:`~imserver.storage.online_redis.RedisOnlineStore`, where each instance's
entries live under its own key, refreshed by its heartbeat, so that the users of an
instance that died go offline when its entries expire.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from imserver.utils.ids import UserId


class OnlineStore(Protocol):
    """Users with a live session, counted over the gateway instances holding one."""

    async def add(self, user: UserId) -> bool:
        """A gateway of this instance holds a live session of ``user`` (its first);
        whether ``user`` was online already through another instance."""

    async def remove(self, user: UserId) -> bool:
        """The last such session closed; whether ``user`` is still online through
        another instance."""

    async def online(self, users: Iterable[UserId]) -> set[UserId]:
        """Those of ``users`` online through any instance."""

    async def close(self) -> None:
        """Forget this instance's entries and stop refreshing them."""


class MemoryOnlineStore:
    """The online set of one process: a count per user of the gateways that
    reported it (several gateways may share one user service in a test)."""

    def __init__(self) -> None:
        self._online: Counter[UserId] = Counter()

    async def add(self, user: UserId) -> bool:
        self._online[user] += 1
        return self._online[user] > 1

    async def remove(self, user: UserId) -> bool:
        count = self._online[user] - 1
        if count > 0:
            self._online[user] = count
            return True
        self._online.pop(user, None)
        return False

    async def online(self, users: Iterable[UserId]) -> set[UserId]:
        online = self._online
        return {user for user in users if user in online}

    async def close(self) -> None:
        self._online.clear()
