"""Accounts, login sessions and tokens (docs/protocol.md §3) and users, presence, blocking (§6).

Every error test checks the exact ``code`` (and ``field`` where the server names one),
that the connection still answers a ``ping`` afterwards, and that nothing was stored or
changed.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import TYPE_CHECKING, Any

import pytest
from metrics import metric, scrape_server, server_metric_reaches

from imserver.client import Client, ClientError, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Account, Clients, ServerFactory, ServerProcess, Wire

PASSWORD = "correct-horse-battery"  # what the harness gives every account it creates
BAD_LOGIN = "invalid username or password"
BAD_TOKEN = "invalid or expired token"
BAD_REFRESH = "invalid or expired refresh token"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fresh_name(prefix: str = "u") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


async def refused(
    c: Client, op: str, fields: dict[str, Any] | None = None, **kw: Any
) -> tuple[str, str | None]:
    """Run ``op`` expecting a refusal; returns (code, field) and checks the connection
    still answers a ping."""
    with pytest.raises(ClientError) as info:
        await c.request(op, fields, **kw)
    assert info.value.message, info.value
    assert await c.ping() == {}
    return info.value.code, info.value.field


def user_shape(user: dict[str, Any], username: str, display_name: str) -> None:
    assert set(user) >= {"id", "username", "display_name", "created"}, user
    assert isinstance(user["id"], str) and user["id"] and ":" not in user["id"]
    assert (user["username"], user["display_name"]) == (username, display_name)
    assert isinstance(user["created"], int) and abs(user["created"] - now_ms()) < 60_000


# --- register --------------------------------------------------------------------------

INVALID_REGISTRATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("username too short", {"username": "ab"}, "username"),
    ("username too long", {"username": "a" * 33}, "username"),
    ("username upper case", {"username": "Alice_x"}, "username"),
    ("username with a space", {"username": "al ice"}, "username"),
    ("username with a trailing newline", {"username": "alice_nl\n"}, "username"),
    ("username not ascii", {"username": "zoë_abc"}, "username"),
    ("username empty", {"username": ""}, "username"),
    ("username not a string", {"username": 12345}, "username"),
    ("username missing", {"username": None}, "username"),
    ("password too short", {"password": "7chars!"}, "password"),
    ("password too long", {"password": "p" * 257}, "password"),
    ("password missing", {"password": None}, "password"),
    ("display_name empty", {"display_name": ""}, "display_name"),
    ("display_name too long", {"display_name": "d" * 65}, "display_name"),
]


async def test_register_validation(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.connect(shared_server)
    for case, change, field in INVALID_REGISTRATIONS:
        username = fresh_name("reg")
        fields: dict[str, Any] = {"username": username, "password": PASSWORD, **change}
        fields = {k: v for k, v in fields.items() if v is not None}
        assert await refused(c, "register", fields) == ("bad_request", field), case
        # Nothing was stored: the (valid) username is still free.
        if field != "username":
            user = await c.register(username, PASSWORD)
            assert user["username"] == username, case
    # A valid name that was refused for its form cannot log in either.
    assert await refused(c, "login", username="Alice_x", password=PASSWORD) == (
        "unauthorized",
        None,
    )


async def test_register_limits_are_inclusive(
    shared_server: ServerProcess, clients: Clients
) -> None:
    alphabet = string.ascii_lowercase + string.digits
    short = "".join(secrets.choice(alphabet) for _ in range(3))
    long = ("z9_.-" + secrets.token_hex(16))[:32]
    for username, password, display_name in (
        (short, "p" * 8, None),
        (long, "ü" * 256, "D" * 64),
        (fresh_name("uni"), PASSWORD, "Zoë 🦊 ☕"),
    ):
        c = await clients.connect(shared_server, "tcp", "msgpack")
        user = await c.register(username, password, display_name)
        user_shape(user, username, display_name or username)
        data = await c.login(username, password)
        assert data["user"] == user


async def test_register_taken_username_is_conflict(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    account: Account = await register_user(shared_server, "taken")
    c = await clients.connect(shared_server, "ws", "msgpack")
    code = await refused(c, "register", username=account.username, password="other-password-1")
    assert code == ("conflict", "username")
    # The first account is untouched: its password works, the second one does not.
    assert await refused(c, "login", username=account.username, password="other-password-1") == (
        "unauthorized",
        None,
    )
    assert (await c.login(account.username, account.password))["user"] == account.user


# --- login / auth / refresh / logout -----------------------------------------------------


async def test_login_returns_tokens_and_authenticates_the_connection(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.connect(shared_server)
    username = fresh_name("login")
    user = await c.register(username, PASSWORD)
    user_shape(user, username, username)
    # Registering does not log in.
    assert await refused(c, "convs") == ("unauthorized", None)
    data = await c.login(username, PASSWORD)
    assert set(data) >= {"user", "token", "refresh_token", "expires_in"}
    assert data["user"] == user
    assert isinstance(data["token"], str) and data["token"]
    assert isinstance(data["refresh_token"], str) and data["refresh_token"] != data["token"]
    assert data["expires_in"] == 900
    assert await c.convs() == []

    # The token authenticates a new connection of any transport as the same user.
    other = await clients.connect(shared_server, "tcp" if wire.transport == "ws" else "ws", "json")
    assert await refused(other, "convs") == ("unauthorized", None)
    assert await other.auth(data["token"]) == {"user": user}
    assert await other.convs() == []
    # Both connections are live sessions of the user: a message reaches both.
    peer = await clients.user(shared_server, "peer")
    conv = Client.direct_conv(user["id"], peer.user_id)
    await peer.send_message(conv, "to both")
    for conn in (c, other):
        assert (await conn.next_event("msg"))["body"] == "to both"


async def test_login_failures(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    account: Account = await register_user(shared_server, "lf")
    c = await clients.connect(shared_server)
    for username, password in (
        (account.username, "wrong-password"),
        (account.username.upper(), account.password),  # usernames are case-sensitive
        (fresh_name("nobody"), account.password),
    ):
        with pytest.raises(ClientError) as info:
            await c.login(username, password)
        assert (info.value.code, info.value.message) == ("unauthorized", BAD_LOGIN)
        assert await c.ping() == {}
        assert await refused(c, "convs") == ("unauthorized", None)
    # Bad tokens: garbage, and a refresh token presented as an access token.
    tokens = await clients.connect(shared_server, "tcp", "json", login_as=account)
    for token in ("garbage-token", tokens.refresh_token, tokens.token + "x"):
        with pytest.raises(ClientError) as info:
            await c.auth(token)
        assert (info.value.code, info.value.message) == ("unauthorized", BAD_TOKEN)
        assert await c.ping() == {}
        assert await refused(c, "convs") == ("unauthorized", None)


async def test_login_on_an_authenticated_connection(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    account: Account = await register_user(shared_server, "relog")
    c = await clients.connect(shared_server, "ws", "json", login_as=account)
    # An unknown username is a login failure like any other, never not_found.
    with pytest.raises(ClientError) as info:
        await c.login(fresh_name("nobody"), PASSWORD)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_LOGIN)
    with pytest.raises(ClientError) as info:
        await c.login(account.username, "wrong-password")
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_LOGIN)
    # Still authenticated as before. (Logging in as somebody else on an authenticated
    # connection is refused before the password is checked: the server's choice, the
    # protocol does not say.)
    other: Account = await register_user(shared_server, "relog2")
    with pytest.raises(ClientError) as info:
        await c.login(other.username, other.password)
    assert info.value.code == "conflict"
    assert await c.ping() == {}
    assert await c.convs() == []
    assert (await c.request("user.get", user=account.id))["user"] == account.user
    # Logging in again as oneself opens a new login session on the same connection.
    data = await c.login(account.username, account.password)
    assert data["user"] == account.user
    assert await c.convs() == []


async def test_ops_need_authentication(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    account: Account = await register_user(shared_server, "anon")
    peer: Account = await register_user(shared_server, "anonpeer")
    c = await clients.connect(shared_server)
    conv = Client.direct_conv(account.id, peer.id)
    for op, fields in (
        ("send", {"conv": conv, "cid": "anon-1", "type": "text", "body": "who am I"}),
        ("history", {"conv": conv}),
        ("convs", {}),
        ("read", {"conv": conv, "seq": 1}),
        ("typing", {"conv": conv}),
        ("logout", {}),
        ("user.get", {"user": account.id}),
        ("user.update", {"display_name": "Hijacked"}),
        ("presence.get", {"users": [account.id]}),
        ("block", {"user": peer.id}),
    ):
        assert await refused(c, op, fields) == ("unauthorized", None), op
    # Nothing happened: no message, no profile change.
    await c.login(account.username, account.password)
    assert await c.history(conv) == {"messages": [], "has_more": False}
    assert (await c.request("user.get", user=account.id))["user"] == account.user


async def test_refresh_rotates_the_tokens(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    account: Account = await register_user(shared_server, "refresh")
    c = await clients.connect(shared_server, login_as=account)
    t1, r1 = c.token, c.refresh_token
    assert t1 is not None and r1 is not None
    # refresh needs no authentication.
    x = await clients.connect(shared_server, "ws", "msgpack")
    data = await x.request("refresh", refresh_token=r1)
    assert set(data) >= {"token", "refresh_token", "expires_in"}
    t2, r2 = data["token"], data["refresh_token"]
    assert data["expires_in"] == 900
    assert len({t1, r1, t2, r2}) == 4
    # The new token authenticates; the old access token and refresh token are dead.
    y = await clients.connect(shared_server, "tcp", "json")
    assert (await y.auth(t2))["user"] == account.user
    with pytest.raises(ClientError) as info:
        await x.auth(t1)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_TOKEN)
    # An access token is not a refresh token.
    assert await refused(x, "refresh", refresh_token=t2) == ("unauthorized", None)
    assert await refused(x, "refresh", refresh_token="garbage") == ("unauthorized", None)
    # Re-authenticating a connection with the rotated token of its own login session.
    assert (await c.auth(t2))["user"] == account.user
    assert await c.convs() == []
    # The rotated refresh token works once more; the connections stay authenticated.
    assert set(await x.request("refresh", refresh_token=r2)) >= {"token", "refresh_token"}
    assert await c.convs() == [] and await y.convs() == []


async def refresh_refused(c: Client, refresh_token: str) -> None:
    """``refresh`` is answered ``unauthorized`` (§3.7), and the connection stays usable."""
    with pytest.raises(ClientError) as info:
        await c.request("refresh", refresh_token=refresh_token)
    assert (info.value.code, info.value.message, info.value.field) == (
        "unauthorized",
        BAD_REFRESH,
        None,
    )
    assert await c.ping() == {}


async def test_refresh_token_reuse_revokes_the_login_session_and_closes_it(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    account: Account = await register_user(shared_server, "reuse")
    c = await clients.connect(shared_server, login_as=account)  # login session 1
    other = await clients.connect(shared_server, "tcp", "msgpack", login_as=account)  # session 2
    r1 = c.refresh_token
    assert r1 is not None and other.token is not None
    rotated = await c.request("refresh", refresh_token=r1)
    t2, r2 = rotated["token"], rotated["refresh_token"]
    y = await clients.connect(shared_server, "tcp", "json")
    assert (await y.auth(t2))["user"] == account.user  # session 1 on a second connection

    # The spent refresh token comes back, here from a connection of session 1 itself:
    # it is answered, then every connection of the session is closed, that one included.
    with pytest.raises(ClientError) as info:
        await c.request("refresh", refresh_token=r1)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_REFRESH)
    for conn in (c, y):
        assert await conn.wait_closed(5) == "revoked"
        assert conn.events_nowait() == [{"op": "closed", "reason": "revoked"}]

    # The whole login session is revoked: the reused refresh token, the legitimately
    # rotated pair, all answer unauthorized.
    probe = await clients.connect(shared_server, "ws", "json")
    await refresh_refused(probe, r1)
    await refresh_refused(probe, r2)
    with pytest.raises(ClientError) as info:
        await probe.auth(t2)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_TOKEN)

    # Session 2's connection, open all along, is still open: the closes above were made
    # in one step, before c and y read theirs, so a close of `other` would have come
    # before this ping's reply.
    assert await other.ping() == {}
    assert other.events_nowait("closed") == []
    assert await other.convs() == []
    assert (await probe.auth(other.token))["user"] == account.user
    assert (await other.refresh())["expires_in"] == 900


async def test_refresh_token_reuse_over_http_closes_the_sessions_connections(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    account: Account = await register_user(shared_server, "reusehttp")
    c = await clients.connect(shared_server, "ws", "msgpack", login_as=account)
    r1 = c.refresh_token
    async with HttpClient(shared_server.http_url) as http:
        rotated = await http.request("refresh", refresh_token=r1)
        refused_body = {"error": {"code": "unauthorized", "message": BAD_REFRESH}}
        assert await http.call("refresh", refresh_token=r1) == (401, refused_body)
        assert await c.wait_closed(5) == "revoked"
        assert c.events_nowait() == [{"op": "closed", "reason": "revoked"}]
        assert await http.call("refresh", refresh_token=rotated["refresh_token"]) == (
            401,
            refused_body,
        )
        assert await http.call("convs", token=rotated["token"]) == (
            401,
            {"error": {"code": "unauthorized", "message": BAD_TOKEN}},
        )


async def test_expired_access_token(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    """Access tokens live 0 s on this server: born expired, so no clock has to run out
    during the test (where a token's lifetime ends is tested on a controlled clock in
    tests/service/test_user_service.py)."""
    server = server_factory({"auth": {"access_ttl": 0}})
    account: Account = await register_user(server, "expiring")
    c = await clients.connect(server, "tcp", "msgpack")
    login = await c.login(account.username, account.password)
    assert login["expires_in"] == 0
    assert await c.convs() == []  # the login authenticated its own connection
    late = await clients.connect(server, "ws", "msgpack")
    with pytest.raises(ClientError) as info:
        await late.auth(login["token"])
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_TOKEN)
    assert await late.ping() == {}
    assert await refused(late, "convs") == ("unauthorized", None)
    async with HttpClient(server.http_url) as http:
        status, body = await http.call("convs", token=login["token"])
        assert status == 401 and body["error"]["code"] == "unauthorized", body
    # The refresh token outlives it and yields a new pair, born expired too.
    data = await late.refresh(login["refresh_token"])
    assert data["expires_in"] == 0
    assert await refused(late, "auth", {"token": data["token"]}) == ("unauthorized", None)
    assert (await late.refresh(data["refresh_token"]))["expires_in"] == 0


async def test_logout_closes_every_connection_of_that_login_session(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    account: Account = await register_user(shared_server, "logout")
    a = await clients.connect(shared_server, login_as=account)  # login session 1
    b = await clients.connect(shared_server, "tcp", "msgpack")  # login session 1 too
    await b.auth(a.token)
    other = await clients.connect(shared_server, "ws", "json", login_as=account)  # session 2
    token, refresh_token = a.token, a.refresh_token

    assert await a.logout() == {}
    for c in (a, b):
        assert await c.wait_closed(5) == "logout"
        assert c.events_nowait() == [{"op": "closed", "reason": "logout"}]
    # The other login session is untouched (its ping is answered after anything the
    # logout sent it).
    assert await other.events_before_ping("closed") == []
    # The revoked tokens are dead; the other session's still work.
    probe = await clients.connect(shared_server, "ws", "json")
    with pytest.raises(ClientError) as info:
        await probe.auth(token)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_TOKEN)
    assert await refused(probe, "refresh", refresh_token=refresh_token) == ("unauthorized", None)
    assert (await probe.auth(other.token))["user"] == account.user
    assert await other.convs() == []


# --- user.get / user.update --------------------------------------------------------------


async def test_user_get(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    target: Account = await register_user(shared_server, "target", display_name="The Target")
    c = await clients.user(shared_server, "asker")
    assert await c.request("user.get", user=target.id) == {"user": target.user}
    assert await c.request("user.get", username=target.username) == {"user": target.user}
    assert target.user["display_name"] == "The Target"
    assert await refused(c, "user.get", user="u-no-such-user") == ("not_found", "user")
    assert await refused(c, "user.get", username=fresh_name("nobody")) == (
        "not_found",
        "username",
    )
    assert await refused(c, "user.get", username=target.username.upper()) == (
        "not_found",
        "username",
    )
    assert await refused(c, "user.get") == ("bad_request", "user")
    assert await refused(c, "user.get", user=17) == ("bad_request", "user")


async def test_user_update_display_name(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    me = await clients.user(shared_server, "renamer")
    other = await clients.user(shared_server, "viewer", transport="tcp", codec="msgpack")
    before = (await other.request("user.get", user=me.user_id))["user"]
    for bad in ("", "n" * 65):
        assert await refused(me, "user.update", display_name=bad) == (
            "bad_request",
            "display_name",
        )
    assert await refused(me, "user.update", display_name=5) == ("bad_request", "display_name")
    assert (await other.request("user.get", user=me.user_id))["user"] == before
    # Nothing to change: the user as it is.
    assert await me.request("user.update") == {"user": before}

    data = await me.request("user.update", display_name="Ñew Näme ✨")
    assert data["user"] == {**before, "display_name": "Ñew Näme ✨"}
    assert (await other.request("user.get", user=me.user_id))["user"] == data["user"]
    assert (await other.request("user.get", username=before["username"]))["user"] == data["user"]


async def test_password_change(
    shared_server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    account: Account = await register_user(shared_server, "pwchange")
    me = await clients.connect(shared_server, "ws", "json", login_as=account)
    me_too = await clients.connect(shared_server, "tcp", "msgpack")  # same login session
    await me_too.auth(me.token)
    other_ws = await clients.connect(shared_server, "ws", "msgpack", login_as=account)
    other_tcp = await clients.connect(shared_server, "tcp", "json", login_as=account)
    new_password = "brand-new-password"

    assert await refused(me, "user.update", password=new_password) == (
        "bad_request",
        "old_password",
    )
    assert await refused(
        me, "user.update", password=new_password, old_password="wrong-password"
    ) == ("unauthorized", "old_password")
    assert await refused(me, "user.update", password="short", old_password=account.password) == (
        "bad_request",
        "password",
    )
    # Nothing changed: every connection is open and the old password still works.
    for c in (me_too, other_ws, other_tcp):
        assert c.events_nowait("closed") == [] and await c.ping() == {}
    probe = await clients.connect(shared_server, "ws", "json")
    await probe.login(account.username, account.password)  # a 5th login session
    await probe.close()

    data = await me.request("user.update", password=new_password, old_password=account.password)
    assert data == {"user": account.user}
    # Every other login session's connections are closed; this login session's stay.
    for c in (other_ws, other_tcp):
        assert await c.wait_closed(5) == "revoked"
        assert c.events_nowait() == [{"op": "closed", "reason": "revoked"}]
    for c in (me, me_too):
        assert await c.events_before_ping("closed") == []
    # The new password logs in, the old one does not; the other sessions' tokens are dead.
    probe = await clients.connect(shared_server, "tcp", "msgpack")
    with pytest.raises(ClientError) as info:
        await probe.login(account.username, account.password)
    assert (info.value.code, info.value.message) == ("unauthorized", BAD_LOGIN)
    assert await refused(probe, "auth", {"token": other_ws.token}) == ("unauthorized", None)
    assert (await probe.auth(me.token))["user"] == account.user
    assert (await probe.login(account.username, new_password))["user"] == account.user


# --- presence --------------------------------------------------------------------------


async def test_presence_get(shared_server: ServerProcess, clients: Clients, wire: Wire) -> None:
    online = await clients.user(shared_server, "online")
    never = await clients.register(shared_server, "never")
    asker = await clients.user(shared_server, "asker")
    t0 = now_ms()
    data = await asker.request(
        "presence.get", users=[online.user_id, "u-unknown", never.id, online.user_id]
    )
    t1 = now_ms()
    assert [(p["user"], p["status"]) for p in data["presence"]] == [
        (online.user_id, "online"),
        (never.id, "offline"),
    ]
    first, second = data["presence"]
    assert t0 - 1000 <= first["last_seen"] <= t1 + 1000
    assert second["last_seen"] is None
    assert await asker.request("presence.get", users=[]) == {"presence": []}
    assert await refused(asker, "presence.get", users=["u"] * 201) == ("bad_request", "users")
    assert await refused(asker, "presence.get") == ("bad_request", "users")


async def test_presence_events_follow_the_first_and_last_connection(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    a_account: Account = await register_user(shared_server, "presa")
    b = await clients.user(shared_server, "presb")  # the watcher, on the test's wire
    stranger = await clients.user(shared_server, "stranger", transport="tcp", codec="json")
    a1 = await clients.connect(shared_server, "ws", "json", login_as=a_account)
    a = a_account.id
    conv = Client.direct_conv(a, b.user_id)
    await a1.send_message(conv, "hi")
    await b.send_message(conv, "hello")
    assert (await a1.next_event("msg"))["body"] == "hello"
    assert b.events_nowait("presence") == []

    def of_a(ev: dict[str, Any]) -> bool:
        return ev.get("user") == a

    # A's only connection closes: offline, with last_seen.
    t0 = now_ms()
    await a1.close()
    ev = await b.next_event("presence", match=of_a)
    assert set(ev) == {"op", "user", "status", "last_seen"}
    assert (ev["user"], ev["status"]) == (a, "offline")
    assert t0 - 1000 <= ev["last_seen"] <= now_ms() + 1000
    offline_at = ev["last_seen"]
    got = await b.request("presence.get", users=[a])
    assert got == {"presence": [{"user": a, "status": "offline", "last_seen": offline_at}]}

    # A's first connection authenticates: online.
    a2 = await clients.connect(shared_server, "tcp", "msgpack", login_as=a_account)
    ev = await b.next_event("presence", match=of_a)
    assert (ev["user"], ev["status"]) == (a, "online")
    assert ev["last_seen"] >= offline_at
    # A second connection, and the first one closing while the second is up: no event.
    a3 = await clients.connect(shared_server, "ws", "msgpack")
    await a3.auth(a2.token)
    assert await b.events_before_ping("presence") == []
    # Nothing answers a close: wait until the server has counted a2 (TCP) out. It
    # decides about presence in the same step, so an event would be on its way.
    tcp_open = metric(await scrape_server(shared_server), "imserver_connections", transport="tcp")
    await a2.close()
    await server_metric_reaches(
        shared_server, "imserver_connections", lambda n: n < tcp_open, transport="tcp"
    )
    assert await b.events_before_ping("presence") == []
    assert (await b.request("presence.get", users=[a]))["presence"][0]["status"] == "online"
    # Logging in again on the remaining connection changes nothing for the others.
    await a3.login(a_account.username, a_account.password)
    assert await b.events_before_ping("presence") == []
    # The last one closes: offline again.
    await a3.close()
    ev = await b.next_event("presence", match=of_a)
    assert (ev["user"], ev["status"]) == (a, "offline")
    assert ev["last_seen"] >= offline_at
    # Users without a direct conversation with A hear nothing.
    assert stranger.events_nowait("presence") == []
    assert b.events_nowait("presence") == []


# --- block / unblock ---------------------------------------------------------------------


async def test_block_and_unblock(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    me = await clients.user(shared_server, "blocker")
    pest = await clients.user(shared_server, "pest", transport="ws", codec="json")
    conv = Client.direct_conv(me.user_id, pest.user_id)
    for op in ("block", "unblock"):
        assert await refused(me, op, user=me.user_id) == ("bad_request", "user"), op
        assert await refused(me, op, user="u-no-such-user") == ("not_found", "user"), op
        assert await refused(me, op) == ("bad_request", "user"), op
    # Unblocking someone never blocked is fine, blocking twice too.
    assert await me.request("unblock", user=pest.user_id) == {}
    assert await me.request("block", user=pest.user_id) == {}
    assert await me.request("block", user=pest.user_id) == {}
    with pytest.raises(ClientError) as info:
        await pest.send_message(conv, "let me in", cid="blocked-1")
    assert info.value.code == "forbidden"
    assert await pest.ping() == {}
    assert await me.history(conv) == {"messages": [], "has_more": False}
    # Blocking is one-way: the blocker can still write.
    assert (await me.send_message(conv, "I can"))["seq"] == 1
    assert (await pest.next_event("msg"))["body"] == "I can"
    assert await me.request("unblock", user=pest.user_id) == {}
    ack = await pest.send_message(conv, "thanks", cid="blocked-1")
    assert (ack["seq"], ack["dup"]) == (2, False)
    assert (await me.next_event("msg"))["body"] == "thanks"
