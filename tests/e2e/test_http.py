"""The HTTP transport (docs/protocol.md §1, §2): ``POST /api/v1/<op>``, error bodies and statuses,
the OpenAPI description, health, readiness and metrics."""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from metrics import metric, scrape_server, server_metric_reaches

from imserver.client import Client, ClientError, HttpClient
from imserver.protocol.ops import ALL_OPS, op_name

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory, ServerProcess

PASSWORD = "correct-horse-battery"
MAX_FRAME = 65536
MAX_BODY = 16384
ALL_OP_NAMES = sorted(op_name(t) for t in ALL_OPS)
PUBLIC = {"hello", "register", "login", "auth", "refresh", "ping"}
BAD_TOKEN = "invalid or expired token"


def error_body(status: int, body: dict[str, Any], expect_status: int) -> tuple[str, str | None]:
    """(code, field) of an HTTP error answer, checking its status and the body's shape."""
    assert status == expect_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "message", "field", "retry_after"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error["code"], error.get("field")


def fresh_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


async def http_user(http: HttpClient, prefix: str) -> tuple[dict[str, Any], str]:
    """Register and log in over HTTP: (user, token)."""
    username = fresh_name(prefix)
    status, body = await http.call("register", username=username, password=PASSWORD)
    assert status == 200, body
    status, body = await http.call("login", username=username, password=PASSWORD)
    assert status == 200, body
    return body["user"], body["token"]


@pytest.fixture
async def http(shared_server: ServerProcess) -> Any:
    async with HttpClient(shared_server.http_url) as client:
        yield client


# --- the ops ---------------------------------------------------------------------------


async def test_ops_over_http(
    shared_server: ServerProcess, clients: Clients, http: HttpClient
) -> None:
    username = fresh_name("http")
    status, body = await http.call("register", username=username, password=PASSWORD)
    assert status == 200 and set(body) == {"user"}, body
    user = body["user"]
    assert user["username"] == username and user["display_name"] == username
    status, body = await http.call("login", username=username, password=PASSWORD, device="curl")
    assert status == 200, body
    assert body["user"] == user and body["expires_in"] == 900
    token = body["token"]
    assert await http.request("ping") == {}
    assert await http.request("ping", token=token) == {}
    hello = await http.request("hello", v=1)
    assert hello["v"] == 1 and hello["limits"]["max_frame"] == MAX_FRAME

    # A WebSocket peer, and the HTTP user's own WebSocket device.
    peer = await clients.user(shared_server, "httppeer")
    own = await clients.connect(shared_server, "tcp", "msgpack")
    await own.auth(token)
    conv = Client.direct_conv(user["id"], peer.user_id)
    ack = await http.request(
        "send", token=token, conv=conv, cid="h-1", type="text", body="over http"
    )
    assert (ack["conv"], ack["seq"], ack["cid"], ack["dup"]) == (conv, 1, "h-1", False)
    again = await http.request(
        "send", token=token, conv=conv, cid="h-1", type="text", body="over http"
    )
    assert again == {**ack, "dup": True}
    # An HTTP request is no session: every live session of both users gets the message.
    for c in (peer, own):
        ev = await c.next_event("msg")
        assert (ev["conv"], ev["seq"], ev["from"], ev["body"]) == (conv, 1, user["id"], "over http")
    await peer.send_message(conv, "back over ws")

    page = await http.request("history", token=token, conv=conv)
    assert [(m["seq"], m["body"]) for m in page["messages"]] == [
        (1, "over http"),
        (2, "back over ws"),
    ]
    assert page["has_more"] is False
    convs = (await http.request("convs", token=token))["convs"]
    assert [(c["conv"], c["kind"], c["last_seq"], c["unread"]) for c in convs] == [
        (conv, "direct", 2, 1)
    ]
    assert await http.request("read", token=token, conv=conv, seq=2) == {}
    receipt = await peer.next_event("receipt")
    assert (receipt["user"], receipt["seq"], receipt["kind"]) == (user["id"], 2, "read")
    assert await http.request("typing", token=token, conv=conv) == {}
    assert (await peer.next_event("typing"))["user"] == user["id"]
    found = await http.request("search", token=token, query="http")
    assert [m["seq"] for m in found["messages"]] == [1] and found["next"] is None

    assert await http.request("user.get", token=token, user=peer.user_id) == {"user": peer.user}
    assert await http.request("user.get", token=token, username=username) == {"user": user}
    renamed = await http.request("user.update", token=token, display_name="Via HTTP")
    assert renamed["user"] == {**user, "display_name": "Via HTTP"}
    presence = (await http.request("presence.get", token=token, users=[peer.user_id]))["presence"]
    assert [(p["user"], p["status"]) for p in presence] == [(peer.user_id, "online")]
    assert await http.request("block", token=token, user=peer.user_id) == {}
    assert await http.request("unblock", token=token, user=peer.user_id) == {}
    assert await http.request("auth", {"token": token}) == {"user": renamed["user"]}

    refreshed = await http.request("refresh", refresh_token=body["refresh_token"])
    assert refreshed["expires_in"] == 900
    new_token = refreshed["token"]
    status, err = await http.call("convs", token=token)
    assert error_body(status, err, 401) == ("unauthorized", None)
    assert await http.request("logout", token=new_token) == {}
    status, err = await http.call("convs", token=new_token)
    assert error_body(status, err, 401) == ("unauthorized", None)
    # A logout over HTTP closes the live connections of that login session too.
    assert await own.wait_closed(5) == "logout"
    assert await peer.ping() == {}


async def test_every_op_has_a_route(http: HttpClient) -> None:
    for name in ALL_OP_NAMES:
        status, body = await http.call(name)
        if status == 200:
            assert name == "ping", (name, body)  # the only op that needs no field nor token
            continue
        code, field = error_body(status, body, status)
        # Refused for what the body lacks or for the missing token, never as unknown.
        assert field != "op", (name, body)
        assert (status, code) in ((400, "bad_request"), (401, "unauthorized")), (name, body)
    for name in ("nope", "Ping", "user", "api", "openapi.json"):
        status, body = await http.call(name)
        assert error_body(status, body, 400) == ("bad_request", "op"), name
    assert await http.request("ping") == {}


async def test_an_op_in_the_body_must_be_the_op_of_the_url(http: HttpClient) -> None:
    """The URL names the op; a body ``op`` that names another is refused, and neither
    op runs."""
    _, token = await http_user(http, "bodyop")
    status, body = await http.call("logout", token=token, op="ping")
    assert error_body(status, body, 400) == ("bad_request", "op")
    assert body["error"]["message"] == "unknown op 'ping'"
    status, body = await http.call("ping", op="logout")
    assert error_body(status, body, 400) == ("bad_request", "op")
    assert body["error"]["message"] == "unknown op 'logout'"
    status, body = await http.call("ping", op=5)
    assert error_body(status, body, 400) == ("bad_request", "op")
    # The logout did not run: the token still works. The same op in the body is fine.
    assert await http.request("convs", token=token) == {"convs": []}
    assert await http.request("ping", op="ping") == {}
    assert await http.request("logout", token=token, op="logout") == {}
    status, body = await http.call("convs", token=token)
    assert error_body(status, body, 401) == ("unauthorized", None)


async def test_openapi_describes_every_op(http: HttpClient) -> None:
    status, headers, raw = await http.get("/api/v1/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    doc = msgspec.json.decode(raw)
    assert doc["openapi"] == "3.1.0"
    assert set(doc["info"]) >= {"title", "version"}
    # Besides the ops: the file routes of docs/protocol.md §6 (tests/e2e/test_files.py checks them).
    file_routes = {"/api/v1/files", "/api/v1/files/{id}", "/api/v1/files/{id}/thumb"}
    assert file_routes <= set(doc["paths"])
    op_paths = sorted(p for p in doc["paths"] if p not in file_routes)
    assert op_paths == [f"/api/v1/{name}" for name in ALL_OP_NAMES]
    schemas = doc["components"]["schemas"]

    def resolve(ref: str) -> dict[str, Any]:
        prefix = "#/components/schemas/"
        assert ref.startswith(prefix), ref
        return schemas[ref[len(prefix) :]]

    for path in op_paths:
        item = doc["paths"][path]
        name = path.rsplit("/", 1)[1]
        assert set(item) == {"post"}, path
        post = item["post"]
        request = resolve(post["requestBody"]["content"]["application/json"]["schema"]["$ref"])
        assert "op" not in request.get("properties", {}), path
        ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        resolve(ok)
        for status in ("400", "401", "403", "404", "409", "413", "429", "500", "503"):
            error_ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert set(resolve(error_ref)["properties"]) == {"error"}, (path, status)
        # register, login and refresh (and the other public ops) need no token.
        assert (post.get("security") == []) == (name in PUBLIC), path
    # Every reference in the document resolves.
    refs = re.findall(rb'"\$ref":"([^"]+)"', raw)
    assert refs and all(resolve(r.decode()) for r in refs)
    login = resolve(
        doc["paths"]["/api/v1/login"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ]["$ref"]
    )
    assert set(login["required"]) == {"username", "password"}
    assert set(login["properties"]) >= {"username", "password", "device"}


# --- errors ------------------------------------------------------------------------------


async def test_error_statuses(
    shared_server: ServerProcess, clients: Clients, http: HttpClient
) -> None:
    me, token = await http_user(http, "herr")
    x, x_token = await http_user(http, "herrx")
    y, _ = await http_user(http, "herry")
    conv = Client.direct_conv(me["id"], x["id"])
    not_mine = Client.direct_conv(x["id"], y["id"])
    send = {"type": "text", "body": "refused"}

    async def expect(
        status: int, op: str, fields: dict[str, Any] | None = None, tok: str | None = token
    ) -> tuple[str, str | None]:
        got_status, body = await http.call(op, fields or {}, token=tok)
        result = error_body(got_status, body, status)
        assert await http.request("ping") == {}
        return result

    assert await expect(400, "send", {**send, "cid": "e-1"}) == ("bad_request", "conv")
    assert await expect(400, "send", {**send, "conv": conv, "cid": 5}) == ("bad_request", "cid")
    assert await expect(400, "history", {"conv": conv, "limit": 0}) == ("bad_request", "limit")
    assert await expect(400, "hello", {"v": 2}) == ("unsupported_version", None)
    assert await expect(401, "convs", tok=None) == ("unauthorized", None)
    assert await expect(401, "convs", tok="not-a-token") == ("unauthorized", None)
    assert await expect(
        401, "login", {"username": me["username"], "password": "wrong-pw"}, None
    ) == (
        "unauthorized",
        None,
    )
    assert await expect(403, "send", {**send, "conv": not_mine, "cid": "e-2"}) == (
        "forbidden",
        None,
    )
    assert await expect(404, "user.get", {"user": "u-no-such-user"}) == ("not_found", "user")
    assert await expect(409, "register", {"username": me["username"], "password": PASSWORD}) == (
        "conflict",
        "username",
    )
    big = {**send, "conv": conv, "cid": "e-3", "body": "b" * (MAX_BODY + 1)}
    assert await expect(413, "send", big) == ("too_large", "body")
    # Nothing of it was stored.
    for tok in (token, x_token):
        assert await http.request("history", token=tok, conv=conv) == {
            "messages": [],
            "has_more": False,
        }
    ok = await http.request("send", token=token, conv=conv, cid="e-3", type="text", body="ok")
    assert (ok["seq"], ok["dup"]) == (1, False)


async def test_malformed_http_requests(shared_server: ServerProcess, http: HttpClient) -> None:
    _, token = await http_user(http, "hmal")
    json_ct = {"Content-Type": "application/json"}
    for raw, field in (
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"ping"', None),
        (b'{"query": 5}', "query"),
    ):
        status, _, body = await http.post("/api/v1/search", raw, token=token, headers=json_ct)
        assert error_body(status, msgspec.json.decode(body), 400) == ("bad_request", field), raw
    # Authorization headers that are not a bearer token.
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token " + token, token):
        status, _, body = await http.post(
            "/api/v1/convs", b"{}", headers={**json_ct, "Authorization": header}
        )
        assert error_body(status, msgspec.json.decode(body), 401) == ("unauthorized", None), header
    assert await http.request("convs", token=token) == {"convs": []}


async def test_public_ops_ignore_the_authorization_header(shared_server: ServerProcess) -> None:
    """The public ops (docs/protocol.md §7.1) ignore an ``Authorization`` header, whatever it
    holds, while every op that needs a user refuses the same header with ``401``."""
    async with HttpClient(shared_server.http_url) as http:
        user, token = await http_user(http, "stale")
        status, body = await http.call("login", username=user["username"], password=PASSWORD)
        assert status == 200, body
        refresh_token, live_token = body["refresh_token"], body["token"]
        assert await http.request("logout", token=token) == {}  # `token` is now revoked
        json_ct = {"Content-Type": "application/json"}
        not_bearer = "Authorization must be 'Bearer <token>'"
        # header -> what an op needing a user answers with it
        headers = {
            f"Bearer {token}": BAD_TOKEN,  # revoked by the logout
            "Bearer not-a-token": BAD_TOKEN,
            "Basic dXNlcjpwYXNz": not_bearer,
            "Bearer": not_bearer,
            "Token " + live_token: not_bearer,
        }

        async def post(op: str, fields: dict[str, Any], header: str) -> tuple[int, Any]:
            status, _, raw = await http.post(
                f"/api/v1/{op}",
                msgspec.json.encode(fields),
                headers={**json_ct, "Authorization": header},
            )
            return status, msgspec.json.decode(raw)

        for header, refusal in headers.items():
            assert await post("convs", {}, header) == (
                401,
                {"error": {"code": "unauthorized", "message": refusal}},
            ), header
            assert await post("ping", {}, header) == (200, {}), header
            status, body = await post("hello", {"v": 1}, header)
            assert (status, body["v"]) == (200, 1), (header, body)
            name = fresh_name("pub")
            status, body = await post("register", {"username": name, "password": PASSWORD}, header)
            assert (status, body["user"]["username"]) == (200, name), (header, body)
            status, body = await post(
                "login", {"username": user["username"], "password": PASSWORD}, header
            )
            assert (status, body["user"]) == (200, user), (header, body)
            status, body = await post("refresh", {"refresh_token": refresh_token}, header)
            assert status == 200 and body["expires_in"] == 900, (header, body)
            refresh_token, live_token = body["refresh_token"], body["token"]
            assert await post("auth", {"token": live_token}, header) == (200, {"user": user})
            # A public op's own refusals are its own, not the header's.
            assert await post(
                "login", {"username": user["username"], "password": "wrong-pw"}, header
            ) == (
                401,
                {"error": {"code": "unauthorized", "message": "invalid username or password"}},
            ), header
            assert await post("refresh", {"refresh_token": "garbage"}, header) == (
                401,
                {"error": {"code": "unauthorized", "message": "invalid or expired refresh token"}},
            ), header
            status, body = await post("hello", {"v": 2}, header)
            assert error_body(status, body, 400) == ("unsupported_version", None), header
        # The tokens the public ops handed out work.
        assert await http.request("convs", token=live_token) == {"convs": []}


async def test_http_body_over_max_frame_is_too_large(
    shared_server: ServerProcess, http: HttpClient
) -> None:
    user, token = await http_user(http, "hbig")
    json_ct = {"Content-Type": "application/json"}

    def ping_of(size: int) -> bytes:
        head, tail = b'{"pad": "', b'"}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    status, _, body = await http.post("/api/v1/ping", ping_of(MAX_FRAME), headers=json_ct)
    assert (status, msgspec.json.decode(body)) == (200, {})
    status, _, body = await http.post("/api/v1/ping", ping_of(MAX_FRAME + 1), headers=json_ct)
    assert error_body(status, msgspec.json.decode(body), 413) == ("too_large", None)

    # A chunked body (no Content-Length) is measured too.
    async def chunks() -> Any:
        for _ in range(4):
            yield b" " * (MAX_FRAME // 2)
        yield b"{}"

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{shared_server.http_url}/api/v1/user.update",
            data=chunks(),
            headers={**json_ct, "Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        error = await resp.json()
        assert error_body(resp.status, error, 413) == ("too_large", None)
    assert await http.request("user.get", token=token, user=user["id"]) == {"user": user}


async def test_http_rate_limit(server_factory: ServerFactory, clients: Clients) -> None:
    """One bucket per client address. Tokens come back at 0.01 per second, so none does
    while the test runs and the counts are exact (the refill: tests/unit/test_ratelimit.py)."""
    server = server_factory({"limits": {"rate_per_s": 0.01, "rate_burst": 5}})
    sender = await clients.user(server, "hrl")
    watcher = await clients.user(server, "hrlw", transport="tcp", codec="json")
    conv = Client.direct_conv(sender.user_id, watcher.user_id)
    oversized = b'{"pad": "' + b"x" * MAX_FRAME + b'"}'

    async def refused_before_the_bucket(http: HttpClient) -> None:
        # An unknown op and a body over max_frame are refused before the rate limit.
        status, body = await http.call("no.such.op")
        assert error_body(status, body, 400) == ("bad_request", "op")
        status, _, raw = await http.post("/api/v1/send", oversized)
        assert error_body(status, msgspec.json.decode(raw), 413) == ("too_large", None)

    async with HttpClient(server.http_url, token=sender.token) as http:
        fields = {"conv": conv, "type": "text", "body": "x"}
        await refused_before_the_bucket(http)
        # A body that does not decode has passed the size check: it takes token 1.
        status, _, raw = await http.post("/api/v1/send", b"{not json")
        assert error_body(status, msgspec.json.decode(raw), 400) == ("bad_request", None)
        results = [await http.call("send", {**fields, "cid": f"hr-{i}"}) for i in range(6)]
        assert [status for status, _ in results] == [200] * 4 + [429] * 2, results
        assert [body["seq"] for _, body in results[:4]] == [1, 2, 3, 4]
        waits = []
        for status, body in results[4:]:
            assert error_body(status, body, 429) == ("rate_limited", None)
            wait = body["error"]["retry_after"]
            assert 0 < wait <= 100 and wait == round(wait, 3), body
            waits.append(wait)
        assert waits == sorted(waits, reverse=True)
        # With the bucket empty, those two are still refused for what they are.
        await refused_before_the_bucket(http)
        status, _, raw = await http.post("/api/v1/send", b"{not json")
        assert error_body(status, msgspec.json.decode(raw), 429) == ("rate_limited", None)
        # The refused sends were not stored, and their cids were not used up: sent again
        # over the sender's WebSocket (a bucket of its own), one is new.
        page = await watcher.history(conv)
        assert [m["cid"] for m in page["messages"]] == [f"hr-{i}" for i in range(4)]
        ack = await sender.send_message(conv, "x", cid="hr-4")
        assert (ack["seq"], ack["dup"]) == (5, False)
    assert await watcher.ping() == {}


# --- health, readiness, metrics --------------------------------------------------------


async def test_health_and_readiness(http: HttpClient) -> None:
    status, _, body = await http.get("/healthz")
    assert status == 200 and msgspec.json.decode(body) == {"status": "ok"}
    status, _, body = await http.get("/readyz")
    assert status == 200 and msgspec.json.decode(body) == {"status": "ready"}


async def test_metrics(server: ServerProcess, clients: Clients) -> None:
    """On a server of its own: every connection and op it counts is this test's."""
    before = await scrape_server(server)
    assert metric(before, "imserver_connections", transport="tcp") == 0
    a = await clients.user(server, "metrics", transport="tcp", codec="msgpack")
    b = await clients.user(server, "metricsb", transport="tcp", codec="json")
    conv = Client.direct_conv(a.user_id, b.user_id)
    for i in range(3):
        await a.send_message(conv, f"m{i}")
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            await a.request("user.get", user="u-no-such-user")
        assert info.value.code == "not_found"
    after = await scrape_server(server)

    assert metric(after, "imserver_connections", transport="tcp") == 2
    delta = {
        (op, result): metric(after, "imserver_ops_total", op=op, result=result)
        - metric(before, "imserver_ops_total", op=op, result=result)
        for op, result in (("send", "ok"), ("user.get", "not_found"), ("login", "ok"))
    }
    assert delta == {("send", "ok"): 3, ("user.get", "not_found"): 2, ("login", "ok"): 2}
    # The ack latency histogram: cumulative buckets up to +Inf, counting every acked send.
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == "imserver_ack_latency_seconds_bucket"
    )
    assert len(buckets) >= 5 and buckets[-1][0] == float("inf")
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)
    count = metric(after, "imserver_ack_latency_seconds_count")
    assert counts[-1] == count
    assert count - metric(before, "imserver_ack_latency_seconds_count") == 3
    # Nobody was too slow to read (test_delivery.py has the sessions that are).
    assert metric(after, "imserver_slow_consumers_total") == 0

    await a.close()
    await b.close()
    # The server counts a connection out when it has seen its end, after the client.
    await server_metric_reaches(server, "imserver_connections", lambda n: n == 0, transport="tcp")
