"""Paging cursors of ``search``, ``room.members`` and ``room.list``: strings in,
positions or the exact ``bad_request`` out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imserver.protocol.cursors import (
    decode_directory_cursor,
    decode_member_cursor,
    decode_search_cursor,
    encode_directory_cursor,
    encode_member_cursor,
    encode_search_cursor,
)
from imserver.utils.errors import BadRequest
from imserver.utils.ids import RoomId

_INT64 = st.integers(min_value=0, max_value=2**63 - 1)


def test_base36_values() -> None:
    assert encode_search_cursor(35) == "z"
    assert encode_member_cursor(36) == "10"
    assert encode_member_cursor(0) == "0"
    assert decode_search_cursor("10") == 36
    assert decode_member_cursor("0") == 0


@given(_INT64.filter(lambda n: n > 0))
def test_search_cursor_round_trip(n: int) -> None:
    assert decode_search_cursor(encode_search_cursor(n)) == n


@given(_INT64)
def test_member_cursor_round_trip(n: int) -> None:
    assert decode_member_cursor(encode_member_cursor(n)) == n


@given(_INT64, st.text(st.characters(codec="ascii"), min_size=1, max_size=64))
def test_directory_cursor_round_trip(created: int, room: str) -> None:
    cursor = encode_directory_cursor(created, RoomId(room))
    assert "=" not in cursor
    assert decode_directory_cursor(cursor) == (created, room)


@pytest.mark.parametrize(
    "cursor", ["", "0", "00", "not a cursor!", "Z", "1" * 14, "zzzzzzzzzzzzzz", "-1", "+1"]
)
def test_malformed_search_cursor(cursor: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_search_cursor(cursor)
    assert (info.value.message, info.value.field) == ("malformed search cursor", "before")


@pytest.mark.parametrize("cursor", ["", "A", "1" * 14, "-1", " 1", "é"])
def test_malformed_member_cursor(cursor: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_member_cursor(cursor)
    assert (info.value.message, info.value.field) == ("malformed cursor", "after")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "MTIz",  # "123": no room
        "MTIzLg",  # "123.": an empty room
        "eC5yMQ",  # "x.r1": not a number
        "_w",  # b"\xff": not ASCII
        "a",  # one character: not base 64
    ],
)
def test_malformed_directory_cursor(cursor: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_directory_cursor(cursor)
    assert (info.value.message, info.value.field) == ("malformed cursor", "after")
