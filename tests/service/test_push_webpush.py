"""The Web Push provider against a real push service stand-in on 127.0.0.1.

The stand-in checks a push the way a browser's push service and then the browser do:
the VAPID JWT (ES256 with the served application server key, ``aud`` the endpoint's
origin, ``exp`` in the future and within 24 hours, ``sub``), the ``TTL``,
``Content-Encoding``, ``Urgency`` and ``Topic`` headers, and the payload, decrypted
with the subscription's private key and auth secret (made here with cryptography, as a
browser makes them) by http_ece. Then it answers 201, or 404/410/429/500/400, or never.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_ece
import jwt
import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from push_receiver import Answer, Receiver, serve

from imserver.services.notification.providers.base import Push, Registration
from imserver.services.notification.providers.vapid import VapidKeys, load_vapid_keys
from imserver.services.notification.providers.webpush import (
    MAX_PLAINTEXT,
    WebPushProvider,
    check_subscription,
)
from imserver.utils.config import WebPushConfig
from imserver.utils.errors import BadRequest

SUBJECT = "mailto:push@example.com"
TTL = 3600


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """A subscription as a browser holds it: the private key and auth secret stay here."""

    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self, endpoint: str) -> dict[str, Any]:
        public = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {"endpoint": endpoint, "keys": {"p256dh": b64(public), "auth": b64(self.auth)}}

    def decrypt(self, body: bytes) -> bytes:
        return bytes(
            http_ece.decrypt(
                body, private_key=self.private_key, auth_secret=self.auth, version="aes128gcm"
            )
        )


@dataclass
class PushService:
    """The checks of the stand-in, and what passed them."""

    keys: VapidKeys
    browser: Browser
    received: list[dict[str, Any]] = field(default_factory=list)
    """Decrypted payloads of the pushes that passed every check."""
    claims: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def __call__(
        self, request: web.Request, body: bytes, answer: Answer
    ) -> web.Response | None:
        try:
            self.check(request, body)
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=400, text=str(exc))
        return None

    def check(self, request: web.Request, body: bytes) -> None:
        authorization = request.headers["Authorization"]
        self.authorizations.append(authorization)
        scheme, _, params = authorization.partition(" ")
        assert scheme.lower() == "vapid", authorization
        fields = dict(part.strip().split("=", 1) for part in params.split(","))
        assert fields["k"] == self.keys.application_server_key
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), unb64(fields["k"])
        )
        origin = f"{request.scheme}://{request.host}"
        claims = jwt.decode(
            fields["t"],
            public_key,
            algorithms=["ES256"],
            audience=origin,
            options={"require": ["aud", "exp", "sub"]},
        )
        assert claims["sub"] == SUBJECT
        assert time.time() < claims["exp"] <= time.time() + 24 * 3600
        self.claims.append(claims)
        assert request.headers["TTL"] == str(TTL)
        assert request.headers["Content-Encoding"] == "aes128gcm"
        assert request.headers["Urgency"] in ("very-low", "low", "normal", "high")
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", request.headers["Topic"])
        assert len(body) <= 4096
        self.received.append(json.loads(self.browser.decrypt(body)))


@pytest.fixture
def keys(tmp_path: Path) -> VapidKeys:
    return load_vapid_keys(tmp_path / "data")


@pytest.fixture
def browser() -> Browser:
    return Browser()


@pytest.fixture
def service(keys: VapidKeys, browser: Browser) -> PushService:
    return PushService(keys=keys, browser=browser)


@pytest.fixture
async def receiver(service: PushService) -> AsyncIterator[Receiver]:
    async with serve(service) as receiver:
        receiver.default = 201
        yield receiver


@pytest.fixture
async def provider(keys: VapidKeys) -> AsyncIterator[WebPushProvider]:
    provider = WebPushProvider(WebPushConfig(subject=SUBJECT, ttl=TTL), keys)
    yield provider
    await provider.close()


def registration(target: dict[str, Any]) -> Registration:
    return Registration(
        user="alice",
        device="laptop",
        provider="webpush",
        target=check_subscription(target),
        created=0,
    )


def a_push(seq: int = 42, **changes: Any) -> Push:
    fields: dict[str, Any] = {
        "key": f"alice:laptop:d:alice:bob:{seq}",
        "kind": "message",
        "user": "alice",
        "device": "laptop",
        "conv": "d:alice:bob",
        "seq": seq,
        "count": 2,
        "badge": 5,
        "title": "Bob",
        "body": "dinner at 8? 🍝",
    }
    fields.update(changes)
    return Push(**fields)


async def test_a_push_is_signed_encrypted_and_accepted(
    provider: WebPushProvider, receiver: Receiver, service: PushService, browser: Browser
) -> None:
    push = a_push()
    target = browser.subscription(receiver.url + "/wpush/v2/abc")
    outcome = await provider.send(registration(target), push)
    assert service.errors == []
    assert (outcome.status, outcome.code) == ("sent", 201)
    assert service.received == [msgspec.to_builtins(push)]
    assert service.claims[0]["aud"] == receiver.url
    request, _ = receiver.requests[0]
    assert request.path == "/wpush/v2/abc"
    assert request.headers["Urgency"] == "high"


async def test_a_read_update_is_normal_urgency_and_shares_the_conversation_topic(
    provider: WebPushProvider, receiver: Receiver, service: PushService, browser: Browser
) -> None:
    target = registration(browser.subscription(receiver.url + "/s"))
    await provider.send(target, a_push(1))
    await provider.send(target, a_push(2, kind="read", count=0, badge=0, body=""))
    await provider.send(target, a_push(3, conv="r:lobby", key="alice:laptop:r:lobby:3"))
    assert service.errors == []
    (first, _), (read, _), (other, _) = receiver.requests
    assert read.headers["Urgency"] == "normal"
    assert first.headers["Topic"] == read.headers["Topic"] != other.headers["Topic"]
    assert [p["kind"] for p in service.received] == ["message", "read", "message"]
    # One JWT per origin, reused while it is fresh.
    assert len(set(service.authorizations)) == 1


async def test_a_long_preview_is_cut_to_fit_one_record(
    provider: WebPushProvider, receiver: Receiver, service: PushService, browser: Browser
) -> None:
    long_body = "é" * 5000
    outcome = await provider.send(
        registration(browser.subscription(receiver.url + "/s")), a_push(body=long_body)
    )
    assert service.errors == []
    assert outcome.status == "sent"
    (payload,) = service.received
    assert long_body.startswith(payload["body"]) and 1000 < len(payload["body"]) < 5000
    assert payload["title"] == "Bob" and payload["seq"] == 42
    assert MAX_PLAINTEXT - 1 <= len(msgspec.json.encode(payload)) <= MAX_PLAINTEXT


@pytest.mark.parametrize(
    ("answer", "status"), [(404, "gone"), (410, "gone"), (400, "failed"), (413, "failed")]
)
async def test_answers_map_to_outcomes(
    provider: WebPushProvider,
    receiver: Receiver,
    browser: Browser,
    answer: int,
    status: str,
) -> None:
    receiver.answers = [answer]
    outcome = await provider.send(registration(browser.subscription(receiver.url + "/s")), a_push())
    assert (outcome.status, outcome.code) == (status, answer)


@pytest.mark.parametrize("answer", [429, 500, 503])
async def test_busy_push_services_are_retried_after_their_retry_after(
    provider: WebPushProvider, receiver: Receiver, browser: Browser, answer: int
) -> None:
    receiver.answers = [answer]
    receiver.headers = {"Retry-After": "30"}
    target = registration(browser.subscription(receiver.url + "/s"))
    outcome = await provider.send(target, a_push())
    assert (outcome.status, outcome.code, outcome.retry_after) == ("retry", answer, 30.0)
    assert (await provider.send(target, a_push())).status == "sent"


async def test_a_push_service_that_hangs_is_a_retry_within_the_timeout(
    keys: VapidKeys, receiver: Receiver, browser: Browser
) -> None:
    receiver.answers = ["hang"]
    provider = WebPushProvider(WebPushConfig(subject=SUBJECT, ttl=TTL, timeout=1.0), keys)
    try:
        started = time.monotonic()
        outcome = await provider.send(
            registration(browser.subscription(receiver.url + "/s")), a_push()
        )
        elapsed = time.monotonic() - started
    finally:
        await provider.close()
    assert (outcome.status, outcome.detail) == ("retry", "timed out after 1s")
    assert 0.95 <= elapsed < 3.0  # bounded by the timeout: the push service never answers


async def test_a_refused_connection_is_a_retry(provider: WebPushProvider, browser: Browser) -> None:
    async with serve() as closed:
        url = closed.url
    outcome = await provider.send(registration(browser.subscription(url + "/s")), a_push())
    assert outcome.status == "retry" and "ClientConnectorError" in outcome.detail


async def test_a_push_to_another_browsers_keys_does_not_decrypt(
    provider: WebPushProvider, receiver: Receiver, service: PushService
) -> None:
    stranger = Browser()
    outcome = await provider.send(
        registration(stranger.subscription(receiver.url + "/s")), a_push()
    )
    assert (outcome.status, outcome.code) == ("failed", 400)
    assert service.received == [] and len(service.errors) == 1


def test_the_vapid_key_is_made_once_with_mode_0600_and_survives_a_restart(tmp_path: Path) -> None:
    first = load_vapid_keys(tmp_path)
    assert first.path == tmp_path / "notification" / "vapid_private.pem"
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    raw = unb64(first.application_server_key)
    assert len(raw) == 65 and raw[0] == 4
    assert "=" not in first.application_server_key
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    again = load_vapid_keys(tmp_path)
    assert again.application_server_key == first.application_server_key
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["vapid_private.pem"]


def test_servers_starting_at_once_on_one_data_dir_share_one_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = list(pool.map(lambda _: load_vapid_keys(tmp_path), range(8)))
    assert len({keys.application_server_key for keys in loaded}) == 1
    assert sorted(p.name for p in (tmp_path / "notification").iterdir()) == ["vapid_private.pem"]


async def test_a_restarted_provider_signs_with_the_same_key(
    tmp_path: Path, receiver: Receiver, service: PushService, browser: Browser
) -> None:
    restarted = WebPushProvider(
        WebPushConfig(subject=SUBJECT, ttl=TTL), load_vapid_keys(tmp_path / "data")
    )
    try:
        outcome = await restarted.send(
            registration(browser.subscription(receiver.url + "/s")), a_push()
        )
    finally:
        await restarted.close()
    assert service.errors == [] and outcome.status == "sent"


def test_a_damaged_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "notification").mkdir()
    (tmp_path / "notification" / "vapid_private.pem").write_text("not a key")
    with pytest.raises(BadRequest, match="invalid configuration"):
        load_vapid_keys(tmp_path)


def test_a_bad_subject_is_a_configuration_error(keys: VapidKeys) -> None:
    with pytest.raises(BadRequest, match=r"push\.webpush\.subject"):
        WebPushProvider(WebPushConfig(subject="admin"), keys)


GOOD = Browser().subscription("https://push.example.net/wpush/v2/abc")
P256DH = GOOD["keys"]["p256dh"]
AUTH = GOOD["keys"]["auth"]
COMPRESSED = b64(
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
)


def with_keys(**keys: Any) -> dict[str, Any]:
    return {"endpoint": GOOD["endpoint"], "keys": {"p256dh": P256DH, "auth": AUTH, **keys}}


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("https://push.example.net/x", "target"),
        ({"keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": 5, "keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": "http://push.example.net/x", "keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": "ftp://push.example.net/x", "keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": "https://u:p@push.example.net/x", "keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": "https:///x", "keys": GOOD["keys"]}, "target.endpoint"),
        ({"endpoint": "https://push.example.net:99999/x", "keys": GOOD["keys"]}, "target.endpoint"),
        (
            {"endpoint": "https://p.example.net/" + "x" * 2048, "keys": GOOD["keys"]},
            "target.endpoint",
        ),
        ({"endpoint": GOOD["endpoint"]}, "target.keys"),
        ({"endpoint": GOOD["endpoint"], "keys": [P256DH, AUTH]}, "target.keys"),
        ({"endpoint": GOOD["endpoint"], "keys": {"auth": AUTH}}, "target.keys.p256dh"),
        (with_keys(p256dh="not base64!"), "target.keys.p256dh"),
        (with_keys(p256dh=b64(b"\x04" + bytes(64))), "target.keys.p256dh"),
        (with_keys(p256dh=P256DH[:-4]), "target.keys.p256dh"),
        (with_keys(p256dh=COMPRESSED), "target.keys.p256dh"),
        ({"endpoint": GOOD["endpoint"], "keys": {"p256dh": P256DH}}, "target.keys.auth"),
        (with_keys(auth=b64(os.urandom(15))), "target.keys.auth"),
        (with_keys(auth="a+b/"), "target.keys.auth"),
    ],
)
def test_bad_subscriptions_name_the_field(target: Any, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_subscription(target)
    assert caught.value.field == field


def test_a_subscription_is_normalised() -> None:
    padded = {
        "endpoint": GOOD["endpoint"],
        "expirationTime": None,
        "keys": {"p256dh": P256DH + "=", "auth": AUTH + "=="},
    }
    assert check_subscription(padded) == GOOD
    local = {"endpoint": "http://localhost:8080/push", "keys": GOOD["keys"]}
    assert check_subscription(local)["endpoint"] == "http://localhost:8080/push"
