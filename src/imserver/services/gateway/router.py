"""The op router: one dispatch table shared by WebSocket, TCP and HTTP.

Every op struct maps to one handler. Because all three transports call
:meth:`Router.call`, an op added to the table exists on every transport at once,
and in the generated OpenAPI description.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from imserver.protocol import ops
from imserver.utils.errors import BadRequest, Unauthorized

if TYPE_CHECKING:
    from imserver.services.gateway.session import Session

Handler = Callable[["Session", Any], "Awaitable[Any] | Any"]

PUBLIC_OPS: frozenset[type[ops.Op]] = frozenset(
    {ops.Hello, ops.Register, ops.Login, ops.Auth, ops.Refresh, ops.Ping}
)
"""Ops allowed before authentication."""


class Router:
    """Op type → handler, with the authentication rule applied in one place."""

    def __init__(self, handlers: dict[type[ops.Op], Handler]) -> None:
        missing = set(ops.ALL_OPS) - set(handlers)
        if missing:
            names = ", ".join(sorted(ops.op_name(t) for t in missing))
            raise RuntimeError(f"ops without a handler: {names}")
        self._handlers = handlers
        self.by_name: dict[str, type[ops.Op]] = {ops.op_name(t): t for t in handlers}

    def call(self, session: Session, op: ops.Op) -> Awaitable[Any] | Any:
        """Run ``op``'s handler; raises ``unauthorized`` when it needs a user."""
        op_type = type(op)
        handler = self._handlers.get(op_type)
        if handler is None:
            raise BadRequest(f"unknown op '{ops.op_name(op_type)}'", field="op")
        if session.caller is None and op_type not in PUBLIC_OPS:
            raise Unauthorized("not authenticated: send login or auth first")
        return handler(session, op)
