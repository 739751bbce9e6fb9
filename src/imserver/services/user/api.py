"""The user service's API.

The gateway and the other services call the user service only through
:class:`UserService`; the in-process implementation is
:class:`imserver.services.user.service.LocalUserService`, and a gRPC client will
satisfy the same protocol.

Tokens are opaque random strings. The service keeps only their SHA-256 hashes, so a
copy of the database cannot be replayed. An access token lives ``access_ttl``
seconds; a refresh token lives ``refresh_ttl`` seconds and is single-use: ``refresh``
returns a new pair and kills the old refresh token (and the old access token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from imserver.protocol.models import PresenceInfo, User
from imserver.utils.errors import Unauthorized
from imserver.utils.ids import LoginId, UserId


class Identity(msgspec.Struct, frozen=True):
    """What a valid access token stands for."""

    user: UserId
    login: LoginId


class RefreshTokenReused(Unauthorized):
    """A spent refresh token was presented again: the whole login session ``login`` of
    ``user`` has been revoked (someone else holds a copy). Clients see a plain
    ``unauthorized``; the gateways also close the live connections of that login
    session."""

    def __init__(self, message: str, *, login: LoginId, user: UserId) -> None:
        super().__init__(message)
        self.login = login
        self.user = user


class LoginResult(msgspec.Struct, frozen=True, kw_only=True):
    user: User
    login: LoginId
    token: str
    refresh_token: str
    expires_in: int


class TokenPair(msgspec.Struct, frozen=True, kw_only=True):
    user: UserId
    login: LoginId
    token: str
    refresh_token: str
    expires_in: int


class UpdateResult(msgspec.Struct, frozen=True, kw_only=True):
    """``revoked`` lists the login sessions a password change ended."""

    user: User
    revoked: list[LoginId]


class UserService(Protocol):
    """Accounts, tokens, blocks, presence records and admin rights."""

    async def register(self, username: str, password: str, display_name: str | None) -> User:
        """Create an account. ``conflict`` if the username is taken.

        ``display_name`` defaults to the username.
        """

    async def login(self, username: str, password: str, device: str | None) -> LoginResult:
        """Check the password (argon2id) and open a login session with a token pair.

        ``unauthorized`` for an unknown user or a wrong password (the same message
        for both, so usernames cannot be probed).
        """

    async def authenticate(self, token: str) -> Identity:
        """Resolve an access token. ``unauthorized`` if unknown, expired or revoked."""

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate the token pair of a login session; the old refresh token dies.

        ``unauthorized`` for an unknown or expired token; :class:`RefreshTokenReused`
        (an ``unauthorized``) when a spent one comes back and its session was revoked.
        """

    async def logout(self, login: LoginId) -> None:
        """Revoke a login session's tokens."""

    async def get_user(self, user: UserId) -> User:
        """``not_found`` if there is no such user."""

    async def get_user_by_name(self, username: str) -> User:
        """``not_found`` if there is no such user."""

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]:
        """The users that exist among ``users`` (unknown ids are simply absent)."""

    async def update(
        self,
        user: UserId,
        login: LoginId,
        *,
        display_name: str | None = None,
        password: str | None = None,
        old_password: str | None = None,
    ) -> UpdateResult:
        """Change the profile and/or the password.

        A password change needs ``old_password`` (``unauthorized`` if wrong,
        ``bad_request`` if missing) and revokes every other login session of the user.
        """

    async def block(self, user: UserId, target: UserId) -> None:
        """``user`` stops receiving direct messages from ``target``."""

    async def unblock(self, user: UserId, target: UserId) -> None:
        """Undo :meth:`block` (no error if there was no block)."""

    async def is_blocked(self, blocker: UserId, blocked: UserId) -> bool:
        """Whether ``blocker`` has blocked ``blocked``. Cached: called on every direct send."""

    async def blocked_pairs(
        self, blockers: Sequence[UserId], blocked: Sequence[UserId]
    ) -> list[bool]:
        """For each ``i``, whether ``blockers[i]`` has blocked ``blocked[i]``: one call
        for every direct conversation of a message-writer batch, instead of one call
        per message (a round trip each when the user service is remote).
        ``bad_request`` when the two lists differ in length."""

    async def list_users(self, after: UserId | None, limit: int) -> list[UserId]:
        """A page of every user's id, ascending: up to ``limit`` ids after ``after``
        (``None``: from the start). The next page starts after the last id answered;
        a short page is the last. ``bad_request`` for a ``limit`` outside 1-10,000."""

    async def is_admin(self, user: UserId) -> bool:
        """Whether ``user`` may use the admin ops: named in the ``admins`` setting or
        granted with :meth:`grant_admin`. ``False`` for an unknown user."""

    async def grant_admin(self, username: str) -> bool:
        """Grant admin rights durably; whether it was not granted before.
        ``not_found`` for an unknown username."""

    async def revoke_admin(self, username: str) -> bool:
        """Take a grant back; whether there was one. A user named in the ``admins``
        setting stays an admin. ``not_found`` for an unknown username."""

    async def granted_admins(self) -> list[User]:
        """The users holding a grant, by username (the setting's names not included)."""

    async def set_online(self, user: UserId) -> PresenceInfo | None:
        """Record that the user's first live session on a gateway opened; ``None``
        when another gateway instance holds one already (they were online: nothing
        to announce)."""

    async def set_offline(self, user: UserId) -> PresenceInfo:
        """Record that the user's last live session on a gateway closed (``last_seen``
        = now); the status answered is ``online`` while another gateway instance still
        holds a live session of the user."""

    async def get_presence(self, users: Sequence[UserId]) -> list[PresenceInfo]:
        """Presence of each known user among ``users``, in the order asked."""

    async def check(self) -> None:
        """Raise ``unavailable`` if the service's database cannot be reached."""

    async def close(self) -> None:
        """Release the store."""
