"""Codecs (docs/protocol.md §1, §2, §8): typed ops in, exact wire frames out, only
BadRequest on failure."""

from __future__ import annotations

import contextlib
import datetime
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imserver.protocol import ops
from imserver.protocol.codec import (
    Codec,
    EncodedEvent,
    decode_op,
    decode_op_as,
    detect_codec,
    encode,
    read_rid,
)
from imserver.protocol.events import (
    Closed,
    ErrorBody,
    Event,
    Msg,
    PresenceEvent,
    Receipt,
    Reply,
    TypingEvent,
)
from imserver.protocol.models import Message
from imserver.protocol.ops import ALL_OPS, Op, op_name
from imserver.utils.errors import BadRequest

CODECS = [Codec.JSON, Codec.MSGPACK]
CONV = "d:u1:u2"

# Every op of docs/protocol.md §3–§6 with valid values for its required fields (and nothing else),
# under the protocol's own field names. Ops not implemented yet are simply not looked up.
MINIMAL: dict[str, dict[str, Any]] = {
    "hello": {"v": 1},
    "register": {"username": "alice", "password": "correct horse"},
    "login": {"username": "alice", "password": "correct horse"},
    "auth": {"token": "tok"},
    "refresh": {"refresh_token": "rtok"},
    "logout": {},
    "ping": {},
    "send": {"conv": CONV, "cid": "c-7f3a", "type": "text", "body": "hi"},
    "edit": {"conv": CONV, "cid": "c-2", "target": 1, "body": "hey"},
    "recall": {"conv": CONV, "cid": "c-3", "target": 1},
    "history": {"conv": CONV},
    "convs": {},
    "read": {"conv": CONV, "seq": 0},
    "recv": {"conv": CONV, "seq": 3},
    "react": {"conv": CONV, "cid": "c-4", "target": 2, "emoji": "👍"},
    "search": {"query": "hi"},
    "typing": {"conv": CONV},
    "room.create": {"name": "general"},
    "room.get": {"room": "r1"},
    "room.update": {"room": "r1"},
    "room.list": {},
    "room.join": {"room": "r1"},
    "room.leave": {"room": "r1"},
    "room.invite": {"room": "r1", "user": "u2"},
    "room.kick": {"room": "r1", "user": "u2"},
    "room.role": {"room": "r1", "user": "u2", "role": "admin"},
    "room.members": {"room": "r1"},
    "user.get": {"user": "u2"},
    "user.update": {},
    "presence.get": {"users": ["u1", "u2"]},
    "block": {"user": "u2"},
    "unblock": {"user": "u2"},
    "notice.broadcast": {"body": "at noon", "to": "all"},
    "push.register": {"provider": "webpush", "target": {"endpoint": "https://push.example"}},
    "push.unregister": {},
    "push.list": {},
    "push.vapid_key": {},
    "conv.mute": {"conv": CONV, "until": 0},
    "conv.notify": {"conv": CONV, "level": "mentions"},
    "push.trace": {"conv": CONV, "seq": 1},
}

OPS_BY_NAME = {op_name(t): t for t in ALL_OPS}
OP_NAMES = sorted(OPS_BY_NAME)


def wire(obj: Any, codec: Codec) -> bytes:
    """Encode a plain value as a client would."""
    if codec is Codec.JSON:
        return msgspec.json.encode(obj)
    return msgspec.msgpack.encode(obj)


def unwire(data: bytes, codec: Codec) -> Any:
    """Decode a server frame as a schema-less client would."""
    if codec is Codec.JSON:
        return msgspec.json.decode(data)
    return msgspec.msgpack.decode(data)


def frame(name: str, **fields: Any) -> dict[str, Any]:
    """A valid frame of op ``name``, with ``fields`` replacing or adding to the minimal ones."""
    return {"op": name, **MINIMAL[name], **fields}


def bad(payload: Any, codec: Codec) -> BadRequest:
    """The BadRequest that decoding ``payload`` (a value, or raw bytes) raises."""
    data = payload if isinstance(payload, bytes) else wire(payload, codec)
    with pytest.raises(BadRequest) as info:
        decode_op(data, codec)
    err = info.value
    assert err.code == "bad_request"
    assert err.status == 400
    return err


def required_fields(op_type: type[Op]) -> list[str]:
    return [
        f.encode_name
        for f in msgspec.structs.fields(op_type)
        if f.required and f.encode_name != "op"
    ]


# --- every op decodes ---------------------------------------------------------------


def test_every_op_is_a_protocol_op_with_minimal_fields_here() -> None:
    missing = [name for name in OP_NAMES if name not in MINIMAL]
    assert not missing, f"add the minimal fields of {missing} to MINIMAL"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", OP_NAMES)
def test_decode_every_op_with_minimal_fields(name: str, codec: Codec) -> None:
    op = decode_op(wire(frame(name), codec), codec)
    assert type(op) is OPS_BY_NAME[name]
    assert op.rid is None
    for key, value in MINIMAL[name].items():
        assert getattr(op, key) == value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", OP_NAMES)
def test_decode_every_op_with_rid(name: str, codec: Codec) -> None:
    op = decode_op(wire(frame(name, rid="r42"), codec), codec)
    assert op.rid == "r42"


@pytest.mark.parametrize("name", OP_NAMES)
def test_minimal_fields_cover_the_required_ones(name: str) -> None:
    """Every required field of the op struct is one the protocol names for that op."""
    assert set(required_fields(OPS_BY_NAME[name])) <= set(MINIMAL[name])


def test_op_defaults() -> None:
    history = decode_op(wire(frame("history"), Codec.JSON), Codec.JSON)
    assert history == ops.History(conv=CONV, after=None, before=None, limit=50)
    search = decode_op(wire(frame("search"), Codec.JSON), Codec.JSON)
    assert isinstance(search, ops.Search)
    assert (search.limit, search.conv, search.before) == (20, None, None)
    react = decode_op(wire(frame("react"), Codec.MSGPACK), Codec.MSGPACK)
    assert isinstance(react, ops.React)
    assert react.remove is False


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_send_with_every_optional_field(codec: Codec) -> None:
    op = decode_op(
        wire(
            frame(
                "send",
                rid="r1",
                type="image",
                meta={"file": "f1", "w": 640, "nested": {"a": [1, 2.5, None, True]}},
                reply_to=17,
                mentions=["u3", "u4"],
            ),
            codec,
        ),
        codec,
    )
    assert op == ops.Send(
        rid="r1",
        conv=CONV,
        cid="c-7f3a",
        type="image",
        body="hi",
        meta={"file": "f1", "w": 640, "nested": {"a": [1, 2.5, None, True]}},
        reply_to=17,
        mentions=["u3", "u4"],
    )


# --- unknown fields (docs/protocol.md §8) -----------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", OP_NAMES)
def test_unknown_fields_are_ignored(name: str, codec: Codec) -> None:
    extra = {"x_future": {"deep": [1, "two", None]}, "zzz": 3, "": "empty key"}
    op = decode_op(wire(frame(name, **extra), codec), codec)
    assert type(op) is OPS_BY_NAME[name]


# --- validation errors --------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_unknown_op(codec: Codec) -> None:
    err = bad({"op": "teleport", "rid": "r1"}, codec)
    assert err.field == "op"
    assert "teleport" in err.message
    assert err.rid == "r1"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("value", [None, 5, ["ping"], {"op": "ping"}, True])
def test_op_not_a_string(codec: Codec, value: Any) -> None:
    err = bad({"op": value, "rid": "r1"}, codec)
    assert err.field == "op"
    assert err.rid == "r1"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_missing_op(codec: Codec) -> None:
    err = bad({"rid": "r7", "conv": CONV}, codec)
    assert err.field == "op"
    assert err.rid == "r7"


MISSING_CASES = [(name, field) for name in OP_NAMES for field in required_fields(OPS_BY_NAME[name])]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(("name", "field"), MISSING_CASES)
def test_missing_field_is_named(name: str, field: str, codec: Codec) -> None:
    payload = frame(name, rid="r5")
    del payload[field]
    err = bad(payload, codec)
    assert err.field == field
    assert field in err.message
    assert err.rid == "r5"


WRONG_TYPES: list[tuple[str, str, Any]] = [
    ("hello", "v", "1"),
    ("hello", "v", 1.5),
    ("hello", "client", 7),
    ("register", "username", 12345),
    ("send", "body", 5),
    ("send", "conv", None),
    ("send", "meta", ["not", "a", "map"]),
    ("send", "reply_to", "17"),
    ("send", "mentions", "u3"),
    ("send", "mentions", [1, 2]),
    ("send", "type", "video"),
    ("edit", "target", "1"),
    ("read", "seq", 1.0),
    ("react", "remove", "yes"),
    ("presence.get", "users", {"u1": True}),
    ("history", "limit", "10"),
    ("ping", "rid", 42),
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(("name", "field", "value"), WRONG_TYPES)
def test_wrong_type_is_named(name: str, field: str, value: Any, codec: Codec) -> None:
    if name not in OPS_BY_NAME:
        pytest.skip(f"op {name} not implemented")
    err = bad(frame(name, **{field: value}), codec)
    assert err.field == field
    assert field in err.message


MAX_SEQ = 2**63 - 1

# (op, field, valid edge values, invalid values)
CONSTRAINTS: list[tuple[str, str, list[Any], list[Any]]] = [
    (
        "register",
        "username",
        ["abc", "a" * 32, "a.b_c-9", "123"],
        ["ab", "a" * 33, "", "Alice", "al ice", "al/ice", "élan", "bob\n"],
    ),
    ("register", "password", ["p" * 8, "p" * 256], ["p" * 7, "p" * 257, ""]),
    ("register", "display_name", ["A", "x" * 64], ["", "x" * 65]),
    ("ping", "rid", ["", "r" * 64], ["r" * 65]),
    ("history", "limit", [1, 200], [0, 201, -1]),
    ("history", "after", [0, MAX_SEQ], [-1, MAX_SEQ + 1]),
    ("history", "before", [1, MAX_SEQ], [0, MAX_SEQ + 1]),
    ("search", "limit", [1, 100], [0, 101]),
    ("search", "query", ["q", "q" * 200], ["", "q" * 201]),
    ("send", "cid", ["c", "c" * 64], ["", "c" * 65]),
    ("send", "conv", ["d:a", "c" * 200], ["ab", "c" * 201]),
    ("send", "reply_to", [1], [0]),
    ("send", "mentions", [[], ["u"] * 200], [["u"] * 201, [""]]),
    ("edit", "target", [1, MAX_SEQ], [0, -5, MAX_SEQ + 1]),
    ("read", "seq", [0, MAX_SEQ], [-1, MAX_SEQ + 1]),
    ("react", "emoji", ["👍", "e" * 16], ["", "e" * 17]),
    ("presence.get", "users", [[], ["u"] * 200], [["u"] * 201]),
    ("auth", "token", ["t", "t" * 512], ["", "t" * 513]),
]

VALID_EDGES = [(n, f, v) for n, f, good, _ in CONSTRAINTS for v in good]
INVALID_VALUES = [(n, f, v) for n, f, _, wrong in CONSTRAINTS for v in wrong]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 20 else f"{text[:12]}..len{len(value)}"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(("name", "field", "value"), VALID_EDGES, ids=_short)
def test_constraint_edges_accepted(name: str, field: str, value: Any, codec: Codec) -> None:
    op = decode_op(wire(frame(name, **{field: value}), codec), codec)
    assert getattr(op, field) == value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(("name", "field", "value"), INVALID_VALUES, ids=_short)
def test_constraint_violations_name_the_field(
    name: str, field: str, value: Any, codec: Codec
) -> None:
    err = bad(frame(name, **{field: value}), codec)
    assert err.field == field


# --- rid recovery -------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_rid_recovered_from_an_invalid_frame(codec: Codec) -> None:
    err = bad({"op": "send", "rid": "r9", "conv": CONV, "cid": "c", "type": "text"}, codec)
    assert err.rid == "r9"
    assert err.field == "body"


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "payload",
    [
        {"op": "send", "rid": 9},  # rid is a number
        {"op": "send", "rid": ["r9"]},
        {"op": "ping", "rid": "r" * 65},  # rid too long to be one
        ["op", "ping", "rid", "r9"],  # not a map
        "r9",
        9,
        None,
    ],
    ids=["number", "list", "too-long", "array", "string", "int", "null"],
)
def test_rid_is_none_when_unreadable(codec: Codec, payload: Any) -> None:
    assert bad(payload, codec).rid is None


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("payload", [b"", b"{", b"\xc1", b"\xff\xfe", b'{"op": "ping",'])
def test_malformed_bytes(codec: Codec, payload: bytes) -> None:
    err = bad(payload, codec)
    assert err.rid is None
    assert err.field is None


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_trailing_garbage_is_malformed(codec: Codec) -> None:
    err = bad(wire({"op": "ping", "rid": "r1"}, codec) + b"\x00", codec)
    assert err.field is None


def test_read_rid() -> None:
    assert read_rid(b'{"rid": "a", "junk": [1, {"x": 2}]}', Codec.JSON) == "a"
    assert read_rid(msgspec.msgpack.encode({"rid": "b", "op": 1}), Codec.MSGPACK) == "b"
    assert read_rid(b'{"rid": null}', Codec.JSON) is None
    assert read_rid(b"not json", Codec.JSON) is None
    assert read_rid(b"\x93\x01\x02\x03", Codec.MSGPACK) is None


# --- limits of nesting and of the JSON data model ------------------------------------


DEPTH = 5000  # well past msgspec's recursion guard, well under max_frame


def deeply_nested(codec: Codec) -> bytes:
    """A list nested DEPTH levels deep (msgspec refuses to encode one, so by hand)."""
    if codec is Codec.JSON:
        return b"[" * DEPTH + b"]" * DEPTH
    return b"\x91" * (DEPTH - 1) + b"\x90"  # fixarray of 1, ..., then an empty fixarray


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "shape",
    [
        None,  # the whole frame
        {"op": "send", "rid": "r1", "conv": CONV, "cid": "c", "type": "text", "body": "b"},
        {"op": "ping", "rid": "r1"},  # in an unknown field
        {"rid": "r1"},  # as the op itself
    ],
    ids=["frame", "meta", "unknown-field", "op"],
)
def test_deep_nesting_is_a_bad_request(codec: Codec, shape: dict[str, Any] | None) -> None:
    if shape is None:
        data = deeply_nested(codec)
    else:
        key = {"send": "meta", "ping": "future"}.get(shape.get("op", ""), "op")
        placeholder = "@@deep@@"
        value: Any = {"a": placeholder} if key == "meta" else placeholder
        data = wire({**shape, key: value}, codec).replace(
            wire(placeholder, codec), deeply_nested(codec)
        )
    assert len(data) >= DEPTH
    bad(data, codec)


@pytest.mark.parametrize(
    "value",
    [
        msgspec.msgpack.Ext(5, b"data"),
        b"raw bytes",
        {1: "int key"},
        {b"k": "bin key"},
        [{"ok": [msgspec.msgpack.Ext(1, b"")]}],
    ],
    ids=["ext", "bin", "int-key", "bin-key", "nested-ext"],
)
def test_msgpack_meta_must_stay_in_the_json_data_model(value: Any) -> None:
    err = bad(frame("send", rid="r3", meta={"v": value}), Codec.MSGPACK)
    assert err.field == "meta"
    assert err.rid == "r3"


def test_push_target_must_stay_in_the_value_model() -> None:
    err = bad(frame("push.register", rid="r4", target={"token": -(2**63) - 1}), Codec.JSON)
    assert (err.field, err.rid) == ("target", "r4")
    assert err.message == (
        "invalid field 'target': integer at target.token is outside the signed 64-bit range"
    )
    err = bad(frame("push.register", target={"n": math.nan}), Codec.MSGPACK)
    assert err.field == "target"


def test_msgpack_timestamp_in_meta_is_refused() -> None:
    stamp = datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC)
    err = bad(frame("send", meta={"at": stamp}), Codec.MSGPACK)
    assert err.field == "meta"


# --- detect_codec -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "codec"),
    [
        (b'{"op":"ping"}', Codec.JSON),
        (b"{", Codec.JSON),
        (msgspec.msgpack.encode({"op": "ping"}), Codec.MSGPACK),
        (b"", Codec.MSGPACK),
        (b' {"op":"ping"}', Codec.MSGPACK),  # only a first byte of "{" means JSON
        (b"[1]", Codec.MSGPACK),
    ],
)
def test_detect_codec(payload: bytes, codec: Codec) -> None:
    assert detect_codec(payload) is codec


# --- decode_op_as (HTTP) ------------------------------------------------------------


def test_decode_op_as_without_op_field() -> None:
    op = decode_op_as(msgspec.json.encode(MINIMAL["send"]), ops.Send)
    assert op == ops.Send(conv=CONV, cid="c-7f3a", type="text", body="hi")


def test_decode_op_as_with_matching_op_field() -> None:
    assert decode_op_as(b'{"op": "typing", "conv": "d:u1:u2"}', ops.Typing) == ops.Typing(conv=CONV)


@pytest.mark.parametrize("body", [b"", b"{}"])
def test_decode_op_as_empty_body_for_fieldless_ops(body: bytes) -> None:
    assert decode_op_as(body, ops.Ping) == ops.Ping()
    assert decode_op_as(body, ops.Convs) == ops.Convs()


def test_decode_op_as_missing_field() -> None:
    with pytest.raises(BadRequest) as info:
        decode_op_as(b'{"rid": "h1"}', ops.Typing)
    assert info.value.field == "conv"
    assert info.value.rid == "h1"


def test_decode_op_as_invalid_field_and_unknown_fields() -> None:
    with pytest.raises(BadRequest) as info:
        decode_op_as(b'{"query": ""}', ops.Search)
    assert info.value.field == "query"
    assert decode_op_as(b'{"query": "q", "new": 1}', ops.Search) == ops.Search(query="q")


@pytest.mark.parametrize("body", [b"[]", b"nope", b'{"op": "ping"}', b'"conv"'])
def test_decode_op_as_bad_bodies(body: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        decode_op_as(body, ops.Typing)
    assert info.value.code == "bad_request"


# --- events: exact wire frames ------------------------------------------------------

EVENT_CASES: list[tuple[str, Event, dict[str, Any]]] = [
    (
        "reply-ok",
        Reply(
            rid="r42",
            ok=True,
            data=ops.SendData(conv=CONV, seq=18, ts=1764241234567, cid="c-7f3a", dup=False),
        ),
        {
            "op": "reply",
            "rid": "r42",
            "ok": True,
            "data": {"conv": CONV, "seq": 18, "ts": 1764241234567, "cid": "c-7f3a", "dup": False},
        },
    ),
    (
        "reply-empty",
        Reply(rid="r1", ok=True, data=ops.Empty()),
        {"op": "reply", "rid": "r1", "ok": True, "data": {}},
    ),
    (
        "reply-error",
        Reply(
            rid="r43", ok=False, error=ErrorBody(code="forbidden", message="not a member of r:9")
        ),
        {
            "op": "reply",
            "rid": "r43",
            "ok": False,
            "error": {"code": "forbidden", "message": "not a member of r:9"},
        },
    ),
    (
        "reply-error-no-rid",
        Reply(ok=False, error=ErrorBody(code="bad_request", message="m", field="conv")),
        {
            "op": "reply",
            "ok": False,
            "error": {"code": "bad_request", "message": "m", "field": "conv"},
        },
    ),
    (
        "reply-rate-limited",
        Reply(
            rid="r2",
            ok=False,
            error=ErrorBody(code="rate_limited", message="slow", retry_after=0.5),
        ),
        {
            "op": "reply",
            "rid": "r2",
            "ok": False,
            "error": {"code": "rate_limited", "message": "slow", "retry_after": 0.5},
        },
    ),
    (
        "msg",
        Msg(
            conv=CONV,
            seq=18,
            from_="u1",
            ts=1764241234567,
            type="text",
            body="hi",
            cid="c-7f3a",
        ),
        {
            "op": "msg",
            "conv": CONV,
            "seq": 18,
            "from": "u1",
            "ts": 1764241234567,
            "type": "text",
            "body": "hi",
            "cid": "c-7f3a",
        },
    ),
    (
        "msg-full",
        Msg(
            conv="r:9",
            seq=2,
            from_="u2",
            ts=5,
            type="image",
            body="",
            cid="c",
            meta={"file": "f1"},
            reply_to=1,
            mentions=["u1"],
        ),
        {
            "op": "msg",
            "conv": "r:9",
            "seq": 2,
            "from": "u2",
            "ts": 5,
            "type": "image",
            "body": "",
            "cid": "c",
            "meta": {"file": "f1"},
            "reply_to": 1,
            "mentions": ["u1"],
        },
    ),
    (
        "receipt",
        Receipt(conv=CONV, user="u2", seq=18, kind="read"),
        {"op": "receipt", "conv": CONV, "user": "u2", "seq": 18, "kind": "read"},
    ),
    (
        "typing",
        TypingEvent(conv=CONV, user="u1"),
        {"op": "typing", "conv": CONV, "user": "u1"},
    ),
    (
        "presence",
        PresenceEvent(user="u1", status="offline", last_seen=1764241234567),
        {"op": "presence", "user": "u1", "status": "offline", "last_seen": 1764241234567},
    ),
    (
        "presence-never-seen",
        PresenceEvent(user="u1", status="online", last_seen=None),
        {"op": "presence", "user": "u1", "status": "online", "last_seen": None},
    ),
    ("closed", Closed(reason="logout"), {"op": "closed", "reason": "logout"}),
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    ("event", "expected"), [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES]
)
def test_event_wire_frame_is_exact(event: Event, expected: dict[str, Any], codec: Codec) -> None:
    assert unwire(encode(event, codec), codec) == expected


EventUnion = Reply | Msg | Receipt | TypingEvent | PresenceEvent | Closed


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "event",
    [c[1] for c in EVENT_CASES if not isinstance(c[1], Reply)],
    ids=[c[0] for c in EVENT_CASES if not isinstance(c[1], Reply)],
)
def test_event_round_trips_through_typed_decode(event: Event, codec: Codec) -> None:
    data = encode(event, codec)
    if codec is Codec.JSON:
        back = msgspec.json.decode(data, type=EventUnion)
    else:
        back = msgspec.msgpack.decode(data, type=EventUnion)
    assert back == event


def test_json_frames_start_with_the_op() -> None:
    assert encode(Closed(reason="bye"), Codec.JSON) == b'{"op":"closed","reason":"bye"}'
    assert encode(TypingEvent(conv="r:1", user="u1"), Codec.JSON).startswith(b'{"op":"typing",')


def test_msg_of_stored_message() -> None:
    stored = Message(
        conv=CONV,
        seq=3,
        from_="u1",
        ts=9,
        type="text",
        body="yo",
        cid="c9",
        mentions=["u2"],
        edited=True,
    )
    frame_ = unwire(encode(Msg.of(stored), Codec.JSON), Codec.JSON)
    assert frame_ == {
        "op": "msg",
        "conv": CONV,
        "seq": 3,
        "from": "u1",
        "ts": 9,
        "type": "text",
        "body": "yo",
        "cid": "c9",
        "mentions": ["u2"],
    }


def test_encoded_event_encodes_once_per_codec() -> None:
    event = Msg(conv=CONV, seq=1, from_="u1", ts=1, type="text", body="hi", cid="c")
    shared = EncodedEvent(event)
    as_json = shared.for_codec(Codec.JSON)
    as_msgpack = shared.for_codec(Codec.MSGPACK)
    assert shared.for_codec(Codec.JSON) is as_json
    assert shared.for_codec(Codec.MSGPACK) is as_msgpack
    assert as_json == encode(event, Codec.JSON)
    assert as_msgpack == encode(event, Codec.MSGPACK)
    assert as_json != as_msgpack
    assert shared.event is event


# --- fuzz ---------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_NAMES = sorted(
    {"op", "rid"} | {f.encode_name for t in ALL_OPS for f in msgspec.structs.fields(t)}
)

common_scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
    | st.sampled_from(["", "r1", "d:u1:u2", "text", "abc", "x" * 65, "x" * 300, *OP_NAMES])
)
json_scalars = common_scalars | st.integers()  # JSON ints have no size limit
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
msgpack_scalars = (
    common_scalars
    | st.binary(max_size=20)
    | msgpack_ints
    | st.floats()
    | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12))
)
msgpack_keys = (
    st.text(max_size=6) | st.sampled_from(FIELD_NAMES) | msgpack_ints | st.binary(max_size=4)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(msgpack_keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def op_like(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> Any:
    """Mostly maps shaped like ops (a real op name, its real fields, random values)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(values)
    name = draw(st.sampled_from(OP_NAMES))
    fields = [f.encode_name for f in msgspec.structs.fields(OPS_BY_NAME[name])]
    body: dict[Any, Any] = {"op": name} if kind > 1 else {"op": draw(values)}
    if draw(st.booleans()):
        body.update(MINIMAL[name])
    for field in draw(st.lists(st.sampled_from(fields), max_size=len(fields))):
        body[field] = draw(values)
    body.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=2)))
    return body


def check_decode(payload: bytes, codec: Codec) -> None:
    """decode_op either returns an op that every codec can send on, or raises BadRequest."""
    try:
        op = decode_op(payload, codec)
    except BadRequest as err:
        assert err.code == "bad_request"
        assert err.field is None or err.field in FIELD_NAMES
        assert err.rid is None or (isinstance(err.rid, str) and len(err.rid) <= 64)
        return
    assert isinstance(op, ALL_OPS)
    # Whatever was accepted can be relayed to JSON and MessagePack sessions alike.
    msgspec.json.encode(op)
    msgspec.msgpack.encode(op)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(payload=st.binary(max_size=200))
@FUZZ
def test_fuzz_arbitrary_bytes(codec: Codec, payload: bytes) -> None:
    check_decode(payload, codec)


def encodings(value: Any) -> list[tuple[bytes, Codec]]:
    """``value`` in each codec that can carry it (MessagePack ints stop at 64 bits)."""
    out = [(msgspec.json.encode(value), Codec.JSON)]
    with contextlib.suppress(OverflowError):
        out.append((msgspec.msgpack.encode(value), Codec.MSGPACK))
    return out


@given(value=op_like(json_values))
@FUZZ
def test_fuzz_json_values(value: Any) -> None:
    for data, codec in encodings(value):
        check_decode(data, codec)


@given(value=op_like(msgpack_values))
@FUZZ
def test_fuzz_msgpack_values(value: Any) -> None:
    check_decode(msgspec.msgpack.encode(value), Codec.MSGPACK)


@given(meta=st.dictionaries(st.text(max_size=6), msgpack_values, max_size=4))
@FUZZ
def test_fuzz_msgpack_meta(meta: dict[str, Any]) -> None:
    check_decode(msgspec.msgpack.encode(frame("send", meta=meta)), Codec.MSGPACK)


@given(value=op_like(json_values), cut=st.integers(0, 400))
@FUZZ
def test_fuzz_truncated_frames(value: Any, cut: int) -> None:
    for data, codec in encodings(value):
        check_decode(data[:cut], codec)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(data=st.data())
@FUZZ
def test_fuzz_valid_ops_survive_a_round_trip(codec: Codec, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(OP_NAMES))
    payload = frame(name, rid=data.draw(st.none() | st.text(max_size=64)))
    op = decode_op(wire(payload, codec), codec)
    # Re-encoding the typed op gives a frame that decodes to the same op, in both codecs.
    for other in CODECS:
        assert decode_op(encode(op, other), other) == op
