"""The push ops through the gateway, on the embedded services (``build_embedded``):
their replies and exact errors, and the online devices the gateway reports, as
``push.trace`` shows them."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imserver.protocol.convs import direct_conv
from imserver.testing.sessions import CHEAP_AUTH, GatewayHarness, Peer
from imserver.utils.config import Config, PushConfig, WebhookConfig, WebPushConfig

PUSH_OFF = PushConfig(
    webpush=WebPushConfig(enabled=False),
    # A webhook that nothing answers: registrations are accepted, pushes only retry.
    webhook=WebhookConfig(url="http://127.0.0.1:9/push", secret="s", timeout=0.5),
)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    async with GatewayHarness.open(tmp_path, Config(auth=CHEAP_AUTH, push=PUSH_OFF)) as h:
        yield h


def error(frame: dict[str, typing.Any]) -> dict[str, typing.Any]:
    assert frame["op"] == "reply" and frame["ok"] is False, frame
    found: dict[str, typing.Any] = frame["error"]
    return found


async def logged_in(harness: GatewayHarness, name: str) -> tuple[Peer, str, str]:
    """A peer logged in as ``name``: (peer, user id, login session id)."""
    peer = harness.peer()
    data = await peer.login(name)
    login = peer.session.caller
    assert login is not None
    return peer, data["user"]["id"], login.login


async def test_push_ops_answer_and_refuse_exactly(harness: GatewayHarness) -> None:
    alice, a, _ = await logged_in(harness, "alice")
    assert await alice.ok("push.list") == {"registrations": []}
    refused = error(await alice.call("push.register", provider="fcm", target={"token": "x"}))
    assert refused["code"] == "bad_request" and refused["field"] == "provider"
    assert error(await alice.call("push.vapid_key"))["code"] == "unavailable"
    assert await alice.ok("push.unregister") == {}
    bad = error(await alice.call("conv.notify", conv="d:x:y", level="loud"))
    assert bad["code"] == "bad_request" and bad["field"] == "level"
    _, b, _ = await logged_in(harness, "bob")
    carol, _, _ = await logged_in(harness, "carol")
    conv = direct_conv(a, b)
    await alice.ok("send", conv=conv, cid="c1", type="text", body="hi")
    assert await alice.ok("conv.mute", conv=conv, until=0) == {}
    assert await alice.ok("conv.notify", conv=conv, level="mentions") == {}
    for op, fields in (
        ("conv.mute", {"until": 0}),
        ("conv.notify", {"level": "none"}),
        ("push.trace", {"seq": 1}),
    ):
        assert error(await carol.call(op, conv=conv, **fields))["code"] == "forbidden", op


async def test_trace_names_the_online_devices_the_gateway_reports(
    harness: GatewayHarness,
) -> None:
    phone, a, phone_login = await logged_in(harness, "alice")
    laptop, _, laptop_login = await logged_in(harness, "alice")
    bob, b, bob_login = await logged_in(harness, "bob")
    # A message concerns the notification service once a member other than its sender
    # could be pushed: then every decision, the sender's too, is stored.
    assert await bob.ok("push.register", provider="webhook", target={"token": "bob"}) == {}
    conv = direct_conv(a, b)

    async def recipients(seq: int) -> dict[str, dict[str, typing.Any]]:
        await harness.services.notifications.settle()
        trace = await phone.ok("push.trace", conv=conv, seq=seq)
        return {r["user"]: r for r in trace["recipients"]}

    await phone.ok("send", conv=conv, cid="c1", type="text", body="hi")
    first = await recipients(1)
    assert first[a]["reason"] == "sender"
    assert first[a]["online"] == sorted([phone_login, laptop_login])
    assert (first[b]["reason"], first[b]["online"], first[b]["pushes"]) == (
        "online",
        [bob_login],
        [],
    )
    await laptop.end()
    await phone.ok("send", conv=conv, cid="c2", type="text", body="again")
    assert (await recipients(2))[a]["online"] == [phone_login]


async def test_trace_of_a_message_no_member_could_get_pushed(harness: GatewayHarness) -> None:
    """Nothing is stored for it, and the trace still names its sender."""
    alice, a, _ = await logged_in(harness, "alice")
    _, c, _ = await logged_in(harness, "carol")
    conv = direct_conv(a, c)
    await alice.ok("send", conv=conv, cid="c1", type="text", body="hi")
    await harness.services.notifications.settle()
    trace = await alice.ok("push.trace", conv=conv, seq=1)
    assert {r["user"]: r["reason"] for r in trace["recipients"]} == {
        a: "sender",
        c: "no_registration",
    }
