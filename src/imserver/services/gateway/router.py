"""The op router: one dispatch shared by WebSocket, TCP and HTTP.

Every op struct maps to one handler, registered with :meth:`Router.route` together
with the struct of its reply: mypy checks that the handler takes that op and returns
that reply (or an awaitable of it), and the router checks at start-up that the reply
is the one :data:`~imserver.protocol.ops.REPLY_TYPES` names and that no op is left
without a handler. Because all three transports call :meth:`Router.call`, an op added
here exists on every transport at once, and in the generated OpenAPI description.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import msgspec

from imserver.protocol import ops
from imserver.services.gateway.session import ADMITTED, OpContext, refusal
from imserver.utils.errors import BadRequest

OpT = TypeVar("OpT", bound=ops.Op)
ReplyT = TypeVar("ReplyT", bound=msgspec.Struct)

Handler = Callable[[OpContext, OpT], "Awaitable[ReplyT] | ReplyT"]
"""A handler of op ``OpT`` whose reply data is ``ReplyT``."""
_Erased = Callable[[OpContext, ops.Op], "Awaitable[object] | object"]


class Router:
    """Op type → handler, with admission (:data:`~.session.ADMITTED`) in one place."""

    def __init__(self) -> None:
        self._routes: dict[type[ops.Op], _Erased] = {}
        self.by_name: dict[str, type[ops.Op]] = {}

    def route(
        self, op_type: type[OpT], reply_type: type[ReplyT], handler: Handler[OpT, ReplyT]
    ) -> None:
        """Register ``handler`` for ``op_type``, whose reply data is ``reply_type``."""
        expected = ops.REPLY_TYPES[op_type]
        if reply_type is not expected:
            raise TypeError(
                f"{ops.op_name(op_type)} replies {expected.__name__}, not {reply_type.__name__}"
            )
        # The table holds every op's handler under one type; call() looks a handler up by
        # the op's own type, so each is only ever called with the op it was checked for.
        self._routes[op_type] = cast(_Erased, handler)
        self.by_name[ops.op_name(op_type)] = op_type

    def check_complete(self) -> None:
        """Raise unless every op has a handler."""
        missing = set(ops.ALL_OPS) - set(self._routes)
        if missing:
            names = ", ".join(sorted(ops.op_name(t) for t in missing))
            raise RuntimeError(f"ops without a handler: {names}")

    def call(self, ctx: OpContext, op: ops.Op) -> Awaitable[object] | object:
        """Run ``op``'s handler; raises the context state's refusal (``unauthorized``
        before authentication) when the state does not admit the op."""
        op_type = type(op)
        route = self._routes.get(op_type)
        if route is None:
            raise BadRequest(f"unknown op '{ops.op_name(op_type)}'", field="op")
        state = ctx.state
        if op_type not in ADMITTED[state]:
            raise refusal(state)
        return route(ctx, op)
