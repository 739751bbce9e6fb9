"""The ``webhook`` push provider: a signed JSON POST to the operator's own receiver.

For operators who deliver pushes themselves (an in-house gateway, a bridge to a
provider IMServer does not speak). Every push is one request to ``[push.webhook] url``::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <push.key>
    X-IMServer-Timestamp: <unix seconds>
    X-IMServer-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the secret>

    {"key": "alice:phone:d:alice:bob:42", "kind": "message", "user": "alice",
     "device": "phone", "conv": "d:alice:bob", "seq": 42, "count": 3, "badge": 7,
     "title": "Bob", "body": "see you at 8", "token": "<the registration's token>"}

A 2xx answer is ``sent``; 404/410 ``gone`` (the registration is removed); 408, 429 and
5xx ``retry`` (honouring ``Retry-After``); any other status ``failed``. A timeout or a
connection error is ``retry`` with the error's text. The receiver's verification
recipe (constant-time compare, a five-minute window, dropping repeated
``Idempotency-Key`` values) is in docs/push.md.

Signing the timestamp with the body stops a captured request from being replayed
later; the idempotency key lets the receiver drop the repeats a retry after a lost
answer (or a restart) can cause, since delivery is at least once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from imserver.services.notification.providers.base import (
    Outcome,
    Push,
    PushKind,
    Registration,
)
from imserver.services.notification.providers.transport import PushTransport
from imserver.utils.config import WebhookConfig
from imserver.utils.errors import BadRequest

TIMESTAMP_HEADER = "X-IMServer-Timestamp"
SIGNATURE_HEADER = "X-IMServer-Signature"
SIGNATURE_VERSION = "v1"
MAX_TOKEN = 512
"""Longest ``target.token``, in characters."""


class WebhookBody(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON body of a webhook push: the push's fields and the registration's token."""

    key: str
    kind: PushKind
    user: str
    device: str
    conv: str
    seq: int
    count: int
    badge: int
    title: str
    body: str
    token: str
    """What the receiver knows the device by (the registration's ``target.token``)."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-IMServer-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def read_secret(config: WebhookConfig) -> bytes:
    """The signing key: ``secret_file``'s content (stripped) when set, else ``secret``."""
    if config.secret_file:
        try:
            text = Path(config.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BadRequest(
                f"invalid configuration: push.webhook.secret_file: {exc.strerror or exc}"
            ) from exc
    else:
        text = config.secret
    if not text:
        raise BadRequest("invalid configuration: push.webhook needs secret or secret_file")
    return text.encode("utf-8")


class WebhookProvider:
    """Delivers pushes as signed JSON POSTs to ``config.url``, over one reused session."""

    def __init__(self, config: WebhookConfig) -> None:
        parts = urlsplit(config.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("invalid configuration: push.webhook.url must be an http(s) URL")
        self._url = config.url
        self._secret = read_secret(config)
        self._transport = PushTransport(config.timeout)

    @property
    def name(self) -> str:
        """``webhook``."""
        return "webhook"

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """``{"token": <1 to 512 characters>}``; other fields are not kept."""
        if not isinstance(target, dict):
            raise BadRequest("target must be an object", field="target")
        token = target.get("token")
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN:
            raise BadRequest(
                f"token must be a string of 1 to {MAX_TOKEN} characters", field="target.token"
            )
        return {"token": token}

    async def send(self, registration: Registration, push: Push) -> Outcome:
        """POST ``push`` for ``registration``; the answer, a timeout or an error as an outcome."""
        body = msgspec.json.encode(
            WebhookBody(
                key=push.key,
                kind=push.kind,
                user=push.user,
                device=push.device,
                conv=push.conv,
                seq=push.seq,
                count=push.count,
                badge=push.badge,
                title=push.title,
                body=push.body,
                token=str(registration.target.get("token", "")),
            )
        )
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": push.key,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        return await self._transport.post(self._url, body, headers)

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._transport.close()
