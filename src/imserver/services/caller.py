"""Who is calling a service: the authenticated user and the connection it came from."""

from __future__ import annotations

import msgspec

from imserver.utils.ids import LoginId, SessionId, UserId


class Caller(msgspec.Struct, frozen=True):
    """The identity behind an op.

    ``session`` is the gateway connection the op arrived on; fan-out skips it, so the
    sender's own connection does not receive its message back while the sender's
    other devices do. ``login`` is the login session whose token authenticated it.
    """

    user: UserId
    login: LoginId
    session: SessionId | None = None
