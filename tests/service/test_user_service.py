"""The user service against a real database: accounts, tokens, blocks, presence.

Contract tests: each runs over the ``local`` and ``loopback`` transports
(``transports.py``) and on every selected database (``sqlite``, ``postgresql``,
``mariadb``: ``tests/databases.py``); in the loopback run every call is encoded and
decoded by the serialising adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from argon2 import PasswordHasher, Type
from conformance import signature_mismatches
from databases import Databases, rows
from sqlalchemy import create_engine
from transports import local_only, through

from imserver.protocol.models import PresenceInfo, User
from imserver.services.message.api import UserDirectory as MessageUserDirectory
from imserver.services.notification.broadcast import AdminDirectory
from imserver.services.room.api import UserDirectory as RoomUserDirectory
from imserver.services.user import presence as user_presence
from imserver.services.user.api import Identity, UserService
from imserver.services.user.schema import metadata
from imserver.services.user.service import (
    MIGRATIONS,
    LocalUserService,
    default_hasher,
    open_user_service,
)
from imserver.services.user.store import AccessGrant, SqlUserStore
from imserver.storage.runners import AsyncRunner
from imserver.storage.sql import make_engine, sqlite_url, sync_url, upgrade, upgrade_sync
from imserver.utils.errors import BadRequest, Conflict, NotFound, Unauthorized
from imserver.utils.ids import LoginId, UserId

T0 = 1_700_000_000_000
PASSWORD = "correct horse"


class FakeClock:
    """Milliseconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


class CountingHasher(PasswordHasher):
    """The production argon2id parameters, counting verifications."""

    def __init__(self, memory_cost: int = 19456) -> None:
        super().__init__(time_cost=2, memory_cost=memory_cost, parallelism=1, type=Type.ID)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verifications += 1
        return super().verify(hash, password)


Opener = Callable[..., Awaitable[LocalUserService]]


@pytest.fixture
def url(databases: Databases) -> str:
    """The user database of the test, on each selected dialect."""
    return databases.url("user")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def open_service(url: str, clock: FakeClock, transport: str) -> AsyncIterator[Opener]:
    """Opens services on the test's database file (several may share it); closes them all."""
    opened: list[LocalUserService] = []

    async def opener(**kwargs: Any) -> LocalUserService:
        await upgrade(url, MIGRATIONS)
        kwargs.setdefault("clock", clock)
        service = LocalUserService(SqlUserStore.on_engine(make_engine(url)), **kwargs)
        opened.append(service)
        return through(transport, UserService, service)

    yield opener
    for service in opened:
        await service.close()


@pytest.fixture
async def svc(open_service: Opener) -> LocalUserService:
    return await open_service()


async def _user_and_login(
    svc: LocalUserService, name: str, device: str | None = None
) -> tuple[User, LoginId, str, str]:
    user = await svc.register(name, PASSWORD, None)
    result = await svc.login(name, PASSWORD, device)
    return user, result.login, result.token, result.refresh_token


async def _rejected(awaitable: Awaitable[Any]) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        await awaitable
    return info.value


# --- schema -----------------------------------------------------------------------------


def test_migrations_match_the_store_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, "user")  # every dialect: test_migrations_dialects.py
    upgrade_sync(url, MIGRATIONS)
    upgrade_sync(url, MIGRATIONS)  # a second run is a no-op
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": "alembic_version_user"}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "proto", [UserService, MessageUserDirectory, RoomUserDirectory, AdminDirectory]
)
def test_local_service_satisfies_its_protocols(proto: type) -> None:
    assert signature_mismatches(proto, LocalUserService) == []


# --- register -----------------------------------------------------------------------------


async def test_register_returns_the_user(svc: LocalUserService) -> None:
    alice = await svc.register("alice", PASSWORD, None)
    bob = await svc.register("bob.b-2_x", PASSWORD, "Bob B")
    assert alice.username == "alice"
    assert alice.display_name == "alice"
    assert alice.created == T0
    assert alice.id.startswith("u")
    assert ":" not in alice.id
    assert (bob.username, bob.display_name) == ("bob.b-2_x", "Bob B")
    assert alice.id != bob.id
    assert await svc.get_user(UserId(alice.id)) == alice


async def test_register_accepts_the_boundaries(svc: LocalUserService) -> None:
    await svc.register("abc", "x" * 8, "d")
    await svc.register("a" * 32, "x" * 256, "d" * 64)
    assert (await svc.get_user_by_name("a" * 32)).display_name == "d" * 64


@pytest.mark.parametrize(
    "username", ["", "ab", "a" * 33, "Alice", "al ice", "abc\n", "ab!c", "ünï", "a:b"]
)
async def test_register_rejects_bad_usernames(svc: LocalUserService, username: str) -> None:
    with pytest.raises(BadRequest) as info:
        await svc.register(username, PASSWORD, None)
    assert info.value.field == "username"


@pytest.mark.parametrize("password", ["", "x" * 7, "x" * 257])
async def test_register_rejects_bad_passwords(svc: LocalUserService, password: str) -> None:
    with pytest.raises(BadRequest) as info:
        await svc.register("alice", password, None)
    assert info.value.field == "password"


@pytest.mark.parametrize("display_name", ["", "x" * 65])
async def test_register_rejects_bad_display_names(svc: LocalUserService, display_name: str) -> None:
    with pytest.raises(BadRequest) as info:
        await svc.register("alice", PASSWORD, display_name)
    assert info.value.field == "display_name"


async def test_register_taken_username_conflicts(svc: LocalUserService) -> None:
    await svc.register("alice", PASSWORD, None)
    with pytest.raises(Conflict) as info:
        await svc.register("alice", "another password", "Other")
    assert info.value.message == "username taken"
    assert info.value.field == "username"


async def test_concurrent_registrations_of_one_name(svc: LocalUserService) -> None:
    results = await asyncio.gather(
        *(svc.register("alice", PASSWORD, None) for _ in range(3)), return_exceptions=True
    )
    assert sum(isinstance(r, User) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 2


# --- login and authenticate -----------------------------------------------------------


async def test_login_returns_a_working_token_pair(svc: LocalUserService) -> None:
    alice = await svc.register("alice", PASSWORD, None)
    result = await svc.login("alice", PASSWORD, "phone")
    assert result.user == alice
    assert result.expires_in == 900
    assert result.token != result.refresh_token
    assert len(result.token) >= 40
    assert result.login.startswith("l")
    identity = await svc.authenticate(result.token)
    assert identity == Identity(user=UserId(alice.id), login=result.login)


async def test_login_failures_look_the_same(open_service: Opener) -> None:
    hasher = CountingHasher()
    svc = await open_service(hasher=hasher)
    await svc.register("alice", PASSWORD, None)
    wrong = await _rejected(svc.login("alice", "wrong password", None))
    assert hasher.verifications == 1
    unknown = await _rejected(svc.login("nobody", PASSWORD, None))
    # Unknown users still cost one argon2 verification (against the dummy hash).
    assert hasher.verifications == 2
    assert wrong.message == unknown.message == "invalid username or password"
    assert wrong.field is None and unknown.field is None


async def test_login_is_case_sensitive(svc: LocalUserService) -> None:
    await svc.register("alice", PASSWORD, None)
    await _rejected(svc.login("Alice", PASSWORD, None))


async def test_each_login_is_its_own_session(svc: LocalUserService) -> None:
    await svc.register("alice", PASSWORD, None)
    first = await svc.login("alice", PASSWORD, "phone")
    second = await svc.login("alice", PASSWORD, "laptop")
    assert first.login != second.login
    assert (await svc.authenticate(first.token)).login == first.login
    assert (await svc.authenticate(second.token)).login == second.login


@pytest.mark.parametrize("token", ["", "garbage", "x" * 512])
async def test_authenticate_rejects_unknown_tokens(svc: LocalUserService, token: str) -> None:
    error = await _rejected(svc.authenticate(token))
    assert error.message == "invalid or expired token"


async def test_refresh_token_is_not_an_access_token(svc: LocalUserService) -> None:
    _, _, token, refresh = await _user_and_login(svc, "alice")
    await _rejected(svc.authenticate(refresh))
    await _rejected(svc.refresh(token))


async def test_access_token_expires(svc: LocalUserService, clock: FakeClock) -> None:
    _, login, token, _ = await _user_and_login(svc, "alice")
    clock.advance(899.999)
    assert (await svc.authenticate(token)).login == login
    clock.advance(0.001)
    await _rejected(svc.authenticate(token))
    await _rejected(svc.authenticate(token))


async def test_expired_token_read_from_the_database(open_service: Opener, clock: FakeClock) -> None:
    first = await open_service()
    _, _, token, _ = await _user_and_login(first, "alice")
    second = await open_service()  # empty token cache: must read the database
    clock.advance(900)
    await _rejected(second.authenticate(token))


async def test_zero_access_ttl_is_born_expired(open_service: Opener) -> None:
    svc = await open_service(access_ttl=0)
    _, _, token, refresh = await _user_and_login(svc, "alice")
    await _rejected(svc.authenticate(token))
    pair = await svc.refresh(refresh)
    assert pair.expires_in == 0
    await _rejected(svc.authenticate(pair.token))


async def test_outdated_hash_is_upgraded_on_login(open_service: Opener, url: str) -> None:
    weak = await open_service(hasher=CountingHasher(memory_cost=8192))
    alice = await weak.register("alice", PASSWORD, None)
    store = SqlUserStore.on_engine(make_engine(url))
    try:
        before = await store.password_hash(UserId(alice.id))
        assert before is not None and "m=8192" in before
        strong = await open_service(hasher=default_hasher())
        await strong.login("alice", PASSWORD, None)
        after = await store.password_hash(UserId(alice.id))
        assert after is not None and "$argon2id$" in after and "m=19456,t=2,p=1" in after
        await strong.login("alice", PASSWORD, None)
        assert await store.password_hash(UserId(alice.id)) == after
    finally:
        await store.close()


async def test_rehash_never_overwrites_a_newer_password(svc: LocalUserService, url: str) -> None:
    alice = UserId((await svc.register("alice", PASSWORD, None)).id)
    store = SqlUserStore.on_engine(make_engine(url))
    try:
        current = await store.password_hash(alice)
        assert current is not None
        assert await store.upgrade_password_hash(alice, "not-the-stored-hash", "x") is False
        assert await store.password_hash(alice) == current
        assert await store.upgrade_password_hash(alice, current, current + "!") is True
        assert await store.password_hash(alice) == current + "!"
    finally:
        await store.close()


class SlowGrantStore(SqlUserStore):
    """Holds every access-token read open until the test lets it finish."""

    def __init__(self, url: str) -> None:
        super().__init__(AsyncRunner(make_engine(url)))
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    async def access_grant(self, token_hash: str) -> AccessGrant | None:
        grant = await super().access_grant(token_hash)
        self.read_done.set()
        await self.release.wait()
        return grant


async def test_revocation_during_a_token_read_is_not_undone(
    open_service: Opener, url: str, clock: FakeClock
) -> None:
    first = await open_service()
    _, login, token, _ = await _user_and_login(first, "alice")
    store = SlowGrantStore(url)
    cold = LocalUserService(store, clock=clock)
    try:
        pending = asyncio.create_task(cold.authenticate(token))
        await store.read_done.wait()
        await cold.logout(login)  # deletes the row the pending read already saw
        store.release.set()
        assert (await pending).login == login  # it was valid when read
        store.read_done.clear()
        await _rejected(cold.authenticate(token))  # but it was not cached
    finally:
        await cold.close()


# --- refresh --------------------------------------------------------------------------


async def test_refresh_rotates_the_pair(svc: LocalUserService, clock: FakeClock) -> None:
    alice, login, token, refresh = await _user_and_login(svc, "alice")
    clock.advance(60)
    pair = await svc.refresh(refresh)
    assert (pair.user, pair.login, pair.expires_in) == (alice.id, login, 900)
    assert {pair.token, pair.refresh_token}.isdisjoint({token, refresh})
    assert await svc.authenticate(pair.token) == Identity(user=UserId(alice.id), login=login)
    await _rejected(svc.authenticate(token))  # the old access token died with the rotation
    # The new access token lives access_ttl from the refresh, not from the login.
    clock.advance(899)
    assert (await svc.authenticate(pair.token)).login == login
    again = await svc.refresh(pair.refresh_token)
    assert (await svc.authenticate(again.token)).login == login


async def test_reused_refresh_token_revokes_the_session(svc: LocalUserService) -> None:
    _, _, _, refresh = await _user_and_login(svc, "alice")
    pair = await svc.refresh(refresh)
    error = await _rejected(svc.refresh(refresh))
    assert error.message == "invalid or expired refresh token"
    # A replayed refresh token means two holders: the whole login session is ended.
    await _rejected(svc.authenticate(pair.token))
    await _rejected(svc.refresh(pair.refresh_token))


async def test_older_refresh_tokens_stay_dead(svc: LocalUserService) -> None:
    _, login, _, first = await _user_and_login(svc, "alice")
    second = await svc.refresh(first)
    third = await svc.refresh(second.refresh_token)
    await _rejected(svc.refresh(first))  # long gone: simply unknown
    assert (await svc.authenticate(third.token)).login == login


async def test_concurrent_refreshes_have_one_winner(svc: LocalUserService) -> None:
    _, _, _, refresh = await _user_and_login(svc, "alice")
    results = await asyncio.gather(
        svc.refresh(refresh), svc.refresh(refresh), return_exceptions=True
    )
    assert sum(isinstance(r, Unauthorized) for r in results) == 1
    assert sum(not isinstance(r, BaseException) for r in results) == 1


async def test_refresh_token_expires(open_service: Opener, clock: FakeClock) -> None:
    svc = await open_service(refresh_ttl=3600)
    _, _, _, refresh = await _user_and_login(svc, "alice")
    clock.advance(3600)
    await _rejected(svc.refresh(refresh))


# --- logout ---------------------------------------------------------------------------


async def test_logout_revokes_only_that_session(svc: LocalUserService) -> None:
    alice, phone, phone_token, phone_refresh = await _user_and_login(svc, "alice", "phone")
    laptop = await svc.login("alice", PASSWORD, "laptop")
    await svc.logout(phone)
    await _rejected(svc.authenticate(phone_token))
    await _rejected(svc.refresh(phone_refresh))
    assert await svc.authenticate(laptop.token) == Identity(
        user=UserId(alice.id), login=laptop.login
    )
    assert (await svc.refresh(laptop.refresh_token)).login == laptop.login
    await svc.logout(phone)  # idempotent
    await svc.logout(LoginId("lnosuchlogin"))


async def test_logout_reaches_tokens_read_from_the_database(open_service: Opener) -> None:
    first = await open_service()
    _, login, token, _ = await _user_and_login(first, "alice")
    second = await open_service()
    assert (await second.authenticate(token)).login == login  # now cached in `second`
    await second.logout(login)
    await _rejected(second.authenticate(token))


# --- update ---------------------------------------------------------------------------


async def test_display_names_hold_any_text(open_service: Opener, url: str) -> None:
    """NUL and the private-use escape of PostgreSQL's text codec are stored as given,
    read back by a fresh service (no cache) and by SQL."""
    names = ["nul\x00inside", "\ue000\ue001", "\x00", "emoji 😀 and ü"]
    svc = await open_service()
    users = [await svc.register(f"user{i}", PASSWORD, name) for i, name in enumerate(names)]
    fresh = await open_service()
    for user, name in zip(users, names, strict=True):
        assert (await fresh.get_user(UserId(user.id))).display_name == name
    stored = await rows(url, "SELECT display_name FROM users ORDER BY username")
    assert [r[0] for r in stored] == names
    found = await rows(url, "SELECT username FROM users WHERE display_name = :n", {"n": "\x00"})
    assert found == [("user2",)]


async def test_update_display_name(svc: LocalUserService) -> None:
    alice, login, _, _ = await _user_and_login(svc, "alice")
    uid = UserId(alice.id)
    assert (await svc.get_users([uid]))[uid].display_name == "alice"  # warm the cache
    result = await svc.update(uid, login, display_name="Alice A.")
    assert result.revoked == []
    assert result.user == User(
        id=alice.id, username="alice", display_name="Alice A.", created=alice.created
    )
    assert (await svc.get_user(uid)).display_name == "Alice A."
    assert (await svc.get_user_by_name("alice")).display_name == "Alice A."
    assert (await svc.get_users([uid]))[uid].display_name == "Alice A."
    with pytest.raises(BadRequest) as info:
        await svc.update(uid, login, display_name="")
    assert info.value.field == "display_name"


async def test_update_with_nothing_returns_the_user(svc: LocalUserService) -> None:
    alice, login, _, _ = await _user_and_login(svc, "alice")
    result = await svc.update(UserId(alice.id), login)
    assert (result.user, result.revoked) == (alice, [])


async def test_password_change_needs_the_old_password(svc: LocalUserService) -> None:
    alice, login, token, _ = await _user_and_login(svc, "alice")
    uid = UserId(alice.id)
    with pytest.raises(BadRequest) as missing:
        await svc.update(uid, login, password="new password")
    assert missing.value.field == "old_password"
    wrong = await _rejected(svc.update(uid, login, password="new password", old_password="nope"))
    assert wrong.field == "old_password"
    with pytest.raises(BadRequest) as short:
        await svc.update(uid, login, password="short", old_password=PASSWORD)
    assert short.value.field == "password"
    # Nothing changed: the old password still logs in, the session still works.
    await svc.login("alice", PASSWORD, None)
    assert (await svc.authenticate(token)).login == login


async def test_password_change_revokes_the_other_sessions(svc: LocalUserService) -> None:
    alice, here, here_token, here_refresh = await _user_and_login(svc, "alice", "phone")
    other1 = await svc.login("alice", PASSWORD, "laptop")
    other2 = await svc.login("alice", PASSWORD, "tablet")
    gone = await svc.login("alice", PASSWORD, "old")
    await svc.logout(gone.login)
    _, bob_login, bob_token, _ = await _user_and_login(svc, "bob")
    for t in (other1.token, other2.token, bob_token):
        await svc.authenticate(t)  # cache them, so the revocation must evict

    result = await svc.update(
        UserId(alice.id), here, password="new password", old_password=PASSWORD
    )
    assert sorted(result.revoked) == sorted([other1.login, other2.login])
    assert result.user == alice
    for other in (other1, other2):
        await _rejected(svc.authenticate(other.token))
        await _rejected(svc.refresh(other.refresh_token))
    assert (await svc.authenticate(here_token)).login == here
    assert (await svc.refresh(here_refresh)).login == here
    assert (await svc.authenticate(bob_token)).login == bob_login
    await _rejected(svc.login("alice", PASSWORD, None))
    assert (await svc.login("alice", "new password", None)).user == alice


# --- users ----------------------------------------------------------------------------


async def test_get_user_and_by_name(svc: LocalUserService) -> None:
    alice = await svc.register("alice", PASSWORD, "Alice")
    assert await svc.get_user(UserId(alice.id)) == alice
    assert await svc.get_user_by_name("alice") == alice
    with pytest.raises(NotFound):
        await svc.get_user(UserId("unosuchuser"))
    with pytest.raises(NotFound):
        await svc.get_user_by_name("nobody")
    with pytest.raises(NotFound):
        await svc.get_user_by_name("Alice")


async def test_get_users_returns_the_known_ones_in_order(open_service: Opener) -> None:
    first = await open_service()
    alice = await first.register("alice", PASSWORD, None)
    bob = await first.register("bob", PASSWORD, None)
    carol = await first.register("carol", PASSWORD, None)
    a, b, c = UserId(alice.id), UserId(bob.id), UserId(carol.id)
    for svc in (first, await open_service()):  # warm cache, then cold
        got = await svc.get_users([c, UserId("unknown"), a, c, b])
        assert list(got) == [c, a, b]
        assert got == {a: alice, b: bob, c: carol}
        assert await svc.get_users([]) == {}
        assert await svc.get_users(iter([UserId("unknown")])) == {}


# --- blocks ---------------------------------------------------------------------------


async def test_block_and_unblock(svc: LocalUserService) -> None:
    alice = UserId((await svc.register("alice", PASSWORD, None)).id)
    bob = UserId((await svc.register("bob", PASSWORD, None)).id)
    assert await svc.is_blocked(alice, bob) is False
    await svc.block(alice, bob)
    assert await svc.is_blocked(alice, bob) is True
    assert await svc.is_blocked(bob, alice) is False  # blocking is one-way
    await svc.block(alice, bob)  # idempotent
    assert await svc.is_blocked(alice, bob) is True
    await svc.unblock(alice, bob)
    assert await svc.is_blocked(alice, bob) is False
    await svc.unblock(alice, bob)  # no block: no error
    assert await svc.is_blocked(alice, bob) is False


async def test_blocked_pairs_answers_each_pair(svc: LocalUserService) -> None:
    alice = UserId((await svc.register("alice", PASSWORD, None)).id)
    bob = UserId((await svc.register("bob", PASSWORD, None)).id)
    carol = UserId((await svc.register("carol", PASSWORD, None)).id)
    await svc.block(alice, bob)
    await svc.block(carol, alice)
    blockers = [alice, bob, carol, alice, carol]
    blocked = [bob, alice, alice, carol, UserId("unosuchuser")]
    assert await svc.blocked_pairs(blockers, blocked) == [True, False, True, False, False]
    assert await svc.blocked_pairs([], []) == []
    await svc.unblock(alice, bob)
    assert await svc.blocked_pairs([alice], [bob]) == [False]
    with pytest.raises(BadRequest):
        await svc.blocked_pairs([alice, bob], [carol])


async def test_block_errors(svc: LocalUserService) -> None:
    alice = UserId((await svc.register("alice", PASSWORD, None)).id)
    with pytest.raises(BadRequest) as itself:
        await svc.block(alice, alice)
    assert itself.value.field == "user"
    with pytest.raises(NotFound):
        await svc.block(alice, UserId("unosuchuser"))
    with pytest.raises(NotFound):
        await svc.unblock(alice, UserId("unosuchuser"))
    assert await svc.is_blocked(alice, UserId("unosuchuser")) is False


async def test_concurrent_first_checks_load_blocks_once(open_service: Opener) -> None:
    first = await open_service()
    alice = UserId((await first.register("alice", PASSWORD, None)).id)
    bob = UserId((await first.register("bob", PASSWORD, None)).id)
    await first.block(alice, bob)
    cold = await open_service()
    checks = await asyncio.gather(*(cold.is_blocked(alice, bob) for _ in range(20)))
    assert checks == [True] * 20
    await cold.unblock(alice, bob)
    assert await cold.is_blocked(alice, bob) is False


# --- presence -------------------------------------------------------------------------


async def test_presence(svc: LocalUserService, clock: FakeClock) -> None:
    alice = UserId((await svc.register("alice", PASSWORD, None)).id)
    bob = UserId((await svc.register("bob", PASSWORD, None)).id)
    ghost = UserId("unosuchuser")
    assert await svc.get_presence([bob, ghost, alice]) == [
        PresenceInfo(user=bob, status="offline", last_seen=None),
        PresenceInfo(user=alice, status="offline", last_seen=None),
    ]
    clock.advance(10)
    assert await svc.set_online(alice) == PresenceInfo(
        user=alice, status="online", last_seen=T0 + 10_000
    )
    clock.advance(5)
    assert await svc.get_presence([alice, alice]) == [
        PresenceInfo(user=alice, status="online", last_seen=T0 + 15_000)
    ]
    clock.advance(5)
    went = await svc.set_offline(alice)
    assert went == PresenceInfo(user=alice, status="offline", last_seen=T0 + 20_000)
    clock.advance(100)
    assert await svc.get_presence([alice, bob]) == [
        PresenceInfo(user=alice, status="offline", last_seen=T0 + 20_000),
        PresenceInfo(user=bob, status="offline", last_seen=None),
    ]
    assert await svc.get_presence([]) == []
    with pytest.raises(NotFound):
        await svc.set_online(ghost)


# --- restart --------------------------------------------------------------------------


async def test_state_survives_a_restart(open_service: Opener, clock: FakeClock) -> None:
    before = await open_service()
    alice, login, token, refresh = await _user_and_login(before, "alice", "phone")
    bob = await before.register("bob", PASSWORD, "Bob")
    a, b = UserId(alice.id), UserId(bob.id)
    await before.block(a, b)
    await before.set_online(a)
    clock.advance(3)
    await before.set_offline(a)
    await before.set_online(b)  # online in memory only: gone after the restart
    await before.close()

    clock.advance(60)
    after = await open_service()
    assert await after.get_user(a) == alice
    assert await after.get_user_by_name("bob") == bob
    assert await after.authenticate(token) == Identity(user=a, login=login)
    assert await after.is_blocked(a, b) is True
    assert await after.is_blocked(b, a) is False
    assert await after.get_presence([a, b]) == [
        PresenceInfo(user=a, status="offline", last_seen=T0 + 3_000),
        PresenceInfo(user=b, status="offline", last_seen=None),
    ]
    pair = await after.refresh(refresh)
    await _rejected(after.authenticate(token))
    assert (await after.authenticate(pair.token)).login == login
    await _rejected(after.login("alice", "wrong password", None))
    assert (await after.login("alice", PASSWORD, None)).user == alice


@local_only  # reaches into the service's store
async def test_last_seen_is_written_in_batches(
    open_service: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(user_presence, "LAST_SEEN_FLUSH_S", 0.05)
    svc = await open_service()
    ids = [UserId((await svc.register(f"seen{i}", PASSWORD, None)).id) for i in range(20)]
    for uid in ids:
        await svc.set_online(uid)
    clock.advance(7)
    for uid in ids:
        await svc.set_offline(uid)
    # Answered from memory at once...
    assert {p.last_seen for p in await svc.get_presence(ids)} == {T0 + 7_000}
    # ...and in the database after one batch, without waiting for close().
    await asyncio.sleep(0.3)
    assert await svc._store.last_seen(ids) == dict.fromkeys(ids, T0 + 7_000)
    clock.advance(1)
    await svc.set_offline(ids[0])
    await svc.close()  # writes what is still pending
    after = await open_service()
    got = await after.get_presence(ids[:2])
    assert [p.last_seen for p in got] == [T0 + 8_000, T0 + 7_000]


@local_only  # reaches into the service's store
async def test_close_lets_a_last_seen_write_in_progress_finish(
    open_service: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() during a batch write waits for it instead of cancelling it: cut off in
    its transaction, the write left the database locked for the one close() starts
    ("database is locked", and the values lost)."""
    monkeypatch.setattr(user_presence, "LAST_SEEN_FLUSH_S", 0)
    svc = await open_service()
    uid = UserId((await svc.register("seen", PASSWORD, None)).id)
    store = svc._store
    write = store.set_last_seen_many
    writing, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def held_write(items: dict[UserId, int]) -> None:
        calls.append(f"write {len(items)}")
        writing.set()
        try:
            await release.wait()
            await write(items)
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise
        calls.append("done")

    monkeypatch.setattr(store, "set_last_seen_many", held_write)
    await svc.set_online(uid)
    clock.advance(5)
    await svc.set_offline(uid)
    await writing.wait()
    closing = asyncio.create_task(svc.close())
    for _ in range(5):  # close() gets as far as it can without the write
        await asyncio.sleep(0)
    release.set()
    await closing
    assert calls == ["write 1", "done", "write 0", "done"]
    after = await open_service()
    assert await after.get_presence([uid]) == [
        PresenceInfo(user=uid, status="offline", last_seen=T0 + 5_000)
    ]


async def test_open_user_service_restart_on_the_real_clock(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, "user")
    svc = await open_user_service(url, access_ttl=60, refresh_ttl=120)
    try:
        await svc.register("alice", PASSWORD, None)
        result = await svc.login("alice", PASSWORD, None)
        assert result.expires_in == 60
        await svc.set_offline(UserId(result.user.id))
    finally:
        await svc.close()
    again = await open_user_service(url)
    try:
        identity = await again.authenticate(result.token)
        assert identity == Identity(user=UserId(result.user.id), login=result.login)
        [seen] = await again.get_presence([identity.user])
        assert seen.status == "offline" and seen.last_seen is not None
        await _rejected(again.login("nobody", PASSWORD, None))
    finally:
        await again.close()


# --- the user listing and admins ---------------------------------------------------------


async def test_list_users_pages_through_every_user(open_service: Opener) -> None:
    svc = await open_service(hasher=default_hasher(1024, 1))
    ids = sorted([UserId((await svc.register(f"lister{n}", PASSWORD, None)).id) for n in range(7)])
    first = await svc.list_users(None, 3)
    assert first == ids[:3]
    second = await svc.list_users(first[-1], 3)
    assert second == ids[3:6]
    assert await svc.list_users(second[-1], 3) == ids[6:]
    assert await svc.list_users(ids[-1], 3) == []


@pytest.mark.parametrize("limit", [0, -1, 10_001])
async def test_list_users_bounds_the_page(svc: LocalUserService, limit: int) -> None:
    with pytest.raises(BadRequest) as info:
        await svc.list_users(None, limit)
    assert info.value.field == "limit"


async def test_admin_by_setting(open_service: Opener) -> None:
    svc = await open_service(admins=["root"], hasher=default_hasher(1024, 1))
    root = await svc.register("root", PASSWORD, None)
    other = await svc.register("other", PASSWORD, None)
    assert await svc.is_admin(UserId(root.id)) is True
    assert await svc.is_admin(UserId(other.id)) is False
    assert await svc.is_admin(UserId("u_nobody")) is False
    assert await svc.granted_admins() == []


async def test_admin_by_grant_until_revoked(open_service: Opener) -> None:
    svc = await open_service(hasher=default_hasher(1024, 1))
    bob = await svc.register("bob", PASSWORD, None)
    uid = UserId(bob.id)
    assert await svc.is_admin(uid) is False
    assert await svc.grant_admin("bob") is True
    assert await svc.grant_admin("bob") is False
    assert await svc.is_admin(uid) is True
    assert [u.username for u in await svc.granted_admins()] == ["bob"]
    assert await svc.revoke_admin("bob") is True
    assert await svc.revoke_admin("bob") is False
    assert await svc.is_admin(uid) is False
    assert await svc.granted_admins() == []


async def test_revoking_leaves_an_admin_of_the_setting(open_service: Opener) -> None:
    svc = await open_service(admins=["root"], hasher=default_hasher(1024, 1))
    root = await svc.register("root", PASSWORD, None)
    await svc.grant_admin("root")
    await svc.revoke_admin("root")
    assert await svc.is_admin(UserId(root.id)) is True


async def test_grants_of_unknown_users_are_not_found(svc: LocalUserService) -> None:
    with pytest.raises(NotFound):
        await svc.grant_admin("ghost")
    with pytest.raises(NotFound):
        await svc.revoke_admin("ghost")


async def test_a_grant_from_another_process_counts_at_once(open_service: Opener) -> None:
    """What ``imserver admin grant`` does beside a running server: another service on
    the same database grants, and the first sees it at its next check."""
    server = await open_service(hasher=default_hasher(1024, 1))
    command = await open_service(hasher=default_hasher(1024, 1))
    carol = await server.register("carol", PASSWORD, None)
    assert await server.is_admin(UserId(carol.id)) is False
    await command.grant_admin("carol")
    assert await server.is_admin(UserId(carol.id)) is True
    await command.revoke_admin("carol")
    assert await server.is_admin(UserId(carol.id)) is False
