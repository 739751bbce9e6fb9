"""The gateway's last line of defence: an unexpected exception becomes ``internal``;
an event or reply that a session's codec cannot encode costs that session only that
frame; and the room writes it refuses while draining.

No honest end-to-end trigger exists for either (every bad input has its own code, and
a draining server closes its connections at once), so this drives a real gateway on
real SQLite services in-process, with one handler replaced by one that fails the way
a bug would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imserver.protocol import ops
from imserver.protocol.codec import Codec
from imserver.protocol.events import Msg
from imserver.services.gateway.session import OpContext
from imserver.storage.bus import Publication, user_channel
from imserver.testing.sessions import GatewayHarness, Peer


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    async with GatewayHarness.open(tmp_path) as h:
        yield h


async def test_an_unexpected_exception_is_answered_internal_and_the_session_lives(
    harness: GatewayHarness,
) -> None:
    def broken(ctx: OpContext, op: ops.Ping) -> ops.Empty:
        raise RuntimeError("a bug")

    gateway = harness.gateway
    gateway.router.route(ops.Ping, ops.Empty, broken)
    peer = harness.peer()
    await peer.receive(b'{"op":"hello","v":1,"rid":"h"}')
    await peer.receive(b'{"op":"ping","rid":"p"}')
    await peer.receive(b'{"op":"register","rid":"r","username":"zed","password":"12345678"}')
    by_rid = {f["rid"]: f for f in peer.frames()}
    assert sorted(by_rid) == ["h", "p", "r"]
    assert by_rid["p"] == {
        "op": "reply",
        "rid": "p",
        "ok": False,
        "error": {"code": "internal", "message": "internal error"},
    }
    assert by_rid["r"]["ok"] is True
    assert not peer.link.closed
    assert gateway.metrics.ops[("ping", "internal")] == 1


async def test_room_writes_are_refused_while_draining(harness: GatewayHarness) -> None:
    gateway = harness.gateway
    peer = harness.peer()
    frames = [
        b'{"op":"hello","v":1,"rid":"h"}',
        b'{"op":"register","rid":"r","username":"zed","password":"12345678"}',
        b'{"op":"login","rid":"l","username":"zed","password":"12345678"}',
        b'{"op":"room.create","rid":"c","name":"before"}',
    ]
    for frame in frames:
        await peer.receive(frame)
    gateway.draining = True
    writes = {
        "create": b'"room.create","name":"x"',
        "update": b'"room.update","room":"r1","name":"x"',
        "join": b'"room.join","room":"r1"',
        "leave": b'"room.leave","room":"r1"',
        "invite": b'"room.invite","room":"r1","user":"u1"',
        "kick": b'"room.kick","room":"r1","user":"u1"',
        "role": b'"room.role","room":"r1","user":"u1","role":"admin"',
    }
    for rid, body in writes.items():
        await peer.receive(b'{"rid":"%s","op":%s}' % (rid.encode(), body))
    await peer.receive(b'{"op":"room.list","rid":"list"}')
    by_rid = {f["rid"]: f for f in peer.frames() if "rid" in f}
    assert by_rid["c"]["ok"] is True
    for rid in writes:
        assert by_rid[rid]["error"]["code"] == "unavailable", by_rid[rid]
    # Reads still work while draining.
    assert [r["name"] for r in by_rid["list"]["data"]["rooms"]] == []


async def logged_in(harness: GatewayHarness, codec: Codec, username: str) -> Peer:
    """A connection of ``username`` (registered on first use) speaking ``codec``, its
    frames so far read."""
    peer = harness.peer(codec)
    await peer.login(username, "12345678")
    assert peer.session.caller is not None
    peer.frames()
    return peer


def msg(seq: int, meta: dict[str, Any]) -> Msg:
    return Msg(
        conv="d:a:b", seq=seq, from_="a", ts=1, type="text", body="", cid=f"c{seq}", meta=meta
    )


async def test_an_event_one_codec_cannot_encode_skips_only_that_codecs_sessions(
    harness: GatewayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """An integer past 64 bits (as stored before values were checked) fits JSON but not
    MessagePack: the MessagePack session misses that event and nothing else, stays
    open, and the live-bus subscriber goes on with the next delivery."""
    gateway = harness.gateway
    js = await logged_in(harness, Codec.JSON, "zed")
    mp = await logged_in(harness, Codec.MSGPACK, "zed")
    assert js.session.caller is not None
    user = js.session.caller.user
    for n, meta in enumerate(({"n": 2**64}, {"n": 1}), 1):
        publication = Publication(event=msg(n, meta), conv="d:a:b", seq=n)
        await gateway.bus.publish(user_channel(user), publication)
    assert [(f["seq"], f["meta"]) for f in js.frames()] == [(1, {"n": 2**64}), (2, {"n": 1})]
    assert [(f["seq"], f["meta"]) for f in mp.frames()] == [(2, {"n": 1})]
    assert not mp.link.closed and not mp.session.closing
    assert gateway.metrics.encode_failures == {("event", "msgpack"): 1}
    assert "cannot encode a Msg event in MSGPACK" in caplog.text
    assert b'imserver_encode_failures_total{codec="msgpack",frame="event"} 1.0' in (
        gateway.metrics.render()
    )


async def test_a_reply_the_codec_cannot_encode_is_answered_internal_and_the_session_lives(
    harness: GatewayHarness,
) -> None:
    gateway = harness.gateway
    peer = await logged_in(harness, Codec.MSGPACK, "zed")
    session = peer.session
    session.send_reply("r1", {"n": 2**64})
    session.send_reply("r2", {"n": 2})
    assert peer.frames() == [
        {
            "op": "reply",
            "rid": "r1",
            "ok": False,
            "error": {"code": "internal", "message": "the reply could not be encoded in MSGPACK"},
        },
        {"op": "reply", "rid": "r2", "ok": True, "data": {"n": 2}},
    ]
    assert not peer.link.closed and not session.closing
    assert gateway.metrics.encode_failures == {("reply", "msgpack"): 1}
