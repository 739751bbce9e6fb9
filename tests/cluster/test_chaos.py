"""Chaos tests of the local cluster: a part is killed or stopped while clients work,
and every acknowledged message is still stored exactly once and reaches every member.

One cluster (``imserver.cluster.local.up``: 2 gateways behind HAProxy, 2 message
instances, one of each other service, etcd) serves every test of the module, on a
fresh PostgreSQL database, with a Redis server and a RabbitMQ node of its own
(:class:`~imserver.testing.redis.RedisServer`,
:class:`~imserver.testing.rabbitmq.RabbitServer`), so that restarting them disturbs
no other run on the machine. A test that kills a member starts it again before it
ends, so the next one finds the whole cluster.

Each test prints ``acked=N lost=N duplicated=N`` and what else it measured, and
asserts ``lost=0 duplicated=0``. A missing server or binary skips, and fails under
``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import databases as dbs
import msgspec
import pytest
from chaos import PASSWORD, Peer, Tally, account
from etcd_server import require_etcd
from test_haproxy import _require_haproxy
from test_local_cluster import _alive

from imserver.client import Client
from imserver.cluster import haproxy
from imserver.cluster.local import ClusterSpec, ClusterState, Member, down, load_state, restart, up
from imserver.discovery.balancer import first_for
from imserver.discovery.etcd import EtcdClient
from imserver.discovery.registry import Instance
from imserver.testing import rabbitmq as rabbitmq_testing
from imserver.testing.redis import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_distributed import webhook_receiver
from test_push_to_webhook import SECRET

ETCD_OUTAGE = 30.0


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the chaos tests must run)")
    pytest.skip(reason)


@dataclass
class Chaos:
    """The module's cluster and the servers it owns."""

    root: Path
    redis: RedisServer
    rabbit: rabbitmq_testing.RabbitServer
    pushes: list[dict[str, Any]]
    users: int = 0
    peers: list[Peer] = field(default_factory=list)

    @property
    def state(self) -> ClusterState:
        return load_state(self.root)

    def member(self, name: str) -> Member:
        [member] = [m for m in self.state.members if m.name == name]
        return member

    def gateway(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.member(name).http_port}/ws"

    async def peer(self, gateway: str, label: str) -> Peer:
        """A new user, connected to ``gateway`` (and reconnecting through HAProxy)."""
        self.users += 1
        username = f"{label}_{self.users}_{os.urandom(2).hex()}"
        async with await Client.connect(self.gateway(gateway)) as client:
            await client.register(username, PASSWORD)
            login = await client.login(username, PASSWORD)
        peer = Peer(label, username, login["token"], login["user"]["id"], self.state.client_url)
        await peer.open(self.gateway(gateway))
        self.peers.append(peer)
        return peer

    async def room(self, owner: Peer, members: Sequence[Peer]) -> str:
        made = await owner.request(
            "room.create", {"name": "chaos", "members": [p.user_id for p in members]}
        )
        return f"r:{made['room']['id']}"

    async def close_peers(self) -> None:
        for peer in self.peers:
            await peer.close()
        self.peers.clear()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    require_etcd()
    _require_haproxy()
    if rabbitmq_testing.binary() is None:
        _missing("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed (apt-get install redis-server)")
    root = tmp_path_factory.mktemp("chaos") / "c"
    database = dbs.create_database("postgresql", "chaos")
    dbs.drop_database(database)  # `up` creates it: the name is fresh
    redis = RedisServer()
    rabbit = rabbitmq_testing.RabbitServer()
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as env:
        stack.callback(dbs.drop_database, database)
        stack.callback(redis.stop)
        stack.callback(rabbit.remove)
        hook_url, pushes = stack.enter_context(webhook_receiver())
        redis.start()
        rabbit.start()
        # The members inherit these (IMSERVER_* overrides the cluster's TOML).
        env.setenv("IMSERVER_PUSH__COLLAPSE_DELAY", "0")
        env.setenv("IMSERVER_PUSH__WEBPUSH__ENABLED", "false")
        env.setenv("IMSERVER_PUSH__WEBHOOK__URL", hook_url)
        env.setenv("IMSERVER_PUSH__WEBHOOK__SECRET", SECRET)
        spec = ClusterSpec(
            database=database.url,
            redis=redis.url,
            rabbitmq=rabbit.url,
            prefix=f"chaos{os.urandom(4).hex()}",
        )
        up(root, spec, progress=lambda _line: None)
        stack.callback(down, root, lambda _line: None)
        yield Chaos(root, redis, rabbit, pushes)


Say = Callable[[str], None]


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Say:
    """Print a line to the terminal even while pytest captures the test's output, so
    that the CI log shows each test's counts."""

    def say(line: str) -> None:
        with capsys.disabled():
            print(f"\n[chaos] {line}", flush=True)

    return say


async def _stream(
    senders: Sequence[tuple[Peer, str]],
    count: int,
    tally: Tally,
    *,
    in_flight: int = 1,
    pause: float = 0.0,
    label: str = "m",
) -> None:
    """Each (peer, conv) sends ``count`` messages, ``in_flight`` at a time."""

    async def one_sender(peer: Peer, conv: str, index: int) -> None:
        slots = asyncio.Semaphore(in_flight)

        async def one(n: int) -> None:
            async with slots:
                await peer.send(conv, f"{label}{index}-{n}", tally)
                if pause:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(one(n) for n in range(count)))

    await asyncio.gather(*(one_sender(p, c, i) for i, (p, c) in enumerate(senders)))


async def _during(
    stream: Awaitable[None], when: Callable[[], bool], action: Callable[[], Awaitable[None]]
) -> None:
    """Run ``stream``; do ``action`` once ``when()`` holds, while it is still running."""
    task = asyncio.ensure_future(stream)
    while not when():
        assert not task.done(), "the stream ended before the fault was injected"
        await asyncio.sleep(0.01)
    assert not task.done(), "the stream ended before the fault was injected"
    await action()
    await task


async def _delivered(tally: Tally, members: dict[str, Sequence[Peer]], limit: float = 20) -> None:
    """Wait (bounded, not failing) until every member has every acked message: the
    last live events may still be on their way; :func:`account` then counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if all(
            {seq for (c, _s, _cid), seq in tally.acks.items() if c == conv} <= peer.seqs(conv)
            for conv, peers in members.items()
            for peer in peers
        ):
            return
        await asyncio.sleep(0.1)


async def _haproxy_up(chaos: Chaos, name: str) -> None:
    socket = Path(chaos.state.stats_socket)
    states: dict[tuple[str, str], str] = {}

    def up_everywhere() -> bool:
        return bool(states) and all(s == "UP" for (_b, n), s in states.items() if n == name)

    async def poll() -> None:
        while not up_everywhere():
            states.update(await haproxy.server_states(socket))
            await asyncio.sleep(0.2)

    await asyncio.wait_for(poll(), 30)


async def _report(
    say: Say, title: str, tally: Tally, members: dict[str, Sequence[Peer]], **extra: object
) -> None:
    result = await account(tally, members)
    line = result.line(gaps=result.gaps, resent_dup=tally.resent, **extra)
    say(f"{title}: {line}")
    for detail in result.details[:20]:
        say(f"  {detail}")
    assert result.acked > 0
    assert (result.lost, result.duplicated, result.gaps) == (0, 0, 0), line


async def test_kill_9_of_a_gateway_its_clients_reconnect_and_recover(
    chaos: Chaos, say: Say
) -> None:
    ann = await chaos.peer("gateway-1", "ann")
    ben = await chaos.peer("gateway-2", "ben")
    cat = await chaos.peer("gateway-1", "cat")
    dan = await chaos.peer("gateway-2", "dan")
    try:
        room = await chaos.room(ann, [ben, cat, dan])
        dm_ab = Client.direct_conv(ann.user_id, ben.user_id)
        dm_cd = Client.direct_conv(cat.user_id, dan.user_id)
        members = {room: [ann, ben, cat, dan], dm_ab: [ann, ben], dm_cd: [cat, dan]}
        tally = Tally()
        count = 60
        senders = [(ann, dm_ab), (ann, room), (dan, dm_cd), (dan, room), (cat, room)]
        victim = chaos.member("gateway-1")

        async def kill() -> None:
            os.kill(victim.pid, signal.SIGKILL)

        await _during(
            _stream(senders, count, tally, pause=0.02),
            lambda: len(tally) >= count * len(senders) // 3,
            kill,
        )
        await _delivered(tally, members)
        moved = [p for p in (ann, cat) if p.reconnects > 0]
        synced = sum(len(p.synced) for p in (ann, cat))
        await _report(
            say,
            "kill -9 gateway-1",
            tally,
            members,
            reconnected=len(moved),
            recovered_by_sync=synced,
        )
        assert moved == [ann, cat], "the killed gateway's clients did not reconnect"
        assert ben.reconnects == 0 and dan.reconnects == 0
    finally:
        await chaos.close_peers()
        restart(chaos.root, "gateway-1")
        await _haproxy_up(chaos, "gateway-1")


async def test_kill_9_of_a_message_instance_during_a_send_stream(chaos: Chaos, say: Say) -> None:
    ann = await chaos.peer("gateway-1", "ann")
    ben = await chaos.peer("gateway-2", "ben")
    cat = await chaos.peer("gateway-1", "cat")
    try:
        # A conversation's sends go to the message instance that ranks first for it
        # (discovery.balancer.first_for); rooms are added until both instances have
        # conversations, and the one that has the first room is killed.
        instances = {
            key: record
            for key, (record, _rev) in (await _registrations(chaos)).items()
            if record.service == "message"
        }
        assert len(instances) == 2
        rooms = [await chaos.room(ann, [ben, cat])]
        dm_ab = Client.direct_conv(ann.user_id, ben.user_id)
        dm_bc = Client.direct_conv(ben.user_id, cat.user_id)
        while len({first_for(c, instances) for c in [*rooms, dm_ab, dm_bc]}) < 2:
            assert len(rooms) < 10, "every conversation ranks one instance first"
            rooms.append(await chaos.room(ann, [ben, cat]))
        victim_key = first_for(rooms[0], instances)
        port = int(instances[victim_key].address.rsplit(":", 1)[1])
        [victim] = [m for m in chaos.state.members if m.rpc_port == port]
        members: dict[str, Sequence[Peer]] = {room: [ann, ben, cat] for room in rooms}
        members |= {dm_ab: [ann, ben], dm_bc: [ben, cat]}
        on_victim = sum(first_for(c, instances) == victim_key for c in members)
        tally = Tally()
        count = 60
        senders = [(p, room) for room in rooms for p in (ann, ben, cat)]
        senders += [(ann, dm_ab), (ben, dm_ab), (cat, dm_bc)]

        async def kill() -> None:
            os.kill(victim.pid, signal.SIGKILL)

        await _during(
            _stream(senders, count, tally, in_flight=4),
            lambda: len(tally) >= count * len(senders) // 3,
            kill,
        )
        await _delivered(tally, members)
        await _report(
            say,
            f"kill -9 {victim.name}",
            tally,
            members,
            retried=sum(p.retries for p in (ann, ben, cat)),
            convs_on_killed=on_victim,
            convs_on_other=len(members) - on_victim,
        )
    finally:
        await chaos.close_peers()
        for member in chaos.state.members:
            if member.name.startswith("message-") and not _alive(member.pid):
                restart(chaos.root, member.name)


async def test_redis_restarted_live_events_resume_and_missed_ones_are_synced(
    chaos: Chaos, say: Say
) -> None:
    ann = await chaos.peer("gateway-1", "ann")
    ben = await chaos.peer("gateway-2", "ben")
    cat = await chaos.peer("gateway-2", "cat")
    try:
        room = await chaos.room(ann, [ben, cat])
        dm = Client.direct_conv(ann.user_id, ben.user_id)
        members = {room: [ann, ben, cat], dm: [ann, ben]}
        tally = Tally()
        count = 60
        senders = [(ann, room), (ann, dm), (cat, room)]
        during: list[int] = []

        async def restart_redis() -> None:
            chaos.redis.kill()
            before = len(tally)
            await asyncio.sleep(2.0)
            during.append(len(tally) - before)
            await asyncio.to_thread(chaos.redis.start)

        await _during(
            _stream(senders, count, tally, pause=0.05),
            lambda: len(tally) >= count * len(senders) // 3,
            restart_redis,
        )
        # Live events resume: a message sent now reaches every member as a `msg` event
        # (a member still reconnecting has it by sync: send another until all are live).
        probes = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            probes += 1
            sent = await ben.send(room, f"probe-{probes}", tally)
            key = (room, int(sent["seq"]))
            others = [ann, cat]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_all_live(others, key), 5)
            if all(key in p.live for p in others):
                break
            assert loop.time() < deadline, "live events did not resume after Redis came back"
        await _delivered(tally, members)
        await _report(
            say,
            "redis restarted",
            tally,
            members,
            acked_during_outage=during[0],
            recovered_by_sync=sum(len(p.synced) for p in (ann, ben, cat)),
            resyncs=sum(r == "resync" for p in (ann, ben, cat) for r in p.closed_reasons),
            probes_until_live=probes,
        )
    finally:
        await chaos.close_peers()


async def _all_live(peers: Sequence[Peer], key: tuple[str, int]) -> None:
    while True:
        if all(key in p.live for p in peers):
            return
        await asyncio.sleep(0.05)


async def _traced_due(alice: Peer, conv: str, seq: int, user: str) -> bool:
    """Whether the notification service has ingested ``seq`` for ``user`` (a decision
    is stored: the trace says ``due`` rather than ``no_registration``)."""
    trace = await alice.request("push.trace", {"conv": conv, "seq": seq})
    [mine] = [r for r in trace["recipients"] if r["user"] == user]
    return bool(mine["reason"] == "due")


async def test_rabbitmq_restarted_events_are_published_after_and_none_lost(
    chaos: Chaos, say: Say
) -> None:
    bob = await chaos.peer("gateway-2", "bob")
    alice = await chaos.peer("gateway-1", "alice")
    try:
        target = {"provider": "webhook", "target": {"token": "t"}}
        assert await bob.request("push.register", target) == {}
        bob_id = bob.user_id
        await bob.close()
        chaos.peers.remove(bob)
        dm = Client.direct_conv(alice.user_id, bob_id)
        tally = Tally()
        # Bob's presence is gone once a push is due for him.
        first = await alice.send(dm, "before", tally)
        await until_async(lambda: _traced_due(alice, dm, int(first["seq"]), bob_id), 20)

        await asyncio.to_thread(chaos.rabbit.stop)
        down = [await alice.send(dm, f"down-{n}", tally) for n in range(10)]
        await asyncio.to_thread(chaos.rabbit.start)
        after = [await alice.send(dm, f"after-{n}", tally) for n in range(10)]

        seqs = [int(m["seq"]) for m in [first, *down, *after]]
        pending = set(seqs)

        async def ingested() -> bool:
            for seq in sorted(pending):
                if await _traced_due(alice, dm, seq, bob_id):
                    pending.discard(seq)
            return not pending

        with contextlib.suppress(AssertionError):
            await until_async(ingested, 60)
        keys = [p.get("key") for p in chaos.pushes if p.get("user") == bob_id]
        repeated = len(keys) - len(set(keys))
        line = (
            f"acked={len(tally)} lost={len(pending)} duplicated={repeated} "
            f"acked_during_outage={len(down)} pushes={len(keys)}"
        )
        say(f"rabbitmq restarted: {line}")
        assert len(tally) == len(seqs) == 21
        assert (len(pending), repeated) == (0, 0), f"{line}; not ingested: {sorted(pending)}"
    finally:
        await chaos.close_peers()


async def until_async(check: Callable[[], Awaitable[bool]], limit: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        assert loop.time() < deadline, f"not within {limit} s"
        await asyncio.sleep(0.2)


async def _registrations(chaos: Chaos) -> dict[str, tuple[Instance, int]]:
    """Every registration key under the cluster's prefix: its record and the revision
    that wrote it (a new one once the instance registered again)."""
    state = chaos.state
    client = EtcdClient([state.etcd_url], timeout=2.0)
    try:
        entries, _ = await client.get_prefix(f"/{state.spec.prefix}/services/")
    finally:
        await client.close()
    return {e.key: (msgspec.json.decode(e.value, type=Instance), e.mod_revision) for e in entries}


async def test_etcd_stopped_for_30_s_live_traffic_continues(chaos: Chaos, say: Say) -> None:
    ann = await chaos.peer("gateway-1", "ann")
    ben = await chaos.peer("gateway-2", "ben")
    cat = await chaos.peer("gateway-2", "cat")
    try:
        room = await chaos.room(ann, [ben, cat])
        dm = Client.direct_conv(ann.user_id, ben.user_id)
        members = {room: [ann, ben, cat], dm: [ann, ben]}
        before = await _registrations(chaos)
        assert {i.service for i, _rev in before.values()} >= {"message", "user", "room"}
        tally = Tally()
        live = 0
        etcd = chaos.state.etcd_pid
        os.kill(etcd, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        try:
            end = loop.time() + ETCD_OUTAGE
            n = 0
            while loop.time() < end:
                n += 1
                for sender, conv, readers in (
                    (ann, dm, [ben]),
                    (ben, dm, [ann]),
                    (cat, room, [ann, ben]),
                ):
                    sent = await sender.send(conv, f"e{n}-{sender.name}", tally)
                    key = (conv, int(sent["seq"]))
                    try:
                        await asyncio.wait_for(_all_live(readers, key), 10)
                    except TimeoutError:
                        for p in (ann, ben, cat):
                            say(
                                f"  {key} at {loop.time() - end + ETCD_OUTAGE:.1f} s: {p.name} "
                                f"live={key in p.live} synced={key in p.synced} "
                                f"reconnects={p.reconnects} closed={p.closed_reasons}"
                            )
                        raise
                    live += 1
                await asyncio.sleep(0.5)
        finally:
            os.kill(etcd, signal.SIGCONT)
        await until_async(lambda: _registered(chaos, before), 30)
        after = await _registrations(chaos)
        await _delivered(tally, members)
        await _report(
            say,
            f"etcd stopped {ETCD_OUTAGE:.0f} s",
            tally,
            members,
            delivered_live=live,
            registered_before=len(before),
            registered_after=len(after),
            registered_again=sum(after[key][1] != rev for key, (_i, rev) in before.items()),
        )
        assert live == len(tally)
    finally:
        await chaos.close_peers()


async def _registered(chaos: Chaos, before: dict[str, tuple[Instance, int]]) -> bool:
    try:
        now = await _registrations(chaos)
    except Exception:
        return False
    return set(now) >= set(before)
