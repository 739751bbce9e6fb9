"""The gRPC client: an object implementing a service Protocol over ``grpc.aio``.

``grpc_client(MessageService, upstream, policy)`` has the Protocol's methods; each
encodes its arguments (:mod:`imserver.rpc.codec`), sends them to an endpoint the
:class:`~imserver.rpc.upstream.Upstream` picks, and decodes the answer or raises the
error the service raised (:mod:`imserver.rpc.status`). The shapes are those of the
loopback:

- **unary** (``async def``): awaited;
- **future** (``def m(...) -> Awaitable[X]``): answers an :class:`asyncio.Future`,
  so the gateway's done-callback path is the same as over a local service. These
  are the writes a service queues in call order (``send``…); they go on one ordered
  stream per endpoint (the ``Writes`` RPC), so writes issued in an order are queued
  in that order by the service, as in process;
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
import itertools
import typing
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from imserver.rpc.apis import service_of
from imserver.rpc.codec import MethodCodec, WritesCodec, method_codec, writes_codec
from imserver.rpc.policy import CallPolicy, idempotent
from imserver.rpc.status import error_from, error_of_details, is_transport_failure
from imserver.rpc.upstream import Endpoint, Upstream
from imserver.services.loopback import protocol_methods
from imserver.utils.errors import IMError, Unavailable

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


class _Writes:
    """One ordered stream of future-shaped calls to one endpoint (the ``Writes`` RPC).

    Calls are written in the order they are issued; results come back tagged with
    their id, in any order. Each call has its own deadline (a timer); a failure of
    the stream fails every call still waiting, and the next call opens a new
    stream."""

    def __init__(self, codec: WritesCodec, endpoint: Endpoint, policy: CallPolicy) -> None:
        self._codec = codec
        self._endpoint = endpoint
        self._deadline = policy.deadline
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._pending: dict[int, tuple[str, asyncio.Future[Any], asyncio.TimerHandle]] = {}
        self._ids = itertools.count(1)
        self.broken = False
        requests: Any = self._requests()
        self._call: Any = endpoint.channel.stream_stream(codec.path)(requests)
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[bytes]:
        """The calls, those issued since the last message in one message."""
        queue = self._queue
        while (first := await queue.get()) is not None:
            calls = [first]
            while not queue.empty():
                call = queue.get_nowait()
                if call is None:
                    yield self._codec.encode_calls(calls)
                    return
                calls.append(call)
            yield self._codec.encode_calls(calls)

    def submit(self, name: str, values: dict[str, Any]) -> asyncio.Future[Any]:
        """Send one call; its future resolves with the result or the error."""
        future: asyncio.Future[Any] = self._loop.create_future()
        call_id = next(self._ids)
        try:
            call = self._codec.call(call_id, name, values)
        except Exception as exc:
            future.set_exception(exc)
            return future
        timer = self._loop.call_later(self._deadline, self._expire, call_id)
        self._pending[call_id] = (name, future, timer)
        self._queue.put_nowait(call)
        return future

    def _expire(self, call_id: int) -> None:
        entry = self._pending.pop(call_id, None)
        if entry is not None and not entry[1].done():
            self._endpoint.failed()
            entry[1].set_exception(Unavailable("a service did not answer in time"))

    async def _read(self) -> None:
        error: IMError = Unavailable("a service closed its stream of writes")
        transport = True
        try:
            async for data in self._call:
                self._endpoint.succeeded()
                for call_id, name, payload in self._codec.decode_results(data):
                    entry = self._pending.pop(call_id, None)
                    if entry is None:
                        continue
                    entry[2].cancel()
                    future = entry[1]
                    if future.done():
                        continue
                    if name is None:
                        future.set_exception(error_of_details(payload))
                    else:
                        try:
                            future.set_result(self._codec.methods[name].decode_response(payload))
                        except Exception as exc:
                            future.set_exception(exc)
        except grpc.aio.AioRpcError as failure:
            error = error_from(failure)
            transport = is_transport_failure(failure)
        except asyncio.CancelledError:
            error = Unavailable("the stream of writes was cancelled")
        finally:
            self.broken = True
            self._queue.put_nowait(None)
            if self._pending and transport:
                self._endpoint.failed()
            for _, future, timer in self._pending.values():
                timer.cancel()
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()


class GrpcClient:
    """An object with a Protocol's methods, each a gRPC call (see the module
    docstring)."""

    def __init__(self, proto: type, upstream: Upstream, policy: CallPolicy) -> None:
        self.protocol = proto
        self.upstream = upstream
        self.policy = policy
        self._callables = _Callables()
        self._writes_codec = writes_codec(proto)
        self._writes: dict[str, _Writes] = {}
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
        name = codec.method.name
        ordered = self._writes_codec is not None and name in self._writes_codec.methods
        if shape == "unary" and ordered:

            async def ordered_unary(*args: Any, **kwargs: Any) -> Any:
                values = bind(args, kwargs)
                endpoint = self.upstream.pick(_conversation(values))
                return await self._writes_to(endpoint).submit(name, values)

            return ordered_unary
        if shape == "unary":

            async def unary(*args: Any, **kwargs: Any) -> Any:
                return await self._unary(codec, codec.encode_request(bind(args, kwargs)), retry)

            return unary
        if shape == "future":

            def future(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
                try:
                    values = bind(args, kwargs)
                    endpoint = self.upstream.pick(_conversation(values))
                except Exception as exc:
                    refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                    refused.set_exception(exc)
                    return refused
                return self._writes_to(endpoint).submit(name, values)

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

    def _writes_to(self, endpoint: Endpoint) -> _Writes:
        writes = self._writes.get(endpoint.key)
        if writes is None or writes.broken:
            assert self._writes_codec is not None
            writes = self._writes[endpoint.key] = _Writes(self._writes_codec, endpoint, self.policy)
        return writes

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
        reading: list[asyncio.Future[Any]] = []
        """The read of the caller's iterable in progress, if any."""

        async def parts() -> AsyncIterator[Any]:
            yield first
            source = aiter(items)
            try:
                while True:
                    pending = asyncio.ensure_future(anext(source))
                    reading[:] = [pending]
                    try:
                        item = await pending
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        failure.append(exc)
                        call.cancel()
                        return
                    finally:
                        reading.clear()
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
            return await self._client_stream_answer(codec, endpoint, call, failure)
        finally:
            # An answer before the whole stream was sent (a refusal) leaves gRPC's
            # sender waiting on the caller's iterable: the read is cancelled, so that
            # the caller owns its source again (an HTTP body, which its server then
            # reads to the end itself).
            for pending in list(reading):
                pending.cancel()
                await asyncio.wait([pending])
                if not pending.cancelled():
                    pending.exception()  # retrieved: the answer is what the caller gets

    async def _client_stream_answer(
        self, codec: MethodCodec, endpoint: Any, call: Any, failure: list[BaseException]
    ) -> Any:
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


def _conversation(values: dict[str, Any]) -> str | None:
    """The conversation an ordered write goes to (its request's ``conv``), the
    affinity that keeps one conversation's writes on one instance."""
    req = values.get("req")
    conv = getattr(req, "conv", None)
    return conv if isinstance(conv, str) else None


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
