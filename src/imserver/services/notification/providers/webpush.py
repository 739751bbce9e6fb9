"""The ``webpush`` push provider: Web Push (RFC 8030) to a browser's push service.

A browser subscribes with the server's application server key (``push.vapid_key``) and
registers the subscription it got (``endpoint``, ``keys.p256dh``, ``keys.auth``). Each
push is one POST to that endpoint:

- the body is the push as JSON (the :class:`~.base.Push` fields), encrypted for the
  subscription with ``aes128gcm`` (RFC 8188/8291) by pywebpush and http-ece, in one
  record: the plaintext is cut to :data:`MAX_PLAINTEXT` bytes by shortening the
  preview (then the title), since push services need accept no more than 4096 bytes
  of body;
- ``Authorization: vapid t=<JWT>, k=<application server key>`` (RFC 8292) signed by
  py-vapid with the server's key (:mod:`.vapid`); a JWT is made once per push
  service origin and reused until an hour before it expires;
- ``TTL`` (``[push.webpush] ttl``), ``Urgency`` (``high`` for messages, ``normal`` for
  the silent read update) and ``Topic``: one per conversation, so a push still waiting
  at the push service is replaced by the next one of the same conversation (a read
  update replaces the message push it made stale).

pywebpush's own ``send_async`` is not used for the request: it reads the whole answer
of a client-chosen endpoint into memory and leaves the response unreleased, while the
answer is only needed for its status and a short reason. The request is built with the
libraries (``WebPusher.encode``, ``Vapid02.sign``) and sent over one reused aiohttp
session.

A 2xx answer (push services answer 201) is ``sent``; 404/410 ``gone`` (the
subscription expired or was revoked); 408, 429 and 5xx ``retry`` with ``Retry-After``;
any other status ``failed``. A timeout or a connection error is ``retry``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import VapidException
from pywebpush import WebPusher, WebPushException

from imserver.services.notification.providers.base import (
    Outcome,
    Push,
    Registration,
)
from imserver.services.notification.providers.transport import PushTransport
from imserver.services.notification.providers.vapid import VapidKeys
from imserver.utils.config import WebPushConfig
from imserver.utils.errors import BadRequest

MAX_PLAINTEXT = 4096 - 86 - 17
"""Largest payload that encrypts to a 4096-byte body: 86 bytes of aes128gcm header
(salt, record size, the 65-byte sender key) and 17 of padding delimiter and tag."""
MAX_ENDPOINT = 2048
"""Longest ``target.endpoint``, in characters."""
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
"""Hosts an ``http:`` endpoint may name (local test push services)."""
JWT_LIFETIME = 12 * 3600
"""Seconds a VAPID JWT is valid (RFC 8292 allows at most 24 hours)."""
JWT_RENEW = 3600
"""Seconds before its expiry a cached JWT is replaced."""
MAX_CACHED_JWTS = 256
"""Push service origins whose JWT is kept; endpoints are the clients' to choose."""
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def topic(conv: str) -> str:
    """The ``Topic`` of a conversation's pushes: 32 base64url characters (RFC 8030
    allows no more). A digest: conversation ids hold characters a Topic may not, and
    the push service has no need to learn them."""
    digest = hashlib.sha256(conv.encode("utf-8")).digest()[:24]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def payload(push: Push) -> bytes:
    """``push`` as JSON, its preview (then its title) shortened to fit one record."""
    data = msgspec.json.encode(push)
    for field in ("body", "title"):
        while len(data) > MAX_PLAINTEXT:
            text = getattr(push, field)
            if not text:
                break
            excess = len(data) - MAX_PLAINTEXT
            cut = text.encode("utf-8")[: max(0, len(text.encode("utf-8")) - excess)]
            push = msgspec.structs.replace(push, **{field: cut.decode("utf-8", "ignore")})
            data = msgspec.json.encode(push)
    return data


def _decode_base64url(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not _BASE64URL.fullmatch(value):
        raise BadRequest("must be base64url", field=field)
    text = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("must be base64url", field=field) from exc


def _unpadded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def check_subscription(target: dict[str, Any]) -> dict[str, Any]:
    """The subscription to store, normalised (keys unpadded); ``bad_request`` naming the
    field otherwise. Other fields of ``PushSubscription.toJSON()`` (``expirationTime``)
    are accepted and not kept."""
    if not isinstance(target, dict):
        raise BadRequest("target must be an object", field="target")
    endpoint = target.get("endpoint")
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT:
        raise BadRequest(
            f"endpoint must be a URL of at most {MAX_ENDPOINT} characters",
            field="target.endpoint",
        )
    try:
        parts = urlsplit(endpoint)
        host, _ = parts.hostname, parts.port  # .port raises ValueError when malformed
    except ValueError as exc:
        raise BadRequest("endpoint is not a valid URL", field="target.endpoint") from exc
    secure = parts.scheme == "https" or (parts.scheme == "http" and host in LOCAL_HOSTS)
    if not secure or not host or parts.username is not None or parts.fragment:
        raise BadRequest(
            "endpoint must be an https URL without credentials or fragment",
            field="target.endpoint",
        )
    keys = target.get("keys")
    if not isinstance(keys, dict):
        raise BadRequest("keys must be an object with p256dh and auth", field="target.keys")
    p256dh = _decode_base64url(keys.get("p256dh"), "target.keys.p256dh")
    try:
        if len(p256dh) != 65:  # a compressed point is a valid key, but not a subscription's
            raise ValueError("not an uncompressed point")
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError as exc:
        raise BadRequest(
            "p256dh must be an uncompressed P-256 point", field="target.keys.p256dh"
        ) from exc
    auth = _decode_base64url(keys.get("auth"), "target.keys.auth")
    if len(auth) != 16:
        raise BadRequest("auth must be 16 bytes", field="target.keys.auth")
    return {"endpoint": endpoint, "keys": {"p256dh": _unpadded(p256dh), "auth": _unpadded(auth)}}


class WebPushProvider:
    """Delivers encrypted, VAPID-signed pushes to browsers' push services."""

    def __init__(self, config: WebPushConfig, keys: VapidKeys) -> None:
        self._keys = keys
        self._subject = config.subject
        self._ttl = config.ttl
        self._transport = PushTransport(config.timeout)
        self._jwts: dict[str, tuple[str, float]] = {}
        """Authorization header per push service origin, with the time to replace it."""
        try:
            self._authorization("https://localhost")
        except VapidException as exc:
            raise BadRequest(
                "invalid configuration: push.webpush.subject must be a mailto: or https: URL"
            ) from exc
        self._jwts.clear()

    @property
    def name(self) -> str:
        """``webpush``."""
        return "webpush"

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """A push subscription (see :func:`check_subscription`)."""
        return check_subscription(target)

    async def send(self, registration: Registration, push: Push) -> Outcome:
        """Encrypt and POST ``push`` to the subscription's endpoint."""
        subscription = registration.target
        endpoint = str(subscription.get("endpoint", ""))
        parts = urlsplit(endpoint)
        try:
            body = WebPusher(subscription).encode(payload(push), "aes128gcm")["body"]
            authorization = self._authorization(f"{parts.scheme}://{parts.netloc}")
        except (WebPushException, VapidException, ValueError, TypeError) as exc:
            return Outcome(status="failed", detail=f"cannot encrypt or sign: {exc}")
        headers = {
            "Authorization": authorization,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(self._ttl),
            "Urgency": "high" if push.kind == "message" else "normal",
            "Topic": topic(push.conv),
        }
        return await self._transport.post(endpoint, body, headers)

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._transport.close()

    def _authorization(self, audience: str) -> str:
        """The VAPID ``Authorization`` header for a push service origin, cached."""
        now = time.time()
        cached = self._jwts.get(audience)
        if cached is not None and cached[1] > now:
            return cached[0]
        expires = int(now) + JWT_LIFETIME
        claims = {"aud": audience, "exp": expires, "sub": self._subject}
        header = str(self._keys.signer.sign(claims)["Authorization"])
        if len(self._jwts) >= MAX_CACHED_JWTS:
            self._jwts.clear()
        self._jwts[audience] = (header, expires - JWT_RENEW)
        return header
