"""The gRPC server adapter: any local implementation of a service Protocol, served.

``service_handler(MessageService, local)`` is a generic handler for a
``grpc.aio`` server: one method handler per Protocol method, under the API's
service name (``imserver.rpc.message.MessageService``). A narrower interface
(``RoomDirectory``) is served under the API that contains it, with only its
methods. Each handler decodes its request with :mod:`imserver.rpc.codec` (a request
that breaks a constraint is answered ``bad_request`` before it reaches the
service), calls the local method, and encodes the result. An :class:`IMError` is
answered with its status and details (:mod:`imserver.rpc.status`); any other
exception is logged with its traceback and answered ``internal``.

The future-shaped methods (``send``, ``edit``…: writes the local service queues in
the order it is called) are also served on one bidirectional stream, ``Writes``:
the calls of one client arrive in the order it issued them and are made in that
order, so the order of a caller's concurrent writes survives the process boundary
as it does in process (separate RPCs are dispatched in no set order).

Requests and responses cross the handler as bytes (no serializer of grpc's): the
decoding is ours, so a malformed request is our ``bad_request``, not gRPC's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from imserver.rpc.apis import service_of
from imserver.rpc.codec import MethodCodec, WritesCodec, method_codec, writes_codec
from imserver.rpc.schema import WRITES
from imserver.rpc.status import details_bytes, status_of, trailers_of
from imserver.services.loopback import protocol_methods
from imserver.utils.errors import BadRequest, IMError, Internal, Unavailable

logger = logging.getLogger(__name__)


def _failure(exc: BaseException, name: str) -> IMError:
    if isinstance(exc, IMError):
        return exc
    logger.error("rpc %s failed", name, exc_info=exc)
    return Internal("internal error")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: IMError) -> None:
    await context.abort(status_of(error), error.message, trailing_metadata=trailers_of(error))


def _unary(codec: MethodCodec, target: Callable[..., Any]) -> Any:
    name = codec.path

    async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            result = await target(**codec.decode_request(request))
            return codec.encode_response(result)
        except Exception as exc:
            error = _failure(exc, name)
        await _abort(context, error)
        raise AssertionError("abort returns only by raising")

    return grpc.unary_unary_rpc_method_handler(handle)


def _server_stream(codec: MethodCodec, target: Callable[..., Any]) -> Any:
    name = codec.path

    async def handle(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        error: IMError | None = None
        try:
            items = target(**codec.decode_request(request))
            try:
                async for item in items:
                    yield codec.encode_response(item)
            finally:
                close = getattr(items, "aclose", None)
                if close is not None:
                    await close()
        except Exception as exc:
            error = _failure(exc, name)
        if error is not None:
            await _abort(context, error)

    return grpc.unary_stream_rpc_method_handler(handle)


class _Body:
    """The client's stream as the callee pulls it: the parts after the first."""

    def __init__(self, codec: MethodCodec, parts: AsyncIterator[bytes]) -> None:
        self._codec = codec
        self._parts = parts

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for data in self._parts:
            args, item = self._codec.decode_part(data)
            if args is not None:
                raise BadRequest("the arguments of a stream come once, first")
            yield item


def _client_stream(codec: MethodCodec, target: Callable[..., Any]) -> Any:
    name = codec.path
    stream_param = codec.method.stream_param
    assert stream_param is not None

    async def handle(
        parts: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        try:
            first = await anext(aiter(parts), None)
            if first is None:
                raise BadRequest("a stream call without its arguments")
            args, _ = codec.decode_part(first)
            if args is None:
                raise BadRequest("a stream call must start with its arguments")
            args[stream_param] = _Body(codec, parts)
            return codec.encode_response(await target(**args))
        except Exception as exc:
            error = _failure(exc, name)
        await _abort(context, error)
        raise AssertionError("abort returns only by raising")

    return grpc.stream_unary_rpc_method_handler(handle)


SERVER_OPTIONS: list[tuple[str, int]] = [
    # gRPC core cancels the calls of a burst past 1,000 that wait to be taken by the
    # server (``max_pending_requests``); the asyncio server takes them one at a time,
    # so a gateway's burst of sends would be answered ``cancelled``. Calls waiting
    # here are bounded by their deadlines instead.
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
"""The options of every gRPC server of a service."""


def make_server(*services: tuple[type, object]) -> grpc.aio.Server:
    """A ``grpc.aio`` server serving each ``(Protocol, local)`` pair (ports are added
    and the server started by the caller)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([service_handler(proto, local) for proto, local in services])
    return server


def _writes(codec: WritesCodec, local: object) -> Any:
    """The ordered writes: the calls of each message are made in order as it
    arrives (so the local service queues them in the order the client issued them);
    the results that resolve in one loop turn go back in one message."""
    targets = {name: getattr(local, name, None) for name in codec.methods}

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        ready: list[dict[str, Any]] = []
        state = {"pending": 0, "reading": 1}

        def flush() -> None:
            out.put_nowait(codec.encode_results(ready[:]))
            ready.clear()
            if not state["reading"] and not state["pending"]:
                out.put_nowait(None)

        def answer(entry: dict[str, Any]) -> None:
            if not ready:
                loop.call_soon(flush)
            ready.append(entry)

        def finished(call_id: int, name: str, done: asyncio.Future[Any]) -> None:
            state["pending"] -= 1
            if done.cancelled():
                answer(codec.error(call_id, details_bytes(Unavailable("cancelled"))))
            elif (exc := done.exception()) is not None:
                answer(codec.error(call_id, details_bytes(_failure(exc, name))))
            else:
                try:
                    answer(codec.result(call_id, name, done.result()))
                except Exception as encode_failure:
                    answer(codec.error(call_id, details_bytes(_failure(encode_failure, name))))

        async def read() -> None:
            try:
                async for data in requests:
                    for call_id, name, message in codec.decode_calls(data):
                        target = targets.get(name) if name else None
                        if name is None or target is None:
                            answer(codec.error(call_id, details_bytes(BadRequest("unknown write"))))
                            continue
                        try:
                            call = target(**codec.methods[name].decode_request(message))
                        except Exception as exc:
                            answer(codec.error(call_id, details_bytes(_failure(exc, name))))
                            continue
                        state["pending"] += 1
                        asyncio.ensure_future(call).add_done_callback(
                            functools.partial(finished, call_id, name)
                        )
            finally:
                state["reading"] = 0
                if not state["pending"] and not ready:
                    out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()

    return grpc.stream_stream_rpc_method_handler(handle)


def service_handler(proto: type, local: object) -> grpc.GenericRpcHandler:
    """A generic handler serving ``local`` (an implementation of ``proto``)."""
    service = service_of(proto)
    handlers: dict[str, Any] = {}
    for name in protocol_methods(proto):
        codec = method_codec(proto, name)
        target = getattr(local, name, None)
        if target is None:
            continue
        shape = codec.method.shape
        if shape in ("unary", "future"):
            handlers[codec.method.rpc] = _unary(codec, target)
        elif shape == "server_stream":
            handlers[codec.method.rpc] = _server_stream(codec, target)
        else:
            handlers[codec.method.rpc] = _client_stream(codec, target)
    writes = writes_codec(proto)
    if writes is not None:
        handlers[WRITES] = _writes(writes, local)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
