"""The HTTP side of the webhook and Web Push providers: one reused aiohttp session
that POSTs a push and reports the answer as an :class:`~.base.Outcome`.

Here, and only here, aiohttp's failures become outcomes: a timeout (connecting
included, ``timeout`` seconds for the whole request) or a connection error is
``retry`` with its text; an answer is mapped by :func:`~.base.outcome_of_status`.
Redirects are not followed: neither a receiver nor a push service answers with one,
and Web Push endpoints are chosen by clients, so a redirect could lead the server
anywhere. Only the first :data:`DETAIL_BYTES` of an answer are read.
"""

from __future__ import annotations

import aiohttp

from imserver.services.notification.providers.base import (
    Outcome,
    outcome_of_status,
    parse_retry_after,
)

DETAIL_BYTES = 512
"""Most bytes of an answer kept as the outcome's detail."""
USER_AGENT = "imserver-push"


class PushTransport:
    """POSTs over one aiohttp session, made on first use (inside the running loop)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """POST ``body`` to ``url``; the answer, a timeout or an error as an outcome."""
        try:
            async with self._client().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await response.content.read(DETAIL_BYTES)
                return outcome_of_status(
                    response.status,
                    detail=answer.decode("utf-8", "replace") or (response.reason or ""),
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return Outcome(status="retry", detail=f"timed out after {self._timeout:g}s")
        except aiohttp.ClientError as exc:
            return Outcome(status="retry", detail=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # No connection cap of its own: ``push.concurrency`` bounds the requests.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session
