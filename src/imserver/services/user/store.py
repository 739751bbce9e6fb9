"""The user service's SQL store: accounts, login sessions, token hashes, blocks, presence,
admin grants.

Portable SQLAlchemy Core only, so the same code runs on SQLite, PostgreSQL and MySQL,
on the tables of :mod:`~imserver.services.user.schema`.

Invariants the service relies on:

- Every multi-step write starts with the statement that decides it (a conditional
  ``UPDATE`` or an ``INSERT`` guarded by a constraint). pysqlite only opens a
  transaction at the first write, so a ``SELECT`` before it is not isolated; ordering
  the deciding write first keeps the logic correct on every driver and takes SQLite's
  write lock up front instead of failing a lock upgrade later.
- A token row exists only while it can still matter: revoking a login session deletes
  its token rows. After a rotation the spent refresh token is kept (``used`` set) until
  the next rotation, so a replay of it can be recognised.
- Timestamps are integer milliseconds supplied by the caller (the service's clock).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from imserver.protocol.models import User
from imserver.services.user.schema import (
    ACCESS,
    REFRESH,
    admin_grants,
    blocks,
    logins,
    presence,
    tokens,
    users,
)
from imserver.storage.runners import SqlStore
from imserver.storage.statements import chunks
from imserver.utils.errors import Conflict, NotFound
from imserver.utils.ids import LoginId, UserId


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """A user together with the stored password hash (never leaves the service)."""

    user: User
    password_hash: str


class NewToken(msgspec.Struct, frozen=True, kw_only=True):
    """A token row to insert: the SHA-256 hex of the token, never the token itself."""

    hash: str
    kind: str
    expires: int


class AccessGrant(msgspec.Struct, frozen=True, kw_only=True):
    """What a live access token resolves to."""

    user: UserId
    login: LoginId
    expires: int


class Rotation(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of :meth:`SqlUserStore.rotate`.

    ``status`` is ``"ok"`` (the new pair is stored), ``"reused"`` (the refresh token
    was already spent; the login session has been revoked) or ``"invalid"``.
    ``dropped`` are the hashes of token rows that stopped working, for cache eviction.
    """

    status: str
    user: UserId | None = None
    login: LoginId | None = None
    dropped: list[str] = msgspec.field(default_factory=list)


def _user(row: Sequence[Any]) -> User:
    # Rows start with the columns of _USER_COLUMNS, in that order.
    return User(id=row[0], username=row[1], display_name=row[2], created=row[3])


_USER_COLUMNS = (users.c.id, users.c.username, users.c.display_name, users.c.created)


class SqlUserStore(SqlStore):
    """All of the user service's persistent state in one SQL database."""

    name = "user database"

    # --- accounts ---------------------------------------------------------------------

    async def create_user(self, user: User, password_hash: str) -> None:
        """Insert an account and its (empty) presence record.

        Raises :class:`Conflict` if the username is taken.
        """

        def run(conn: Connection) -> None:
            conn.execute(
                insert(users).values(
                    id=user.id,
                    username=user.username,
                    display_name=user.display_name,
                    password_hash=password_hash,
                    created=user.created,
                )
            )
            conn.execute(insert(presence).values(user_id=user.id, last_seen=None))

        try:
            await self._write(run)
        except IntegrityError as exc:
            # The only constraint a fresh random id can realistically hit is the username.
            if await self.user_by_name(user.username) is not None:
                raise Conflict("username taken", field="username") from exc
            raise

    async def user_by_id(self, user: UserId) -> User | None:
        """One user, or ``None``."""
        return await self._read(_one_user, users.c.id == user)

    async def user_by_name(self, username: str) -> User | None:
        """One user by username, or ``None``."""
        return await self._read(_one_user, users.c.username == username)

    async def users_by_id(self, ids: Sequence[UserId]) -> list[User]:
        """The users that exist among ``ids`` (any order)."""
        if not ids:
            return []

        def run(conn: Connection) -> list[User]:
            found: list[User] = []
            for chunk in chunks(ids):
                result = conn.execute(select(*_USER_COLUMNS).where(users.c.id.in_(chunk)))
                found.extend(_user(row) for row in result)
            return found

        return await self._read(run)

    async def user_ids_after(self, after: UserId | None, limit: int) -> list[UserId]:
        """Up to ``limit`` user ids greater than ``after``, ascending (a keyset page)."""
        query = select(users.c.id).order_by(users.c.id).limit(limit)
        if after is not None:
            query = query.where(users.c.id > after)

        def run(conn: Connection) -> list[UserId]:
            return [UserId(row[0]) for row in conn.execute(query)]

        return await self._read_replica(run)

    async def credentials(self, username: str) -> Credentials | None:
        """The account and password hash for a login attempt, or ``None``."""

        def run(conn: Connection) -> Credentials | None:
            row = conn.execute(
                select(*_USER_COLUMNS, users.c.password_hash).where(users.c.username == username)
            ).first()
            if row is None:
                return None
            return Credentials(user=_user(row), password_hash=row[4])

        return await self._read(run)

    async def password_hash(self, user: UserId) -> str | None:
        """The stored password hash of a user, or ``None`` if there is no such user."""

        def run(conn: Connection) -> str | None:
            value = conn.scalar(select(users.c.password_hash).where(users.c.id == user))
            return None if value is None else str(value)

        return await self._read(run)

    async def upgrade_password_hash(self, user: UserId, old_hash: str, new_hash: str) -> bool:
        """Swap in a re-hash of the same password (argon2 parameter upgrade).

        Only if the stored hash is still ``old_hash``: a password change that landed
        in the meantime must not be overwritten by a hash of the old password.
        """

        def run(conn: Connection) -> bool:
            result = conn.execute(
                update(users)
                .where(users.c.id == user, users.c.password_hash == old_hash)
                .values(password_hash=new_hash)
            )
            return bool(result.rowcount)

        return await self._write(run)

    async def set_display_name(self, user: UserId, display_name: str) -> User:
        """Change a display name; :class:`NotFound` if there is no such user."""

        def run(conn: Connection) -> User:
            result = conn.execute(
                update(users).where(users.c.id == user).values(display_name=display_name)
            )
            if result.rowcount == 0:
                raise NotFound(f"no user {user}", field="user")
            return _user(conn.execute(select(*_USER_COLUMNS).where(users.c.id == user)).one())

        return await self._write(run)

    async def change_password(
        self, user: UserId, keep: LoginId, password_hash: str, now: int
    ) -> tuple[list[LoginId], list[str]]:
        """Store a new hash and revoke every live login session of ``user`` but ``keep``.

        Returns the revoked login ids and the hashes of the token rows deleted.
        """

        def run(conn: Connection) -> tuple[list[LoginId], list[str]]:
            result = conn.execute(
                update(users).where(users.c.id == user).values(password_hash=password_hash)
            )
            if result.rowcount == 0:
                raise NotFound(f"no user {user}", field="user")
            others = [
                LoginId(row[0])
                for row in conn.execute(
                    select(logins.c.id).where(
                        logins.c.user_id == user,
                        logins.c.revoked.is_(None),
                        logins.c.id != keep,
                    )
                )
            ]
            return others, _revoke(conn, others, now)

        return await self._write(run)

    # --- login sessions and tokens ----------------------------------------------------

    async def create_login(
        self,
        login: LoginId,
        user: UserId,
        device: str | None,
        now: int,
        new_tokens: Sequence[NewToken],
    ) -> None:
        """Open a login session with its first tokens."""

        def run(conn: Connection) -> None:
            conn.execute(
                insert(logins).values(
                    id=login, user_id=user, device=device, created=now, revoked=None
                )
            )
            _insert_tokens(conn, login, new_tokens)

        await self._write(run)

    async def access_grant(self, token_hash: str) -> AccessGrant | None:
        """Resolve an access-token hash of a live login session (expiry not checked)."""
        query = (
            select(logins.c.user_id, tokens.c.login_id, tokens.c.expires)
            .select_from(tokens.join(logins, logins.c.id == tokens.c.login_id))
            .where(
                tokens.c.hash == token_hash,
                tokens.c.kind == ACCESS,
                logins.c.revoked.is_(None),
            )
        )

        def run(conn: Connection) -> AccessGrant | None:
            row = conn.execute(query).first()
            if row is None:
                return None
            return AccessGrant(user=UserId(row[0]), login=LoginId(row[1]), expires=row[2])

        return await self._read(run)

    async def rotate(self, refresh_hash: str, now: int, new_tokens: Sequence[NewToken]) -> Rotation:
        """Spend a refresh token and store ``new_tokens`` for the same login session.

        Every other token of the session is deleted; the spent refresh token stays,
        marked ``used``, until the next rotation. Presenting a spent token again is
        taken as theft (someone holds a copy) and revokes the whole login session.
        """

        def run(conn: Connection) -> Rotation:
            # The conditional UPDATE is the single point that decides who wins a race
            # between two refreshes with the same token.
            spent = conn.execute(
                update(tokens)
                .where(
                    tokens.c.hash == refresh_hash,
                    tokens.c.kind == REFRESH,
                    tokens.c.used.is_(None),
                    tokens.c.expires > now,
                )
                .values(used=now)
            )
            row = conn.execute(
                select(tokens.c.login_id, tokens.c.used, logins.c.user_id, logins.c.revoked)
                .select_from(tokens.join(logins, logins.c.id == tokens.c.login_id))
                .where(tokens.c.hash == refresh_hash, tokens.c.kind == REFRESH)
            ).first()
            if row is None:
                return Rotation(status="invalid")
            login, used, user, revoked = LoginId(row[0]), row[1], UserId(row[2]), row[3]
            if revoked is not None:
                return Rotation(status="invalid")
            if spent.rowcount == 0:
                if used is not None:
                    dropped = _revoke(conn, [login], now)
                    return Rotation(status="reused", user=user, login=login, dropped=dropped)
                return Rotation(status="invalid")  # expired
            stale = [
                r[0]
                for r in conn.execute(
                    select(tokens.c.hash).where(
                        tokens.c.login_id == login, tokens.c.hash != refresh_hash
                    )
                )
            ]
            if stale:
                conn.execute(
                    delete(tokens).where(tokens.c.login_id == login, tokens.c.hash != refresh_hash)
                )
            _insert_tokens(conn, login, new_tokens)
            return Rotation(status="ok", user=user, login=login, dropped=stale)

        return await self._write(run)

    async def revoke_login(self, login: LoginId, now: int) -> list[str]:
        """Revoke one login session; returns the hashes of the token rows deleted."""
        return await self._write(_revoke, [login], now)

    async def purge_expired_tokens(self, now: int) -> int:
        """Delete token rows past their expiry; returns how many went."""

        def run(conn: Connection) -> int:
            return int(conn.execute(delete(tokens).where(tokens.c.expires <= now)).rowcount)

        return await self._write(run)

    # --- blocks -----------------------------------------------------------------------

    async def blocked_by(self, user: UserId) -> set[UserId]:
        """Everyone ``user`` has blocked."""

        def run(conn: Connection) -> set[UserId]:
            result = conn.execute(select(blocks.c.target_id).where(blocks.c.user_id == user))
            return {UserId(row[0]) for row in result}

        return await self._read(run)

    async def add_block(self, user: UserId, target: UserId, now: int) -> None:
        """Record a block; already present is fine (no dialect-specific upsert needed)."""

        def run(conn: Connection) -> None:
            conn.execute(insert(blocks).values(user_id=user, target_id=target, created=now))

        def exists(conn: Connection) -> bool:
            return bool(
                conn.scalar(
                    select(func.count())
                    .select_from(blocks)
                    .where(and_(blocks.c.user_id == user, blocks.c.target_id == target))
                )
            )

        try:
            await self._write(run)
        except IntegrityError as exc:
            if not await self._read(exists):
                # Not the primary key, so a foreign key: one of the users is missing.
                raise NotFound("no such user", field="user") from exc

    async def remove_block(self, user: UserId, target: UserId) -> None:
        """Drop a block if present."""

        def run(conn: Connection) -> None:
            conn.execute(
                delete(blocks).where(blocks.c.user_id == user, blocks.c.target_id == target)
            )

        await self._write(run)

    # --- admin grants -----------------------------------------------------------------

    async def is_granted(self, user: UserId) -> bool:
        """Whether ``user`` holds an admin grant."""

        def run(conn: Connection) -> bool:
            query = select(admin_grants.c.user_id).where(admin_grants.c.user_id == user)
            return conn.execute(query).first() is not None

        return await self._read(run)

    async def set_grant(self, user: UserId, granted: bool, now: int) -> bool:
        """Grant (or revoke) admin rights; whether anything changed."""

        def run(conn: Connection) -> bool:
            held = conn.execute(delete(admin_grants).where(admin_grants.c.user_id == user)).rowcount
            if granted:
                conn.execute(insert(admin_grants).values(user_id=user, granted=now))
                return not held
            return bool(held)

        return await self._write(run)

    async def granted_users(self) -> list[User]:
        """Every user holding an admin grant, by username."""
        query = (
            select(*_USER_COLUMNS)
            .select_from(admin_grants.join(users, users.c.id == admin_grants.c.user_id))
            .order_by(users.c.username)
        )

        def run(conn: Connection) -> list[User]:
            return [_user(row) for row in conn.execute(query)]

        return await self._read(run)

    # --- presence ---------------------------------------------------------------------

    async def last_seen(self, ids: Sequence[UserId]) -> dict[UserId, int | None]:
        """Stored ``last_seen`` of each user among ``ids`` that has a presence record."""
        if not ids:
            return {}

        def run(conn: Connection) -> dict[UserId, int | None]:
            seen: dict[UserId, int | None] = {}
            for chunk in chunks(ids):
                result = conn.execute(
                    select(presence.c.user_id, presence.c.last_seen).where(
                        presence.c.user_id.in_(chunk)
                    )
                )
                seen.update((UserId(row[0]), row[1]) for row in result)
            return seen

        return await self._read(run)

    async def set_last_seen_many(self, items: Mapping[UserId, int]) -> None:
        """Store many ``last_seen`` values in one transaction (one commit)."""
        if not items:
            return
        p = presence.c

        def run(conn: Connection) -> set[UserId]:
            result = conn.execute(
                update(presence)
                .where(p.user_id == bindparam("k_user"))
                .values(last_seen=bindparam("k_seen")),
                [{"k_user": u, "k_seen": t} for u, t in items.items()],
            )
            if result.rowcount == len(items):
                return set(items)
            return set(conn.execute(select(p.user_id).where(p.user_id.in_(list(items)))).scalars())

        found = await self._write(run)
        for user, when in items.items():
            if user not in found:
                await self.set_last_seen(user, when)

    async def set_last_seen(self, user: UserId, when: int) -> None:
        """Store ``last_seen``; creates the record if the account predates it."""

        def run(conn: Connection) -> int:
            return int(
                conn.execute(
                    update(presence).where(presence.c.user_id == user).values(last_seen=when)
                ).rowcount
            )

        def create(conn: Connection) -> None:
            conn.execute(insert(presence).values(user_id=user, last_seen=when))

        if await self._write(run):
            return
        # Update-then-insert instead of a dialect-specific upsert; a racing insert of
        # the same row lands in IntegrityError and the update is simply retried.
        try:
            await self._write(create)
        except IntegrityError:
            await self._write(run)


def _one_user(conn: Connection, where: Any) -> User | None:
    row = conn.execute(select(*_USER_COLUMNS).where(where)).first()
    return None if row is None else _user(row)


def _insert_tokens(conn: Connection, login: LoginId, new_tokens: Sequence[NewToken]) -> None:
    conn.execute(
        insert(tokens),
        [
            {"hash": t.hash, "login_id": login, "kind": t.kind, "expires": t.expires}
            for t in new_tokens
        ],
    )


def _revoke(conn: Connection, ids: Sequence[LoginId], now: int) -> list[str]:
    """Revoke the login sessions ``ids``; the hashes of the token rows deleted."""
    dropped: list[str] = []
    for chunk in chunks(ids):
        dropped.extend(
            r[0] for r in conn.execute(select(tokens.c.hash).where(tokens.c.login_id.in_(chunk)))
        )
        conn.execute(delete(tokens).where(tokens.c.login_id.in_(chunk)))
        conn.execute(
            update(logins)
            .where(logins.c.id.in_(chunk), logins.c.revoked.is_(None))
            .values(revoked=now)
        )
    return dropped
