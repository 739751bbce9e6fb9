"""The notification service's contract: who gets a push and why, collapse, badges,
the read sync across devices, and the trace — over ``local`` and ``loopback``, with
the real message service committing the messages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conformance import signature_mismatches
from databases import Databases
from message_helpers import Directory, send
from notification_helpers import RecordingProvider, World, eventually, login, open_world
from sqlalchemy import create_engine

from imserver.protocol import ops
from imserver.protocol.convs import direct_conv
from imserver.services.message.api import CommitListener
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.notification.api import MessageSource, NotificationService
from imserver.services.notification.providers.base import Outcome
from imserver.services.notification.rules import backoff, decide
from imserver.services.notification.schema import metadata
from imserver.services.notification.service import MIGRATIONS, LocalNotificationService
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url, sync_url, upgrade_sync
from imserver.utils.config import PushConfig
from imserver.utils.errors import BadRequest, Forbidden
from imserver.utils.ids import ConvId, UserId
from imserver.utils.metrics import Metrics

AB = direct_conv("alice", "bob")
TOKEN = {"token": "t"}


async def settle(world: World) -> None:
    await world.local_messages.flush()
    await world.notifications.settle()


async def trace_of(world: World, conv: str, seq: int, user: str) -> ops.PushRecipient:
    got = await world.notifications.trace(login(user), ConvId(conv), seq)
    return next(r for r in got.recipients if r.user == user)


def test_schema_matches_migrations(tmp_path: Path) -> None:
    url = sync_url(sqlite_url(tmp_path, "notification"))
    upgrade_sync(url, MIGRATIONS)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": "alembic_version_notification"}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("proto", [NotificationService, CommitListener])
def test_local_service_satisfies_its_protocols(proto: type) -> None:
    assert signature_mismatches(proto, LocalNotificationService) == []


def test_rules_order_and_mentions_override() -> None:
    common = {"sender": "a", "registered": True, "now": 1000}
    assert (
        decide(user="a", online=(), muted_until=0, level="all", mentioned=False, **common).reason
        == "sender"
    )  # type: ignore[arg-type]
    assert (
        decide(
            user="b", online=("d",), muted_until=0, level="all", mentioned=False, **common
        ).reason
        == "online"
    )  # type: ignore[arg-type]
    assert (
        decide(user="b", online=(), muted_until=2000, level="all", mentioned=True, **common).reason
        == "muted"
    )  # type: ignore[arg-type]
    assert (
        decide(user="b", online=(), muted_until=500, level="none", mentioned=True, **common).reason
        == "level"
    )  # type: ignore[arg-type]
    assert (
        decide(
            user="b", online=(), muted_until=0, level="mentions", mentioned=False, **common
        ).reason
        == "level"
    )  # type: ignore[arg-type]
    assert decide(
        user="b", online=(), muted_until=0, level="mentions", mentioned=True, **common
    ).due  # type: ignore[arg-type]


def test_backoff_is_full_jitter_capped() -> None:
    assert backoff(1, 1.0, 300.0, 0.999) < 1.0
    assert backoff(4, 1.0, 300.0, 0.5) == 4.0
    assert backoff(20, 1.0, 300.0, 0.5) == 150.0
    assert backoff(3, 1.0, 300.0, 0.0) == 0.0


async def test_offline_member_gets_one_push_with_badge(
    databases: Databases, transport: str
) -> None:
    async with open_world(databases, transport) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        assert [r.device for r in await w.notifications.registrations(login("bob"))] == ["bob-1"]
        await w.messages.send(login("alice"), send(AB, "c1", "hello bob"))
        await settle(w)
        await eventually(lambda: len(w.provider.pushes) == 1)
        push = w.provider.pushes[0]
        assert (push.kind, push.user, push.device, push.conv, push.seq) == (
            "message",
            "bob",
            "bob-1",
            AB,
            1,
        )
        assert (push.count, push.badge, push.body, push.title) == (1, 1, "hello bob", "alice")
        assert push.key == f"bob:bob-1:{AB}:1"
        await eventually(lambda: w.local.stats.results[("test", "sent")] == 1)
        bob = await trace_of(w, AB, 1, "bob")
        assert (bob.due, bob.reason, bob.online) == (True, "due", [])
        [job] = bob.pushes
        assert (job.provider, job.device, job.state, job.collapsed) == (
            "test",
            "bob-1",
            "sent",
            False,
        )
        assert [(a.n, a.status, a.code) for a in job.attempts] == [(1, "sent", 201)]
        alice = await trace_of(w, AB, 1, "alice")
        assert (alice.due, alice.reason, alice.pushes) == (False, "sender", [])


async def test_online_on_any_device_suppresses(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.notifications.device_online(login("bob", "2").user, "bob-2")
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        bob = await trace_of(w, AB, 1, "bob")
        assert (bob.due, bob.reason, bob.online, bob.pushes) == (False, "online", ["bob-2"], [])
        await w.notifications.device_offline(login("bob").user, "bob-2")
        await w.messages.send(login("alice"), send(AB, "c2"))
        await settle(w)
        assert (await trace_of(w, AB, 2, "bob")).due
        await eventually(lambda: len(w.provider.pushes) == 1)
        assert w.provider.pushes[0].seq == 2


async def test_no_registration_is_explained(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        bob = await trace_of(w, AB, 1, "bob")
        assert (bob.due, bob.reason) == (False, "no_registration")


async def test_mute_until_and_unmute(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c0"))  # the conversation exists
        await settle(w)
        until = int(time.time() * 1000) + 60_000
        await w.notifications.mute(login("bob"), AB, until)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        bob = await trace_of(w, AB, 2, "bob")
        assert (bob.due, bob.reason, bob.muted_until) == (False, "muted", until)
        await w.notifications.mute(login("bob"), AB, 0)
        await w.messages.send(login("alice"), send(AB, "c2"))
        await settle(w)
        assert (await trace_of(w, AB, 3, "bob")).reason == "due"
        # c0 and c2 are pushed (in one push when c2 folds into c0's), c1 is not.
        await eventually(lambda: w.provider.pushes[-1:] != [] and w.provider.pushes[-1].seq == 3)
        assert sum(p.count for p in w.provider.pushes) == 2


async def test_levels_and_the_mention_override(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        w.rooms.add("r1", "Room", "alice", "bob", "carol")
        conv = "r:r1"
        for user in ("bob", "carol"):
            await w.notifications.register(login(user), "test", TOKEN)
        await w.notifications.set_level(login("bob"), ConvId(conv), "mentions")
        await w.notifications.set_level(login("carol"), ConvId(conv), "none")
        await w.messages.send(login("alice"), send(conv, "c1", "plain"))
        await w.messages.send(
            login("alice"), send(conv, "c2", "@bob @carol", mentions=["bob", "carol"])
        )
        await settle(w)
        bob1 = await trace_of(w, conv, 1, "bob")
        assert (bob1.reason, bob1.level, bob1.mentioned) == ("level", "mentions", False)
        bob2 = await trace_of(w, conv, 2, "bob")
        assert (bob2.reason, bob2.mentioned) == ("due", True)
        carol2 = await trace_of(w, conv, 2, "carol")
        assert (carol2.reason, carol2.level, carol2.mentioned) == ("level", "none", True)
        await eventually(lambda: len(w.provider.pushes) == 1)
        assert (w.provider.pushes[0].user, w.provider.pushes[0].seq) == ("bob", 2)


async def test_a_burst_of_50_is_one_push_with_count_50(
    databases: Databases, transport: str
) -> None:
    config = PushConfig(collapse_delay=0.5, backoff_base=0.01, backoff_max=0.05)
    async with open_world(databases, transport, config=config) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        for i in range(50):
            w.messages.send(login("alice"), send(AB, f"c{i}", f"m{i}"))
        await settle(w)
        await eventually(lambda: len(w.provider.pushes) >= 1)
        await settle(w)
        [push] = w.provider.pushes
        assert (push.count, push.seq, push.body, push.badge) == (50, 50, "m49", 50)
        assert push.key == f"bob:bob-1:{AB}:1"
        last = await trace_of(w, AB, 50, "bob")
        assert last.pushes[0].collapsed and last.pushes[0].key == push.key
        assert last.pushes[0].count == 50


async def test_read_on_one_device_clears_the_badge_on_the_other(
    databases: Databases, transport: str
) -> None:
    async with open_world(databases, transport) as w:
        await w.notifications.register(login("bob", "1"), "test", {"token": "phone"})
        await w.notifications.register(login("bob", "2"), "test", {"token": "laptop"})
        await w.messages.send(login("alice"), send(AB, "c1"))
        await w.messages.send(login("alice"), send(AB, "c2"))
        await settle(w)
        await eventually(lambda: len(w.provider.pushes) == 2)
        assert {p.badge for p in w.provider.pushes} == {2}
        await w.messages.mark(login("bob", "1"), AB, 2, "read")
        await settle(w)
        await eventually(lambda: len(w.provider.of("bob-2", "read")) == 1)
        [read] = w.provider.of("bob-2", "read")
        assert (read.badge, read.seq, read.count, read.conv) == (0, 2, 0, AB)
        assert w.provider.of("bob-1", "read") == []


async def test_each_badge_is_the_unread_total_when_the_push_is_sent(
    databases: Databases, transport: str
) -> None:
    bc = direct_conv("bob", "carol")
    config = PushConfig(collapse_delay=1.0, backoff_base=0.01, backoff_max=0.05)
    async with open_world(databases, transport, config=config) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        # bob: 2 unread from alice, 1 from carol; his own message and alice's recalled
        # one do not count. Both pushes are claimed after all of it (collapse delay).
        await w.messages.send(login("alice"), send(AB, "a1", "one"))
        await w.messages.send(login("bob"), send(AB, "b1", "mine"))
        await w.messages.send(login("alice"), send(AB, "a2", "two"))
        await w.messages.send(login("alice"), send(AB, "a3", "oops"))
        await w.messages.recall(login("alice"), ops.Recall(conv=AB, cid="a4", target=4))
        await w.messages.send(login("carol"), send(bc, "c1", "three"))
        await settle(w)
        assert await w.messages.unread_totals([UserId("bob")]) == {"bob": 3}
        await eventually(lambda: len(w.provider.pushes) == 2)
        by_conv = {p.conv: p for p in w.provider.pushes}
        assert {c: (p.count, p.badge) for c, p in by_conv.items()} == {AB: (3, 3), bc: (1, 3)}
        # bob reads alice's conversation; carol writes again: the badge follows.
        await w.messages.mark(login("bob"), AB, 5, "read")
        await w.messages.send(login("carol"), send(bc, "c2", "four"))
        await settle(w)
        assert await w.messages.unread_totals([UserId("bob")]) == {"bob": 2}
        await eventually(lambda: len(w.provider.pushes) == 3)
        last = w.provider.pushes[2]
        assert (last.conv, last.seq, last.count, last.badge) == (bc, 2, 1, 2)


async def test_backoff_then_dead_letter(databases: Databases, transport: str) -> None:
    failing = RecordingProvider([Outcome(status="retry", code=503, detail="down")] * 10)
    async with open_world(databases, transport, provider=failing) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        await eventually(lambda: w.local.stats.dead == 1)
        [job] = (await trace_of(w, AB, 1, "bob")).pushes
        assert job.state == "dead"
        assert [(a.n, a.status, a.code, a.detail) for a in job.attempts] == [
            (n, "retry", 503, "down") for n in (1, 2, 3)
        ]
        assert len(failing.pushes) == 3
        assert {p.key for p in failing.pushes} == {job.key}
        metrics = Metrics()
        metrics.push = w.local.stats
        text = metrics.render().decode()
        assert 'imserver_push_total{provider="test",result="retry-wait"} 2.0' in text
        assert 'imserver_push_total{provider="test",result="dead"} 1.0' in text
        assert "imserver_push_dead_total 1.0" in text


async def test_retry_after_is_honoured(databases: Databases, transport: str) -> None:
    slow = RecordingProvider([Outcome(status="retry", code=429, retry_after=0.4)])
    async with open_world(databases, transport, provider=slow) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        await eventually(lambda: len(slow.pushes) == 2)
        assert slow.times[1] - slow.times[0] >= 0.39
        await eventually(lambda: w.local.stats.results[("test", "sent")] == 1)
        [job] = (await trace_of(w, AB, 1, "bob")).pushes
        assert [a.status for a in job.attempts] == ["retry", "sent"]


@pytest.mark.parametrize(("status", "code"), [("gone", 410), ("failed", 400)])
async def test_gone_removes_the_registration_failed_keeps_it(
    databases: Databases, transport: str, status: str, code: int
) -> None:
    provider = RecordingProvider([Outcome(status=status, code=code)])  # type: ignore[arg-type]
    async with open_world(databases, transport, provider=provider) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        await eventually(lambda: w.local.stats.results[("test", status)] == 1)
        [job] = (await trace_of(w, AB, 1, "bob")).pushes
        assert job.state == status
        left = await w.notifications.registrations(login("bob"))
        assert len(left) == (0 if status == "gone" else 1)


async def test_queue_bound_drops_the_oldest(databases: Databases, transport: str) -> None:
    config = PushConfig(collapse_delay=30.0, queue_max=2)
    async with open_world(databases, transport, config=config) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.notifications.register(login("carol"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        await w.messages.send(login("alice"), send(direct_conv("alice", "carol"), "c2"))
        await w.messages.send(login("carol"), send(direct_conv("bob", "carol"), "c3"))
        await settle(w)
        [job] = (await trace_of(w, AB, 1, "bob")).pushes
        assert job.state == "dropped"
        assert await w.local.queue_depth() == {"test": 2}
        assert w.local.stats.dropped == 1
        await eventually(lambda: w.local.stats.depth == {"test": 2}, within=3.0)
        metrics = Metrics()
        metrics.push = w.local.stats
        text = metrics.render().decode()
        assert 'imserver_push_queue_depth{provider="test"} 2.0' in text
        assert "imserver_push_dropped_total 1.0" in text


async def test_bad_input_is_refused_with_exact_codes(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        with pytest.raises(BadRequest) as exc:
            await w.notifications.register(login("bob"), "apns", TOKEN)
        assert exc.value.field == "provider"
        with pytest.raises(BadRequest) as exc:
            await w.notifications.register(login("bob"), "test", {"token": 5})
        assert exc.value.field == "target.token"
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        with pytest.raises(Forbidden):
            await w.notifications.trace(login("carol"), AB, 1)
        with pytest.raises(Forbidden):
            await w.notifications.mute(login("carol"), AB, 0)
        with pytest.raises(Forbidden):
            await w.notifications.set_level(login("carol"), AB, "none")
        with pytest.raises(BadRequest) as exc:
            await w.notifications.set_level(login("bob"), AB, "loud")
        assert exc.value.field == "level"
        with pytest.raises(BadRequest) as exc:
            await w.notifications.mute(login("bob"), AB, -1)
        assert exc.value.field == "until"
        with pytest.raises(Exception) as unavailable:
            await w.notifications.vapid_key()
        assert getattr(unavailable.value, "code", None) == "unavailable"


async def test_unregister_and_forget_device(databases: Databases, transport: str) -> None:
    async with open_world(databases, transport) as w:
        await w.notifications.register(login("bob", "1"), "test", TOKEN)
        await w.notifications.register(login("bob", "2"), "test", TOKEN)
        await w.notifications.unregister(login("bob", "1"), "test")
        assert [r.device for r in await w.notifications.registrations(login("bob"))] == ["bob-2"]
        await w.notifications.forget_device("bob-2")
        assert await w.notifications.registrations(login("bob")) == []


async def test_a_hanging_provider_does_not_slow_sends(databases: Databases, transport: str) -> None:
    provider = RecordingProvider()
    provider.hang = asyncio.Event()
    config = PushConfig(collapse_delay=0.0, concurrency=2)
    async with open_world(databases, transport, provider=provider, config=config) as w:
        for user in ("bob", "carol"):
            await w.notifications.register(login(user), "test", TOKEN)
        started = time.monotonic()
        for i in range(40):
            conv = AB if i % 2 else direct_conv("alice", "carol")
            await w.messages.send(login("alice"), send(conv, f"c{i}"))
        assert time.monotonic() - started < 2.0
        await settle(w)
        assert provider.pushes == []
        provider.hang.set()
        await eventually(lambda: len(provider.pushes) >= 2)


def test_the_message_service_is_a_message_source() -> None:
    assert signature_mismatches(MessageSource, LocalMessageService) == []


async def test_restart_delivers_each_waiting_key_exactly_once(databases: Databases) -> None:
    hanging = RecordingProvider()
    hanging.hang = asyncio.Event()
    config = PushConfig(collapse_delay=0.0, concurrency=1)
    ac = direct_conv("alice", "carol")
    async with open_world(databases, "local", provider=hanging, config=config) as w:
        await w.notifications.register(login("bob"), "test", TOKEN)
        await w.notifications.register(login("carol"), "test", TOKEN)
        await w.messages.send(login("alice"), send(AB, "c1"))
        await settle(w)
        await eventually(lambda: w.local._worker._inflight["test"] == 1)
        await w.messages.send(login("alice"), send(ac, "c2"))
        await settle(w)
        # carol's push is claimed too (the worker claims ahead of free slots) and waits
        # for bob's slot: both are ``sending``, one of them never started.
        states: list[str] = []
        deadline = time.monotonic() + 5.0
        while states != ["sending", "sending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            states = [
                (await trace_of(w, AB, 1, "bob")).pushes[0].state,
                (await trace_of(w, ac, 1, "carol")).pushes[0].state,
            ]
        assert states == ["sending", "sending"]
        assert (hanging.seen, w.local._worker._inflight["test"]) == ({}, 1)
    # Closed with one push in flight and one claimed: both are sent after the restart.
    receiver = RecordingProvider()
    async with open_world(databases, "local", provider=receiver, config=config) as w:
        await eventually(lambda: w.local.stats.results[("test", "sent")] == 2)
        assert receiver.seen == {f"bob:bob-1:{AB}:1": 1, f"carol:carol-1:{ac}:1": 1}
        assert hanging.pushes == []
        for conv, user in ((AB, "bob"), (ac, "carol")):
            [job] = (await trace_of(w, conv, 1, user)).pushes
            assert (job.state, [a.status for a in job.attempts]) == ("sent", ["sent"])


async def test_catch_up_after_a_crash_between_the_two_commits(databases: Databases) -> None:
    async with open_world(databases, "local") as w:  # the first start sets the cursor
        await w.notifications.register(login("bob"), "test", TOKEN)
    # The message is committed while the notification service never hears of it.
    messages = await open_message_service(
        databases.url("message"), bus=MemoryLiveBus(), users=Directory("alice", "bob")
    )
    try:
        await messages.send(login("alice"), send(AB, "c1", "while down"))
    finally:
        await messages.close()
    receiver = RecordingProvider()
    async with open_world(databases, "local", provider=receiver) as w:
        await settle(w)
        await eventually(lambda: len(receiver.pushes) == 1)
        assert (receiver.pushes[0].seq, receiver.pushes[0].body) == (1, "while down")
        await w.messages.send(login("alice"), send(AB, "c2"))
        await settle(w)
        await eventually(lambda: len(receiver.pushes) == 2)
        assert [p.seq for p in receiver.pushes] == [1, 2]
