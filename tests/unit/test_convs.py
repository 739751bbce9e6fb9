"""Conversation ids (docs/protocol.md §4.1): strings in, parsed ids or the exact
``bad_request`` out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imserver.protocol.convs import ConvRef, direct_conv, parse_conv, room_conv, system_conv
from imserver.utils.errors import BadRequest
from imserver.utils.ids import RoomId, UserId


@pytest.mark.parametrize(
    ("conv", "parsed"),
    [
        ("d:u1:u2", ConvRef("d:u1:u2", "direct", "u1", "u2")),
        ("d:u10:u2", ConvRef("d:u10:u2", "direct", "u10", "u2")),  # plain string order
        ("r:r7q2m", ConvRef("r:r7q2m", "room", "r7q2m")),
        ("s:u1", ConvRef("s:u1", "system", "u1")),
    ],
)
def test_well_formed(conv: str, parsed: ConvRef) -> None:
    assert parse_conv(conv) == parsed


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        ("x:abc", "malformed conversation id 'x:abc'"),
        ("d:", "malformed conversation id 'd:'"),
        ("s:", "malformed conversation id 's:'"),
        ("r:", "malformed conversation id 'r:'"),
        ("abc", "malformed conversation id 'abc'"),
        ("", "malformed conversation id ''"),
        (":u1", "malformed conversation id ':u1'"),
        ("s:u1:x", "malformed conversation id 's:u1:x'"),
        ("r:r1:x", "malformed conversation id 'r:r1:x'"),
        ("d:u1", "malformed direct conversation id 'd:u1'"),
        ("d:u1:", "malformed direct conversation id 'd:u1:'"),
        ("d::u1", "malformed direct conversation id 'd::u1'"),
        ("d:u1:u2:u3", "malformed direct conversation id 'd:u1:u2:u3'"),
        ("d:u1:u1", "a direct conversation needs two different users"),
        ("d:u2:u1", "direct conversation ids name the users in order: d:u1:u2"),
    ],
)
def test_malformed(conv: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_conv(conv)
    assert (info.value.message, info.value.field) == (message, "conv")


def test_builders() -> None:
    assert direct_conv("u2", "u10") == direct_conv("u10", "u2") == "d:u10:u2"
    assert room_conv(RoomId("r7q2m")) == "r:r7q2m"
    assert system_conv(UserId("u1")) == "s:u1"


_ID = st.text(st.characters(blacklist_characters=":"), min_size=1, max_size=20)


@given(_ID, _ID)
def test_direct_conv_parses_back(a: str, b: str) -> None:
    if a == b:
        with pytest.raises(BadRequest):
            parse_conv(direct_conv(a, b))
        return
    ref = parse_conv(direct_conv(a, b))
    assert (ref.kind, {ref.a, ref.b}, ref.a < ref.b) == ("direct", {a, b}, True)


@given(_ID)
def test_room_and_system_convs_parse_back(name: str) -> None:
    assert parse_conv(room_conv(RoomId(name))) == ConvRef(f"r:{name}", "room", name)
    assert parse_conv(system_conv(UserId(name))) == ConvRef(f"s:{name}", "system", name)
