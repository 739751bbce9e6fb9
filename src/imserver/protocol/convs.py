"""Conversation ids: their grammar, parsed once, and how each kind is built.

A conversation id names its kind and its members' source (docs/protocol.md §4.1):

- ``d:<A>:<B>``: the direct conversation of users ``A`` and ``B``, named in plain
  string order (``A < B``), so each pair of users has exactly one id;
- ``r:<room>``: the conversation of a room;
- ``s:<user>``: a user's read-only system conversation (notices).

User and room ids never contain ``:`` (``utils/ids.py``), so an id splits
unambiguously. Parsing checks the syntax only: whether the users or the room exist,
and whether the caller belongs, is the message service's question.
"""

from __future__ import annotations

from dataclasses import dataclass

from imserver.protocol.models import ConvKind
from imserver.utils.errors import BadRequest
from imserver.utils.ids import ConvId, RoomId, UserId

__all__ = ["ConvRef", "direct_conv", "parse_conv", "room_conv", "system_conv"]


@dataclass(frozen=True, slots=True)
class ConvRef:
    """A parsed conversation id. ``a``/``b``: the two users of a direct
    conversation; ``a`` alone: the room of ``r:`` or the user of ``s:``."""

    id: ConvId
    kind: ConvKind
    a: str
    b: str = ""


def parse_conv(conv: str) -> ConvRef:
    """Parse and validate the syntax of a conversation id (``bad_request`` otherwise)."""
    prefix, sep, rest = conv.partition(":")
    if sep and rest:
        if prefix == "d":
            a, sep2, b = rest.partition(":")
            if not sep2 or not a or not b or ":" in b:
                raise BadRequest(f"malformed direct conversation id {conv!r}", field="conv")
            if a == b:
                raise BadRequest("a direct conversation needs two different users", field="conv")
            if not a < b:
                raise BadRequest(
                    f"direct conversation ids name the users in order: d:{b}:{a}", field="conv"
                )
            return ConvRef(ConvId(conv), "direct", a, b)
        if prefix == "r" and ":" not in rest:
            return ConvRef(ConvId(conv), "room", rest)
        if prefix == "s" and ":" not in rest:
            return ConvRef(ConvId(conv), "system", rest)
    raise BadRequest(f"malformed conversation id {conv!r}", field="conv")


def direct_conv(a: str, b: str) -> ConvId:
    """The id of the direct conversation of users ``a`` and ``b``: ``d:<min>:<max>``."""
    return ConvId(f"d:{a}:{b}" if a < b else f"d:{b}:{a}")


def room_conv(room: RoomId) -> ConvId:
    """The id of a room's conversation: ``r:<room>``."""
    return ConvId(f"r:{room}")


def system_conv(user: UserId) -> ConvId:
    """The id of a user's system conversation: ``s:<user>``."""
    return ConvId(f"s:{user}")
