"""The aiohttp application: the WebSocket at ``/ws``, the HTTP API, health and metrics.

Routes:

* ``GET /ws`` — the WebSocket (text frames JSON, binary frames MessagePack);
* ``POST /api/v1/<op>`` — any op, body = the op's fields as JSON;
* ``GET /api/v1/openapi.json`` — generated from the op structs;
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

WebSocket frames up to ``max_frame`` bytes are handled; larger ones up to a hard cap
(``WS_HARD_CAP_FACTOR`` × ``max_frame``) are answered ``too_large`` and the
connection stays open; aiohttp closes the connection (status 1009) on anything past
the hard cap, which bounds what a client can make the server buffer.

Server → client WebSocket frames are framed by :mod:`imserver.protocol.wsframe` and
written straight to the transport, so a fanned-out event is framed once and the
same bytes go to every recipient. Compression is not negotiated, which is what
makes those pre-built frames valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from imserver.core.openapi import openapi_document
from imserver.core.ratelimit import TokenBucket
from imserver.core.router import PUBLIC_OPS
from imserver.core.session import Session
from imserver.protocol.codec import Codec, decode_op_as, encode_json
from imserver.protocol.wsframe import OP_BINARY, OP_TEXT, ws_frame
from imserver.services.caller import Caller
from imserver.services.gateway.service import Gateway
from imserver.utils.errors import (
    BadRequest,
    Forbidden,
    IMError,
    Internal,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
)

logger = logging.getLogger(__name__)

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
WS_HARD_CAP_FACTOR = 16
HTTP_BUCKETS_MAX = 10_000


class WsLink:
    """A session's WebSocket transport."""

    kind = "ws"
    __slots__ = ("transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
        self.transport = transport

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return ws_frame(payload, OP_TEXT if codec is Codec.JSON else OP_BINARY)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self) -> None:
        asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()

    def abort(self) -> None:
        self.transport.abort()


class HttpLink:
    """The link of a one-request HTTP session: replies are returned, not written."""

    kind = "http"

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        return payload

    def write(self, data: bytes) -> None:
        return None

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


_HTTP_LINK = HttpLink()


def _error_response(exc: IMError) -> web.Response:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, RateLimited):
        error["retry_after"] = exc.retry_after
    if exc.field is not None:
        error["field"] = exc.field
    return web.Response(
        status=exc.status, body=encode_json({"error": error}), content_type="application/json"
    )


class HttpApi:
    """Handlers of the aiohttp routes."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._openapi: bytes | None = None
        self.ready = False

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = self.gateway.new_bucket()
            if len(self._buckets) > HTTP_BUCKETS_MAX:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        gw = self.gateway
        allowed = gw.config.ws.allowed_origins
        if allowed and request.headers.get("Origin") not in allowed:
            return _error_response(Forbidden("origin not allowed"))
        if gw.draining:
            return _error_response(Unavailable("server is shutting down"))
        max_frame = gw.config.limits.max_frame
        ws = web.WebSocketResponse(
            max_msg_size=max_frame * WS_HARD_CAP_FACTOR, compress=False, autoping=True
        )
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        session = Session(gw, WsLink(ws, transport))
        gw.opened(session)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    data: str | bytes = msg.data
                    codec = Codec.JSON
                    size = len(data) if len(data) * 4 <= max_frame else len(msg.data.encode())
                elif msg.type is WSMsgType.BINARY:
                    data = msg.data
                    codec = Codec.MSGPACK
                    size = len(data)
                else:
                    break
                if size > max_frame:
                    session.last_rx = time.monotonic()
                    session.send_error(
                        None,
                        TooLarge(f"frame of {size} bytes exceeds max_frame {max_frame}"),
                        codec,
                    )
                    continue
                await session.receive(data, codec)
                if session.closing:
                    break
        finally:
            await gw.closed(session)
        return ws

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
            peer = request.remote or "?"
            wait = self._bucket(peer).take()
            if wait:
                raise RateLimited(round(wait, 3))
            session = Session(gw, _HTTP_LINK)
            auth = request.headers.get("Authorization")
            # register/login/refresh/hello/ping need no token, so a stale one a client
            # attaches out of habit must not make them fail.
            if auth is not None and op_type not in PUBLIC_OPS:
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise Unauthorized("Authorization must be 'Bearer <token>'")
                identity = await gw.users.authenticate(token.strip())
                session.caller = Caller(identity.user, identity.login, None)
            op = decode_op_as(body, op_type)
            result = gw.router.call(session, op)
            if asyncio.isfuture(result) or asyncio.iscoroutine(result):
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
        try:
            await gw.users.check()
            await gw.messages.check()
        except IMError as exc:
            return web.json_response({"status": "unavailable", "reason": exc.message}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.gateway.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def build_app(gateway: Gateway) -> tuple[web.Application, HttpApi]:
    """The aiohttp application and its handler object (whose ``ready`` flag gates /readyz)."""
    api = HttpApi(gateway)
    app = web.Application(client_max_size=gateway.config.limits.max_frame)
    app[GATEWAY] = gateway
    app.router.add_get("/ws", api.websocket)
    app.router.add_get("/api/v1/openapi.json", api.openapi)
    app.router.add_post("/api/v1/{op}", api.api)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app, api
