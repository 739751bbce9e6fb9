"""A session's state machine (CONNECTED → GREETED → AUTHENTICATED → CLOSING → CLOSED),
driven in memory through :mod:`imserver.testing.sessions`: real services on SQLite
files, payloads in, decoded frames out, no sockets."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from imserver.protocol import ops
from imserver.protocol.codec import Codec
from imserver.services.gateway.handlers import Handlers
from imserver.services.gateway.router import Router
from imserver.services.gateway.session import ADMITTED, PUBLIC_OPS, RequestContext, State
from imserver.testing.sessions import CHEAP_AUTH, GatewayHarness
from imserver.utils.config import Config, LimitsConfig


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    async with GatewayHarness.open(tmp_path) as h:
        yield h


def error(frame: dict[str, typing.Any]) -> str:
    assert frame["op"] == "reply" and frame["ok"] is False, frame
    code: str = frame["error"]["code"]
    return code


async def test_every_op_but_hello_is_refused_before_hello(harness: GatewayHarness) -> None:
    peer = harness.peer()
    before: dict[str, dict[str, typing.Any]] = {
        "ping": {},
        "register": {"username": "ann", "password": "12345678"},
        "login": {"username": "ann", "password": "12345678"},
        "send": {"conv": "d:a:b", "cid": "c1", "type": "text", "body": "hi"},
        "convs": {},
    }
    for op, fields in before.items():
        assert error(await peer.call(op, **fields)) == "hello_required"
    assert peer.session.state is State.CONNECTED
    await peer.ok("hello", v=1)
    assert peer.session.state is State.GREETED
    assert (await peer.call("ping"))["ok"] is True


async def test_an_unsupported_version_leaves_the_session_connected(
    harness: GatewayHarness,
) -> None:
    peer = harness.peer()
    reply = await peer.call("hello", v=2)
    assert reply["error"] == {
        "code": "unsupported_version",
        "message": "unsupported version 2; this server speaks: 1",
    }
    assert peer.session.state is State.CONNECTED
    assert error(await peer.call("ping")) == "hello_required"
    await peer.ok("hello", v=1)
    assert peer.session.state is State.GREETED


async def test_the_codec_of_hello_is_the_codec_of_every_reply(harness: GatewayHarness) -> None:
    peer = harness.peer(Codec.MSGPACK)
    # Before hello, an error answers in the codec of the frame it answers.
    await peer.send("ping", codec=Codec.JSON, rid="j")
    harness.gateway.flusher.flush()
    assert peer.link.written[4:5] == b"{"
    assert error(await peer.reply("j")) == "hello_required"
    await peer.ok("hello", v=1, device="phone")
    assert peer.session.codec is Codec.MSGPACK
    assert peer.session.device == "phone"
    # A JSON frame after a MessagePack hello is answered in MessagePack.
    await peer.send("ping", codec=Codec.JSON, rid="p")
    harness.gateway.flusher.flush()
    assert peer.link.written[4:5] != b"{"
    assert (await peer.reply("p"))["ok"] is True


async def test_consecutive_bad_frames_close_with_bad_frames(tmp_path: Path) -> None:
    config = Config(auth=CHEAP_AUTH, limits=LimitsConfig(bad_frames=3))
    async with GatewayHarness.open(tmp_path, config) as harness:
        peer = harness.peer()
        await peer.ok("hello", v=1)
        await peer.receive(b"not json")
        await peer.receive(b'{"op":"nope"}')
        # A good frame resets the count.
        await peer.ok("ping")
        for _ in range(3):
            await peer.receive(b"{")
        frames = peer.frames()
        assert [error(f) for f in frames[:-1]] == ["bad_request"] * 5
        assert frames[-1] == {"op": "closed", "reason": "bad_frames"}
        assert peer.session.state is State.CLOSING
        assert peer.link.closed


async def test_ops_needing_a_user_are_unauthorized_until_login(harness: GatewayHarness) -> None:
    peer = harness.peer()
    await peer.ok("hello", v=1)
    for op, fields in {"logout": {}, "convs": {}, "room.list": {}, "block": {"user": "u1"}}.items():
        assert error(await peer.call(op, **fields)) == "unauthorized"
    await peer.ok("register", username="ann", password="12345678")
    assert peer.session.state is State.GREETED
    await peer.ok("login", username="ann", password="12345678")
    assert peer.session.state is State.AUTHENTICATED
    assert peer.session.caller is not None
    assert await peer.ok("convs") == {"convs": []}
    assert harness.gateway.metrics.ops[("convs", "unauthorized")] == 1


async def test_ops_past_the_burst_are_rate_limited(tmp_path: Path) -> None:
    limits = LimitsConfig(rate_per_s=0.001, rate_burst=3)
    async with GatewayHarness.open(tmp_path, Config(auth=CHEAP_AUTH, limits=limits)) as harness:
        peer = harness.peer()
        await peer.ok("hello", v=1)
        await peer.ok("ping")
        await peer.ok("ping")
        reply = await peer.call("ping")
        assert error(reply) == "rate_limited"
        assert reply["error"]["retry_after"] > 0
        assert peer.session.state is State.GREETED
        assert harness.gateway.metrics.ops[("ping", "rate_limited")] == 1


async def test_a_slow_consumer_is_closed(tmp_path: Path) -> None:
    limits = LimitsConfig(send_queue_bytes=1000)
    async with GatewayHarness.open(tmp_path, Config(auth=CHEAP_AUTH, limits=limits)) as harness:
        peer = harness.peer()
        await peer.ok("hello", v=1)
        peer.link.backlog = 1001  # the client has not taken what was written before
        await peer.send("ping", rid="p")
        assert peer.frames() == [{"op": "closed", "reason": "slow_consumer"}]
        assert peer.session.state is State.CLOSING
        assert peer.link.closed
        assert harness.gateway.metrics.slow_consumers.value == 1


async def test_close_sends_closed_once_and_ignores_what_follows(harness: GatewayHarness) -> None:
    peer = harness.peer()
    await peer.login("ann", "12345678")
    peer.frames()
    peer.session.close("shutdown")
    peer.session.close("again")
    assert peer.frames() == [{"op": "closed", "reason": "shutdown"}]
    assert peer.session.closing
    await peer.send("ping", rid="p")
    await peer.send("send", rid="s", conv="d:a:b", cid="c1", type="text", body="late")
    assert peer.frames() == []
    assert harness.gateway.metrics.ops.get(("send", "ok")) is None
    await peer.end()
    assert peer.session.state is State.CLOSED
    assert peer.session not in harness.gateway.sessions
    assert harness.gateway.hub.sessions_of(peer.session.caller.user) == []  # type: ignore[union-attr]


async def test_a_session_closed_before_hello_gets_no_closed_frame(
    harness: GatewayHarness,
) -> None:
    peer = harness.peer()
    peer.session.close("hello_timeout")
    assert peer.frames() == []
    assert peer.link.closed


async def test_an_http_request_context_binds_nothing(harness: GatewayHarness) -> None:
    """login over HTTP answers tokens and attaches no session to the hub; the same
    admission table as a session's decides what a context without a user may run."""
    peer = harness.peer()
    await peer.ok("hello", v=1)
    await peer.ok("register", username="ann", password="12345678")
    router = harness.gateway.router
    anonymous = RequestContext()
    assert anonymous.state is State.GREETED
    result = router.call(anonymous, ops.Login(username="ann", password="12345678"))
    assert isinstance(result, Awaitable)
    data = await result
    assert isinstance(data, ops.LoginData)
    assert harness.gateway.hub.sessions_of(typing.cast(typing.Any, data.user.id)) == []
    with pytest.raises(Exception, match="not authenticated"):
        router.call(anonymous, ops.Convs())


def test_the_admission_table_covers_every_state() -> None:
    assert set(ADMITTED) == set(State)
    assert ADMITTED[State.CONNECTED] == {ops.Hello}
    assert ADMITTED[State.GREETED] == PUBLIC_OPS
    assert ADMITTED[State.AUTHENTICATED] == set(ops.ALL_OPS)
    assert not ADMITTED[State.CLOSING] and not ADMITTED[State.CLOSED]


def test_every_handler_returns_its_ops_reply_type() -> None:
    """Handlers.router() registered each op with REPLY_TYPES' struct (Router.route
    checks that); here each handler's own annotation must agree with it."""
    for op_type, reply_type in ops.REPLY_TYPES.items():
        name = ops.op_name(op_type).replace(".", "_")
        hints = typing.get_type_hints(getattr(Handlers, name))
        assert hints["op"] is op_type, name
        returned = hints["return"]
        if typing.get_origin(returned) is not None:
            (returned,) = typing.get_args(returned)
        assert returned is reply_type, name


def test_a_route_with_the_wrong_reply_type_is_refused() -> None:
    async def hello(ctx: typing.Any, op: ops.Hello) -> ops.Empty:
        return ops.Empty()

    with pytest.raises(TypeError, match="hello replies HelloData, not Empty"):
        Router().route(ops.Hello, ops.Empty, hello)
    with pytest.raises(RuntimeError, match="ops without a handler"):
        Router().check_complete()


async def test_the_peer_reads_msgpack_events_of_other_sessions(harness: GatewayHarness) -> None:
    ann = harness.peer(Codec.MSGPACK)
    ann_login = await ann.login("ann", "12345678")
    bob = harness.peer()
    bob_login = await bob.login("bob", "12345678")
    ann.frames()
    conv = "d:" + ":".join(sorted([ann_login["user"]["id"], bob_login["user"]["id"]]))
    sent = await bob.ok("send", conv=conv, cid="c1", type="text", body="hi")
    events = [f for f in ann.frames() if f["op"] == "msg"]
    assert [(e["seq"], e["body"]) for e in events] == [(sent["seq"], "hi")]
    # The sender's own connection does not get its message back.
    assert [f for f in bob.frames() if f["op"] == "msg"] == []
