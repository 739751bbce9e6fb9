"""The one exception tree of IMServer.

Every error a client can see is an :class:`IMError`; its ``code`` is the stable
protocol error code and ``status`` the HTTP status that goes with it::

    IMError
     ├── BadRequest            bad_request          400
     ├── HelloRequired         hello_required       400
     ├── UnsupportedVersion    unsupported_version  400
     ├── Unauthorized          unauthorized         401
     ├── Forbidden             forbidden            403
     ├── NotFound              not_found            404
     ├── Conflict              conflict             409
     ├── TooLarge              too_large            413
     ├── RateLimited           rate_limited         429  (carries retry_after)
     ├── Internal              internal             500
     └── Unavailable           unavailable          503

The gateway turns any ``IMError`` into the protocol's error reply; any other
exception is logged with its traceback and answered ``internal``. Foreign
exceptions (database, network) are translated once, where they are caught.
"""

from __future__ import annotations


class IMError(Exception):
    """Base of every error that reaches a client."""

    code: str = "internal"
    status: int = 500

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.field = field
        self.rid: str | None = None
        """The request id of the frame that failed, when the failure is found before dispatch."""


class BadRequest(IMError):
    """Malformed frame, unknown op, missing or invalid field."""

    code = "bad_request"
    status = 400


class HelloRequired(IMError):
    """The first frame of a WebSocket or TCP connection was not ``hello``."""

    code = "hello_required"
    status = 400


class UnsupportedVersion(IMError):
    """``hello.v`` names a protocol version this server does not speak."""

    code = "unsupported_version"
    status = 400


class Unauthorized(IMError):
    """Not logged in, bad or expired token, wrong password."""

    code = "unauthorized"
    status = 401


class Forbidden(IMError):
    """Authenticated but not allowed: not a member, blocked, not an admin."""

    code = "forbidden"
    status = 403


class NotFound(IMError):
    """The named user, conversation, message or file does not exist."""

    code = "not_found"
    status = 404


class Conflict(IMError):
    """The request collides with existing state, e.g. a taken username."""

    code = "conflict"
    status = 409


class TooLarge(IMError):
    """A frame, body or upload exceeds its limit."""

    code = "too_large"
    status = 413


class RateLimited(IMError):
    """The connection exceeded its op rate; ``retry_after`` is in seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: float, message: str = "") -> None:
        super().__init__(message or f"rate limit exceeded, retry after {retry_after:.3f}s")
        self.retry_after = retry_after


class Internal(IMError):
    """An unexpected server fault."""

    code = "internal"
    status = 500


class Unavailable(IMError):
    """A backend service is down; retry later."""

    code = "unavailable"
    status = 503


ERRORS_BY_CODE: dict[str, type[IMError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        HelloRequired,
        UnsupportedVersion,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        TooLarge,
        RateLimited,
        Internal,
        Unavailable,
    )
}
