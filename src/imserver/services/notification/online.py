"""The online devices the notification service needs: a user with a live session on
any device gets no push, and the trace names the devices.

The gateway reports each live session's device (login session) with
``device_online``/``device_offline``; :class:`OnlineDevices` keeps them. One
process keeps them in memory (:class:`MemoryOnlineDevices`); several share
:class:`~imserver.storage.online_redis.RedisOnlineDevices`, the online-session
routing table (user -> the instances holding their sessions, and the devices),
where each instance's entries expire unless its heartbeat refreshes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol


class OnlineDevices(Protocol):
    """The devices with a live session, per user."""

    async def add(self, user: str, device: str) -> None:
        """A live session of ``device`` started on this instance."""

    async def remove(self, user: str, device: str) -> None:
        """A live session of ``device`` on this instance ended."""

    async def devices(self, users: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The online users among ``users``, each with their devices (sorted), on
        every instance."""

    async def close(self) -> None:
        """Forget this instance's entries and stop refreshing them."""


class MemoryOnlineDevices:
    """The online devices of one process: a count of live sessions per device."""

    def __init__(self, instance: str = "local") -> None:
        self.instance = instance
        self._online: dict[str, Counter[str]] = {}

    async def add(self, user: str, device: str) -> None:
        self._online.setdefault(user, Counter())[device] += 1

    async def remove(self, user: str, device: str) -> None:
        devices = self._online.get(user)
        if devices is None:
            return
        devices[device] -= 1
        if devices[device] <= 0:
            del devices[device]
        if not devices:
            del self._online[user]

    async def devices(self, users: Iterable[str]) -> dict[str, tuple[str, ...]]:
        online = self._online
        return {u: tuple(sorted(online[u])) for u in users if online.get(u)}

    async def routes(self, user: str) -> dict[str, tuple[str, ...]]:
        """The instances holding live sessions of ``user``, each with the devices."""
        devices = self._online.get(user)
        return {self.instance: tuple(sorted(devices))} if devices else {}

    async def close(self) -> None:
        self._online.clear()
