"""The distributed mode through real processes: ``imserver serve --services NAME``, one
process per service and two gateways, found through a real etcd, on a fresh
PostgreSQL database, the machine's Redis (live bus, presence) and RabbitMQ (events),
with a webhook receiver for the notification service's pushes.

The processes are shared by the module's tests, which run in order: the one before
the last kills a gateway. The last runs on a second layout, several services per
process (``--services gateway,message`` beside ``--services
user,room,file,notification``). A missing etcd, PostgreSQL, Redis or RabbitMQ skips, and fails
under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import databases as dbs
import pytest
from etcd_server import require_etcd
from test_push_to_webhook import SECRET

from imserver.client import Client, ClientError, HttpClient
from imserver.core.events import GROUPS
from imserver.testing import redis as redis_testing
from imserver.testing.etcd import EtcdServer
from imserver.testing.process import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
import rabbit

pytestmark = pytest.mark.own_database  # on PostgreSQL in every run: one is enough

SERVICES = ("user", "room", "file", "notification", "message")
BACKOFF = [0.2, 0.5]
TTL = 3.0
HEARTBEAT = 0.5


@dataclass
class Deployment:
    """The processes of a layout: those without a gateway by name, the gateways in
    start order; the bodies the webhook receiver got."""

    services: dict[str, ServerProcess]
    gateways: list[ServerProcess]
    pushes: list[dict[str, Any]]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook endpoint in a thread: its URL and the JSON bodies posted to it."""
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


ONE_PER_SERVICE = [
    *((name, name) for name in SERVICES),
    ("gateway-1", "gateway"),
    ("gateway-2", "gateway"),
]
"""The module's layout: (process name, its ``--services``) in start order."""

GROUPED = [
    ("user-room-file-notification", "user,room,file,notification"),
    ("gateway-message", "gateway,message"),
]
"""Several services per process: the message service beside the gateway, the
others together in a second process."""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with _deployment(tmp_path_factory.mktemp("distributed"), ONE_PER_SERVICE) as running:
        yield running


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with _deployment(tmp_path_factory.mktemp("grouped"), GROUPED) as running:
        yield running


@contextlib.contextmanager
def _deployment(root: Path, layout: list[tuple[str, str]]) -> Iterator[Deployment]:
    """The processes of ``layout`` on a fresh database, Redis prefix, RabbitMQ prefix
    and etcd of their own, with a webhook receiver; all removed after."""
    require_etcd()
    redis_url = redis_testing.shared_url()
    why = redis_testing.reachable(redis_url)
    if why is not None:
        dbs.unavailable(why)
    asyncio.run(rabbit.reachable())
    database = dbs.create_database("postgresql", "dist")
    redis_prefix = redis_testing.unique_prefix()
    rabbit_prefix = rabbit.new_prefix()
    etcd = EtcdServer(root / "etcd")
    processes: list[ServerProcess] = []
    with contextlib.ExitStack() as stack:
        hook_url, pushes = stack.enter_context(webhook_receiver())
        stack.callback(lambda: asyncio.run(rabbit.delete_topology(rabbit_prefix, GROUPS, BACKOFF)))
        stack.callback(redis_testing.delete_prefix, redis_url, redis_prefix)
        stack.callback(dbs.drop_database, database)
        stack.callback(etcd.kill)
        stack.callback(lambda: [process.teardown() for process in processes])
        etcd.start()
        config: dict[str, Any] = {
            "live": "redis",
            "storage": {"url": database.url},
            "etcd": {
                "endpoints": [etcd.url],
                "prefix": f"/{rabbit_prefix}",
                "lease_ttl": 2,
                "request_timeout": 2.0,
                "breaker_failures": 2,
                "breaker_cooldown": 0.5,
            },
            "redis": {"url": redis_url, "prefix": redis_prefix, "heartbeat": HEARTBEAT, "ttl": TTL},
            "events": {
                "backend": "rabbitmq",
                "url": rabbit.URL,
                "prefix": rabbit_prefix,
                "backoff": BACKOFF,
            },
            "rpc": {"deadline": 3.0, "retry_attempts": 2},
            "push": {
                "collapse_delay": 0.0,
                "webpush": {"enabled": False},
                "webhook": {"url": hook_url, "secret": SECRET, "timeout": 2.0},
            },
        }

        def spawn(name: str, services: str) -> ServerProcess:
            process = ServerProcess(root / name, config, serve_args=["--services", services])
            processes.append(process)
            process.start()
            return process

        started = {name: spawn(name, services) for name, services in layout}
        gateways = [p for name, p in started.items() if "gateway" in dict(layout)[name].split(",")]
        others = {name: p for name, p in started.items() if p not in gateways}
        yield Deployment(others, gateways, pushes)


async def test_every_operation_crosses_the_processes(
    deployment: Deployment, register_user: Any, make_client: Any
) -> None:
    gw1, gw2 = deployment.gateways
    alice_account = await register_user(gw1, "alice")
    bob_account = await register_user(gw2, "bob")
    # The room is made over HTTP before either connects: each gateway follows it from
    # its user's rooms at login (see tests/e2e/test_two_gateways.py).
    async with HttpClient(gw1.http_url) as http:
        login = await http.request(
            "login", username=alice_account.username, password=alice_account.password
        )
        made = await http.request(
            "room.create", token=login["token"], name="Both", members=[bob_account.id]
        )
    room = f"r:{made['room']['id']}"
    alice: Client = await make_client(gw1, login_as=alice_account)
    bob: Client = await make_client(gw2, login_as=bob_account)

    # A DM from a session on gateway 1 reaches bob's session on gateway 2 live.
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    sent = await alice.send_message(dm, "hello across")
    got = await bob.next_event("msg", match=lambda e: e.get("conv") == dm, timeout=10)
    assert (got["seq"], got["body"], got["from"]) == (sent["seq"], "hello across", alice.user_id)

    # The room made through gateway 1, and its message, live on gateway 2.
    seen = await bob.request("room.get", {"room": made["room"]["id"]})
    assert seen["room"]["name"] == "Both"
    sent_room = await alice.send_message(room, "room hello")
    got = await bob.next_event("msg", match=lambda e: e.get("conv") == room, timeout=10)
    assert (got["seq"], got["body"]) == (sent_room["seq"], "room hello")

    # A file uploaded through gateway 1, downloaded through gateway 2.
    data = b"%PDF-1.4\n" + bytes(range(256)) * 64
    async with HttpClient(gw1.http_url, token=alice.token) as http:
        status, _, raw = await http.post(
            "/api/v1/files",
            data,
            params={"conv": dm, "name": "r.pdf"},
            headers={"Content-Type": "application/pdf"},
        )
    assert status == 200, raw
    info = (await _json(raw))["file"]
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    async with HttpClient(gw2.http_url, token=bob.token) as http:
        status, _, body = await http.get(info["url"])
    assert (status, body) == (200, data)

    # History through gateway 2: both conversations, in order.
    page = await bob.history(dm)
    assert [m["body"] for m in page["messages"]] == ["hello across"]
    page = await bob.history(room)
    assert "room hello" in [m["body"] for m in page["messages"]]

    # Presence: alice (on gateway 1) is online as seen through gateway 2.
    assert await _presence(bob, alice.user_id) == "online"


async def test_a_block_refuses_the_next_direct_message_across_processes(
    deployment: Deployment, user_factory: Any
) -> None:
    # The block goes to the user service through gateway 2; the very next message
    # from gateway 1 is checked by a message-service instance against it.
    gw1, gw2 = deployment.gateways
    alice: Client = await user_factory(gw1, "alice")
    bob: Client = await user_factory(gw2, "bob")
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    assert (await alice.send_message(dm, "before"))["seq"] == 1
    assert await bob.request("block", {"user": alice.user_id}) == {}
    with pytest.raises(ClientError) as refused:
        await alice.send_message(dm, "after the block")
    assert refused.value.code == "forbidden"
    # bob can still write to alice; a block is one-way.
    assert (await bob.send_message(dm, "still mine"))["seq"] == 2
    assert await bob.request("unblock", {"user": alice.user_id}) == {}
    assert (await alice.send_message(dm, "after the unblock"))["seq"] == 3


async def test_a_killed_service_answers_unavailable_until_it_is_back(
    deployment: Deployment, user_factory: Any
) -> None:
    gw = deployment.gateways[0]
    alice: Client = await user_factory(gw, "alice")
    bob: Client = await user_factory(gw, "bob")
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    await alice.request("room.list", {})

    rooms = deployment.services["room"]
    rooms.kill()
    with pytest.raises(ClientError) as refused:
        await alice.request("room.list", {})
    assert refused.value.code == "unavailable"
    # The gateway and the session survive: the DM path does not need the room service.
    sent = await alice.send_message(dm, "still here")
    got = await bob.next_event("msg", match=lambda e: e.get("conv") == dm, timeout=10)
    assert got["seq"] == sent["seq"]

    rooms.start()  # a new instance, registered anew; the breaker lets calls through again
    async with asyncio.timeout(30):
        while True:
            try:
                listed = await alice.request("room.list", {})
                break
            except ClientError as exc:
                assert exc.code == "unavailable"
                await asyncio.sleep(0.2)
    assert listed["rooms"] == []
    made = await alice.request("room.create", {"name": "Back", "members": [bob.user_id]})
    assert made["room"]["name"] == "Back"

    # A graceful stop revokes the lease (the key goes at once, not at its expiry).
    assert rooms.stop() == 0
    assert "deregistered /" in rooms.stderr_path.read_text().rsplit("===== start", 1)[-1]
    rooms.start()


async def test_an_offline_device_gets_a_push_through_the_event_stream(
    deployment: Deployment, user_factory: Any
) -> None:
    gw = deployment.gateways[1]
    bob: Client = await user_factory(gw, "bob")
    alice: Client = await user_factory(gw, "alice")
    target = {"token": f"dev-{bob.user_id}"}
    assert await bob.request("push.register", {"provider": "webhook", "target": target}) == {}
    [registration] = (await bob.request("push.list"))["registrations"]
    bob_id = bob.user_id
    await bob.close()
    async with asyncio.timeout(10):
        while True:
            if await _presence(alice, bob_id) == "offline":
                break
            await asyncio.sleep(0.1)

    # The message service's outbox, RabbitMQ, the notification process, the webhook.
    dm = Client.direct_conv(alice.user_id, bob_id)
    sent = await alice.send_message(dm, "while you were away")
    async with asyncio.timeout(20):
        while True:
            mine = [p for p in deployment.pushes if p.get("user") == bob_id]
            if mine:
                break
            await asyncio.sleep(0.1)
    [push] = mine
    assert (push["device"], push["conv"], push["seq"], push["body"]) == (
        registration["device"],
        dm,
        sent["seq"],
        "while you were away",
    )


async def test_a_killed_gateway_takes_its_users_offline(
    deployment: Deployment, user_factory: Any
) -> None:
    gw1, gw2 = deployment.gateways
    alice: Client = await user_factory(gw1, "alice")
    bob: Client = await user_factory(gw2, "bob")
    assert await _presence(bob, alice.user_id) == "online"

    gw1.kill()  # its entries expire: the user service's process keeps running

    async with asyncio.timeout(10 * TTL):
        while True:
            if await _presence(bob, alice.user_id) == "offline":
                break
            await asyncio.sleep(HEARTBEAT)
    assert await _presence(bob, bob.user_id) == "online"


async def _presence(client: Client, user: str) -> str:
    data = await client.request("presence.get", {"users": [user]})
    [entry] = data["presence"]
    status: str = entry["status"]
    return status


async def _json(raw: bytes) -> Any:
    return json.loads(raw)


async def test_several_services_in_one_process_serve_every_operation(
    grouped: Deployment, user_factory: Any
) -> None:
    # `--services gateway,message` beside `--services user,room,file,notification`:
    # the gateway reaches its own process's message service directly and the others
    # through gRPC; the message service reaches the user and room services remotely.
    [gw] = grouped.gateways
    alice: Client = await user_factory(gw, "alice")
    bob: Client = await user_factory(gw, "bob")
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    sent = await alice.send_message(dm, "grouped")
    got = await bob.next_event("msg", match=lambda e: e.get("conv") == dm, timeout=10)
    assert (got["seq"], got["body"]) == (sent["seq"], "grouped")

    made = await alice.request("room.create", {"name": "Grouped", "members": [bob.user_id]})
    room = f"r:{made['room']['id']}"
    sent_room = await alice.send_message(room, "room grouped")
    got = await bob.next_event(
        "msg", match=lambda e: e.get("conv") == room and e.get("body") == "room grouped", timeout=10
    )
    assert got["seq"] == sent_room["seq"]

    data = b"grouped file " * 100
    async with HttpClient(gw.http_url, token=alice.token) as http:
        status, _, raw = await http.post(
            "/api/v1/files",
            data,
            params={"conv": dm, "name": "g.txt"},
            headers={"Content-Type": "text/plain"},
        )
    assert status == 200, raw
    info = (await _json(raw))["file"]
    async with HttpClient(gw.http_url, token=bob.token) as http:
        status, _, body = await http.get(info["url"])
    assert (status, body) == (200, data)

    assert await bob.request("block", {"user": alice.user_id}) == {}
    with pytest.raises(ClientError) as refused:
        await alice.send_message(dm, "after the block")
    assert refused.value.code == "forbidden"
    assert [m["body"] for m in (await bob.history(dm))["messages"]] == ["grouped"]
    assert await _presence(bob, alice.user_id) == "online"

    # The process without a gateway answers the probes only: no client API.
    [others] = grouped.services.values()
    for process, api_status in ((gw, 200), (others, 404)):
        async with HttpClient(process.http_url) as http:
            assert (await http.get("/readyz"))[0] == 200
            assert (await http.get("/api/v1/openapi.json"))[0] == api_status
