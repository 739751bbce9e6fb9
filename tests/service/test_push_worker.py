"""The push worker against real databases and a real webhook receiver on 127.0.0.1:
a burst while ingest and worker write ``notification.db`` together, a close with
pushes held by the receiver and the start after it, and a job whose registration is
gone when it is claimed — over ``local`` and ``loopback``."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from message_helpers import send
from notification_helpers import World, eventually, login, open_world
from push_receiver import Answer, serve

from imserver.protocol.convs import direct_conv
from imserver.services.notification.providers.webhook import WebhookProvider
from imserver.services.notification.registry import Providers
from imserver.services.notification.worker import CLOSE_GRACE_S
from imserver.utils.config import PushConfig, WebhookConfig
from imserver.utils.ids import ConvId

SECRET = "s3cret-for-worker-tests"


@dataclass
class Dedupe:
    """A receiver that processes each ``Idempotency-Key`` once: the first request of a
    key is processed (its body kept) before it is answered, a repeat is answered 200
    and dropped. ``arrivals`` counts every request of each key."""

    arrivals: Counter[str] = field(default_factory=Counter)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def __call__(
        self, request: web.Request, body: bytes, answer: Answer
    ) -> web.Response | None:
        key = request.headers["Idempotency-Key"]
        self.arrivals[key] += 1
        if key in self.processed:
            return web.Response(status=200, text="repeat")
        self.processed[key] = json.loads(body)
        return None


@asynccontextmanager
async def webhook_world(
    tmp_path: Path, transport: str, url: str, config: PushConfig, users: tuple[str, ...]
) -> AsyncIterator[World]:
    """:func:`open_world` with the webhook provider posting to ``url`` (a new provider
    per opening, as a restarted server builds it)."""
    provider = WebhookProvider(WebhookConfig(url=url, secret=SECRET, timeout=60.0))
    async with open_world(
        tmp_path,
        transport,
        config=config,
        providers=Providers(by_name={"webhook": provider}),
        users=users,
        send_timeout=60.0,
    ) as w:
        yield w


def jobs(tmp_path: Path) -> list[tuple[Any, ...]]:
    """(key, user, state, count, attempts) of every push job, from the database file."""
    with sqlite3.connect(tmp_path / "notification.db") as conn:
        return conn.execute(
            'SELECT key, user_id, state, "count", attempts FROM push_jobs ORDER BY key'
        ).fetchall()


def attempts(tmp_path: Path) -> list[tuple[Any, ...]]:
    """(key, n, status, code) of every recorded attempt."""
    with sqlite3.connect(tmp_path / "notification.db") as conn:
        return conn.execute(
            "SELECT j.key, a.n, a.status, a.code FROM push_attempts a "
            "JOIN push_jobs j ON j.id = a.job_id ORDER BY j.key, a.n"
        ).fetchall()


async def test_a_burst_is_sent_once_per_key_while_ingest_and_worker_write(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    recipients = [f"r{i:03d}" for i in range(200)]
    total = 500
    config = PushConfig(collapse_delay=0, backoff_base=0.01, backoff_max=0.05)
    dedupe = Dedupe()
    async with (
        serve(dedupe) as receiver,
        webhook_world(
            tmp_path, transport, receiver.url + "/push", config, ("alice", *recipients)
        ) as w,
    ):
        for user in recipients:
            await w.notifications.register(login(user), "webhook", {"token": f"tok-{user}"})
        # Message k goes to recipient k mod 200, in waves of 50 sent at once: pushes are
        # claimed and answered while the next waves are ingested.
        for wave in range(0, total, 50):
            futures = [
                w.messages.send(
                    login("alice"),
                    send(direct_conv("alice", recipients[k % 200]), f"c{k}", f"m{k}"),
                )
                for k in range(wave, wave + 50)
            ]
            for fut in futures:
                await fut
        await w.local_messages.flush()
        await w.notifications.settle()
        await eventually(lambda: all(j[2] == "sent" for j in jobs(tmp_path)), within=60.0)
        stored = jobs(tmp_path)
        keys = {j[0] for j in stored}
        assert len(keys) == len(stored)
        # Every message is in exactly one push: r000..r099 got 3 messages, the others 2.
        per_user: Counter[str] = Counter()
        for _, user, _, count, n in stored:
            per_user[user] += count
            assert n == 1
        assert per_user == {u: 3 if i < 100 else 2 for i, u in enumerate(recipients)}
        # Each push arrived once, and is the one the database says was sent.
        assert dedupe.arrivals == dict.fromkeys(keys, 1)
        assert {k: (b["user"], b["count"]) for k, b in dedupe.processed.items()} == {
            j[0]: (j[1], j[3]) for j in stored
        }
        assert attempts(tmp_path) == [(key, 1, "sent", 200) for key in sorted(keys)]
        # The counters move just after the turn's commit returns, which another
        # connection may see first.
        sent = Counter({("webhook", "sent"): len(stored)})
        await eventually(lambda: +w.local.stats.results == sent)
        assert len(receiver.requests) == len(stored)
    # No worker or ingest failure, no "database is locked", not even a warning.
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == []


async def test_close_with_pushes_held_then_the_next_start_sends_each_key_once(
    tmp_path: Path, transport: str
) -> None:
    users = ("bob", "carol", "dave", "erin")
    config = PushConfig(collapse_delay=0, concurrency=2, backoff_base=0.01, backoff_max=0.05)
    dedupe = Dedupe()
    async with serve(dedupe) as receiver:
        receiver.answers = ["hang", "hang"]  # the two pushes in flight are never answered
        url = receiver.url + "/push"
        async with webhook_world(tmp_path, transport, url, config, ("alice", *users)) as w:
            for user in users:
                await w.notifications.register(login(user), "webhook", {"token": f"tok-{user}"})
            for user in users:
                await w.messages.send(login("alice"), send(direct_conv("alice", user), "c1"))
            await w.local_messages.flush()
            await w.notifications.settle()
            # Two held by the receiver; the other two claimed, waiting for a slot.
            await eventually(lambda: len(receiver.requests) == 2)
            await eventually(lambda: {j[2] for j in jobs(tmp_path)} == {"sending"})
            held = set(dedupe.arrivals)
            await w.local_messages.close()
            started = time.monotonic()
            await w.local.close()
            took = time.monotonic() - started
            assert CLOSE_GRACE_S - 0.1 <= took < CLOSE_GRACE_S + 2.0
        assert [(j[2], j[4]) for j in jobs(tmp_path)] == [("sending", 0)] * 4
        assert attempts(tmp_path) == []
        assert len(receiver.requests) == 2
        # The next start sends all four, the two held ones again with the same key.
        async with webhook_world(tmp_path, transport, url, config, ("alice", *users)) as w:
            await eventually(lambda: w.local.stats.results[("webhook", "sent")] == 4)
            stored = jobs(tmp_path)
            keys = {j[0] for j in stored}
            assert [(j[2], j[4]) for j in stored] == [("sent", 1)] * 4
            assert keys == {f"{u}:{u}-1:{direct_conv('alice', u)}:1" for u in users}
            assert dedupe.arrivals == {k: 2 if k in held else 1 for k in keys}
            assert set(dedupe.processed) == keys  # none lost, each processed once
            assert attempts(tmp_path) == [(k, 1, "sent", 200) for k in sorted(keys)]
            for user in users:
                trace = await w.notifications.trace(login(user), direct_conv("alice", user), 1)
                [job] = next(r for r in trace.recipients if r.user == user).pushes
                assert (job.state, [(a.n, a.status) for a in job.attempts]) == (
                    "sent",
                    [(1, "sent")],
                )


async def test_a_job_whose_registration_went_away_fails_without_an_attempt(
    tmp_path: Path, transport: str
) -> None:
    ab = ConvId(direct_conv("alice", "bob"))
    config = PushConfig(collapse_delay=1.0, backoff_base=0.01, backoff_max=0.05)
    async with open_world(tmp_path, transport, config=config) as w:
        await w.notifications.register(login("bob", "1"), "test", {"token": "phone"})
        await w.notifications.register(login("bob", "2"), "test", {"token": "laptop"})
        await w.messages.send(login("alice"), send(ab, "c1", "hello"))
        await w.local_messages.flush()
        await w.notifications.settle()
        # Ingested (a job per device, due after the collapse delay); bob-1 then goes.
        await w.notifications.unregister(login("bob", "1"), "test")
        await eventually(lambda: len(w.provider.pushes) == 1)
        await eventually(lambda: w.local.stats.results[("test", "failed")] == 1)
        await eventually(lambda: w.local.stats.results[("test", "sent")] == 1)
        assert [(p.device, p.seq) for p in w.provider.pushes] == [("bob-2", 1)]
        trace = await w.notifications.trace(login("bob", "2"), ab, 1)
        bob = next(r for r in trace.recipients if r.user == "bob")
        assert (bob.due, bob.reason) == (True, "due")
        got = {
            job.device: (job.state, [(a.n, a.status, a.code) for a in job.attempts])
            for job in bob.pushes
        }
        assert got == {"bob-1": ("failed", []), "bob-2": ("sent", [(1, "sent", 201)])}
        assert +w.local.stats.results == Counter({("test", "failed"): 1, ("test", "sent"): 1})


async def test_a_claim_after_the_message_service_closed_sends_without_a_badge(
    tmp_path: Path,
) -> None:
    ab = ConvId(direct_conv("alice", "bob"))
    config = PushConfig(collapse_delay=0.3, backoff_base=0.01, backoff_max=0.05)
    async with open_world(tmp_path, "local", config=config) as w:
        await w.notifications.register(login("bob"), "test", {"token": "phone"})
        await w.messages.send(login("alice"), send(ab, "c1", "hello"))
        await w.local_messages.flush()
        await w.notifications.settle()
        # The embedded server closes the message service before this one: the job
        # falls due in between and is claimed while no badge can be asked.
        await w.local_messages.close()
        await eventually(lambda: [j[2] for j in jobs(tmp_path)] != ["queued"])
        await eventually(lambda: len(w.provider.pushes) == 1 or w.local._worker._task.done())
        await w.local.close()
        assert [(p.seq, p.badge) for p in w.provider.pushes] == [(1, 0)]
