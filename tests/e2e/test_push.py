"""Offline push through a real ``imserver serve`` (docs/protocol.md §6.6): a device
registers an FCM token, its user goes offline, a message to them becomes an FCM v1
request at a local stand-in of Google's token and send endpoints — across a restart
of the server too — and ``push.trace`` explains it.

The stand-in accepts any well-formed token request (the FCM provider's own tests
verify the assertion); its send endpoint checks the bearer it issued, answers the
first request with 503 and ``Retry-After: 0`` and records the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from imserver.client import Client

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory

PROJECT = "imserver-e2e"


class StandIn:
    """Google's two endpoints, as far as the FCM provider needs them."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.messages: list[dict[str, Any]] = []
        self.refused = 0
        self.base = ""

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not form.get("assertion"):
            return web.json_response({"error": "invalid_request"}, status=400)
        access = f"ya29.e2e-{len(self.tokens)}"
        self.tokens.add(access)
        return web.json_response({"access_token": access, "expires_in": 3599})

    async def send(self, request: web.Request) -> web.Response:
        bearer = request.headers.get("Authorization", "")
        if bearer.removeprefix("Bearer ") not in self.tokens:
            return web.json_response({"error": {"code": 401}}, status=401)
        if self.refused == 0:
            self.refused += 1
            return web.json_response(
                {"error": {"code": 503, "status": "UNAVAILABLE"}},
                status=503,
                headers={"Retry-After": "0"},
            )
        self.messages.append((await request.json())["message"])
        return web.json_response({"name": f"projects/{PROJECT}/messages/{len(self.messages)}"})


@pytest.fixture
async def google(tmp_path: Path) -> AsyncIterator[tuple[StandIn, dict[str, Any]]]:
    """The stand-in on a free port and the ``[push.fcm]`` settings that use it."""
    state = StandIn()
    app = web.Application()
    app.router.add_post("/token", state.token)
    app.router.add_post("/v1/projects/{project}/messages:send", state.send)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base = f"http://127.0.0.1:{port}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = tmp_path / "service-account.json"
    account.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "push@imserver-e2e.iam.gserviceaccount.com",
                "token_uri": f"{state.base}/token",
            }
        )
    )
    try:
        yield state, {"service_account_file": str(account), "endpoint": state.base}
    finally:
        await runner.cleanup()


async def until(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.embedded_only("stops and restarts the one server process")
async def test_offline_push_reaches_fcm_and_survives_a_restart(
    server_factory: ServerFactory,
    clients: Clients,
    google: tuple[StandIn, dict[str, Any]],
) -> None:
    state, fcm = google
    server = server_factory(
        {"push": {"collapse_delay": 0.05, "fcm": fcm, "webpush": {"enabled": False}}}
    )
    bob = await clients.user(server, "bob")
    assert await bob.request("push.register", {"provider": "fcm", "target": {"token": "T1"}}) == {}
    [reg] = (await bob.request("push.list"))["registrations"]
    assert (reg["provider"], reg["target"]) == ("fcm", {"token": "T1"})
    bob_id = bob.user_id
    await bob.close()
    alice = await clients.user(server, "alice")
    conv = Client.direct_conv(alice.user_id, bob_id)
    await alice.send_message(conv, "are you there?")
    await until(lambda: len(state.messages) == 1)
    message = state.messages[0]
    assert message["token"] == "T1"
    assert f"{bob_id}:" in json.dumps(message) and "are you there?" in json.dumps(message)
    # The server records FCM's answer after FCM got the push: read the trace until
    # the push has left ``sending``.
    deadline = time.monotonic() + 10.0
    while True:
        trace = await alice.request("push.trace", {"conv": conv, "seq": 1})
        [bob_trace] = [r for r in trace["recipients"] if r["user"] == bob_id]
        [job] = bob_trace["pushes"]
        if job["state"] != "sending" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (bob_trace["due"], bob_trace["reason"]) == (True, "due")
    assert job["provider"] == "fcm" and job["state"] == "sent"
    assert [a["code"] for a in job["attempts"]] == [503, 200]

    # The registration and the outbox are in notification.db: after a restart a new
    # message is pushed as before, and the old one is not pushed again.
    await alice.close()
    server.stop()
    server.start()
    alice2 = await clients.user(server, "alice")
    conv2 = Client.direct_conv(alice2.user_id, bob_id)
    await alice2.send_message(conv2, "still there?")
    await until(lambda: len(state.messages) == 2)
    assert state.messages[1]["token"] == "T1"
    assert "still there?" in json.dumps(state.messages[1])
    await asyncio.sleep(0.3)
    assert len(state.messages) == 2
