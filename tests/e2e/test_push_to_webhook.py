"""Offline push through a real ``imserver serve`` and its webhook provider to a local
receiver (docs/push.md, "Webhook"): a message to an offline user becomes one signed
POST with the documented body, a burst collapses into one push with its count, a
receiver's 503s are retried with backoff until it answers, a mute suppresses the
push, and ``push.trace`` over the wire says what happened each time.

The receiver checks every request with docs/push.md's ``verify`` and answers 401 to
a bad signature; the tests then expect no 401 in any trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from imserver.client import Client

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory, ServerProcess

SECRET = "e2e-webhook-secret"
TOLERANCE = 300  # seconds: older (or further ahead) timestamps are rejected
FIELDS = {"key", "kind", "user", "device", "conv", "seq", "count", "badge", "title", "body"}


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float) -> bool:
    """True when ``body`` was signed with ``secret`` at ``timestamp``, within TOLERANCE."""
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > TOLERANCE:
        return False
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(signature.encode(), ("v1=" + mac.hexdigest()).encode())


class Receiver:
    """A webhook receiver that verifies signatures and fails the first ``fail`` requests."""

    def __init__(self) -> None:
        self.fail = 0
        self.requests = 0
        self.bad = 0
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.url = ""

    async def push(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        headers = request.headers
        if not verify(
            SECRET.encode(),
            headers.get("X-IMServer-Timestamp", ""),
            headers.get("X-IMServer-Signature", ""),
            body,
            time.time(),
        ):
            self.bad += 1
            return web.Response(status=401)
        if self.requests <= self.fail:
            return web.Response(status=503)
        self.received.append((dict(headers), json.loads(body)))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.push)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield state
    finally:
        await runner.cleanup()


def start(factory: ServerFactory, receiver: Receiver, **push: Any) -> ServerProcess:
    settings = {
        "collapse_delay": 0.0,
        "webpush": {"enabled": False},
        "webhook": {"url": receiver.url, "secret": SECRET, "timeout": 2.0},
        **push,
    }
    return factory({"push": settings})


async def until(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def offline_with_webhook(
    server: ServerProcess, clients: Clients, *, mute: bool = False
) -> tuple[str, str, Client]:
    """Bob registers a webhook for his device and disconnects; Alice is online.

    Returns Bob's id, his device (as ``push.list`` shows it) and Alice's client; with
    ``mute`` Bob mutes their conversation first.
    """
    bob = await clients.user(server, "bob", display_name="Bob")
    alice = await clients.user(server, "alice", display_name="Alice")
    target = {"token": "dev-81f2"}
    assert await bob.request("push.register", {"provider": "webhook", "target": target}) == {}
    if mute:
        conv = Client.direct_conv(alice.user_id, bob.user_id)
        until_ms = int(time.time() * 1000) + 3_600_000
        assert await bob.request("conv.mute", {"conv": conv, "until": until_ms}) == {}
    [reg] = (await bob.request("push.list"))["registrations"]
    assert (reg["provider"], reg["target"]) == ("webhook", target)
    bob_id = bob.user_id
    await bob.close()
    return bob_id, reg["device"], alice


UNSETTLED = {"queued", "sending", "retry-wait"}
"""Push states that change without the client doing anything: the receiver can hold a
request before the server has recorded its answer."""


async def trace_of(alice: Client, conv: str, seq: int, user: str) -> dict[str, Any]:
    """``user``'s entry in the trace of ``seq``, once none of its pushes is in flight."""
    deadline = time.monotonic() + 10.0
    while True:
        trace = await alice.request("push.trace", {"conv": conv, "seq": seq})
        [mine] = [r for r in trace["recipients"] if r["user"] == user]
        if not any(job["state"] in UNSETTLED for job in mine["pushes"]):
            return dict(mine)
        assert time.monotonic() < deadline, f"pushes still in flight: {mine['pushes']}"
        await asyncio.sleep(0.05)


async def test_a_message_to_an_offline_user_is_one_signed_request(
    server_factory: ServerFactory, clients: Clients, receiver: Receiver
) -> None:
    server = start(server_factory, receiver)
    bob_id, device, alice = await offline_with_webhook(server, clients)
    conv = Client.direct_conv(alice.user_id, bob_id)
    sent = await alice.send_message(conv, "see you at 8")
    await until(lambda: len(receiver.received) == 1)
    headers, body = receiver.received[0]
    key = f"{bob_id}:{device}:{conv}:{sent['seq']}"
    assert headers["Idempotency-Key"] == key
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-IMServer-Signature"].startswith("v1=")
    assert FIELDS | {"token"} <= body.keys() and body["title"]
    assert body == body | {
        "key": key,
        "kind": "message",
        "user": bob_id,
        "device": device,
        "conv": conv,
        "seq": sent["seq"],
        "count": 1,
        "badge": 1,
        "body": "see you at 8",
        "token": "dev-81f2",
    }
    mine = await trace_of(alice, conv, sent["seq"], bob_id)
    assert (mine["due"], mine["reason"], mine["online"]) == (True, "due", [])
    [job] = mine["pushes"]
    assert (job["key"], job["provider"], job["device"], job["state"]) == (
        key,
        "webhook",
        device,
        "sent",
    )
    assert [(a["n"], a["status"], a["code"]) for a in job["attempts"]] == [(1, "sent", 204)]
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1 and receiver.bad == 0


async def test_a_burst_collapses_into_one_push_with_its_count(
    server_factory: ServerFactory, clients: Clients, receiver: Receiver
) -> None:
    server = start(server_factory, receiver, collapse_delay=1.5)
    bob_id, device, alice = await offline_with_webhook(server, clients)
    conv = Client.direct_conv(alice.user_id, bob_id)
    seqs = [(await alice.send_message(conv, f"burst {n}"))["seq"] for n in range(10)]
    await until(lambda: len(receiver.received) == 1)
    await asyncio.sleep(0.5)
    [(headers, body)] = receiver.received
    assert (body["count"], body["seq"], body["body"], body["badge"]) == (
        10,
        seqs[-1],
        "burst 9",
        10,
    )
    assert headers["Idempotency-Key"] == f"{bob_id}:{device}:{conv}:{seqs[0]}"
    first = await trace_of(alice, conv, seqs[0], bob_id)
    later = await trace_of(alice, conv, seqs[5], bob_id)
    assert first["pushes"][0]["collapsed"] is False
    assert later["pushes"][0]["collapsed"] is True
    for mine in (first, later):
        [job] = mine["pushes"]
        assert (job["count"], job["state"], job["seq"]) == (10, "sent", seqs[-1])
    assert receiver.bad == 0


async def test_a_failing_receiver_gets_the_push_on_the_third_attempt(
    server_factory: ServerFactory, clients: Clients, receiver: Receiver
) -> None:
    receiver.fail = 2
    server = start(server_factory, receiver, backoff_base=0.1, backoff_max=0.3)
    bob_id, device, alice = await offline_with_webhook(server, clients)
    conv = Client.direct_conv(alice.user_id, bob_id)
    sent = await alice.send_message(conv, "third time lucky")
    await until(lambda: len(receiver.received) == 1)
    assert receiver.requests == 3 and receiver.bad == 0
    _, body = receiver.received[0]
    assert (body["body"], body["device"]) == ("third time lucky", device)
    mine = await trace_of(alice, conv, sent["seq"], bob_id)
    [job] = mine["pushes"]
    assert job["state"] == "sent"
    assert [(a["n"], a["status"], a["code"]) for a in job["attempts"]] == [
        (1, "retry", 503),
        (2, "retry", 503),
        (3, "sent", 204),
    ]


async def test_a_mute_suppresses_the_push_and_the_trace_says_so(
    server_factory: ServerFactory, clients: Clients, receiver: Receiver
) -> None:
    server = start(server_factory, receiver)
    bob_id, _, alice = await offline_with_webhook(server, clients, mute=True)
    conv = Client.direct_conv(alice.user_id, bob_id)
    sent = await alice.send_message(conv, "you will not hear this")
    # Until the notification service has taken the message in, the trace shows no
    # decision for Bob (``no_registration``, as for a member with nothing to push to).
    deadline = time.monotonic() + 10
    mine = await trace_of(alice, conv, sent["seq"], bob_id)
    while mine["reason"] == "no_registration":
        assert time.monotonic() < deadline, "no decision in time"
        await asyncio.sleep(0.05)
        mine = await trace_of(alice, conv, sent["seq"], bob_id)
    assert (mine["due"], mine["reason"], mine["pushes"]) == (False, "muted", [])
    assert mine["muted_until"] > time.time() * 1000
    await asyncio.sleep(0.5)
    assert receiver.requests == 0
