"""Admin notices: ``notice.broadcast`` posts one notice into many users' ``s:``
conversations.

Who may: a user the user service calls an admin (:meth:`AdminDirectory.is_admin`:
named in the ``admins`` setting, or granted with ``imserver admin grant``), asked
on every call, so a grant or a revocation takes effect at once.

Whom: ``to`` names up to :data:`~imserver.protocol.ops.BROADCAST_MAX_USERS` user
ids — unknown ones are answered in ``unknown``, not refused, so one stale id does
not cost the rest their notice — or is ``"all"``: every user, read from the user
service a page at a time (a user who registers during the broadcast may or may not
get it).

Fast: the notices of a page go to the message service in one call
(:meth:`NoticePoster.post_system_many`), which queues them all before awaiting any,
so the group-commit writer stores thousands in a few transactions instead of one
commit per user.

Idempotent: with a client ``cid`` the broadcast id is derived from (admin, cid), and
that id is the idempotency key of every notice in its user's conversation. A retry
(after a lost reply, a reconnect, a restart) posts nothing twice: each user who
already holds the notice answers ``dup``, and one the first attempt did not reach
gets it now. Without ``cid`` every call is a new broadcast.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from imserver.protocol import ops
from imserver.protocol.models import User
from imserver.services.caller import Caller
from imserver.utils.errors import BadRequest, Forbidden, TooLarge
from imserver.utils.ids import UserId, random_id

PAGE = 2_000
"""User ids read (and notices queued) per step of a ``to: "all"`` broadcast."""


class AdminDirectory(Protocol):
    """What broadcasts need of the user service."""

    async def is_admin(self, user: UserId) -> bool: ...

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]: ...

    async def list_users(self, after: UserId | None, limit: int) -> list[UserId]: ...


class NoticePoster(Protocol):
    """What broadcasts need of the message service."""

    async def post_system_many(
        self, users: Sequence[UserId], body: str, meta: dict[str, Any] | None, cid: str
    ) -> list[ops.SendData]: ...


class BroadcastService(Protocol):
    """``notice.broadcast``, as the gateway calls it."""

    async def broadcast(self, caller: Caller, req: ops.NoticeBroadcast) -> ops.BroadcastData:
        """Post ``req.body`` into the ``s:`` conversation of each user of ``req.to``;
        resolves after every notice is committed. ``forbidden`` for a caller who is
        not an admin, ``too_large`` for a body over ``max_body`` characters,
        ``bad_request`` for an empty one."""


def broadcast_id(admin: UserId, cid: str | None) -> str:
    """The id of a broadcast: derived from (admin, cid) when there is a cid, so a
    retry is the same broadcast; random otherwise."""
    if cid is None:
        return random_id("bc-")
    digest = hashlib.sha256(f"{admin}\n{cid}".encode()).hexdigest()
    return f"bc-{digest[:32]}"


class LocalBroadcastService:
    """:class:`BroadcastService` in process, over the user and message services."""

    def __init__(
        self, *, users: AdminDirectory, messages: NoticePoster, max_body: int = 16384
    ) -> None:
        self._users = users
        self._messages = messages
        self._max_body = max_body

    async def broadcast(self, caller: Caller, req: ops.NoticeBroadcast) -> ops.BroadcastData:
        """Check the caller and the body, then post page by page."""
        if not await self._users.is_admin(caller.user):
            raise Forbidden("notice.broadcast is for admins")
        if not req.body:
            raise BadRequest("body must not be empty", field="body")
        if len(req.body) > self._max_body:
            raise TooLarge(f"body longer than {self._max_body} characters", field="body")
        bid = broadcast_id(caller.user, req.cid)
        meta: dict[str, Any] = {"broadcast": bid}
        results: list[ops.SendData] = []
        unknown: list[str] = []
        if req.to == "all":
            after: UserId | None = None
            while True:
                page = await self._users.list_users(after, PAGE)
                if page:
                    results += await self._messages.post_system_many(page, req.body, meta, bid)
                    after = page[-1]
                if len(page) < PAGE:
                    break
        else:
            asked = [UserId(u) for u in dict.fromkeys(req.to)]
            known = await self._users.get_users(asked)
            unknown = [u for u in asked if u not in known]
            if known:
                results = await self._messages.post_system_many(list(known), req.body, meta, bid)
        return ops.BroadcastData(
            id=bid,
            reached=len(results),
            unknown=unknown,
            dup=bool(results) and all(r.dup for r in results),
        )
