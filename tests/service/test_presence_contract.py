"""The contracts of the online set (the user service's ``OnlineStore``) and of the
online devices (the notification service's ``OnlineDevices``, which in Redis is
also the routing table): one test body per capability over ``memory`` and
``redis``.

Instances: a test asks the ``instances`` fixture for the store of instance ``a``
and of instance ``b``, as two gateway processes would have. In memory there is one
process: both names give the same store (whose counts keep the answers the same).
In Redis each is a store of its own, with a short TTL and heartbeat, under a prefix
of the test's own on the machine's Redis.

An instance that dies stops its heartbeat without deleting its entries
(``close(deregister=False)``): its users go offline once the TTL has passed, which
the test waits for with a bounded poll. One process cannot outlive itself, so the
memory runs skip that test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from imserver.services.notification.online import MemoryOnlineDevices
from imserver.services.user.online import MemoryOnlineStore
from imserver.storage.online_redis import RedisOnlineDevices, RedisOnlineStore
from imserver.utils.ids import UserId

TTL = 1.0
HEARTBEAT = 0.1

U1, U2, U3 = UserId("u1"), UserId("u2"), UserId("u3")


class Instances:
    """The stores of instances ``a`` and ``b`` of one backend."""

    def __init__(self, backend: str, make: Callable[[str], Any]) -> None:
        self.backend = backend
        self._make = make
        self._made: dict[str, Any] = {}
        self.dead: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    async def kill(self, name: str) -> None:
        """Instance ``name`` dies: no heartbeat, entries left to expire."""
        await self._made[name].close(deregister=False)
        self.dead.add(name)

    async def close(self) -> None:
        for name, store in self._made.items():
            if name not in self.dead:
                await store.close()


async def until(ok: Callable[[], Awaitable[bool]], seconds: float = 20 * TTL) -> None:
    """Poll ``ok`` until it holds (bounded)."""
    async with asyncio.timeout(seconds):
        while True:
            if await ok():
                return
            await asyncio.sleep(HEARTBEAT)


def _redis_instances(
    request: pytest.FixtureRequest, cls: type[RedisOnlineStore] | type[RedisOnlineDevices]
) -> Instances:
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")

    def make(name: str) -> Any:
        store = cls(url, prefix=prefix, instance=name, ttl=TTL, heartbeat=HEARTBEAT)
        store.start()
        return store

    return Instances("redis", make)


@pytest.fixture(params=["memory", "redis"])
async def users(request: pytest.FixtureRequest) -> AsyncIterator[Instances]:
    """Online sets."""
    if request.param == "memory":
        shared = MemoryOnlineStore()
        made = Instances("memory", lambda _: shared)
    else:
        made = _redis_instances(request, RedisOnlineStore)
    yield made
    await made.close()


@pytest.fixture(params=["memory", "redis"])
async def devices(request: pytest.FixtureRequest) -> AsyncIterator[Instances]:
    """Online devices (routing tables)."""
    if request.param == "memory":
        shared = MemoryOnlineDevices()
        made = Instances("memory", lambda _: shared)
    else:
        made = _redis_instances(request, RedisOnlineDevices)
    yield made
    await made.close()


# --- the online set ---------------------------------------------------------------------


async def test_users_are_online_between_add_and_remove(users: Instances) -> None:
    a = users["a"]
    assert await a.online([U1, U2]) == set()
    assert await a.add(U1) is False  # nobody held U1: online now, news to announce
    assert await a.add(U2) is False
    assert await a.online([U1, U2, U3]) == {U1, U2}
    assert await a.remove(U1) is False  # no other instance holds U1
    assert await a.online([U1, U2, U3]) == {U2}
    assert await a.online([]) == set()


async def test_a_user_stays_online_while_another_instance_holds_them(users: Instances) -> None:
    a, b = users["a"], users["b"]
    assert await a.add(U1) is False
    assert await b.add(U1) is True  # online already through a: nothing to announce
    assert await b.online([U1]) == {U1}
    assert await a.remove(U1) is True
    assert await a.online([U1]) == {U1}
    assert await b.remove(U1) is False
    assert await a.online([U1]) == set()


async def test_a_dead_instances_users_go_offline_within_the_ttl(users: Instances) -> None:
    if users.backend == "memory":
        pytest.skip("memory: one process, whose online set dies with it")
    a, b = users["a"], users["b"]
    await a.add(U1)
    await a.add(U2)
    await b.add(U2)
    assert await b.online([U1, U2]) == {U1, U2}
    await users.kill("a")

    async def u1_offline() -> bool:
        return await b.online([U1, U2]) == {U2}

    await until(u1_offline)


async def test_the_heartbeat_writes_back_entries_that_expired(
    users: Instances, redis_url: str, redis_prefix: str
) -> None:
    if users.backend == "memory":
        pytest.skip("memory: nothing expires")
    a = users["a"]
    await a.add(U1)
    # An outage longer than the TTL: the instance's key is gone from Redis.
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.delete(f"{redis_prefix}online:a") == 1
    finally:
        await client.aclose()
    assert await a.online([U1]) == set()

    async def back() -> bool:
        return await a.online([U1]) == {U1}

    await until(back)


# --- online devices and routes ----------------------------------------------------------


async def test_devices_are_counted_per_session(devices: Instances) -> None:
    a = devices["a"]
    await a.add("u1", "phone")
    await a.add("u1", "phone")  # a second session of one device
    await a.add("u1", "laptop")
    await a.add("u2", "phone")
    assert await a.devices(["u1", "u2", "u3"]) == {
        "u1": ("laptop", "phone"),
        "u2": ("phone",),
    }
    await a.remove("u1", "phone")
    assert await a.devices(["u1"]) == {"u1": ("laptop", "phone")}
    await a.remove("u1", "phone")
    await a.remove("u1", "tablet")  # never online: nothing happens
    assert await a.devices(["u1"]) == {"u1": ("laptop",)}
    await a.remove("u1", "laptop")
    assert await a.devices(["u1", "u2"]) == {"u2": ("phone",)}
    assert await a.devices([]) == {}


async def test_routes_name_the_instances_holding_a_users_sessions(devices: Instances) -> None:
    a, b = devices["a"], devices["b"]
    await a.add("u1", "phone")
    await b.add("u1", "laptop")
    assert await b.devices(["u1"]) == {"u1": ("laptop", "phone")}
    routes = await a.routes("u1")
    if devices.backend == "memory":  # one instance holds everything
        assert routes == {"local": ("laptop", "phone")}
    else:
        assert routes == {"a": ("phone",), "b": ("laptop",)}
    await b.remove("u1", "laptop")
    assert await a.devices(["u1"]) == {"u1": ("phone",)}
    assert await a.routes("u2") == {}


async def test_a_dead_instances_devices_go_offline_within_the_ttl(devices: Instances) -> None:
    if devices.backend == "memory":
        pytest.skip("memory: one process, whose devices die with it")
    a, b = devices["a"], devices["b"]
    await a.add("u1", "phone")
    await b.add("u1", "laptop")
    assert await b.routes("u1") == {"a": ("phone",), "b": ("laptop",)}
    await devices.kill("a")

    async def only_b() -> bool:
        return await b.routes("u1") == {"b": ("laptop",)}

    await until(only_b)
    assert await b.devices(["u1"]) == {"u1": ("laptop",)}
