"""The HTTP API client: ``POST /api/v1/<op>`` with JSON bodies, and plain routes."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from imserver.client.codec import Frame, json_decoder, json_encoder
from imserver.client.errors import ClientError, ConnectFailed

__all__ = ["HttpClient"]


class HttpClient:
    """The HTTP API: ``POST /api/v1/<op>`` with JSON bodies, plus plain routes.

    ``token`` (given here or per call) is sent as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``session``: a shared aiohttp session, left open by :meth:`close`."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._session = session
        self._own = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _sess(self) -> aiohttp.ClientSession:
        # Created lazily: aiohttp wants a running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _headers(self, token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(headers or {})
        bearer = token or self.token
        if bearer:
            out.setdefault("Authorization", f"Bearer {bearer}")
        return out

    async def call(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        /,
        *,
        token: str | None = None,
        **kw: Any,
    ) -> tuple[int, Frame]:
        """POST the op and return ``(status, body)``.

        The body is the reply ``data`` on 2xx and ``{"error": {...}}`` otherwise; a body
        that is not a JSON object comes back as ``{"_raw": text}``. Fields named
        ``token`` go in the ``fields`` mapping (the keyword is the bearer token).
        """
        body: Frame = dict(fields or {})
        body.update(kw)
        status, _, raw = await self.post(
            f"/api/v1/{op}",
            json_encoder.encode(body),
            token=token,
            headers={"Content-Type": "application/json"},
        )
        return status, _json_body(raw)

    async def request(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        /,
        *,
        token: str | None = None,
        **kw: Any,
    ) -> Frame:
        """Like :meth:`call`, but return ``data`` and raise :class:`ClientError` on errors."""
        status, body = await self.call(op, fields, token=token, **kw)
        if 200 <= status < 300:
            return body
        if isinstance(body.get("error"), Mapping):
            raise ClientError.from_reply(body, status=status)
        raise ClientError("_http", f"HTTP {status}: {body!r}", status=status)

    async def get(
        self,
        path: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """GET ``path`` (relative to the base URL): ``(status, headers, body)``."""
        return await self._send("GET", path, None, token, headers, params)

    async def post(
        self,
        path: str,
        data: bytes,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """POST raw ``data`` to ``path`` (file uploads): ``(status, headers, body)``."""
        return await self._send("POST", path, data, token, headers, params)

    async def _send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        token: str | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        try:
            async with self._sess().request(
                method,
                url,
                data=data,
                headers=self._headers(token, headers),
                params=dict(params) if params else None,
            ) as resp:
                body = await resp.read()
                return resp.status, resp.headers, body
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise ConnectFailed(f"{method} {url}: {exc}") from exc

    async def close(self) -> None:
        """Close the HTTP session (when this client created it)."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _json_body(raw: bytes) -> Frame:
    if not raw:
        return {}
    try:
        body = json_decoder.decode(raw)
    except msgspec.DecodeError:
        return {"_raw": raw.decode(errors="replace")}
    return body if isinstance(body, dict) else {"_raw": raw.decode(errors="replace")}
