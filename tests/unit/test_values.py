"""Free-form values (``send.meta``) across both codecs (docs/protocol.md §1.5).

The property: whatever JSON value a client puts in ``meta``, in whichever codec it
can be written, the server either refuses the frame with ``bad_request`` naming
``meta``, or accepts a value that both codecs encode back to the same value. The
oracle deciding which is written here independently of the server's checker.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imserver.protocol.codec import Codec, EncodedEvent, decode_op, decode_op_as
from imserver.protocol.events import Msg
from imserver.protocol.ops import Send
from imserver.protocol.values import value_problem
from imserver.utils.errors import BadRequest

CONV = "d:u1:u2"


def frame(meta: Any) -> dict[str, Any]:
    return {
        "op": "send",
        "rid": "r1",
        "conv": CONV,
        "cid": "c1",
        "type": "text",
        "body": "",
        "meta": meta,
    }


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def outside_model(value: Any) -> bool:
    """The oracle: True when some codec could not carry ``value`` (§1.5)."""
    if depth(value) > 32:
        return True
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            pass
        elif isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                return True
        elif isinstance(item, float) and not math.isfinite(item):
            return True
    return False


def encodings(meta: Any) -> list[tuple[Codec, bytes, Any]]:
    """The frame in every codec that can write it, with the ``meta`` it then carries
    (a JSON encoder writes NaN as null; MessagePack has no integers past 64 bits)."""
    out = []
    for codec, module in ((Codec.JSON, msgspec.json), (Codec.MSGPACK, msgspec.msgpack)):
        try:
            data = module.encode(frame(meta))
        except (OverflowError, RecursionError):
            continue
        out.append((codec, data, module.decode(data)["meta"]))
    return out


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"n": 2**63 - 1}, None),
        ({"n": -(2**63)}, None),
        ({"n": 2**63}, "integer at meta.n is outside the signed 64-bit range"),
        ({"n": -(2**63) - 1}, "integer at meta.n is outside the signed 64-bit range"),
        ({"a": [0, 2**64]}, "integer at meta.a[1] is outside the signed 64-bit range"),
        ({"f": 1e308, "b": True, "z": None}, None),
        ({"f": math.nan}, "nan at meta.f is not a finite number"),
        ({"f": -math.inf}, "-inf at meta.f is not a finite number"),
        ({"x": b"\x00"}, "bytes value at meta.x has no JSON equivalent"),
        ({1: "x"}, "map keys must be strings, not int, at meta"),
        (nested(32), None),
        (nested(33), "nested deeper than 32 levels at meta" + ".k[0]" * 16),
        (nested(100_000), "nested deeper than 32 levels at meta" + "[0].k" * 16),
    ],
)
def test_value_problem_at_the_edges(meta: Any, problem: str | None) -> None:
    assert value_problem(meta, "meta") == problem


@pytest.mark.parametrize(
    "meta", [{"n": 2**64 - 1}, {"n": 2**63}, {"n": -(2**63) - 1}, {"n": 10**30}, nested(33)]
)
def test_refused_in_every_codec_that_can_send_it_with_the_rid(meta: Any) -> None:
    sent = encodings(meta)
    assert sent
    for codec, data, _ in sent:
        with pytest.raises(BadRequest) as info:
            decode_op(data, codec)
        assert (info.value.code, info.value.field, info.value.rid) == ("bad_request", "meta", "r1")


def test_refused_over_http_too() -> None:
    with pytest.raises(BadRequest) as info:
        decode_op_as(msgspec.json.encode(frame({"n": 2**64})), Send)
    assert (info.value.code, info.value.field) == ("bad_request", "meta")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2)
    | st.integers(min_value=2**63 - 2, max_value=2**63 + 2)
    | st.floats()
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=60,
)
metas = st.dictionaries(st.text(), json_values, max_size=4) | st.builds(
    lambda levels, leaf: {"deep": nested(levels) if leaf is None else [nested(levels), leaf]},
    st.integers(min_value=25, max_value=40),
    st.none() | json_values,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas)
def test_any_meta_is_refused_or_carried_by_both_codecs(meta: dict[str, Any]) -> None:
    for codec, data, sent in encodings(meta):
        try:
            op = decode_op(data, codec)
        except BadRequest as exc:
            assert (exc.code, exc.field, exc.rid) == ("bad_request", "meta", "r1")
            assert outside_model(sent), f"refused a value both codecs can carry: {exc.message}"
            continue
        assert isinstance(op, Send) and op.meta == sent
        assert not outside_model(sent), "accepted a value one codec cannot carry"
        event = EncodedEvent(
            Msg(conv=CONV, seq=1, from_="u1", ts=1, type="text", body="", cid="c1", meta=op.meta)
        )
        for out in (Codec.JSON, Codec.MSGPACK):
            encoded = event.for_codec(out)
            decoder = msgspec.json.decode if out is Codec.JSON else msgspec.msgpack.decode
            assert decoder(encoded)["meta"] == op.meta
