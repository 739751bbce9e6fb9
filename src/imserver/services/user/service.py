"""The in-process user service: accounts, argon2id passwords, tokens, blocks, presence, admins.

What lives in memory, and why it stays correct:

- **Access tokens**: a bounded map token-hash -> (identity, expiry). Every path that
  kills a token in this process (refresh, logout, password change, refresh-token
  reuse) evicts the hashes the store reports as deleted, so a revoked token fails at
  once here. Another process sharing the database would keep accepting it from its own
  cache until the token expires (at most ``access_ttl``).
- **Users**: a bounded map id -> :class:`User`. Only ``display_name`` ever changes, and
  only through :meth:`LocalUserService.update`, which replaces the cached object.
  Returned ``User`` objects are shared: callers must treat them as read-only.
- **Blocks**: each blocker's set, loaded on first use (one load per user even under
  concurrency) and then kept in step by :meth:`~LocalUserService.block` /
  :meth:`~LocalUserService.unblock`, which always load before writing.
- **Presence**: the online set and the ``last_seen`` cache, kept by
  :class:`~imserver.services.user.presence.Presence` (its module says how
  ``last_seen`` reaches the database); this service checks the users exist.

Password hashing (argon2id, 19 MiB, t=2, p=1) runs in worker threads, at most one per
CPU at a time: more would only queue inside the CPU while multiplying memory use.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from imserver.protocol.models import PresenceInfo, User
from imserver.services.user.api import (
    Identity,
    LoginResult,
    RefreshTokenReused,
    TokenPair,
    UpdateResult,
)
from imserver.services.user.bounded import Bounded
from imserver.services.user.online import MemoryOnlineStore, OnlineStore
from imserver.services.user.presence import Presence
from imserver.services.user.schema import ACCESS, REFRESH
from imserver.services.user.store import NewToken, SqlUserStore
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.clock import now_ms
from imserver.utils.errors import BadRequest, Conflict, NotFound, Unauthorized, Unavailable
from imserver.utils.ids import LoginId, UserId, new_login_id, new_user_id

MIGRATIONS = "imserver.services.user.migrations"

USERNAME_RE = re.compile(r"[a-z0-9_.-]{3,32}")
PASSWORD_MIN, PASSWORD_MAX = 8, 256
DISPLAY_NAME_MIN, DISPLAY_NAME_MAX = 1, 64

BAD_LOGIN = "invalid username or password"
BAD_TOKEN = "invalid or expired token"
BAD_REFRESH = "invalid or expired refresh token"
BAD_OLD_PASSWORD = "old password is wrong"

TOKEN_CACHE_SIZE = 100_000
USER_CACHE_SIZE = 100_000
BLOCK_CACHE_SIZE = 100_000
LIST_USERS_MAX = 10_000
"""Most user ids one :meth:`LocalUserService.list_users` page answers."""
PURGE_INTERVAL_MS = 3_600_000
"""How often (at most) expired token rows are swept, piggy-backed on ``login``."""


def default_hasher(memory_kib: int = 19456, time_cost: int = 2) -> PasswordHasher:
    """argon2id, by default with the OWASP minimum: 19 MiB memory, 2 iterations, 1 lane."""
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1, type=Type.ID)


def token_hash(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and cached."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _CachedAccess:
    __slots__ = ("expires", "identity")

    def __init__(self, identity: Identity, expires: int) -> None:
        self.identity = identity
        self.expires = expires


class LocalUserService:
    """The in-process :class:`~imserver.services.user.api.UserService`.

    ``admins``: the usernames of the ``admins`` setting (admins besides the grants).
    ``clock`` returns the current time in integer milliseconds; tests pass a fake one.
    ``dummy_hash`` is an argon2 hash of an unguessable password, verified on logins
    for unknown usernames so they take as long as real ones.
    """

    def __init__(
        self,
        store: SqlUserStore,
        *,
        access_ttl: int = 900,
        refresh_ttl: int = 30 * 86400,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], int] = now_ms,
        dummy_hash: str | None = None,
        admins: Iterable[str] = (),
        online: OnlineStore | None = None,
    ) -> None:
        if access_ttl < 0 or refresh_ttl < 0:
            raise ValueError("token lifetimes must not be negative")
        self._store = store
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._hasher = hasher or default_hasher()
        self._clock = clock
        self._dummy_hash = dummy_hash
        self._admins = frozenset(admins)
        self._hash_slots = asyncio.Semaphore(os.cpu_count() or 1)
        self._tokens: Bounded[str, _CachedAccess] = Bounded(TOKEN_CACHE_SIZE)
        # Bumped by every revocation / profile write; a database read that overlapped
        # one does not overwrite the cache with what it saw.
        self._token_epoch = 0
        self._user_epoch = 0
        self._users: Bounded[UserId, User] = Bounded(USER_CACHE_SIZE)
        self._ids_by_name: Bounded[str, UserId] = Bounded(USER_CACHE_SIZE)
        self._blocks: Bounded[UserId, set[UserId]] = Bounded(BLOCK_CACHE_SIZE)
        self._block_loads: dict[UserId, asyncio.Task[set[UserId]]] = {}
        self._presence = Presence(store, clock, online or MemoryOnlineStore())
        self._last_purge = clock()

    # --- password hashing, off the event loop -----------------------------------------

    async def _hash(self, password: str) -> str:
        async with self._hash_slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def _verify(self, password_hash: str, password: str) -> bool:
        async with self._hash_slots:
            try:
                return await asyncio.to_thread(self._hasher.verify, password_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_urlsafe(32))
        return self._dummy_hash

    # --- accounts ---------------------------------------------------------------------

    async def register(self, username: str, password: str, display_name: str | None) -> User:
        """Create an account; ``display_name`` defaults to the username.

        ``bad_request`` (field ``username``, ``password`` or ``display_name``) for a value
        outside the protocol's rules, ``conflict`` "username taken" if it is taken.
        """
        _check_username(username)
        _check_password(password, "password")
        if display_name is not None:
            _check_display_name(display_name)
        # Cheap early answer before the expensive hash; the unique constraint still
        # decides a race between two registrations of the same name.
        if await self._store.user_by_name(username) is not None:
            raise Conflict("username taken", field="username")
        password_hash = await self._hash(password)
        user = User(
            id=new_user_id(),
            username=username,
            display_name=display_name if display_name is not None else username,
            created=self._clock(),
        )
        await self._store.create_user(user, password_hash)
        self._remember(user, self._user_epoch)
        self._presence.registered(UserId(user.id))
        return user

    async def login(self, username: str, password: str, device: str | None) -> LoginResult:
        """Verify the password and open a login session with a fresh token pair.

        Unknown user and wrong password both answer ``unauthorized``
        "invalid username or password", after the same amount of hashing work.
        """
        epoch = self._user_epoch
        creds = await self._store.credentials(username)
        if creds is None:
            await self._verify(await self._dummy(), password)
            raise Unauthorized(BAD_LOGIN)
        if not await self._verify(creds.password_hash, password):
            raise Unauthorized(BAD_LOGIN)
        user_id = UserId(creds.user.id)
        if self._hasher.check_needs_rehash(creds.password_hash):
            await self._store.upgrade_password_hash(
                user_id, creds.password_hash, await self._hash(password)
            )
        now = self._clock()
        login = new_login_id()
        access, refresh, rows = self._new_pair(now)
        await self._store.create_login(login, user_id, device, now, rows)
        self._cache_access(rows[0], Identity(user=user_id, login=login))
        self._remember(creds.user, epoch)
        if now - self._last_purge >= PURGE_INTERVAL_MS:
            self._last_purge = now
            await self._store.purge_expired_tokens(now)
        return LoginResult(
            user=creds.user,
            login=login,
            token=access,
            refresh_token=refresh,
            expires_in=self._access_ttl,
        )

    async def authenticate(self, token: str) -> Identity:
        """Resolve an access token; ``unauthorized`` if unknown, expired or revoked.

        A hit in the token cache costs one hash and one dict lookup.
        """
        key = token_hash(token)
        now = self._clock()
        cached = self._tokens.get(key)
        if cached is None:
            epoch = self._token_epoch
            grant = await self._store.access_grant(key)
            if grant is None:
                raise Unauthorized(BAD_TOKEN)
            cached = _CachedAccess(Identity(user=grant.user, login=grant.login), grant.expires)
            # A revocation that ran during the read may have found nothing to evict;
            # caching this grant would then resurrect the token until it expires.
            if now < cached.expires and epoch == self._token_epoch:
                self._tokens.put(key, cached)
        if now >= cached.expires:
            self._tokens.pop(key)
            raise Unauthorized(BAD_TOKEN)
        return cached.identity

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate a login session's tokens.

        The presented refresh token and the session's previous access token stop
        working. Presenting an already-spent refresh token again revokes the whole
        login session (someone else holds a copy) and answers ``unauthorized``.
        """
        now = self._clock()
        access, refresh, rows = self._new_pair(now)
        outcome = await self._store.rotate(token_hash(refresh_token), now, rows)
        self._evict(outcome.dropped)
        if outcome.status == "reused" and outcome.login is not None and outcome.user is not None:
            raise RefreshTokenReused(BAD_REFRESH, login=outcome.login, user=outcome.user)
        if outcome.status != "ok" or outcome.user is None or outcome.login is None:
            raise Unauthorized(BAD_REFRESH)
        self._cache_access(rows[0], Identity(user=outcome.user, login=outcome.login))
        return TokenPair(
            user=outcome.user,
            login=outcome.login,
            token=access,
            refresh_token=refresh,
            expires_in=self._access_ttl,
        )

    async def logout(self, login: LoginId) -> None:
        """Revoke a login session's tokens; unknown or already revoked is not an error."""
        self._evict(await self._store.revoke_login(login, self._clock()))

    async def get_user(self, user: UserId) -> User:
        """One user; ``not_found`` if there is no such user."""
        cached = self._users.get(user)
        if cached is not None:
            return cached
        epoch = self._user_epoch
        found = await self._store.user_by_id(user)
        if found is None:
            raise NotFound(f"no user {user}", field="user")
        self._remember(found, epoch)
        return found

    async def get_user_by_name(self, username: str) -> User:
        """One user by username (exact, case-sensitive); ``not_found`` if none."""
        # Usernames never change, so a cached name -> id mapping is never stale.
        uid = self._ids_by_name.get(username)
        if uid is not None:
            return await self.get_user(uid)
        epoch = self._user_epoch
        found = await self._store.user_by_name(username)
        if found is None:
            raise NotFound(f"no user named {username}", field="username")
        self._remember(found, epoch)
        return found

    async def get_users(self, users: Iterable[UserId]) -> dict[UserId, User]:
        """The users that exist among ``users``, in the order first asked."""
        asked = list(dict.fromkeys(users))
        known = {uid: u for uid in asked if (u := self._users.get(uid)) is not None}
        if len(known) < len(asked):
            missing = [uid for uid in asked if uid not in known]
            epoch = self._user_epoch
            for found in await self._store.users_by_id(missing):
                self._remember(found, epoch)
                known[UserId(found.id)] = found
        return {uid: known[uid] for uid in asked if uid in known}

    async def update(
        self,
        user: UserId,
        login: LoginId,
        *,
        display_name: str | None = None,
        password: str | None = None,
        old_password: str | None = None,
    ) -> UpdateResult:
        """Change the display name and/or the password.

        A password change needs ``old_password`` (``bad_request`` field
        ``old_password`` if missing, ``unauthorized`` if wrong) and revokes every other
        live login session of the user; ``login`` (the caller's) stays.
        """
        if display_name is not None:
            _check_display_name(display_name)
        revoked: list[LoginId] = []
        if password is not None:
            _check_password(password, "password")
            if old_password is None:
                raise BadRequest(
                    "old_password is required to change the password", field="old_password"
                )
            current = await self._store.password_hash(user)
            if current is None:
                raise NotFound(f"no user {user}", field="user")
            if not await self._verify(current, old_password):
                raise Unauthorized(BAD_OLD_PASSWORD, field="old_password")
            new_hash = await self._hash(password)
            revoked, dropped = await self._store.change_password(
                user, login, new_hash, self._clock()
            )
            self._evict(dropped)
        if display_name is not None:
            updated = await self._store.set_display_name(user, display_name)
            self._user_epoch += 1
            self._remember(updated, self._user_epoch)
            return UpdateResult(user=updated, revoked=revoked)
        return UpdateResult(user=await self.get_user(user), revoked=revoked)

    async def list_users(self, after: UserId | None, limit: int) -> list[UserId]:
        """A page of user ids, ascending, after ``after`` (keyset paging: a user
        registered meanwhile with a higher id still comes in a later page)."""
        if not 1 <= limit <= LIST_USERS_MAX:
            raise BadRequest(f"limit must be 1-{LIST_USERS_MAX}", field="limit")
        return await self._store.user_ids_after(after, limit)

    # --- admins -----------------------------------------------------------------------
    # Grants are read from the database on every check, not cached: `imserver admin`
    # changes them from another process while the server runs, and the admin ops that
    # ask are rare.

    async def is_admin(self, user: UserId) -> bool:
        """Named in the ``admins`` setting, or granted; ``False`` for an unknown user."""
        try:
            found = await self.get_user(user)
        except NotFound:
            return False
        return found.username in self._admins or await self._store.is_granted(user)

    async def grant_admin(self, username: str) -> bool:
        """Grant admin rights; whether the user held no grant before."""
        user = await self.get_user_by_name(username)
        return await self._store.set_grant(UserId(user.id), True, self._clock())

    async def revoke_admin(self, username: str) -> bool:
        """Take a grant back; whether there was one."""
        user = await self.get_user_by_name(username)
        return await self._store.set_grant(UserId(user.id), False, self._clock())

    async def granted_admins(self) -> list[User]:
        """The users holding a grant, by username."""
        return await self._store.granted_users()

    # --- blocks -----------------------------------------------------------------------

    async def block(self, user: UserId, target: UserId) -> None:
        """``user`` stops receiving direct messages from ``target``; idempotent.

        ``bad_request`` (field ``user``) for oneself, ``not_found`` for an unknown target.
        """
        if target == user:
            raise BadRequest("cannot block yourself", field="user")
        await self.get_user(target)
        blocked = await self._block_set(user)
        if target in blocked:
            return
        await self._store.add_block(user, target, self._clock())
        blocked.add(target)

    async def unblock(self, user: UserId, target: UserId) -> None:
        """Undo :meth:`block`; no error if there was no block.

        ``bad_request`` for oneself and ``not_found`` for an unknown target, as for block.
        """
        if target == user:
            raise BadRequest("cannot unblock yourself", field="user")
        await self.get_user(target)
        blocked = await self._block_set(user)
        if target not in blocked:
            return
        await self._store.remove_block(user, target)
        blocked.discard(target)

    async def is_blocked(self, blocker: UserId, blocked: UserId) -> bool:
        """Whether ``blocker`` has blocked ``blocked``: a set lookup once loaded."""
        cached = self._blocks.get(blocker)
        if cached is None:
            cached = await self._block_set(blocker)
        return blocked in cached

    async def blocked_pairs(
        self, blockers: Sequence[UserId], blocked: Sequence[UserId]
    ) -> list[bool]:
        """:meth:`is_blocked` of each pair, from the same cached block sets."""
        if len(blockers) != len(blocked):
            raise BadRequest("blockers and blocked differ in length", field="blocked")
        return [await self.is_blocked(a, b) for a, b in zip(blockers, blocked, strict=True)]

    async def _block_set(self, user: UserId) -> set[UserId]:
        cached = self._blocks.get(user)
        if cached is not None:
            return cached
        # One load per user at a time, so a block written while a load is in flight
        # cannot be overwritten by that load's older result.
        task = self._block_loads.get(user)
        if task is None:
            task = asyncio.ensure_future(self._load_blocks(user))
            self._block_loads[user] = task
        return await asyncio.shield(task)

    async def _load_blocks(self, user: UserId) -> set[UserId]:
        try:
            loaded = await self._store.blocked_by(user)
            self._blocks.put(user, loaded)
            return loaded
        finally:
            del self._block_loads[user]

    # --- presence ---------------------------------------------------------------------

    async def set_online(self, user: UserId) -> PresenceInfo | None:
        """Mark the user online (their first live session on a gateway opened);
        ``None`` when another gateway instance holds one already."""
        await self.get_user(user)
        return await self._presence.set_online(user)

    async def set_offline(self, user: UserId) -> PresenceInfo:
        """Mark the user offline and store ``last_seen`` = now; the answer says
        ``online`` when another gateway instance still holds a live session."""
        await self.get_user(user)
        return await self._presence.set_offline(user)

    async def get_presence(self, users: Sequence[UserId]) -> list[PresenceInfo]:
        """Presence of each known user among ``users``, in the order asked.

        Unknown ids are left out and a repeated id is reported once. Online users have
        ``last_seen`` = now; offline ones the time their last session closed, or
        ``None`` if they were never seen.
        """
        return await self._presence.get(await self.get_users(users))

    async def check(self) -> None:
        """Raise if the user database cannot be reached (readiness probe)."""
        try:
            await self._store.check()
        except Exception as exc:
            raise Unavailable("user database unreachable") from exc

    async def close(self) -> None:
        """Write pending ``last_seen`` values and dispose the database engine."""
        await self._presence.close()
        await self._store.close()

    # --- helpers ----------------------------------------------------------------------

    def _new_pair(self, now: int) -> tuple[str, str, list[NewToken]]:
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        rows = [
            NewToken(hash=token_hash(access), kind=ACCESS, expires=now + self._access_ttl * 1000),
            NewToken(
                hash=token_hash(refresh), kind=REFRESH, expires=now + self._refresh_ttl * 1000
            ),
        ]
        return access, refresh, rows

    def _remember(self, user: User, epoch: int) -> None:
        """Cache ``user`` as read when ``_user_epoch`` was ``epoch``.

        A read that overlapped a profile update may hold the old display name, so it
        must not replace what the update cached; the id <-> name mapping never changes.
        """
        uid = UserId(user.id)
        self._ids_by_name.put(user.username, uid)
        if epoch == self._user_epoch or uid not in self._users:
            self._users.put(uid, user)

    def _cache_access(self, row: NewToken, identity: Identity) -> None:
        self._tokens.put(row.hash, _CachedAccess(identity, row.expires))

    def _evict(self, hashes: Iterable[str]) -> None:
        self._token_epoch += 1
        for h in hashes:
            self._tokens.pop(h)


def _check_username(username: str) -> None:
    if USERNAME_RE.fullmatch(username) is None:
        raise BadRequest("username must be 3-32 of a-z 0-9 _ . -", field="username")


def _check_password(password: str, field: str) -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise BadRequest(f"password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters", field=field)


def _check_display_name(display_name: str) -> None:
    if not DISPLAY_NAME_MIN <= len(display_name) <= DISPLAY_NAME_MAX:
        raise BadRequest(
            f"display_name must be {DISPLAY_NAME_MIN}-{DISPLAY_NAME_MAX} characters",
            field="display_name",
        )


async def open_user_service(
    url: str,
    *,
    access_ttl: int = 900,
    refresh_ttl: int = 30 * 86400,
    argon2_memory_kib: int = 19456,
    argon2_time_cost: int = 2,
    admins: Iterable[str] = (),
    read_url: str | None = None,
    online: OnlineStore | None = None,
) -> LocalUserService:
    """Migrate the database at ``url`` to the latest schema and start the service on it.

    Stored hashes made with other argon2 parameters keep verifying; they are re-hashed
    with the current ones at the next successful login. ``read_url``: a replica the
    user directory listing (``list_users``) is read from. ``online``: the online set
    (in memory by default).
    """
    await upgrade(url, MIGRATIONS)
    hasher = default_hasher(argon2_memory_kib, argon2_time_cost)
    # Pay for the dummy hash now rather than on the first unknown-user login, whose
    # doubled latency would otherwise reveal that the username does not exist.
    dummy = await asyncio.to_thread(hasher.hash, secrets.token_urlsafe(32))
    return LocalUserService(
        SqlUserStore.on_engine(
            make_engine(url), make_engine(read_url) if read_url is not None else None
        ),
        access_ttl=access_ttl,
        refresh_ttl=refresh_ttl,
        hasher=hasher,
        dummy_hash=dummy,
        admins=admins,
        online=online,
    )
