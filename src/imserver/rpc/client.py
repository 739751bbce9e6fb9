"""The gRPC client: an object implementing a service Protocol over ``grpc.aio``.

``grpc_client(MessageService, upstream, policy)`` has the Protocol's methods; each
encodes its arguments (:mod:`imserver.rpc.codec`), sends them to an endpoint the
:class:`~imserver.rpc.upstream.Upstream` picks, and decodes the answer or raises the
error the service raised (:mod:`imserver.rpc.status`). The shapes are those of the
loopback:

- **unary** (``async def``): awaited;
- **future** (``def m(...) -> Awaitable[X]``): answers an :class:`asyncio.Future`
  (a task running the call), so the gateway's done-callback path is the same as
  over a local service;
- **server streaming** (``-> AsyncIterator[X]``): an async iterator of the items,
  the call cancelled when the iterator is closed early;
- **client streaming** (an ``AsyncIterable[X]`` parameter): the other arguments go
  first, then each item as the iterable yields it. If the caller's own iterable
  raises, the call is cancelled and the caller gets its own exception back.

Every call has a deadline, idempotent unary calls are retried after transport
failures, and each attempt is reported to its endpoint (:mod:`imserver.rpc.policy`).
"""

from __future__ import annotations

import asyncio
import inspect
import typing
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from imserver.rpc.apis import service_of
from imserver.rpc.codec import MethodCodec, method_codec
from imserver.rpc.policy import CallPolicy, idempotent
from imserver.rpc.status import error_from, is_transport_failure
from imserver.rpc.upstream import Upstream
from imserver.services.loopback import protocol_methods
from imserver.utils.errors import Unavailable

P = TypeVar("P")

_TRANSPORT_ERRORS = (ConnectionError, OSError)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class _Callables:
    """The multi-callables of each channel, made once (making one costs more than
    a call's own Python work)."""

    def __init__(self) -> None:
        self._by_channel: weakref.WeakKeyDictionary[grpc.aio.Channel, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, channel: grpc.aio.Channel, codec: MethodCodec) -> Any:
        per_path = self._by_channel.get(channel)
        if per_path is None:
            per_path = self._by_channel[channel] = {}
        found = per_path.get(codec.path)
        if found is None:
            shape = codec.method.shape
            if shape == "server_stream":
                found = channel.unary_stream(codec.path)
            elif shape == "client_stream":
                found = channel.stream_unary(codec.path, request_serializer=_serialize)
            else:
                found = channel.unary_unary(codec.path)
            per_path[codec.path] = found
        return found


class GrpcClient:
    """An object with a Protocol's methods, each a gRPC call (see the module
    docstring)."""

    def __init__(self, proto: type, upstream: Upstream, policy: CallPolicy) -> None:
        self.protocol = proto
        self.upstream = upstream
        self.policy = policy
        self._callables = _Callables()
        api = _api_name(proto)
        for name, fn in protocol_methods(proto).items():
            codec = method_codec(proto, name)
            setattr(self, name, self._method(codec, inspect.signature(fn), idempotent(api, name)))

    def __repr__(self) -> str:
        return f"<grpc client {self.protocol.__name__}>"

    def _method(
        self, codec: MethodCodec, signature: inspect.Signature, retry: bool
    ) -> Callable[..., Any]:
        params = codec.method.params
        lists = codec.method.list_params
        simple = all(
            p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
            for p in list(signature.parameters.values())[1:]
        )

        def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            if simple and not kwargs and len(args) == len(params) and not codec.method.stream_param:
                values = dict(zip(params, args, strict=True))
            else:
                bound = signature.bind(None, *args, **kwargs)
                bound.apply_defaults()
                values = dict(bound.arguments)
                del values["self"]
            for name in lists:
                values[name] = list(values[name])
            return values

        shape = codec.method.shape
        if shape == "unary":

            async def unary(*args: Any, **kwargs: Any) -> Any:
                return await self._unary(codec, codec.encode_request(bind(args, kwargs)), retry)

            return unary
        if shape == "future":

            def future(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
                async def call() -> Any:
                    request = codec.encode_request(bind(args, kwargs))
                    return await self._unary(codec, request, retry)

                return asyncio.ensure_future(call())

            return future
        if shape == "server_stream":

            def server_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                return self._server_stream(codec, codec.encode_request(bind(args, kwargs)))

            return server_stream

        async def client_stream(*args: Any, **kwargs: Any) -> Any:
            values = bind(args, kwargs)
            assert codec.method.stream_param is not None
            items = values.pop(codec.method.stream_param)
            return await self._client_stream(codec, values, items)

        return client_stream

    async def _unary(self, codec: MethodCodec, request: bytes, retry: bool) -> Any:
        attempts = self.policy.retry_attempts if retry else 1
        attempt = 1
        while True:
            endpoint = self.upstream.pick()
            call = self._callables.get(endpoint.channel, codec)
            try:
                data = await call(request, timeout=self.policy.deadline)
            except grpc.aio.AioRpcError as error:
                if not is_transport_failure(error):
                    endpoint.succeeded()
                    raise error_from(error) from None
                endpoint.failed()
                if attempt >= attempts:
                    raise error_from(error) from None
            except _TRANSPORT_ERRORS:
                endpoint.failed()
                if attempt >= attempts:
                    raise Unavailable("a service is unavailable") from None
            else:
                endpoint.succeeded()
                return codec.decode_response(data)
            await asyncio.sleep(self.policy.backoff(attempt))
            attempt += 1

    async def _server_stream(self, codec: MethodCodec, request: bytes) -> AsyncIterator[Any]:
        endpoint = self.upstream.pick()
        call = self._callables.get(endpoint.channel, codec)(
            request, timeout=self.policy.stream_deadline
        )
        try:
            async for data in call:
                yield codec.decode_response(data)
        except grpc.aio.AioRpcError as error:
            _report(endpoint, error)
            raise error_from(error) from None
        finally:
            call.cancel()
        endpoint.succeeded()

    async def _client_stream(
        self, codec: MethodCodec, values: dict[str, Any], items: AsyncIterable[Any]
    ) -> Any:
        first = codec.encode_args(values)
        failure: list[BaseException] = []

        async def parts() -> AsyncIterator[Any]:
            yield first
            source = aiter(items)
            try:
                while True:
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        failure.append(exc)
                        call.cancel()
                        return
                    yield codec.encode_item(item)
            finally:
                close = getattr(source, "aclose", None)
                if close is not None:
                    await close()

        endpoint = self.upstream.pick()
        call = self._callables.get(endpoint.channel, codec)(
            parts(), timeout=self.policy.upload_deadline
        )
        try:
            data = await call
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        except grpc.aio.AioRpcError as error:
            if failure:
                raise failure[0] from None
            _report(endpoint, error)
            raise error_from(error) from None
        endpoint.succeeded()
        return codec.decode_response(data)


def _report(endpoint: Any, error: grpc.aio.AioRpcError) -> None:
    if is_transport_failure(error):
        endpoint.failed()
    else:
        endpoint.succeeded()


def _api_name(proto: type) -> str:
    return service_of(proto).name


def grpc_client(proto: type[P], upstream: Upstream, policy: CallPolicy | None = None) -> P:
    """``proto`` reached over gRPC through ``upstream`` (see the module docstring)."""
    return typing.cast(P, GrpcClient(proto, upstream, policy or CallPolicy()))
