"""The client's exceptions, one tree; timeouts are the builtin :class:`TimeoutError`.

The tree::

    IMClientError
     ├── ClientError        the server answered ok: false (code, message, retry_after, field, rid)
     ├── ConnectFailed      could not connect, or the WebSocket upgrade was refused (status)
     └── ConnectionClosed   the connection is gone (reason of the server's closed event, code)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ClientError", "ConnectFailed", "ConnectionClosed", "IMClientError"]


class IMClientError(Exception):
    """Base of every exception this module raises (besides :class:`TimeoutError`)."""


class ClientError(IMClientError):
    """The server refused a request: a reply with ``ok: false`` (or an HTTP error)."""

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        retry_after: float | None = None,
        field: str | None = None,
        rid: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        """The stable protocol error code (``bad_request``, ``forbidden`` ...)."""
        self.message = message
        self.retry_after = retry_after
        """Seconds to wait, for ``rate_limited``."""
        self.field = field
        """The offending field, when the server named one."""
        self.rid = rid
        self.status = status
        """The HTTP status, for errors from :class:`HttpClient`."""

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any], *, status: int | None = None) -> ClientError:
        """The error of a failed reply (or of an HTTP error body), however malformed."""
        err = reply.get("error")
        if not isinstance(err, Mapping):
            return cls("_malformed", f"error reply without an error map: {reply!r}", status=status)
        retry = err.get("retry_after")
        field = err.get("field")
        rid = reply.get("rid")
        return cls(
            str(err.get("code", "_malformed")),
            str(err.get("message", "")),
            retry_after=float(retry) if isinstance(retry, int | float) else None,
            field=field if isinstance(field, str) else None,
            rid=rid if isinstance(rid, str) else None,
            status=status,
        )


class ConnectFailed(IMClientError):
    """The connection could not be opened (refused, unreachable, upgrade rejected)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status when the WebSocket upgrade was answered with an error."""


class ConnectionClosed(IMClientError):
    """The connection ended; pending requests and event waits fail with this."""

    def __init__(
        self,
        message: str = "connection closed",
        *,
        reason: str | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """The ``reason`` of the server's ``closed`` event, if one came."""
        self.code = code
        """The WebSocket close code, if any."""
