"""Smoke tests of the harness and the client against a real server process."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from imserver.client import Client, ClientError, ConnectionClosed, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerProcess, Wire


async def test_direct_message_between_two_users(server: ServerProcess, clients: Clients) -> None:
    alice = await clients.user(server, "alice")
    bob = await clients.user(server, "bob")
    assert alice.hello_data is not None and alice.hello_data["v"] == 1
    conv = Client.direct_conv(alice.user_id, bob.user_id)

    sent = await alice.send_message(conv, "hello bob")
    assert sent["conv"] == conv and sent["seq"] == 1 and sent["dup"] is False

    ev = await bob.next_event("msg")
    assert (ev["conv"], ev["seq"], ev["from"], ev["body"]) == (conv, 1, alice.user_id, "hello bob")
    assert ev["cid"] == sent["cid"]
    # the sending session does not get its own message back
    assert await alice.events_before_ping("msg") == []

    page = await bob.history(conv)
    assert [m["body"] for m in page["messages"]] == ["hello bob"]


async def test_every_transport_and_codec(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    sender = await clients.user(shared_server, "sender")  # the test's wire
    peer = await clients.user(shared_server, "peer", transport="ws", codec="json")
    conv = Client.direct_conv(sender.user_id, peer.user_id)

    await sender.send_message(conv, f"over {wire}", cid="c-1")
    again = await sender.send_message(conv, f"over {wire}", cid="c-1")
    assert again["dup"] is True and again["seq"] == 1
    assert (await peer.next_event("msg"))["body"] == f"over {wire}"

    await peer.send_message(conv, "back")
    assert (await sender.next_event("msg"))["body"] == "back"

    with pytest.raises(ClientError) as info:
        await sender.request("no.such.op")
    assert info.value.code == "bad_request"


async def test_bad_frame_keeps_connection_open(server: ServerProcess) -> None:
    async with Client.connect(server.tcp_addr, transport="tcp") as c:
        reply = await c.roundtrip({"op": "send", "conv": 5})
        assert reply["ok"] is False
        assert reply["error"]["code"] in ("bad_request", "unauthorized")
        await c.send_raw(b"{garbage")  # no rid can be read: the error reply is an event
        assert (await c.next_event("reply"))["error"]["code"] == "bad_request"
        assert await c.ping() == {}
    assert c.closed


@pytest.mark.embedded_only("stops and restarts the one server process")
async def test_http_api_and_restart(server: ServerProcess, clients: Clients) -> None:
    account = await clients.register(server, "carol")
    async with HttpClient(server.http_url) as http:
        status, body = await http.call(
            "login", username=account.username, password=account.password
        )
        assert status == 200, body
        token = body["token"]
        status, _, _ = await http.get("/healthz")
        assert status == 200
        status, body = await http.call("convs", token=token)
        assert status == 200 and body["convs"] == []
        status, body = await http.call("convs")
        assert status == 401 and body["error"]["code"] == "unauthorized"

    # Restart on the same data directory: the account survives.
    code = await server.astop()
    await server.astart()
    c = await clients.connect(server, "ws", "msgpack", login_as=account)
    assert c.user_id == account.id
    assert code == 0, "SIGTERM should end the server cleanly"


async def test_server_close_reaches_the_client(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    c = await clients.user(shared_server, "leaving")
    pending = c.request_nowait("ping")  # answered before the close, or failed by it
    await c.logout()
    assert await c.wait_closed(5) is not None  # the reason of the `closed` event
    assert (await c.next_event("closed"))["reason"] == c.closed_reason
    with pytest.raises(ConnectionClosed):
        await c.ping()
    await asyncio.gather(pending, return_exceptions=True)
