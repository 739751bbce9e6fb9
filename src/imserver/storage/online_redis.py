"""Presence and the online-session routing table in Redis, kept alive by heartbeats.

Several processes (gateway instances, each with an instance id of its own) share
them. Every instance writes only keys named after itself, and refreshes them:

* ``<prefix>instances``: a sorted set, instance -> the time (Redis's clock, ms) its
  entries expire; the heartbeat moves it forward.
* ``<prefix>online:<instance>``: a set, the users with a live session there
  (:class:`RedisOnlineStore`, the user service's online set).
* ``<prefix>route:<instance>``: a hash, user -> their devices with a live session
  there, MessagePack (:class:`RedisOnlineDevices`, the notification service's online
  devices, and the routing table: which instances hold sessions of a user, and which
  devices).

Each write and each heartbeat sets the instance's key to expire ``ttl`` seconds
later, and its entry in ``instances`` likewise; the heartbeat runs every
``heartbeat`` seconds. An instance that dies (``kill -9``, a lost machine) stops
refreshing: its keys expire, and readers, which look only at instances whose
entry has not expired, see its users offline within ``ttl``. An instance that comes
back from an outage longer than ``ttl`` finds its key gone and writes it whole
again from what it holds in memory. Writes of one instance are serialised (one at a
time, in call order), so a quick online/offline pair cannot land reversed.

Reads and heartbeats are Lua scripts that take the time from Redis (no clock of
the instances is compared) and build the instances' key names from the prefix:
one Redis, not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from imserver.utils.errors import Unavailable
from imserver.utils.ids import UserId

logger = logging.getLogger(__name__)

_TOUCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
"""

_WRITE = (
    """
if ARGV[3] ~= '' then redis.call(ARGV[3], KEYS[2], unpack(ARGV, 4)) end
"""
    + _TOUCH
    + """
return redis.call('PEXPIRE', KEYS[2], ttl)
"""
)
"""One write of an instance's key (a command and its arguments, or none: the
heartbeat), then its expiry moved on; answers 0 when the key does not exist."""

_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
"""

_ONLINE = (
    _LIVE
    + """
local out = {}
for i = 2, #ARGV do
  local on = 0
  for _, instance in ipairs(live) do
    if redis.call('SISMEMBER', ARGV[1] .. instance, ARGV[i]) == 1 then on = 1 break end
  end
  out[i - 1] = on
end
return out
"""
)
"""Whether each user (ARGV[2..]) is in the set of a live instance (ARGV[1]: the
sets' key prefix)."""

_ROUTES = (
    _LIVE
    + """
local out = {}
for i = 2, #ARGV do
  for _, instance in ipairs(live) do
    local devices = redis.call('HGET', ARGV[1] .. instance, ARGV[i])
    if devices then
      out[#out + 1] = i - 2
      out[#out + 1] = instance
      out[#out + 1] = devices
    end
  end
end
return out
"""
)
"""Flat triples (user index, instance, devices) of each user's entries on live
instances."""

_FAILURES = (RedisError, OSError, TimeoutError)


class _InstanceTable:
    """One instance's key (a set or a hash) with its heartbeat (see the module
    docstring)."""

    kind = ""
    """The key's name between the prefix and the instance: ``online`` or ``route``."""

    def __init__(
        self, url: str, *, prefix: str, instance: str, ttl: float, heartbeat: float
    ) -> None:
        self.instance = instance
        self._client: aioredis.Redis = aioredis.Redis.from_url(url)
        self._registry = prefix + "instances"
        self._family = f"{prefix}{self.kind}:"
        self._key = self._family + instance
        self._ttl_ms = max(1, int(ttl * 1000))
        self._heartbeat = heartbeat
        self._write_script = self._client.register_script(_WRITE)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the heartbeat."""
        self._task = asyncio.get_running_loop().create_task(
            self._beat(), name=f"presence-heartbeat-{self.kind}"
        )

    async def close(self, *, deregister: bool = True) -> None:
        """Stop the heartbeat; with ``deregister``, delete this instance's key now
        (else it expires within ``ttl``, as after a crash)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if deregister:
            with contextlib.suppress(*_FAILURES):
                await self._client.delete(self._key)
        await self._client.aclose()

    async def _write(self, *command: Any) -> int:
        """Apply ``command`` to this instance's key and refresh its expiry, in call
        order; answers 0 when the key did not exist before a bare refresh."""
        async with self._lock:
            keys = [self._registry, self._key]
            args = [self.instance, self._ttl_ms, *(command or ("",))]
            result: int = await self._write_script(keys=keys, args=args)
            return result

    async def _call(self, what: str, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except _FAILURES as exc:
            raise Unavailable(f"presence store unavailable ({what}): {exc}") from exc

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                if await self._write() == 0:
                    await self._restore()
            except _FAILURES as exc:
                logger.warning("presence heartbeat (%s) failed: %s", self.kind, exc)

    async def _restore(self) -> None:
        """The key expired (an outage longer than ``ttl``): write it whole again."""
        entries = self._entries()
        if not entries:
            return
        logger.warning(
            "presence entries (%s) had expired: %d written again", self.kind, len(entries)
        )
        for write in entries:
            await self._write(*write)

    def _entries(self) -> list[tuple[Any, ...]]:
        """The writes that rebuild this instance's key from memory."""
        raise NotImplementedError


class RedisOnlineStore(_InstanceTable):
    """The user service's online set in Redis (an
    :class:`~imserver.services.user.online.OnlineStore`)."""

    kind = "online"

    def __init__(
        self, url: str, *, prefix: str, instance: str, ttl: float, heartbeat: float
    ) -> None:
        super().__init__(url, prefix=prefix, instance=instance, ttl=ttl, heartbeat=heartbeat)
        self._users: Counter[UserId] = Counter()
        self._online_script = self._client.register_script(_ONLINE)

    async def add(self, user: UserId) -> bool:
        self._users[user] += 1
        if self._users[user] > 1:
            return True
        elsewhere = bool(await self.online((user,)))
        await self._call("add", self._write("SADD", user))
        return elsewhere

    async def remove(self, user: UserId) -> bool:
        count = self._users[user] - 1
        if count > 0:
            self._users[user] = count
            return True
        self._users.pop(user, None)
        await self._call("remove", self._write("SREM", user))
        return bool(await self.online((user,)))

    async def online(self, users: Iterable[UserId]) -> set[UserId]:
        ids = list(users)
        if not ids:
            return set()
        flags = await self._call(
            "online", self._online_script(keys=[self._registry], args=[self._family, *ids])
        )
        return {user for user, flag in zip(ids, flags, strict=True) if flag}

    def _entries(self) -> list[tuple[Any, ...]]:
        return [("SADD", *self._users)] if self._users else []


class RedisOnlineDevices(_InstanceTable):
    """The notification service's online devices in Redis (an
    :class:`~imserver.services.notification.online.OnlineDevices`), which is also the
    routing table: :meth:`routes` answers the instances holding a user's sessions."""

    kind = "route"

    def __init__(
        self, url: str, *, prefix: str, instance: str, ttl: float, heartbeat: float
    ) -> None:
        super().__init__(url, prefix=prefix, instance=instance, ttl=ttl, heartbeat=heartbeat)
        self._devices: dict[str, Counter[str]] = {}
        self._routes_script = self._client.register_script(_ROUTES)
        self._encode: Callable[[Any], bytes] = msgspec.msgpack.encode
        self._decode = msgspec.msgpack.Decoder(list[str]).decode

    def _packed(self, user: str) -> bytes | None:
        devices = self._devices.get(user)
        return self._encode(sorted(devices)) if devices else None

    async def add(self, user: str, device: str) -> None:
        devices = self._devices.setdefault(user, Counter())
        devices[device] += 1
        if devices[device] == 1:
            await self._call("add", self._write("HSET", user, self._packed(user)))

    async def remove(self, user: str, device: str) -> None:
        devices = self._devices.get(user)
        if devices is None or devices[device] <= 0:
            return
        devices[device] -= 1
        if devices[device] > 0:
            return
        del devices[device]
        if devices:
            await self._call("remove", self._write("HSET", user, self._packed(user)))
        else:
            del self._devices[user]
            await self._call("remove", self._write("HDEL", user))

    async def _entries_of(self, users: list[str]) -> list[tuple[int, str, list[str]]]:
        flat = await self._call(
            "devices", self._routes_script(keys=[self._registry], args=[self._family, *users])
        )
        return [
            (int(flat[i]), flat[i + 1].decode(), self._decode(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def devices(self, users: Iterable[str]) -> dict[str, tuple[str, ...]]:
        ids = list(users)
        if not ids:
            return {}
        found: dict[str, set[str]] = {}
        for index, _, devices in await self._entries_of(ids):
            found.setdefault(ids[index], set()).update(devices)
        return {user: tuple(sorted(devices)) for user, devices in found.items()}

    async def routes(self, user: str) -> dict[str, tuple[str, ...]]:
        """The live instances holding sessions of ``user``, each with the devices."""
        return {instance: tuple(devices) for _, instance, devices in await self._entries_of([user])}

    def _entries(self) -> list[tuple[Any, ...]]:
        writes: list[tuple[Any, ...]] = []
        for user in self._devices:
            packed = self._packed(user)
            if packed is not None:
                writes.append(("HSET", user, packed))
        return writes
