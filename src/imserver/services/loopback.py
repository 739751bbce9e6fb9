"""The serialising loopback: a service API called through MessagePack inside one process.

``loopback(MessageService, local)`` returns an object with the methods of the
``MessageService`` protocol. Every call encodes its arguments with msgspec
(MessagePack), decodes them into fresh objects, calls ``local`` with those, and does
the same with the result or the error. What the callee gets and what the caller gets
back are copies that crossed bytes, so a call that works through the loopback works
across a process boundary: no shared object, no identity, no live handle. The gRPC
adapters of the distributed mode take the same place in the contract tests.

The schema is the protocol's type hints (:func:`typing.get_type_hints`): the
parameters of a method are its request, its return type the response. A method has
one of the shapes a remote call can have:

- **unary**: ``async def m(...) -> X``, or ``def m(...) -> Awaitable[X]`` for a write
  that the local service answers with an :class:`asyncio.Future` (the loopback answers
  with a future too, chained to the local one, so the gateway's done-callback path is
  the same over both);
- **server streaming**: ``def m(...) -> AsyncIterator[X]``, each item encoded on its
  own as the caller pulls it (gRPC's server-streaming call);
- **client streaming**: a parameter typed ``AsyncIterable[X]``, each item encoded on
  its own as the callee pulls it (gRPC's client-streaming call).

Anything else (a synchronous method returning a plain value) is refused when the
adapter is built: it could not be answered from another process.

Rules the adapter enforces, so the contract tests prove them:

- **Only data crosses.** An argument, result or item msgspec cannot encode (a live
  object, a generator, a lock) raises ``TypeError``/:class:`msgspec.EncodeError` in
  the caller, and one that does not decode as the hinted type raises
  :class:`msgspec.ValidationError`; neither is smoothed over.
- **No envelope ``rid``.** An op (:class:`~imserver.protocol.ops.Op`) crosses with
  ``rid`` cleared: the request id belongs to the client's connection, not to the
  service call.
- **Errors are data.** An :class:`~imserver.utils.errors.IMError` crosses as
  :class:`ErrorData` (its class, message, field and the attributes its subclass adds,
  such as ``retry_after`` or a revoked ``login``) and is raised again as the same
  class on the caller's side. Any other exception of the callee crosses as
  ``internal``, as a remote server answers a fault it did not expect.
- **A request that does not validate is refused as the server refuses it.** Ops
  carry the protocol's constraints (``Annotated`` lengths, ranges); a request that
  breaks one is answered ``bad_request`` naming the field, as a remote service's
  decoder would answer it, instead of reaching the callee.
- Parameters typed ``Iterable[X]``/``Sequence[X]`` cross as lists: the caller may pass
  a generator, as it may to a gRPC stub building a repeated field.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
import logging
import re
import typing
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from imserver.protocol.ops import Op
from imserver.utils.errors import ERRORS_BY_CODE, BadRequest, IMError, Internal

logger = logging.getLogger(__name__)

P = TypeVar("P")

_ENCODER = msgspec.msgpack.Encoder()
_STREAMS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)
_LISTS = (collections.abc.Iterable, collections.abc.Sequence, collections.abc.Collection)
_ERROR_FIELDS = frozenset({"message", "field", "rid"})
_PATH_RE = re.compile(r"- at `([^`]*)`$")
_NAME_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")


class ErrorData(msgspec.Struct, frozen=True, kw_only=True):
    """An :class:`IMError` as it crosses a process boundary."""

    kind: str
    """``module.QualName`` of the error's class (an ``IMError`` subclass)."""
    code: str
    """The protocol code, the fallback when ``kind`` is not known on this side."""
    message: str
    field: str | None = None
    extra: dict[str, Any] = {}
    """The attributes the subclass adds (``retry_after``, ``login``, ``size``, …)."""


def error_data(exc: IMError) -> ErrorData:
    """What crosses for ``exc`` (never its ``rid``)."""
    cls = type(exc)
    return ErrorData(
        kind=f"{cls.__module__}.{cls.__qualname__}",
        code=exc.code,
        message=exc.message,
        field=exc.field,
        extra={k: v for k, v in vars(exc).items() if k not in _ERROR_FIELDS},
    )


def _error_classes() -> dict[str, type[IMError]]:
    found: dict[str, type[IMError]] = {}
    todo: list[type[IMError]] = [IMError]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found


def raise_error(data: ErrorData) -> IMError:
    """The error ``data`` describes, as its own class (built without its ``__init__``,
    whose signature differs between subclasses)."""
    cls = _error_classes().get(data.kind) or ERRORS_BY_CODE.get(data.code, Internal)
    exc = cls.__new__(cls)
    IMError.__init__(exc, data.message, field=data.field)
    for name, value in data.extra.items():
        setattr(exc, name, value)
    return exc


def _cross_error(exc: BaseException) -> IMError:
    """The error the caller sees for a failure of the callee."""
    if isinstance(exc, IMError):
        data = error_data(exc)
    else:
        logger.error("loopback call failed", exc_info=exc)
        data = error_data(Internal("internal error"))
    return raise_error(msgspec.msgpack.decode(_ENCODER.encode(data), type=ErrorData))


def refused_request(exc: msgspec.ValidationError) -> BadRequest:
    """The ``bad_request`` of a request that does not validate, naming the innermost
    field of the path msgspec reports."""
    text = str(exc)
    path = _PATH_RE.search(text)
    names = _NAME_RE.findall(path.group(1)) if path else []
    return BadRequest(f"invalid request: {text}", field=names[-1] if names else None)


def _origin_in(hint: Any, kinds: tuple[type, ...]) -> bool:
    origin = typing.get_origin(hint)
    return isinstance(origin, type) and origin in kinds


def _item_type(hint: Any) -> Any:
    args = typing.get_args(hint)
    return args[0] if args else Any


class _Method:
    """One protocol method: how its request, response and streams cross."""

    def __init__(self, proto: type, name: str, fn: Callable[..., Any]) -> None:
        self.name = f"{proto.__name__}.{name}"
        hints = typing.get_type_hints(fn, include_extras=True)
        self.signature = inspect.signature(fn)
        params = [p for p in self.signature.parameters.values() if p.name != "self"]
        self.streams: dict[str, msgspec.msgpack.Decoder[Any]] = {}
        self.lists: set[str] = set()
        fields: list[tuple[str, Any]] = []
        for p in params:
            hint = hints[p.name]
            if _origin_in(hint, _STREAMS):
                self.streams[p.name] = msgspec.msgpack.Decoder(_item_type(hint))
                continue
            if _origin_in(hint, _LISTS):
                self.lists.add(p.name)
            fields.append((p.name, hint))
        self.request = msgspec.defstruct(f"{proto.__name__}_{name}_request", fields)
        self.request_decoder = msgspec.msgpack.Decoder(self.request)
        ret = hints.get("return", None)
        if inspect.iscoroutinefunction(fn):
            self.shape = "unary"
        elif _origin_in(ret, (collections.abc.Awaitable,)):
            self.shape = "future"
            ret = _item_type(ret)
        elif _origin_in(ret, _STREAMS):
            self.shape = "server_stream"
            ret = _item_type(ret)
        else:
            raise TypeError(f"{self.name} is synchronous: it cannot be called remotely")
        self.result_decoder = msgspec.msgpack.Decoder(ret)

    def request_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the callee receives them: encoded, decoded, streams wrapped."""
        bound = self.signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        streams = {name: values.pop(name) for name in self.streams}
        for name in self.lists:
            values[name] = list(values[name])
        for name, value in values.items():
            if isinstance(value, Op) and value.rid is not None:
                values[name] = msgspec.structs.replace(value, rid=None)
        try:
            decoded = self.request_decoder.decode(_ENCODER.encode(self.request(**values)))
        except msgspec.ValidationError as exc:
            raise refused_request(exc) from None
        out = {f: getattr(decoded, f) for f in self.request.__struct_fields__}
        for name, stream in streams.items():
            out[name] = _ClientStream(stream, self.streams[name])
        return out

    def result_of(self, value: Any) -> Any:
        """The result as the caller receives it."""
        return self.result_decoder.decode(_ENCODER.encode(value))


class _ClientStream:
    """The caller's stream as the callee pulls it, item by item through MessagePack.

    A failure of the caller's own stream (its client went away) is the caller's
    error: it is kept here and raised to the caller as it was, as a gRPC client that
    cancels its call sees its own exception, not the server's answer to it."""

    def __init__(self, items: AsyncIterable[Any], decoder: msgspec.msgpack.Decoder[Any]) -> None:
        self._items = items
        self._decoder = decoder
        self.failure: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        items = aiter(self._items)
        try:
            while True:
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    self.failure = exc
                    raise
                yield self._decoder.decode(_ENCODER.encode(item))
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()


def _caller_failure(request: dict[str, Any]) -> BaseException | None:
    for value in request.values():
        if isinstance(value, _ClientStream) and value.failure is not None:
            return value.failure
    return None


async def _unary(method: _Method, request: dict[str, Any], call: Awaitable[Any]) -> Any:
    try:
        value = await call
    except Exception as exc:
        failure = _caller_failure(request)
        if failure is not None:
            raise failure from None
        raise _cross_error(exc) from None
    return method.result_of(value)


def _future(method: _Method, call: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
    """A future of the caller's side, settled from the callee's awaitable."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[Any] = loop.create_future()
    try:
        awaitable = call()
    except Exception as exc:
        out.set_exception(_cross_error(exc))
        return out
    inner = asyncio.ensure_future(awaitable)

    def settle(done: asyncio.Future[Any]) -> None:
        if out.done():
            return
        if done.cancelled():
            out.cancel()
            return
        exc = done.exception()
        if exc is not None:
            out.set_exception(_cross_error(exc))
            return
        try:
            out.set_result(method.result_of(done.result()))
        except Exception as encode_failure:  # the result cannot cross: loudly, to the caller
            out.set_exception(encode_failure)

    inner.add_done_callback(settle)
    return out


async def _server_stream(method: _Method, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The callee's stream as the caller pulls it, item by item through MessagePack."""
    try:
        while True:
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise _cross_error(exc) from None
            yield method.result_of(item)
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


def _adapter_method(method: _Method, target: Callable[..., Any]) -> Callable[..., Any]:
    if method.shape == "unary":

        async def unary(*args: Any, **kwargs: Any) -> Any:
            request = method.request_of(args, kwargs)
            return await _unary(method, request, target(**request))

        return unary
    if method.shape == "future":

        def future(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
            try:
                request = method.request_of(args, kwargs)
            except BadRequest as exc:
                refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                refused.set_exception(exc)
                return refused
            return _future(method, lambda: target(**request))

        return future

    def server_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        request = method.request_of(args, kwargs)
        try:
            items = target(**request)
        except Exception as exc:
            raise _cross_error(exc) from None
        return _server_stream(method, items)

    return server_stream


def protocol_methods(proto: type) -> dict[str, Callable[..., Any]]:
    """The public methods ``proto`` and its protocol bases declare."""
    methods: dict[str, Callable[..., Any]] = {}
    for klass in proto.__mro__:
        if not getattr(klass, "_is_protocol", False) or klass is typing.Protocol:
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                methods.setdefault(name, value)
    return methods


class Loopback:
    """An object with a protocol's methods, each a serialising call to ``local``."""

    def __init__(self, proto: type, local: object) -> None:
        self.protocol = proto
        self.local = local
        for name, fn in protocol_methods(proto).items():
            setattr(self, name, _adapter_method(_Method(proto, name, fn), getattr(local, name)))

    def __repr__(self) -> str:
        return f"<loopback {self.protocol.__name__} of {self.local!r}>"


def loopback(proto: type[P], local: P) -> P:
    """``local`` reached through ``proto`` as if across a process boundary (see the
    module docstring). Raises ``TypeError`` for a protocol that cannot cross one."""
    return typing.cast(P, Loopback(proto, local))
