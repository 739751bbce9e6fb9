"""Identifier types and generators.

User ids are opaque, server-chosen, and never contain ``:`` so that conversation
ids (``d:<A>:<B>``, ``r:<room>``, ``s:<user>``) split unambiguously.
"""

from __future__ import annotations

import itertools
import secrets
from typing import NewType

UserId = NewType("UserId", str)
ConvId = NewType("ConvId", str)
RoomId = NewType("RoomId", str)
SessionId = NewType("SessionId", str)
"""A connection (WebSocket, TCP or one HTTP request) as the gateway knows it."""
LoginId = NewType("LoginId", str)
"""A login session: what ``login`` creates and ``logout`` revokes (one device's tokens)."""
FileId = NewType("FileId", str)

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def random_id(prefix: str, nbytes: int = 10) -> str:
    """Return ``prefix`` followed by a random lower-case base-36 string."""
    n = int.from_bytes(secrets.token_bytes(nbytes), "big")
    chars = []
    while n:
        n, r = divmod(n, 36)
        chars.append(_ALPHABET[r])
    return prefix + "".join(reversed(chars or ["0"]))


def new_user_id() -> UserId:
    """A fresh user id such as ``u3k9x…``."""
    return UserId(random_id("u"))


_PROCESS = random_id("c", 8)
_CONNECTIONS = itertools.count()


def new_session_id() -> SessionId:
    """A fresh connection id: this process's random prefix and a counter.

    Unique across processes and restarts, and cheap (no random bytes per connection:
    a reconnect storm makes thousands a second). The client sees it (``hello``'s
    ``session``) but no op takes it, so it grants nothing and need not be
    unpredictable; the counter tells a client how many connections this process has
    accepted, which is not a secret.
    """
    return SessionId(f"{_PROCESS}.{next(_CONNECTIONS):x}")


def new_login_id() -> LoginId:
    """A fresh login-session id."""
    return LoginId(random_id("l"))


def new_room_id() -> RoomId:
    """A fresh room id such as ``r7q2m…`` (its conversation is ``r:<id>``)."""
    return RoomId(random_id("r"))
