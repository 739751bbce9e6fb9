"""The interface every push provider implements, and what passes through it.

The notification service decides *whether* and *what* to push; a provider only knows
*how* to deliver one :class:`Push` to one :class:`Registration` and reports the
provider's answer as an :class:`Outcome`. The service's queue does everything else:
retries with backoff after ``retry``, removes the registration after ``gone``, and
records every attempt for ``push.trace``.

A provider never raises for a delivery problem (timeouts, refused connections, HTTP
errors are outcomes); an exception out of :meth:`Provider.send` is a bug, which the
queue records as a ``retry`` attempt with the exception's text.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

PushKind = Literal["message", "read"]
"""``message``: new messages to show. ``read``: a silent update (nothing shown) that
sets the badge after the user read on another device."""

OutcomeStatus = Literal["sent", "retry", "gone", "failed"]
"""``sent``: the provider accepted the push. ``retry``: a temporary failure (timeout,
connection refused, 429, 5xx). ``gone``: the registration no longer exists at the
provider (404, 410) and is removed. ``failed``: refused for good (another 4xx)."""


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """One device's push registration with one provider.

    ``target`` is the provider's address of the device, as the client registered it and
    the provider's :meth:`Provider.check_target` accepted it: a Web Push subscription
    (``endpoint``, ``keys.p256dh``, ``keys.auth``), an FCM or APNs device token, the
    opaque token a webhook receiver knows the device by.
    """

    user: str
    device: str
    provider: str
    target: dict[str, Any]
    created: int
    """Milliseconds since the epoch."""


class Push(msgspec.Struct, frozen=True, kw_only=True):
    """What one push says. Collapsed: ``count`` messages of ``conv`` up to ``seq``."""

    key: str
    """The idempotency key, ``<user>:<device>:<conv>:<seq>``: providers pass it on
    (a header, a collapse id) so that a receiver can drop a repeat after a restart."""
    kind: PushKind
    user: str
    device: str
    conv: str
    seq: int
    """The last seq this push covers (for ``read``: the seq read up to)."""
    count: int
    """Messages this push stands for (0 for ``read``)."""
    badge: int
    """The user's unread total over every conversation, after these messages."""
    title: str
    """Who sent the last message: the sender's user id."""
    body: str
    """A preview of the last message (empty for ``read``)."""


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's answer to one attempt."""

    status: OutcomeStatus
    code: int | None = None
    """The provider's HTTP status, when there was one."""
    detail: str = ""
    """The provider's reason, or the transport error, as text (for ``push.trace``)."""
    retry_after: float | None = None
    """Seconds the provider asked to wait (``Retry-After``)."""


class Provider(Protocol):
    """Delivers pushes of one kind (``webpush``, ``webhook``, ``fcm``, ``apns``)."""

    @property
    def name(self) -> str:
        """The ``provider`` value of ``push.register``."""

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """The target to store for a ``push.register``; ``bad_request`` (with the
        field) when it is not one this provider can deliver to."""

    async def send(self, registration: Registration, push: Push) -> Outcome:
        """Deliver one push; never raises for a delivery problem."""

    async def close(self) -> None:
        """Release connections."""


def outcome_of_status(code: int, detail: str = "", retry_after: float | None = None) -> Outcome:
    """The outcome of an HTTP status from a provider: 2xx sent; 404/410 gone; 408, 429
    and 5xx retry; any other failed."""
    if 200 <= code < 300:
        return Outcome(status="sent", code=code, detail=detail)
    if code in (404, 410):
        return Outcome(status="gone", code=code, detail=detail)
    if code in (408, 429) or code >= 500:
        return Outcome(status="retry", code=code, detail=detail, retry_after=retry_after)
    return Outcome(status="failed", code=code, detail=detail)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header in its delta-seconds form (None otherwise)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
