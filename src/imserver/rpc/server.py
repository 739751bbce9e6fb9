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

Requests and responses cross the handler as bytes (no serializer of grpc's): the
decoding is ours, so a malformed request is our ``bad_request``, not gRPC's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from imserver.rpc.apis import service_of
from imserver.rpc.codec import MethodCodec, method_codec
from imserver.rpc.status import status_of, trailers_of
from imserver.services.loopback import protocol_methods
from imserver.utils.errors import BadRequest, IMError, Internal

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
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
