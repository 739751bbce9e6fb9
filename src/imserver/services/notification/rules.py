"""Who gets a push for a stored message, and why: a pure function of what is known.

The rules, in the order they are checked (the first that applies is the reason):

1. ``sender`` — the sender never gets a push of their own message.
2. ``online`` — a live session on any device: the message reaches the user live.
3. ``muted`` — ``conv.mute`` until a time still in the future.
4. ``level`` — level ``none``; or level ``mentions`` and the message does not mention
   the user (a mention overrides a ``mentions`` level, never a mute).
5. ``no_registration`` — nothing to push to.
6. ``due`` — one push per registered device (collapsed into a waiting one if any).

Only content messages push (:data:`PUSHED_TYPES`), and ``system`` messages of the
user's own ``s:`` conversation (notices); edits, recalls, reactions and room
membership notices do not.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

Level = Literal["all", "mentions", "none"]
LEVELS: Final = ("all", "mentions", "none")

PUSHED_TYPES: Final = frozenset({"text", "image", "file", "custom"})


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Whether one member gets a push for one message, and the facts behind it."""

    due: bool
    reason: str
    """``due``, ``sender``, ``online``, ``muted``, ``level`` or ``no_registration``."""
    online: tuple[str, ...] = ()
    """The devices with a live session."""
    muted_until: int = 0
    level: str = "all"
    mentioned: bool = False


def pushes(msg_type: str, conv: str) -> bool:
    """Whether a message of this type in this conversation pushes at all."""
    return msg_type in PUSHED_TYPES or (msg_type == "system" and conv.startswith("s:"))


def decide(
    *,
    user: str,
    sender: str,
    online: tuple[str, ...],
    muted_until: int,
    level: str,
    mentioned: bool,
    registered: bool,
    now: int,
) -> Decision:
    """The decision for ``user`` (see the module's rules)."""
    if user == sender:
        reason = "sender"
    elif online:
        reason = "online"
    elif muted_until > now:
        reason = "muted"
    elif level == "none" or (level == "mentions" and not mentioned):
        reason = "level"
    elif not registered:
        reason = "no_registration"
    else:
        reason = "due"
    return Decision(
        due=reason == "due",
        reason=reason,
        online=online,
        muted_until=muted_until,
        level=level,
        mentioned=mentioned,
    )


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential from ``base`` to
    ``cap``, with full jitter (``rand`` uniform in [0, 1))."""
    return float(rand * min(cap, base * 2.0 ** (attempt - 1)))
