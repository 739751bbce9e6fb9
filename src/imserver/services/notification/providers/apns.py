"""The ``apns`` provider: Apple Push Notification service over HTTP/2 with token-based
authentication.

The provider token is an ES256 JWT (header ``kid`` the key id, claims ``iss`` the team
id and ``iat``) signed with the team's ``.p8`` key. Apple rejects a token older than an
hour and throttles one refreshed more often than every 20 minutes
(``TooManyProviderTokenUpdates``), so one token serves every request for
:data:`TOKEN_LIFETIME` seconds. An ``ExpiredProviderToken`` answer (the clock moved, or
the token outlived a suspended process) replaces it at once and the push is tried once
more.

Each push is one ``POST {endpoint}/3/device/{token}`` on one HTTP/2 connection that
every request shares. A ``message`` push is an alert (priority 10) with the title, the
body, the badge and ``thread-id`` = the conversation; a ``read`` push is a background
push (``content-available: 1``, priority 5; Apple refuses priority 10 for those) whose
custom keys give the app the new badge. ``apns-collapse-id`` is the conversation, so a
device shows one notification per conversation.

Answers: 200 sent (with the ``apns-id``); 410, ``BadDeviceToken`` and ``Unregistered``
gone; 429 and 5xx retry; any other refusal fails with Apple's ``reason``, a 404 too:
APNs answers it only for a wrong path (``BadPath``), which says nothing of the device.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from imserver.services.notification.providers.base import (
    Outcome,
    Push,
    Registration,
    outcome_of_status,
    parse_retry_after,
)
from imserver.services.notification.providers.mobile import (
    BODY_BYTES,
    TITLE_BYTES,
    clip,
    collapse_id,
    transport_outcome,
)
from imserver.utils.config import ApnsConfig
from imserver.utils.errors import BadRequest

TOKEN_LIFETIME: Final = 40 * 60.0
"""Seconds one provider token is used: past Apple's 20-minute refresh floor, well
before its 60-minute expiry."""
EXPIRATION: Final = 86400
"""Seconds APNs keeps trying to reach an offline device (``apns-expiration``)."""
GONE_REASONS: Final = frozenset({"BadDeviceToken", "Unregistered"})
DEVICE_TOKEN: Final = re.compile(r"(?:[0-9a-f]{2}){16,256}")
"""A device token in hex. Apple says their length varies: 16 to 256 bytes are taken."""
KEY_NAMESPACE: Final = uuid.UUID("0f8a5f8c-0b0e-4c43-9a55-2c0b6c1e9f41")
"""Of the ``apns-id`` derived from a push's idempotency key."""


def load_key(path: str) -> EllipticCurvePrivateKey:
    """The ES256 key of a ``.p8`` file; ``bad_request`` naming the setting otherwise."""
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BadRequest(f"invalid configuration: push.apns.key_file {path!r}: {exc}") from None
    if not isinstance(key, EllipticCurvePrivateKey):
        raise BadRequest(f"invalid configuration: push.apns.key_file {path!r} is not an EC key")
    return key


def apns_payload(push: Push) -> dict[str, Any]:
    """The JSON body for ``push``: the ``aps`` dictionary and the app's own keys."""
    custom = {
        "kind": push.kind,
        "conv": push.conv,
        "seq": push.seq,
        "count": push.count,
        "badge": push.badge,
        "key": push.key,
    }
    if push.kind == "read":
        return {"aps": {"content-available": 1}, **custom}
    aps = {
        "alert": {"title": clip(push.title, TITLE_BYTES), "body": clip(push.body, BODY_BYTES)},
        "badge": push.badge,
        "sound": "default",
        "thread-id": push.conv,
    }
    return {"aps": aps, **custom}


def _reason(response: httpx.Response) -> str:
    """Apple's ``reason`` of a refusal (the raw body when it has another shape)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("reason", "")) if isinstance(body, dict) else response.text[:200]


class ApnsProvider:
    """Delivers pushes to APNs on one HTTP/2 connection with a shared provider token."""

    def __init__(self, config: ApnsConfig) -> None:
        for setting in ("key_id", "team_id", "topic"):
            if not getattr(config, setting):
                raise BadRequest(f"invalid configuration: push.apns.{setting} is empty")
        self._config = config
        self._key = load_key(config.key_file)
        verify: ssl.SSLContext | bool = True
        if config.ca_file:
            try:
                verify = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise BadRequest(
                    f"invalid configuration: push.apns.ca_file {config.ca_file!r}: {exc}"
                ) from None
        self._client = httpx.AsyncClient(http2=True, verify=verify, timeout=config.timeout)
        self._base = config.endpoint.rstrip("/")
        self._token: str | None = None
        self._token_issued = 0.0
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """``apns``."""
        return "apns"

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """``{"token": <the device token in hex>}``, stored in lower case."""
        token = target.get("token")
        if not isinstance(token, str) or not DEVICE_TOKEN.fullmatch(token.lower()):
            raise BadRequest(
                "target.token: an APNs device token in hex (32 to 512 digits)",
                field="target.token",
            )
        return {"token": token.lower()}

    async def send(self, registration: Registration, push: Push) -> Outcome:
        """POST the notification; on ``ExpiredProviderToken``, once more with a new token."""
        device = str(registration.target.get("token", ""))
        try:
            token = await self._provider_token()
            response = await self._post(token, device, push)
            if response.status_code == 403 and _reason(response) == "ExpiredProviderToken":
                await self._drop_token(token)
                response = await self._post(await self._provider_token(), device, push)
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        if response.status_code == 200:
            return Outcome(status="sent", code=200, detail=response.headers.get("apns-id", ""))
        reason = _reason(response)
        if reason in GONE_REASONS:
            return Outcome(status="gone", code=response.status_code, detail=reason)
        if reason == "ExpiredProviderToken":
            return Outcome(status="retry", code=response.status_code, detail=reason)
        if response.status_code == 404:
            # APNs says 410 for a device that is gone; its 404 (BadPath) is a wrong endpoint.
            return Outcome(status="failed", code=404, detail=reason)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return outcome_of_status(response.status_code, reason, retry_after)

    async def close(self) -> None:
        """Close the HTTP/2 connection."""
        await self._client.aclose()

    async def _post(self, token: str, device: str, push: Push) -> httpx.Response:
        silent = push.kind == "read"
        headers = {
            "authorization": f"bearer {token}",
            "apns-topic": self._config.topic,
            "apns-push-type": "background" if silent else "alert",
            "apns-priority": "5" if silent else "10",
            "apns-collapse-id": collapse_id(push.conv),
            "apns-expiration": str(int(time.time()) + EXPIRATION),
            "apns-id": str(uuid.uuid5(KEY_NAMESPACE, push.key)),
        }
        return await self._client.post(
            f"{self._base}/3/device/{device}", json=apns_payload(push), headers=headers
        )

    async def _drop_token(self, token: str) -> None:
        """Forget ``token`` unless a concurrent send already replaced it."""
        async with self._lock:
            if self._token == token:
                self._token = None

    async def _provider_token(self) -> str:
        """The current provider token, signed anew after :data:`TOKEN_LIFETIME`."""
        async with self._lock:
            now = time.monotonic()
            if self._token is None or now - self._token_issued >= TOKEN_LIFETIME:
                self._token = jwt.encode(
                    {"iss": self._config.team_id, "iat": int(time.time())},
                    self._key,
                    "ES256",
                    headers={"kid": self._config.key_id},
                )
                self._token_issued = now
            return self._token
