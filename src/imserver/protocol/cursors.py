"""Paging cursors: the opaque ``next`` strings of ``search``, ``room.members`` and
``room.list``, and their parsing when a client passes one back.

Clients treat a cursor as opaque (docs/protocol.md §4.10, §5); what is inside is the
position the next page starts after:

- ``search``: the storage id of the page's oldest message, base 36 (``before``);
- ``room.members``: the join order of the page's last member, base 36 (``after``);
- ``room.list``: ``<created>.<room>`` of the page's last room, unpadded URL-safe
  base 64 (``after``): rooms created in the same millisecond are told apart by id.

A string that is not a cursor of its kind is ``bad_request`` naming the field it came
in, with the same message whatever is wrong with it.
"""

from __future__ import annotations

import base64
import binascii

from imserver.utils.errors import BadRequest
from imserver.utils.ids import RoomId

__all__ = [
    "decode_directory_cursor",
    "decode_member_cursor",
    "decode_search_cursor",
    "encode_directory_cursor",
    "encode_member_cursor",
    "encode_search_cursor",
]

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_B36_MAX_DIGITS = 13
"""Enough for any signed 64-bit value (36**13 > 2**63)."""


def _encode_b36(n: int) -> str:
    digits = []
    while n:
        n, r = divmod(n, 36)
        digits.append(_B36[r])
    return "".join(reversed(digits)) or "0"


def _decode_b36(cursor: str) -> int | None:
    """The value of a base-36 cursor, or None if it is not one."""
    if not cursor or len(cursor) > _B36_MAX_DIGITS or any(ch not in _B36 for ch in cursor):
        return None
    return int(cursor, 36)


def encode_search_cursor(message_id: int) -> str:
    """The ``next`` of a ``search`` page whose oldest message has this storage id."""
    return _encode_b36(message_id)


def decode_search_cursor(cursor: str) -> int:
    """The storage id a ``search`` ``before`` cursor names (``bad_request`` otherwise)."""
    value = _decode_b36(cursor)
    if value is None or value <= 0:
        raise BadRequest("malformed search cursor", field="before")
    return value


def encode_member_cursor(join_order: int) -> str:
    """The ``next`` of a ``room.members`` page whose last member has this join order."""
    return _encode_b36(join_order)


def decode_member_cursor(cursor: str) -> int:
    """The join order a ``room.members`` ``after`` cursor names (``bad_request`` otherwise)."""
    value = _decode_b36(cursor)
    if value is None:
        raise BadRequest("malformed cursor", field="after")
    return value


def encode_directory_cursor(created: int, room: RoomId) -> str:
    """The ``next`` of a ``room.list`` page whose last room is this one."""
    raw = f"{created}.{room}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_directory_cursor(cursor: str) -> tuple[int, RoomId]:
    """The (created, room) a ``room.list`` ``after`` cursor names (``bad_request``
    otherwise)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        created, _, room = raw.partition(".")
        if not room:
            raise ValueError(cursor)
        return int(created), RoomId(room)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("malformed cursor", field="after") from None
