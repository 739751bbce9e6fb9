"""Discovery on a real etcd: registration under a lease, its end on a graceful stop
and on ``kill -9``, the registry's watch (compaction, outage), the balancer fed by it,
and an etcd outage that the instances and their clients live through."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
from waiting import until

from imserver.discovery.balancer import ServiceUpstream
from imserver.discovery.etcd import Compacted, Entry, EtcdClient, EtcdUnavailable
from imserver.discovery.registry import Registration, instance_key, services_prefix
from imserver.discovery.watch import PrefixWatch
from imserver.testing.etcd import EtcdServer

PREFIX = "/imtest"
TTL = 2


class Channel:
    """A channel as the balancer sees it (no gRPC server behind it in these tests)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    async def close(self, grace: float | None = None) -> None:
        self.closed = True


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    c = EtcdClient([etcd.url], timeout=1.0)
    try:
        yield c
    finally:
        await c.close()


async def test_a_registration_is_seen_and_a_graceful_stop_removes_it(
    client: EtcdClient, etcd: EtcdServer
) -> None:
    reg = Registration(
        client, prefix=PREFIX, service="user", instance="u1", address="127.0.0.1:7001", ttl=TTL
    )
    reg.start()
    assert await reg.wait_registered(10)
    entry, _ = await client.get(instance_key(PREFIX, "user", "u1"))
    assert entry is not None
    assert b'"address":"127.0.0.1:7001"' in entry.value
    assert b'"service":"user"' in entry.value
    upstream = ServiceUpstream(
        client, prefix=PREFIX, service="user", channel_factory=Channel, retry_max=0.5
    )
    upstream.start()
    assert await upstream.wait_synced(10)
    picked = upstream.pick()
    assert picked.key == instance_key(PREFIX, "user", "u1")
    assert picked.channel.address == "127.0.0.1:7001"
    await reg.stop()  # the lease is revoked: the key goes now, not after the TTL
    entry, _ = await client.get(instance_key(PREFIX, "user", "u1"))
    assert entry is None
    await until(lambda: not upstream.balancer.endpoints, "the watcher saw the instance leave")
    assert picked.channel.closed
    await upstream.stop()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from imserver.discovery.etcd import EtcdClient
    from imserver.discovery.registry import Registration

    async def main() -> None:
        client = EtcdClient([sys.argv[1]], timeout=1.0)
        reg = Registration(client, prefix=sys.argv[2], service="message", instance="m1",
                           address="127.0.0.1:7101", ttl=int(sys.argv[3]))
        reg.start()
        await reg.wait_registered(10)
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_an_instance_killed_with_sigkill_leaves_within_the_ttl(
    client: EtcdClient, etcd: EtcdServer
) -> None:
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", CHILD, etcd.url, PREFIX, str(TTL)),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 20)
        assert line == b"registered\n"
        upstream = ServiceUpstream(
            client, prefix=PREFIX, service="message", channel_factory=Channel, retry_max=0.5
        )
        upstream.start()
        assert await upstream.wait_synced(10)
        assert upstream.pick().channel.address == "127.0.0.1:7101"
        os.killpg(child.pid, signal.SIGKILL)
        await child.wait()
        killed_at = asyncio.get_running_loop().time()
        # etcd expires a lease at most TTL seconds after its last renewal; its expiry
        # check runs every 500 ms, hence the allowance.
        await until(lambda: not upstream.balancer.endpoints, "the killed instance left", TTL + 1.5)
        assert asyncio.get_running_loop().time() - killed_at <= TTL + 1.5
        entry, _ = await client.get(instance_key(PREFIX, "message", "m1"))
        assert entry is None
        await upstream.stop()
    finally:
        if child.returncode is None:
            os.killpg(child.pid, signal.SIGKILL)
            await child.wait()


async def test_a_watch_from_a_compacted_revision_raises_compacted(client: EtcdClient) -> None:
    first = await client.put("/c/k", b"1")
    latest = await client.put("/c/k", b"2")
    await client.compact(latest)
    with pytest.raises(Compacted) as info:
        async for _ in client.watch_prefix("/c/", first):
            pass
    assert info.value.revision == latest


class CompactingClient(EtcdClient):
    """A real client that, once, writes and compacts past the range it just read, as
    happens when etcd compacts between a watcher's read and its watch."""

    compacted = False

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        entries, revision = await super().get_prefix(prefix)
        if not self.compacted:
            self.compacted = True
            await self.put(prefix + "late", b"x")
            await self.compact(await self.put(prefix + "later", b"y"))
        return entries, revision


async def test_a_compacted_watch_reads_the_range_again(etcd: EtcdServer) -> None:
    c = CompactingClient([etcd.url], timeout=1.0)
    seen: list[set[str]] = []
    watch = PrefixWatch(c, "/w/", lambda entries, _rev: seen.append(set(entries)), retry_max=0.5)
    try:
        await c.put("/w/a", b"1")
        watch.start()
        await until(lambda: watch.syncs >= 2, "the watcher read the range again")
        await until(lambda: set(watch.entries) == {"/w/a", "/w/late", "/w/later"}, "resynced")
        assert seen[0] == {"/w/a"}
        await c.put("/w/b", b"2")  # and it watches again from there
        await until(lambda: "/w/b" in watch.entries, "a change after the resync")
    finally:
        await watch.stop()
        await c.close()


async def test_etcd_down_keeps_the_last_endpoints_and_the_instance_reregisters(
    client: EtcdClient, etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reg_client = EtcdClient([etcd.url], timeout=0.5)
    reg = Registration(
        reg_client, prefix=PREFIX, service="room", instance="r1", address="h:1", ttl=TTL
    )
    upstream = ServiceUpstream(
        client, prefix=PREFIX, service="room", channel_factory=Channel, retry_max=0.5
    )
    try:
        reg.start()
        assert await reg.wait_registered(10)
        upstream.start()
        assert await upstream.wait_synced(10)
        assert upstream.pick().instance == "r1"
        first_lease = reg.lease

        etcd.stop()
        await until(lambda: not upstream.watch.connected, "the watcher saw etcd go")
        await until(lambda: "cannot renew" in caplog.text, "the keep-alive failed")
        await asyncio.sleep(TTL + 1)  # several keep-alives fail meanwhile
        assert reg._task is not None and not reg._task.done()  # still trying, no crash
        for _ in range(3):  # the last known instance still takes calls
            endpoint = upstream.pick()
            assert endpoint.instance == "r1"
            endpoint.succeeded()
        with pytest.raises(EtcdUnavailable):
            await client.get("/anything")

        syncs = upstream.watch.syncs
        etcd.start()
        await until(lambda: upstream.watch.syncs > syncs, "the watcher resynced")
        await until(lambda: "kept alive" in caplog.text, "the keep-alive works again")
        entry, _ = await client.get(reg.key)
        assert entry is not None and entry.value.startswith(b"{")
        assert upstream.pick().instance == "r1"

        # The lease lost (as when it expires while the instance cannot reach etcd):
        # the next keep-alive finds it gone and registers again with a new lease.
        await client.revoke(reg.lease)
        await until(lambda: reg.registrations == 2, "registered again")
        assert reg.lease != first_lease
        await until(lambda: bool(upstream.balancer.endpoints), "the watcher saw it come back")
        assert upstream.pick().instance == "r1"
        assert "lease of /imtest/services/room/r1 expired; registering again" in caplog.text
    finally:
        await upstream.stop()
        await reg.stop()
        await reg_client.close()


async def test_the_registry_prefix_of_a_service() -> None:
    assert services_prefix("/imserver/", "user") == "/imserver/services/user/"
    assert instance_key("/imserver", "user", "u-1") == "/imserver/services/user/u-1"
