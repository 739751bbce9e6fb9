"""The ``fcm`` provider against a local stand-in of Google's two endpoints.

The stand-in is a real HTTP server that checks what the documentation asks of a
client: the OAuth2 token endpoint verifies the RS256 assertion with the service
account's public key (generated here), its claims and the grant type, and issues
bearer tokens; the FCM v1 send endpoint checks the bearer, the project in the URL and
the message's shape (string data values, notification only for visible pushes, the
collapse key), and answers as FCM does: 200 with the message's name, 404
``UNREGISTERED``, 400 ``INVALID_ARGUMENT``, 503 with ``Retry-After``, 401 for a revoked
token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from imserver.services.notification.providers.base import Outcome, Push, Registration
from imserver.services.notification.providers.fcm import GRANT_TYPE, SCOPE, FcmProvider
from imserver.utils.config import FcmConfig
from imserver.utils.errors import BadRequest

PROJECT = "imserver-test"
EMAIL = "push@imserver-test.iam.gserviceaccount.com"
KEY_ID = "a1b2c3d4"

OK = "tok-ok"
UNREGISTERED = "tok-unregistered"
INVALID = "tok-invalid"
BUSY = "tok-busy"
SLOW = "tok-slow"


def fcm_error(code: int, status: str, error_code: str, message: str) -> dict[str, Any]:
    """An FCM v1 error body (google.rpc.Status with an FcmError detail)."""
    return {
        "error": {
            "code": code,
            "message": message,
            "status": status,
            "details": [
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": error_code,
                }
            ],
        }
    }


def message_problem(body: Any) -> str | None:
    """What is wrong with a ``messages:send`` body, per the FCM v1 reference."""
    if not isinstance(body, dict) or set(body) != {"message"}:
        return "the body is {message: …}"
    message = body["message"]
    if not isinstance(message.get("token"), str):
        return "message.token"
    data = message.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return "message.data values are strings"
    if not {"kind", "conv", "seq", "count", "badge", "key"} <= set(data):
        return "message.data keys"
    android = message.get("android", {})
    if not android.get("collapse_key"):
        return "message.android.collapse_key"
    apns = message.get("apns", {})
    if not apns.get("headers", {}).get("apns-collapse-id"):
        return "message.apns.headers"
    if data["kind"] == "message":
        notification = message.get("notification")
        if not isinstance(notification, dict) or set(notification) != {"title", "body"}:
            return "message.notification"
        if android.get("priority") != "high":
            return "message.android.priority"
    else:
        if "notification" in message:
            return "a silent push has no notification"
        if apns["payload"]["aps"].get("content-available") != 1:
            return "message.apns.payload.aps.content-available"
    return None


@dataclass
class Google:
    """The stand-in's state, and what it saw."""

    public_key: rsa.RSAPublicKey
    token_url: str = ""
    expires_in: int = 3599
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    messages: list[dict[str, Any]] = field(default_factory=list)
    busy_answered: bool = False
    revoke_on_issue: bool = False
    """Every token is revoked as it is issued (the send endpoint refuses them all)."""

    async def token(self, request: web.Request) -> web.Response:
        """The OAuth2 token endpoint (RFC 7523 JWT bearer grant)."""
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400)
        form = await request.post()
        if form.get("grant_type") != GRANT_TYPE:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        assertion = str(form.get("assertion", ""))
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_url,
                issuer=EMAIL,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response(
                {"error": "invalid_grant", "error_description": str(exc)}, status=400
            )
        if header.get("kid") != KEY_ID or claims["scope"] != SCOPE:
            return web.json_response({"error": "invalid_scope"}, status=400)
        if not 0 < claims["exp"] - claims["iat"] <= 3600:
            return web.json_response({"error": "invalid_grant"}, status=400)
        access = "ya29." + secrets.token_urlsafe(24)
        self.issued.append(access)
        if self.revoke_on_issue:
            self.revoked.add(access)
        return web.json_response(
            {"access_token": access, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        """``POST /v1/projects/{project}/messages:send``."""
        bearer = request.headers.get("Authorization", "")
        if (
            not bearer.startswith("Bearer ")
            or bearer[7:] not in self.issued
            or bearer[7:] in self.revoked
        ):
            return web.json_response(
                fcm_error(401, "UNAUTHENTICATED", "UNAUTHENTICATED", "bad credentials"), status=401
            )
        if request.match_info["project"] != PROJECT:
            return web.json_response(
                fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "project"), status=403
            )
        body = await request.json()
        problem = message_problem(body)
        if problem:
            return web.json_response(
                fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", problem), status=400
            )
        message = body["message"]
        token = message["token"]
        if token == UNREGISTERED:
            return web.json_response(
                fcm_error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
                status=404,
            )
        if token == INVALID:
            return web.json_response(
                fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "invalid registration"),
                status=400,
            )
        if token == BUSY and not self.busy_answered:
            self.busy_answered = True
            return web.json_response(
                fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "try later"),
                status=503,
                headers={"Retry-After": "7"},
            )
        if token == SLOW:
            await asyncio.sleep(1.5)
        self.messages.append(message)
        name = f"projects/{PROJECT}/messages/{len(self.messages)}"
        return web.json_response({"name": name})


@pytest.fixture
async def google(tmp_path: Path) -> AsyncIterator[tuple[Google, FcmConfig]]:
    """The stand-in on a free port, and the settings of a provider that uses it: the
    service account file names the token URL and the project."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    state = Google(public_key=key.public_key())
    app = web.Application()
    app.router.add_post("/token", state.token)
    app.router.add_post("/v1/projects/{project}/messages:send", state.send)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    state.token_url = f"{base}/token"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "1234567890",
        "token_uri": state.token_url,
    }
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(account))
    try:
        yield state, FcmConfig(service_account_file=str(path), endpoint=base, timeout=0.5)
    finally:
        await runner.cleanup()


@pytest.fixture
async def provider(google: tuple[Google, FcmConfig]) -> AsyncIterator[FcmProvider]:
    """An FCM provider on the stand-in."""
    fcm = FcmProvider(google[1])
    try:
        yield fcm
    finally:
        await fcm.close()


def registration(token: str) -> Registration:
    return Registration(
        user="u1", device="phone", provider="fcm", target={"token": token}, created=0
    )


def push(kind: str = "message", seq: int = 12) -> Push:
    return Push(
        key=f"u1:phone:d:u1:u2:{seq}",
        kind=kind,  # type: ignore[arg-type]
        user="u1",
        device="phone",
        conv="d:u1:u2",
        seq=seq,
        count=3 if kind == "message" else 0,
        badge=5 if kind == "message" else 0,
        title="Bob" if kind == "message" else "",
        body="see you at 8" if kind == "message" else "",
    )


async def test_message_push_is_sent_with_notification_and_string_data(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    outcome = await provider.send(registration(OK), push())
    assert outcome.status == "sent"
    assert outcome.code == 200
    assert outcome.detail == f"projects/{PROJECT}/messages/1"
    (message,) = state.messages
    assert message["token"] == OK
    assert message["notification"] == {"title": "Bob", "body": "see you at 8"}
    assert message["data"] == {
        "kind": "message",
        "conv": "d:u1:u2",
        "seq": "12",
        "count": "3",
        "badge": "5",
        "key": "u1:phone:d:u1:u2:12",
    }
    assert message["android"]["collapse_key"] == "d:u1:u2"
    assert message["apns"]["payload"]["aps"]["badge"] == 5


async def test_read_push_is_data_only(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    assert (await provider.send(registration(OK), push("read"))).status == "sent"
    (message,) = state.messages
    assert "notification" not in message
    assert message["data"]["kind"] == "read"
    assert message["data"]["badge"] == "0"
    assert message["apns"]["headers"]["apns-push-type"] == "background"
    assert message["apns"]["headers"]["apns-priority"] == "5"


async def test_access_token_is_reused_and_one_exchange_serves_concurrent_sends(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    outcomes = await asyncio.gather(*(provider.send(registration(OK), push()) for _ in range(5)))
    assert [o.status for o in outcomes] == ["sent"] * 5
    assert await provider.send(registration(OK), push()) == Outcome(
        status="sent", code=200, detail=f"projects/{PROJECT}/messages/6"
    )
    assert len(state.issued) == 1


async def test_token_near_its_expiry_is_replaced(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    state.expires_in = 30  # inside the refresh margin: each send needs a new one
    for _ in range(2):
        assert (await provider.send(registration(OK), push())).status == "sent"
    assert len(state.issued) == 2


async def test_401_refreshes_the_token_once(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    assert (await provider.send(registration(OK), push())).status == "sent"
    state.revoked.update(state.issued)
    outcome = await provider.send(registration(OK), push())
    assert outcome.status == "sent"
    assert len(state.issued) == 2
    assert len(state.messages) == 2


async def test_401_after_a_fresh_token_fails(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    state, _ = google
    state.revoke_on_issue = True
    outcome = await provider.send(registration(OK), push())
    assert outcome.status == "failed"
    assert outcome.code == 401
    assert "UNAUTHENTICATED" in outcome.detail
    assert len(state.issued) == 2


async def test_unregistered_token_is_gone(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    outcome = await provider.send(registration(UNREGISTERED), push())
    assert outcome.status == "gone"
    assert outcome.code == 404
    assert outcome.detail.startswith("UNREGISTERED")


async def test_invalid_argument_fails(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    outcome = await provider.send(registration(INVALID), push())
    assert outcome.status == "failed"
    assert outcome.code == 400
    assert outcome.detail == "INVALID_ARGUMENT: invalid registration"


async def test_503_is_retried_after_retry_after_then_sent(
    google: tuple[Google, FcmConfig], provider: FcmProvider
) -> None:
    first = await provider.send(registration(BUSY), push())
    assert first.status == "retry"
    assert first.code == 503
    assert first.retry_after == 7.0
    second = await provider.send(registration(BUSY), push())
    assert second.status == "sent"


async def test_timeout_is_retried(google: tuple[Google, FcmConfig], provider: FcmProvider) -> None:
    outcome = await provider.send(registration(SLOW), push())
    assert outcome.status == "retry"
    assert outcome.code is None
    assert outcome.detail.startswith("timeout")


async def test_unreachable_endpoint_is_retried(google: tuple[Google, FcmConfig]) -> None:
    _, config = google
    fcm = FcmProvider(msgspec.structs.replace(config, endpoint="http://127.0.0.1:9"))
    try:
        assert (await fcm.send(registration(OK), push())).status == "retry"
    finally:
        await fcm.close()


async def test_bare_404_of_a_wrong_endpoint_fails_and_is_not_gone(
    google: tuple[Google, FcmConfig],
) -> None:
    _, config = google
    fcm = FcmProvider(msgspec.structs.replace(config, endpoint=config.endpoint + "/fcm"))
    try:
        outcome = await fcm.send(registration(OK), push())
    finally:
        await fcm.close()
    assert (outcome.status, outcome.code) == ("failed", 404)


async def test_refused_assertion_fails_and_is_never_gone(
    google: tuple[Google, FcmConfig],
) -> None:
    state, config = google
    state.public_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    fcm = FcmProvider(config)
    try:
        outcome = await fcm.send(registration(OK), push())
    finally:
        await fcm.close()
    assert outcome.status == "failed"
    assert outcome.code == 400
    assert "invalid_grant" in outcome.detail
    assert not state.messages


async def test_token_url_and_project_settings_override_the_file(
    google: tuple[Google, FcmConfig],
) -> None:
    state, config = google
    wrong = msgspec.structs.replace(config, project_id="another-project")
    fcm = FcmProvider(wrong)
    try:
        outcome = await fcm.send(registration(OK), push())
    finally:
        await fcm.close()
    assert outcome.status == "failed"
    assert outcome.code == 403
    assert outcome.detail.startswith("SENDER_ID_MISMATCH")
    elsewhere = msgspec.structs.replace(config, token_url=state.token_url + "-moved")
    fcm = FcmProvider(elsewhere)
    try:
        outcome = await fcm.send(registration(OK), push())
    finally:
        await fcm.close()
    assert outcome.status == "failed"  # a 404 from the token URL is no device's fault
    assert outcome.code == 404


@pytest.mark.parametrize(
    ("target", "field_name"),
    [
        ({}, "target.token"),
        ({"token": 42}, "target.token"),
        ({"token": "  "}, "target.token"),
        ({"token": "bad token\n"}, "target.token"),
        ({"token": "x" * 5000}, "target.token"),
    ],
)
async def test_bad_target_is_a_bad_request_naming_the_field(
    provider: FcmProvider, target: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        provider.check_target(target)
    assert caught.value.field == field_name


async def test_good_target_is_kept(provider: FcmProvider) -> None:
    assert provider.check_target({"token": OK, "extra": 1}) == {"token": OK}
    assert provider.name == "fcm"


def test_missing_or_broken_service_account_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"push\.fcm\.service_account_file"):
        FcmProvider(FcmConfig(service_account_file=str(tmp_path / "missing.json")))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"client_email": EMAIL, "private_key": "not a key"}))
    with pytest.raises(BadRequest, match="private_key"):
        FcmProvider(FcmConfig(service_account_file=str(broken)))
