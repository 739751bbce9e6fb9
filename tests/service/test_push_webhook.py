"""The webhook provider against a real receiver on 127.0.0.1 that verifies every
request with the recipe of docs/push.md (signature, five-minute window, repeats of
``Idempotency-Key``) and answers as each test plans: 2xx, 503 a few times, 410, 400,
no answer at all."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from push_receiver import Answer, Receiver, serve

from imserver.services.notification.providers.base import Push, Registration
from imserver.services.notification.providers.webhook import WebhookBody, WebhookProvider
from imserver.utils.config import WebhookConfig
from imserver.utils.errors import BadRequest

SECRET = "s3cret-for-tests"

# --- the verification recipe of docs/push.md, verbatim -------------------------------

TOLERANCE = 300  # seconds: older (or further ahead) timestamps are rejected


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float) -> bool:
    """True when ``body`` was signed with ``secret`` at ``timestamp``, within TOLERANCE."""
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > TOLERANCE:
        return False
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(signature.encode(), ("v1=" + mac.hexdigest()).encode())


# --------------------------------------------------------------------------------------


@dataclass
class Verifier:
    """The receiver's side of the recipe: what it accepted, refused and dropped."""

    secret: bytes
    seen: set[str] = field(default_factory=set)
    delivered: list[dict[str, Any]] = field(default_factory=list)
    repeats: int = 0
    refused: int = 0

    async def __call__(
        self, request: web.Request, body: bytes, answer: Answer
    ) -> web.Response | None:
        timestamp = request.headers.get("X-IMServer-Timestamp", "")
        signature = request.headers.get("X-IMServer-Signature", "")
        if not verify(self.secret, timestamp, signature, body, time.time()):
            self.refused += 1
            return web.Response(status=401, text="bad signature")
        key = request.headers["Idempotency-Key"]
        if key in self.seen:
            self.repeats += 1
            return web.Response(status=200, text="repeat")
        if isinstance(answer, int) and 200 <= answer < 300:
            self.seen.add(key)
            self.delivered.append(json.loads(body))
        return None


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(secret=SECRET.encode())


@pytest.fixture
async def receiver(verifier: Verifier) -> AsyncIterator[Receiver]:
    async with serve(verifier) as receiver:
        yield receiver


def provider_for(url: str, timeout: float = 5.0, **secret: str) -> WebhookProvider:
    return WebhookProvider(
        WebhookConfig(url=url, timeout=timeout, **(secret or {"secret": SECRET}))
    )


@pytest.fixture
async def provider(receiver: Receiver) -> AsyncIterator[WebhookProvider]:
    provider = provider_for(receiver.url + "/push")
    yield provider
    await provider.close()


def a_push(seq: int = 42, **changes: Any) -> Push:
    fields: dict[str, Any] = {
        "key": f"alice:phone:d:alice:bob:{seq}",
        "kind": "message",
        "user": "alice",
        "device": "phone",
        "conv": "d:alice:bob",
        "seq": seq,
        "count": 3,
        "badge": 7,
        "title": "Bob",
        "body": "see you at 8 — ok?",
    }
    fields.update(changes)
    return Push(**fields)


REGISTRATION = Registration(
    user="alice", device="phone", provider="webhook", target={"token": "tok-1"}, created=0
)


async def test_a_signed_push_is_verified_and_sent(
    provider: WebhookProvider, receiver: Receiver, verifier: Verifier
) -> None:
    push = a_push()
    outcome = await provider.send(REGISTRATION, push)
    assert (outcome.status, outcome.code) == ("sent", 200)
    request, _ = receiver.requests[0]
    assert request.method == "POST" and request.path == "/push"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == push.key
    assert request.headers["X-IMServer-Signature"].startswith("v1=")
    assert verifier.refused == 0
    assert verifier.delivered == [
        {
            "key": push.key,
            "kind": "message",
            "user": "alice",
            "device": "phone",
            "conv": "d:alice:bob",
            "seq": 42,
            "count": 3,
            "badge": 7,
            "title": "Bob",
            "body": "see you at 8 — ok?",
            "token": "tok-1",
        }
    ]


async def test_first_attempts_fail_with_503_then_the_push_is_sent_once(
    provider: WebhookProvider, receiver: Receiver, verifier: Verifier
) -> None:
    receiver.answers = [503, 503, 503]
    receiver.headers = {"Retry-After": "2"}
    push = a_push()
    for _ in range(3):
        outcome = await provider.send(REGISTRATION, push)
        assert (outcome.status, outcome.code, outcome.retry_after) == ("retry", 503, 2.0)
        assert outcome.detail == "answer 503"
    assert (await provider.send(REGISTRATION, push)).status == "sent"
    # A repeat after a lost answer (or a restart) is acknowledged, not delivered again.
    assert (await provider.send(REGISTRATION, push)).status == "sent"
    assert [d["seq"] for d in verifier.delivered] == [42]
    assert verifier.repeats == 1
    assert verifier.refused == 0
    assert len(receiver.requests) == 5


async def test_410_is_gone_and_400_is_failed(provider: WebhookProvider, receiver: Receiver) -> None:
    receiver.answers = [410, 400]
    gone = await provider.send(REGISTRATION, a_push(1))
    assert (gone.status, gone.code, gone.detail) == ("gone", 410, "answer 410")
    failed = await provider.send(REGISTRATION, a_push(2))
    assert (failed.status, failed.code) == ("failed", 400)


async def test_a_redirect_is_not_followed(provider: WebhookProvider, receiver: Receiver) -> None:
    receiver.answers = [307]
    receiver.headers = {"Location": receiver.url + "/elsewhere"}
    outcome = await provider.send(REGISTRATION, a_push())
    assert (outcome.status, outcome.code) == ("failed", 307)
    assert [request.path for request, _ in receiver.requests] == ["/push"]


async def test_a_receiver_that_hangs_is_a_retry_within_the_timeout(receiver: Receiver) -> None:
    receiver.answers = ["hang"]
    provider = provider_for(receiver.url + "/push", timeout=1.0)
    try:
        started = time.monotonic()
        outcome = await provider.send(REGISTRATION, a_push())
        elapsed = time.monotonic() - started
        # The session survives a timeout: the next push goes through.
        assert (await provider.send(REGISTRATION, a_push(43))).status == "sent"
    finally:
        await provider.close()
    assert outcome.status == "retry" and outcome.code is None
    assert outcome.detail == "timed out after 1s"
    assert 0.95 <= elapsed < 3.0  # bounded by the timeout: the receiver never answers


async def test_a_refused_connection_is_a_retry_with_the_error() -> None:
    async with serve() as gone_receiver:
        url = gone_receiver.url
    provider = provider_for(url + "/push", timeout=2.0)
    try:
        outcome = await provider.send(REGISTRATION, a_push())
    finally:
        await provider.close()
    assert outcome.status == "retry" and outcome.code is None
    assert "ClientConnectorError" in outcome.detail


async def test_a_wrong_secret_is_refused_by_the_receiver(
    receiver: Receiver, verifier: Verifier
) -> None:
    provider = provider_for(receiver.url, secret="not-the-secret")
    try:
        outcome = await provider.send(REGISTRATION, a_push())
    finally:
        await provider.close()
    assert (outcome.status, outcome.code) == ("failed", 401)
    assert verifier.refused == 1 and verifier.delivered == []


async def test_the_secret_can_come_from_a_file(
    tmp_path: Path, receiver: Receiver, verifier: Verifier
) -> None:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(f"  {SECRET}\n")
    provider = provider_for(receiver.url, secret_file=str(secret_file))
    try:
        assert (await provider.send(REGISTRATION, a_push())).status == "sent"
    finally:
        await provider.close()
    assert verifier.refused == 0 and len(verifier.delivered) == 1


async def test_one_connection_is_reused(provider: WebhookProvider, receiver: Receiver) -> None:
    for seq in range(1, 4):
        assert (await provider.send(REGISTRATION, a_push(seq))).status == "sent"
    assert len(set(receiver.peers)) == 1


def test_the_recipe_rejects_stale_future_and_tampered_requests() -> None:
    secret = SECRET.encode()
    body = b'{"key":"k"}'
    now = time.time()

    def signature(timestamp: str, payload: bytes = body) -> str:
        return (
            "v1=" + hmac.new(secret, f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
        )

    fresh = str(int(now) - 10)
    assert verify(secret, fresh, signature(fresh), body, now)
    stale = str(int(now) - 301)
    assert not verify(secret, stale, signature(stale), body, now)
    ahead = str(int(now) + 301)
    assert not verify(secret, ahead, signature(ahead), body, now)
    assert not verify(secret, fresh, signature(fresh), b'{"key":"x"}', now)
    assert not verify(secret, "12e3", signature("12e3"), body, now)
    assert not verify(secret, fresh, "v1=é", body, now)


@pytest.mark.parametrize(
    "target",
    [{}, {"token": ""}, {"token": 7}, {"token": "x" * 513}, {"tokn": "abc"}],
    ids=["missing", "empty", "not-a-string", "too-long", "misspelt"],
)
def test_bad_targets_name_the_field(target: dict[str, Any]) -> None:
    provider = provider_for("http://127.0.0.1:9/push")
    with pytest.raises(BadRequest) as caught:
        provider.check_target(target)
    assert caught.value.field == "target.token"


def test_a_good_target_keeps_only_the_token() -> None:
    provider = provider_for("http://127.0.0.1:9/push")
    assert provider.check_target({"token": "x" * 512, "extra": 1}) == {"token": "x" * 512}
    with pytest.raises(BadRequest) as caught:
        provider.check_target("tok")  # type: ignore[arg-type]
    assert caught.value.field == "target"


@pytest.mark.parametrize(
    "config",
    [
        WebhookConfig(url="http://127.0.0.1:9/push"),
        WebhookConfig(url="http://127.0.0.1:9/push", secret_file="/nonexistent/secret"),
        WebhookConfig(url="ftp://127.0.0.1/push", secret=SECRET),
        WebhookConfig(url="", secret=SECRET),
    ],
    ids=["no-secret", "missing-secret-file", "not-http", "no-url"],
)
def test_a_bad_configuration_is_refused_at_construction(config: WebhookConfig) -> None:
    with pytest.raises(BadRequest, match=r"invalid configuration: push\.webhook"):
        WebhookProvider(config)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "push.md"


def test_the_documented_recipe_and_example_are_the_tested_ones() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert inspect.getsource(verify) in text
    assert f"TOLERANCE = {TOLERANCE}" in text
    timestamp = re.search(r"^X-IMServer-Timestamp: (\d+)$", text, re.M)
    signature = re.search(r"^X-IMServer-Signature: (v1=[0-9a-f]{64})$", text, re.M)
    body = re.search(r'^(\{"key":"alice:phone.*"token":"dev-81f2"\})$', text, re.M)
    assert timestamp and signature and body
    documented = WebhookBody(
        key="alice:phone:d:alice:bob:42",
        kind="message",
        user="alice",
        device="phone",
        conv="d:alice:bob",
        seq=42,
        count=3,
        badge=7,
        title="bob",
        body="see you at 8",
        token="dev-81f2",
    )
    assert msgspec.json.encode(documented) == body[1].encode()
    assert verify(
        b"example-secret",
        timestamp[1],
        signature[1],
        body[1].encode(),
        now=float(timestamp[1]),
    )
