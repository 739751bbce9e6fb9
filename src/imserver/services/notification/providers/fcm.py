"""The ``fcm`` provider: Firebase Cloud Messaging's HTTP v1 API.

Authentication is OAuth2 with a service account (RFC 7523): the provider signs a JWT
assertion with the account's RSA key (RS256; ``iss`` the account's e-mail, ``scope``
firebase.messaging, ``aud`` the token URL, one hour long), exchanges it at the token
URL for a bearer access token, and keeps that token until a minute before its
``expires_in``. One lock makes concurrent sends share one exchange. A 401 from the send
endpoint drops the token and the send is tried once more with a fresh one.

Each push is one ``POST {endpoint}/v1/projects/{project}/messages:send``. A ``message``
push carries a notification (title, body) and data; a ``read`` push is data only, which
the app handles silently to set its badge. FCM's data values are strings. The
conversation is the collapse key on Android and the collapse id on Apple devices, so a
device shows one notification per conversation.

FCM's error body names the cause in ``error.status`` and in an ``FcmError`` detail's
``errorCode``: ``UNREGISTERED`` or ``NOT_FOUND`` (FCM's 404) means the token is gone;
429 and 5xx are retried after ``Retry-After``; any other refusal fails for good, a 404
without FCM's error body too (a wrong endpoint says nothing of the device).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
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
from imserver.utils.config import FcmConfig
from imserver.utils.errors import BadRequest

SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME: Final = 3600
"""Seconds an assertion is valid: Google accepts at most one hour."""
TOKEN_MARGIN: Final = 60.0
"""Seconds before its expiry an access token is replaced."""
TOKEN_MAX_CHARS: Final = 4096
GONE_CODES: Final = frozenset({"UNREGISTERED", "NOT_FOUND"})


class ServiceAccount(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of a Google service account's JSON key file that the provider uses."""

    client_email: str
    private_key: str
    """PEM, PKCS#8."""
    token_uri: str = "https://oauth2.googleapis.com/token"
    project_id: str = ""
    private_key_id: str = ""


def load_service_account(path: str) -> ServiceAccount:
    """The service account of a key file; ``bad_request`` naming the setting when the
    file cannot be read or is not a service account key."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=ServiceAccount)
    except (OSError, msgspec.DecodeError) as exc:
        raise BadRequest(
            f"invalid configuration: push.fcm.service_account_file {path!r}: {exc}"
        ) from None


def load_signing_key(account: ServiceAccount) -> RSAPrivateKey:
    """The account's RSA key, loaded once so that a bad key stops the start."""
    try:
        key = load_pem_private_key(account.private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise BadRequest(
            f"invalid configuration: push.fcm.service_account_file: private_key: {exc}"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise BadRequest(
            "invalid configuration: push.fcm.service_account_file: private_key is not RSA"
        )
    return key


class _Refused(Exception):
    """The token exchange did not give a token; carries the outcome to report."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


def _fcm_error(response: httpx.Response) -> tuple[str, str]:
    """``(code, text)`` of an FCM error body: the ``FcmError`` detail's ``errorCode``
    (else ``error.status``) and the message; empty strings for a body of another shape."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", response.text[:200]
    code = str(error.get("status") or "")
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
            break
    return code, str(error.get("message") or "")


def fcm_message(token: str, push: Push) -> dict[str, Any]:
    """The ``message`` of a ``messages:send`` request for ``push`` to device ``token``."""
    silent = push.kind == "read"
    data = {
        "kind": push.kind,
        "conv": push.conv,
        "seq": str(push.seq),
        "count": str(push.count),
        "badge": str(push.badge),
        "key": push.key,
    }
    collapse = collapse_id(push.conv)
    aps: dict[str, Any] = {"thread-id": push.conv}
    if silent:
        aps["content-available"] = 1
    else:
        aps["badge"] = push.badge
    message: dict[str, Any] = {
        "token": token,
        "data": data,
        "android": {"collapse_key": collapse, "priority": "normal" if silent else "high"},
        "apns": {
            "headers": {
                "apns-collapse-id": collapse,
                "apns-priority": "5" if silent else "10",
                "apns-push-type": "background" if silent else "alert",
            },
            "payload": {"aps": aps},
        },
    }
    if not silent:
        message["notification"] = {
            "title": clip(push.title, TITLE_BYTES),
            "body": clip(push.body, BODY_BYTES),
        }
        message["android"]["notification"] = {"tag": collapse, "notification_count": push.count}
    return message


class FcmProvider:
    """Delivers pushes through FCM HTTP v1 with one reused HTTP client."""

    def __init__(self, config: FcmConfig) -> None:
        self._account = load_service_account(config.service_account_file)
        self._key = load_signing_key(self._account)
        project = config.project_id or self._account.project_id
        if not project:
            raise BadRequest(
                "invalid configuration: push.fcm.project_id is empty and the service "
                "account file names no project_id"
            )
        self._token_url = config.token_url or self._account.token_uri
        self._send_url = f"{config.endpoint.rstrip('/')}/v1/projects/{project}/messages:send"
        self._client = httpx.AsyncClient(timeout=config.timeout)
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """``fcm``."""
        return "fcm"

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """``{"token": <the app's FCM registration token>}``."""
        token = target.get("token")
        if not isinstance(token, str) or not token.strip():
            raise BadRequest("target.token: an FCM registration token", field="target.token")
        if len(token) > TOKEN_MAX_CHARS or not token.isascii() or not token.isprintable():
            raise BadRequest("target.token is not an FCM registration token", field="target.token")
        return {"token": token}

    async def send(self, registration: Registration, push: Push) -> Outcome:
        """POST the message; on a 401, once more with a new access token."""
        body = {"message": fcm_message(str(registration.target.get("token", "")), push)}
        try:
            token = await self._access_token()
            response = await self._post(token, body)
            if response.status_code == 401:
                await self._drop_token(token)
                response = await self._post(await self._access_token(), body)
        except _Refused as refused:
            return refused.outcome
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        if response.is_success:
            return Outcome(status="sent", code=response.status_code, detail=_sent_name(response))
        code, text = _fcm_error(response)
        detail = f"{code}: {text}" if code else text
        if code in GONE_CODES:
            return Outcome(status="gone", code=response.status_code, detail=detail)
        if response.status_code == 404:
            # FCM names a vanished token in its error body; a bare 404 is a wrong endpoint.
            return Outcome(status="failed", code=404, detail=detail)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return outcome_of_status(response.status_code, detail, retry_after)

    async def close(self) -> None:
        """Close the HTTP client's connections."""
        await self._client.aclose()

    async def _post(self, token: str, body: dict[str, Any]) -> httpx.Response:
        return await self._client.post(
            self._send_url, json=body, headers={"authorization": f"Bearer {token}"}
        )

    async def _drop_token(self, token: str) -> None:
        """Forget ``token`` unless a concurrent send already replaced it."""
        async with self._lock:
            if self._token == token:
                self._token = None

    async def _access_token(self) -> str:
        """The cached access token, or a new one from the token URL."""
        async with self._lock:
            if self._token is not None and time.monotonic() < self._token_expires:
                return self._token
            now = time.monotonic()
            self._token, lifetime = await self._exchange()
            self._token_expires = now + max(lifetime - TOKEN_MARGIN, 0.0)
            return self._token

    async def _exchange(self) -> tuple[str, float]:
        """A signed assertion exchanged for ``(access token, seconds valid)``."""
        issued = int(time.time())
        claims = {
            "iss": self._account.client_email,
            "scope": SCOPE,
            "aud": self._token_url,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
        assertion = jwt.encode(claims, self._key, "RS256", headers=headers)
        response = await self._client.post(
            self._token_url, data={"grant_type": GRANT_TYPE, "assertion": assertion}
        )
        if not response.is_success:
            detail = f"access token: {response.status_code} {response.text[:200]}"
            # A refused exchange is the operator's key or clock, not the device: never gone.
            status = outcome_of_status(response.status_code).status
            raise _Refused(
                Outcome(
                    status="retry" if status == "retry" else "failed",
                    code=response.status_code,
                    detail=detail,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
            )
        try:
            answer = response.json()
            return str(answer["access_token"]), float(answer.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as exc:
            raise _Refused(
                Outcome(status="retry", code=response.status_code, detail=f"access token: {exc!r}")
            ) from None


def _sent_name(response: httpx.Response) -> str:
    """The ``name`` FCM gave the message (``projects/…/messages/…``), for the trace."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("name", "")) if isinstance(body, dict) else ""
