"""Every request and response of every API survives protobuf unchanged.

Values are drawn from the type hints themselves (the schema's source): 64-bit
integers at their bounds, strings with NUL, empty lists, ``None`` against an absent
default, MessagePack-carried ``Any`` values, nested structs and dicts."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any, Literal, NewType, Union

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imserver.protocol import ops
from imserver.protocol.models import Message
from imserver.rpc.apis import schema
from imserver.rpc.codec import method_codec
from imserver.rpc.schema import Optional, Registry, UnionRef
from imserver.services.caller import Caller
from imserver.services.message.api import CommittedMessage, Members, MessageService
from imserver.utils.errors import BadRequest
from imserver.utils.ids import ConvId, LoginId, UserId

INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.just("a\x00b")
ANY = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
_LISTS = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.Iterable,
    collections.abc.Collection,
)


def _meta(hint: Any) -> tuple[Any, list[msgspec.Meta]]:
    metas: list[msgspec.Meta] = []
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extra = typing.get_args(hint)
            metas += [m for m in extra if isinstance(m, msgspec.Meta)]
        elif isinstance(hint, NewType):
            hint = hint.__supertype__
        else:
            return hint, metas


def strategy(hint: Any) -> st.SearchStrategy[Any]:
    """Valid values of ``hint``, its constraints kept."""
    hint, metas = _meta(hint)
    bound = {
        k: getattr(m, k)
        for m in metas
        for k in ("min_length", "max_length", "ge", "le", "pattern")
        if getattr(m, k) is not None
    }
    if hint is type(None) or hint is None:
        return st.none()
    if hint is Any:
        return ANY
    if hint is str:
        if "pattern" in bound:
            return st.from_regex(r"[a-z0-9_.-]{3,32}", fullmatch=True)
        lo, hi = bound.get("min_length", 0), min(bound.get("max_length", 12), 12)
        return st.text(st.characters(codec="utf-8"), min_size=lo, max_size=max(lo, hi)) | (
            st.just("a\x00" + "b" * max(0, lo - 2)) if hi >= max(2, lo) else st.nothing()
        )
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(bound.get("ge", -(2**63)), bound.get("le", 2**63 - 1))
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is bytes:
        return st.binary(max_size=16)
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return _struct(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of([strategy(a) for a in args])
    if origin in _LISTS:
        item = strategy(args[0])
        lo, hi = bound.get("min_length", 0), min(bound.get("max_length", 3), 3)
        if origin in (set, frozenset):
            return st.sets(item, min_size=lo, max_size=max(lo, hi)).map(origin)
        made = st.lists(item, min_size=lo, max_size=max(lo, hi))
        return made.map(tuple) if origin is tuple else made
    if origin in (dict, collections.abc.Mapping):
        return st.dictionaries(strategy(args[0]), strategy(args[1]), max_size=3)
    raise TypeError(hint)


def _struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {
        f.name: strategy(hints[f.name])
        for f in msgspec.structs.fields(cls)
        if not (issubclass(cls, ops.Op) and f.name == "rid")
    }
    return st.builds(cls, **fields)


CASES = [(proto, name) for proto, service in schema().services.items() for name in service.methods]


@pytest.mark.parametrize(("proto", "name"), CASES, ids=[f"{p.__name__}.{n}" for p, n in CASES])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_requests_and_responses_round_trip(proto: type, name: str, data: st.DataObject) -> None:
    codec = method_codec(proto, name)
    method = codec.method
    hints = typing.get_type_hints(getattr(proto, name), include_extras=True)
    values = {p: data.draw(strategy(hints[p]), label=p) for p in method.params}
    decoded = codec.decode_request(codec.encode_request(values))
    expected = {p: list(v) if p in method.list_params else v for p, v in values.items()}
    assert decoded == expected
    if method.result is None or method.result is type(None):
        assert codec.encode_response(None) == b""
        return
    result = data.draw(strategy(method.result), label="result")
    assert codec.decode_response(codec.encode_response(result)) == result


def _round_trip(proto: type, name: str, values: dict[str, Any]) -> dict[str, Any]:
    codec = method_codec(proto, name)
    return codec.decode_request(codec.encode_request(values))


CALLER = Caller(UserId("u"), LoginId("l"))


def test_64_bit_integers_nul_and_empty_lists_cross() -> None:
    got = _round_trip(
        MessageService,
        "stored_since",
        {"ts": 2**63 - 1, "after_id": -(2**63), "limit": 0},
    )
    assert got == {"ts": 2**63 - 1, "after_id": -(2**63), "limit": 0}
    got = _round_trip(
        MessageService, "post_system_many", {"users": [], "body": "a\x00b", "meta": None, "cid": ""}
    )
    assert got == {"users": [], "body": "a\x00b", "meta": None, "cid": ""}


def test_none_and_an_absent_default_stay_apart() -> None:
    codec = method_codec(MessageService, "history")
    message = Message(conv=ConvId("d:a:b"), seq=1, from_="a", ts=0, type="text", body="", cid="c")
    with_meta = msgspec.structs.replace(message, meta={}, mentions=[], reactions={})
    data = ops.HistoryData(messages=[message, with_meta], has_more=False)
    back = codec.decode_response(codec.encode_response(data))
    assert back == data
    assert back.messages[0].meta is None and back.messages[1].meta == {}
    assert back.messages[0].mentions is None and back.messages[1].mentions == []
    members = method_codec(MessageService, "post_room_system")
    sent = {
        "room": "r",
        "body": "",
        "meta": None,
        "notify": [],
        "cid": None,
        "members": Members(("a",)),
    }
    assert members.decode_request(members.encode_request(sent))["members"] == Members(("a",), 0)
    assert (
        members.decode_request(members.encode_request({**sent, "members": None}))["members"] is None
    )


def test_an_op_crosses_without_its_rid() -> None:
    req = ops.Send(
        rid="r1", conv=ConvId("d:a:b"), cid="c", type="text", body="x", meta={"k": [1, None]}
    )
    got = _round_trip(MessageService, "send", {"caller": CALLER, "req": req})
    assert got["req"] == msgspec.structs.replace(req, rid=None)


def test_a_request_that_breaks_a_constraint_is_bad_request_naming_the_field() -> None:
    codec = method_codec(MessageService, "send")
    req = ops.Send(conv=ConvId("d:a:b"), cid="", type="text", body="x")  # cid: min_length 1
    with pytest.raises(BadRequest) as info:
        codec.decode_request(codec.encode_request({"caller": CALLER, "req": req}))
    assert info.value.field == "cid"
    history = method_codec(MessageService, "history")
    past = ops.History(conv=ConvId("d:a:b"), before=2**63)  # past int64: refused before sending
    with pytest.raises(BadRequest) as info:
        history.encode_request({"caller": CALLER, "req": past})
    assert info.value.field == "before"


def test_a_tuple_of_structs_in_a_list_keeps_its_order_and_types() -> None:
    codec = method_codec(MessageService, "stored_since")
    rows = [
        CommittedMessage(
            conv=ConvId("r:x"), seq=s, ts=s, sender="a", type="text", body="", members=("b", "a")
        )
        for s in (3, 1, 2)
    ]
    assert codec.decode_response(codec.encode_response(rows)) == rows


def test_a_tagged_union_becomes_a_oneof_of_its_variants() -> None:
    registry = Registry()
    kind = registry.kind(ops.Send | ops.Edit | None)
    assert isinstance(kind, Optional) and isinstance(kind.inner, UnionRef)
    assert [(name, tag) for name, tag, _ in kind.inner.variants] == [
        ("send", "send"),
        ("edit", "edit"),
    ]
    assert kind.inner.name == "SendEditUnion" and kind.inner.tag_field == "op"
