"""The HTTP API edge: the aiohttp application of the ops, files, health and metrics.

Routes:

* ``GET /ws`` — only the refusals: the WebSocket itself is served by
  :mod:`imserver.network.ws`, which hands aiohttp every other request;
* ``POST /api/v1/<op>`` — any op, body = the op's fields as JSON;
* ``GET /api/v1/openapi.json`` — generated from the op structs;
* ``POST /api/v1/files``, ``GET /api/v1/files/<id>``, ``GET /api/v1/files/<id>/thumb``
  — uploads (the raw body streamed to the file service) and downloads (``Range``);
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

An op arrives here as one request and runs through the same router as a WebSocket or
TCP frame, in a :class:`~imserver.services.gateway.session.RequestContext` (no live
session: ``login`` and ``auth`` bind nothing); its rate limit, bearer check and
error object are those of the other transports.
"""

from __future__ import annotations

import inspect
import logging
import time
import urllib.parse
from collections import OrderedDict

import msgspec
from aiohttp import web

from imserver.network.ws import upgrade_within_aiohttp
from imserver.protocol.codec import decode_op_as, encode_json
from imserver.protocol.events import ErrorBody
from imserver.protocol.wsframe import RequestHead, header_dict, upgrade_key
from imserver.services.caller import Caller
from imserver.services.file.api import FileService, RangeNotSatisfiable, UploadData
from imserver.services.gateway.openapi import openapi_document
from imserver.services.gateway.ratelimit import TokenBucket
from imserver.services.gateway.service import Gateway
from imserver.services.gateway.session import PUBLIC_OPS, RequestContext, error_body
from imserver.utils.errors import (
    BadRequest,
    IMError,
    Internal,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from imserver.utils.ids import ConvId, UserId

logger = logging.getLogger(__name__)

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
HTTP_BUCKETS_MAX = 10_000
UPLOAD_CHUNK = 256 * 1024
"""Most bytes taken from an upload's body at a time."""


class _ErrorDocument(msgspec.Struct):
    """The body of an HTTP error response: the protocol's error object."""

    error: ErrorBody


def _error_response(exc: IMError) -> web.Response:
    body = encode_json(_ErrorDocument(error_body(exc)))
    response = web.Response(status=exc.status, body=body, content_type="application/json")
    if isinstance(exc, RangeNotSatisfiable):
        response.headers["Content-Range"] = f"bytes */{exc.size}"
    return response


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks of a ``size``-byte file.

    ``None`` means "send the whole file" (no header, another unit, several ranges, or
    a malformed value: RFC 9110 lets a server ignore those). A well-formed single range
    that starts past the end raises :class:`RangeNotSatisfiable` (416).
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(int(last), size - 1) if last else size - 1


def content_disposition(name: str, kind: str = "attachment") -> str:
    """``attachment; filename="<ASCII fallback>"; filename*=UTF-8''<name>`` (RFC 6266).

    The fallback replaces anything outside printable ASCII, and the quote, backslash,
    percent and semicolon characters, with ``_``, so no header injection is possible
    even from a name that was never sanitised.
    """
    fallback = "".join(ch if " " <= ch < "\x7f" and ch not in '"\\%;' else "_" for ch in name)
    encoded = urllib.parse.quote(name, safe="")
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def _served_type(mime: str) -> str:
    # Text was checked to be UTF-8 when it was sniffed.
    if mime.startswith("text/"):
        return f"{mime}; charset=utf-8"
    return mime


_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Belt and braces for browsers that render an attachment anyway: no script, no
    # subresources, a unique origin.
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-cache",
}


READY_FOR = 1.0
"""Seconds a gateway's ``/readyz`` answers ready without asking its services again
after they all answered. A balancer checks each gateway once per port and interval
(HAProxy: both ports every second), and each full check is a call to every service
and a query of each one's database; a failing check is never remembered, and the
gateway's own state (starting, draining) is read every time."""


class HttpApi:
    """Handlers of the aiohttp routes."""

    def __init__(self, gateway: Gateway, files: FileService | None = None) -> None:
        self.gateway = gateway
        self.files = files
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._openapi: bytes | None = None
        self.ready = False
        self._reached = float("-inf")
        """When (monotonic) the services last all answered a readiness check."""

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = self.gateway.new_bucket()
            if len(self._buckets) > HTTP_BUCKETS_MAX:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def _rate_limit(self, request: web.Request) -> None:
        """Take a token of the peer's bucket (HTTP requests are limited per address)."""
        limited = self._bucket(request.remote or "?").check()
        if limited is not None:
            raise limited

    async def _bearer(self, header: str, malformed: str) -> Caller:
        """The caller an ``Authorization: Bearer <token>`` header stands for."""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(malformed)
        identity = await self.gateway.users.authenticate(token)
        return Caller(identity.user, identity.login, None)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws`` requests that did not come first on their connection (the front
        door of :mod:`imserver.network.ws` upgrades those itself): the refusals, the
        requests that are not upgrades, and upgrades on a keep-alive connection that
        carried HTTP requests before, which are served here."""
        refusal = self.gateway.ws_refusal(request.headers.get("Origin"))
        if refusal is not None:
            return _error_response(refusal)
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        head = RequestHead(
            request.method, request.raw_path, version, header_dict(request.headers.items())
        )
        key = upgrade_key(head)
        if key is None:
            return _error_response(
                BadRequest("expected a WebSocket upgrade (RFC 6455, version 13)")
            )
        return await upgrade_within_aiohttp(self.gateway, request, key)

    async def api(self, request: web.Request) -> web.Response:
        gw = self.gateway
        name = request.match_info["op"]
        op_type = gw.router.by_name.get(name)
        started = time.monotonic()
        try:
            if op_type is None:
                raise BadRequest(f"unknown op '{name}'", field="op")
            max_frame = gw.config.limits.max_frame
            if request.content_length is not None and request.content_length > max_frame:
                raise TooLarge(f"body of {request.content_length} bytes exceeds {max_frame}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise TooLarge(f"body exceeds {max_frame} bytes") from None
            self._rate_limit(request)
            # The public ops ignore the header (docs/protocol.md §7.1): they act for no caller,
            # and refresh/login are what a client whose token just died calls, often
            # with that token still attached.
            caller = None
            auth = request.headers.get("Authorization")
            if auth is not None and op_type not in PUBLIC_OPS:
                caller = await self._bearer(auth, "Authorization must be 'Bearer <token>'")
            op = decode_op_as(body, op_type)
            result = gw.router.call(RequestContext(caller), op)
            if inspect.isawaitable(result):
                result = await result
        except IMError as exc:
            gw.metrics.op(name if op_type else "unknown", exc.code)
            return _error_response(exc)
        except Exception:
            logger.exception("HTTP op %s failed", name)
            gw.metrics.op(name, Internal.code)
            return _error_response(Internal("internal error"))
        gw.metrics.op(name, "ok")
        if op_type is not None and name in ("send", "edit", "recall", "react"):
            gw.metrics.ack_latency.observe(time.monotonic() - started)
        return web.Response(body=encode_json(result), content_type="application/json")

    # --- files (docs/protocol.md §6) ---------------------------------------------------------

    def _file_service(self) -> FileService:
        if self.files is None:
            raise NotFound("this server stores no files")
        return self.files

    async def _file_caller(self, request: web.Request) -> UserId:
        """Rate limit by peer, then the bearer token's user (file routes always need one)."""
        self._rate_limit(request)
        auth = request.headers.get("Authorization", "")
        caller = await self._bearer(auth, "file routes need 'Authorization: Bearer <token>'")
        return caller.user

    def _file_failure(self, route: str, exc: Exception) -> web.Response:
        if isinstance(exc, IMError):
            self.gateway.metrics.op(route, exc.code)
            return _error_response(exc)
        logger.error("HTTP %s failed", route, exc_info=exc)
        self.gateway.metrics.op(route, Internal.code)
        return _error_response(Internal("internal error"))

    async def upload_file(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/v1/files?conv=&name=``: the raw body, streamed to the file service.

        The size limit is enforced on the bytes that arrive, so neither a small nor an
        absent ``Content-Length`` (chunked encoding) gets past it; the declared length
        only allows refusing early, before any byte is read.
        """
        route = "files.upload"
        try:
            files = self._file_service()
            if self.gateway.draining:
                raise Unavailable("server is shutting down")
            user = await self._file_caller(request)
            conv = request.query.get("conv")
            if not conv:
                raise BadRequest("the conv query parameter is required", field="conv")
            info = await files.upload(
                user,
                ConvId(conv),
                request.query.get("name", ""),
                request.content_length,
                request.content.iter_chunked(UPLOAD_CHUNK),
            )
        except Exception as exc:
            return self._file_failure(route, exc)
        self.gateway.metrics.op(route, "ok")
        body = encode_json(UploadData(file=info))
        return web.Response(body=body, content_type="application/json")

    async def download_file(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/files/<id>``: the bytes, always as an attachment; ``Range`` → 206."""
        route = "files.download"
        try:
            files = self._file_service()
            user = await self._file_caller(request)
            blob = await files.open_file(user, request.match_info["id"])
            etag = f'"{blob.info.sha256}"'
            if_range = request.headers.get("If-Range")
            wanted = None if if_range not in (None, etag) else request.headers.get("Range")
            span = parse_range(wanted, blob.size)
            start, end = span if span is not None else (0, blob.size - 1)
            chunks = files.read(blob.key, start, end)
            # Read ahead one chunk: a missing blob is still an error reply, not a cut body.
            first = await anext(chunks, b"") if end >= start else b""
        except Exception as exc:
            return self._file_failure(route, exc)
        headers = {
            **_DOWNLOAD_HEADERS,
            "Content-Type": _served_type(blob.mime),
            "Content-Disposition": content_disposition(blob.info.name),
            "Accept-Ranges": "bytes",
            "ETag": etag,
        }
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        response.content_length = end - start + 1
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
                async for chunk in chunks:
                    await response.write(chunk)
            await response.write_eof()
        finally:
            # A client that goes away mid-body must not leave the blob open.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        self.gateway.metrics.op(route, "ok")
        return response

    async def file_thumb(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/files/<id>/thumb``: the ≤ 320 px JPEG or PNG thumbnail."""
        route = "files.thumb"
        try:
            files = self._file_service()
            user = await self._file_caller(request)
            thumb = await files.open_thumb(user, request.match_info["id"])
        except Exception as exc:
            return self._file_failure(route, exc)
        stem = thumb.info.name.rsplit(".", 1)[0] or "file"
        ext = "png" if thumb.mime == "image/png" else "jpg"
        headers = {
            **_DOWNLOAD_HEADERS,
            "Content-Type": thumb.mime,
            "Content-Disposition": content_disposition(f"{stem}.thumb.{ext}", "inline"),
        }
        self.gateway.metrics.op(route, "ok")
        return web.Response(body=thumb.data, headers=headers)

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = msgspec.json.encode(openapi_document(self.gateway.server_info))
        return web.Response(body=self._openapi, content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        gw = self.gateway
        if not self.ready or gw.draining:
            return web.json_response({"status": "unavailable"}, status=503)
        if time.monotonic() - self._reached < READY_FOR:
            return web.json_response({"status": "ready"})
        try:
            await gw.users.check()
            await gw.messages.check()
            if self.files is not None:
                await self.files.check()
            await gw.rooms.check()
        except IMError as exc:
            return web.json_response({"status": "unavailable", "reason": exc.message}, status=503)
        self._reached = time.monotonic()
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.gateway.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def build_app(
    gateway: Gateway, files: FileService | None = None
) -> tuple[web.Application, HttpApi]:
    """The aiohttp application and its handler object (whose ``ready`` flag gates /readyz).

    ``files`` serves the file routes; without it they answer ``not_found``.
    """
    api = HttpApi(gateway, files)
    app = web.Application(client_max_size=gateway.config.limits.max_frame)
    app[GATEWAY] = gateway
    app.router.add_get("/ws", api.websocket)
    app.router.add_get("/api/v1/openapi.json", api.openapi)
    # Before the ops' catch-all POST /api/v1/{op}, which would otherwise take "files".
    app.router.add_post("/api/v1/files", api.upload_file)
    app.router.add_get("/api/v1/files/{id}", api.download_file, allow_head=False)
    app.router.add_get("/api/v1/files/{id}/thumb", api.file_thumb, allow_head=False)
    app.router.add_post("/api/v1/{op}", api.api)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app, api
