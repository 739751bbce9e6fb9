"""The gRPC schema of the service APIs, read from their Python type hints.

The Protocols of ``services/<name>/api.py`` and the msgspec structs they carry are
the single source of truth. This module turns them into a model of protobuf
messages and services that both :mod:`imserver.rpc.protogen` (which writes the
``.proto`` files) and :mod:`imserver.rpc.convert` (which converts values at run
time) read, so the two can never disagree.

How a type hint becomes a protobuf field (:class:`Kind`):

- ``str`` (and its ``NewType`` ids), ``int``, ``float``, ``bool``, ``bytes`` and a
  ``Literal`` of strings, ints or bools: a scalar (``string``, ``int64``, ``double``,
  ``bool``, ``bytes``); ``Annotated`` constraints are checked when a request is
  decoded, not in the schema.
- a ``msgspec.Struct``: a message of that name, one field per struct field (under
  its encoded name, ``from`` for ``Message.from_``). An op's envelope ``rid`` never
  crosses: it belongs to the client's connection, not to a service call.
- a union of tagged structs (ops, events): a message with a ``oneof`` of its
  variants, each named by its tag.
- ``list``, ``tuple``, ``set``, ``Sequence``, ``Iterable``: ``repeated``;
  ``dict`` with ``str`` keys: ``repeated <Value>Entry {key, value}``, which is a
  ``map<string, …>`` on the wire but keeps the order of the keys (a Python
  ``map`` reader does not, and some answers are ordered).
- ``X | None``, and any field with a default: proto3 ``optional`` (or a message
  field, which has presence), so ``None`` and an absent default stay apart.
- anything holding ``Any`` (``send.meta``, a push target) and any other union:
  ``bytes`` holding MessagePack, decoded as the hinted type.

A kind that protobuf cannot nest (a list of lists, an optional list, a map of
lists) is wrapped in a message of one field ``value``, named after what it holds
(``StringList``, ``OptionalStringList``…).
"""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, Union

import msgspec

from imserver.protocol.ops import Op
from imserver.services.loopback import protocol_methods

SCALARS: dict[type, str] = {
    str: "string",
    int: "int64",
    float: "double",
    bool: "bool",
    bytes: "bytes",
}
_SEQUENCES = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.Iterable,
    collections.abc.Collection,
    collections.abc.Set,
)
_STREAMS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)
_DICTS = (dict, collections.abc.Mapping)


@dataclass(frozen=True)
class Scalar:
    """A protobuf scalar type."""

    proto: str


@dataclass(frozen=True)
class Packed:
    """A value carried as MessagePack in a ``bytes`` field, decoded as ``hint``."""

    hint: Any


@dataclass(frozen=True)
class MessageRef:
    """A message built from the struct ``struct``."""

    name: str
    struct: type[msgspec.Struct]


@dataclass(frozen=True)
class UnionRef:
    """A ``oneof`` message of tagged structs: ``variants`` maps a field name to the
    tag value and the variant's message."""

    name: str
    tag_field: str
    variants: tuple[tuple[str, Any, MessageRef], ...]


@dataclass(frozen=True)
class Repeated:
    """A ``repeated`` field of ``item`` (a scalar, packed, message or union)."""

    item: Kind


@dataclass(frozen=True)
class MapOf:
    """A dict with ``str`` keys: a repeated ``entry`` message (``key``, ``value``).

    On the wire that is exactly a ``map<string, value>``, but a Python reader of a
    ``map`` loses the order of its keys, and some answers are ordered dicts
    (``get_users`` answers in the order asked)."""

    value: Kind
    entry: str


@dataclass(frozen=True)
class Optional:
    """``X | None`` (or a field with a default): proto3 presence."""

    inner: Kind


@dataclass(frozen=True)
class Wrapper:
    """A message with one field ``value`` of ``inner``, for a kind protobuf cannot
    nest where it stands."""

    name: str
    inner: Kind


Kind = Scalar | Packed | MessageRef | UnionRef | Repeated | MapOf | Optional | Wrapper


def nestable(kind: Kind) -> bool:
    """Whether ``kind`` can be the item of a repeated field or the value of a map."""
    return isinstance(kind, Scalar | Packed | MessageRef | UnionRef | Wrapper)


@dataclass(frozen=True)
class Field:
    """One field of a message: its proto name, the Python attribute it comes from,
    its kind, and whether the struct gives it a default (absent → the default)."""

    name: str
    attr: str
    kind: Kind
    has_default: bool = False


@dataclass
class Message:
    """A protobuf message: a struct, a request or response, a wrapper or a union."""

    name: str
    fields: list[Field]
    oneof: UnionRef | None = None
    oneof_name: str | None = None
    """The fields are one ``oneof`` of this name (a client stream's part, a call or
    result of the ordered writes), after the ``head`` fields."""
    head: list[Field] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """One Protocol method as an RPC: its shape, request and response."""

    name: str
    """The Python method name."""
    rpc: str
    """The RPC name (CamelCase)."""
    shape: Literal["unary", "future", "server_stream", "client_stream"]
    params: tuple[str, ...]
    """The non-stream parameters, in order (the request message's fields)."""
    request: Message
    response: Message
    result: Any
    """The Python type of the result (of each item, for a server stream)."""
    stream_param: str | None = None
    """The ``AsyncIterable`` parameter of a client stream."""
    stream_item: Message | None = None
    """A client stream's part: ``oneof part { Request args; Item item; }``."""
    stream_hint: Any = None
    """The type of a client stream's items."""
    request_struct: type[msgspec.Struct] | None = None
    """The request as a struct, to validate what the server decodes."""
    list_params: frozenset[str] = frozenset()
    """Parameters typed ``Iterable``/``Sequence``: a caller may pass a generator."""


@dataclass
class Service:
    """One Protocol as a gRPC service in one ``.proto`` file."""

    protocol: type
    name: str
    file: str
    package: str
    methods: dict[str, Method]
    messages: list[Message] = field(default_factory=list)
    writes: list[Method] = field(default_factory=list)
    """The methods that act on the service's queue of writes, whose order of issue
    is kept: the future-shaped ones (``send``…) and ``close`` (which drains the
    queue). They also cross on one ordered stream, the ``Writes`` RPC, the calls of
    one loop turn in one message."""

    @property
    def full_name(self) -> str:
        return f"{self.package}.{self.name}"


def camel(name: str) -> str:
    """``get_user`` → ``GetUser``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def _strip(hint: Any) -> Any:
    """``hint`` without ``Annotated`` and ``NewType`` layers."""
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif isinstance(hint, NewType):
            hint = hint.__supertype__
        else:
            return hint


def _holds_any(hint: Any) -> bool:
    hint = _strip(hint)
    if hint is Any:
        return True
    return any(_holds_any(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)


def _tag_name(tag: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", str(tag))


class Registry:
    """The common messages (structs, unions, wrappers) found while reading hints."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}
        self._by_struct: dict[type, MessageRef] = {}

    def kind(self, hint: Any) -> Kind:
        """The kind of a field or value typed ``hint``."""
        hint = _strip(hint)
        if _holds_any(hint):
            return Packed(hint)
        if hint in SCALARS:
            return Scalar(SCALARS[hint])
        if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            return self.struct(hint)
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is Literal:
            kinds = {type(arg) for arg in args}
            if len(kinds) == 1 and kinds.pop() in SCALARS:
                return Scalar(SCALARS[type(args[0])])
            return Packed(hint)
        if origin in (Union, types.UnionType):
            return self._union(hint, args)
        if origin in _SEQUENCES:
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                return Packed(hint)
            return Repeated(self._nested(self.kind(args[0] if args else Any)))
        if origin in _DICTS:
            if _strip(args[0]) is not str:
                return Packed(hint)
            value = self._nested(self.kind(args[1]))
            entry = _kind_name(value) + "Entry"
            if entry not in self.messages:
                self.messages[entry] = Message(
                    entry, [Field("key", "key", Scalar("string")), Field("value", "value", value)]
                )
            return MapOf(value, entry)
        raise TypeError(f"no protobuf form for {hint!r}")

    def _union(self, hint: Any, args: tuple[Any, ...]) -> Kind:
        rest = [a for a in args if a is not type(None)]
        if len(rest) < len(args):
            inner = self.kind(rest[0]) if len(rest) == 1 else self._union(hint, tuple(rest))
            if isinstance(inner, MessageRef | UnionRef | Packed | Scalar):
                return Optional(inner)
            return Optional(self._wrap(inner))
        structs = [_strip(a) for a in rest]
        if all(isinstance(s, type) and issubclass(s, msgspec.Struct) for s in structs):
            infos = [msgspec.inspect.type_info(s) for s in structs]
            if all(isinstance(i, msgspec.inspect.StructType) and i.tag is not None for i in infos):
                return self._tagged(structs, infos)
        return Packed(hint)

    def _tagged(self, structs: list[Any], infos: list[Any]) -> UnionRef:
        # Named by its variants, so two unions of one base never share a message.
        name = "".join(s.__name__ for s in structs) + "Union"
        if len(name) > 60:
            digest = hashlib.sha256(name.encode()).hexdigest()[:12]
            name = f"{structs[0].__mro__[1].__name__}Union{digest}"
        found = self.messages.get(name)
        if found is not None and found.oneof is not None:
            return found.oneof
        variants = tuple(
            (_tag_name(info.tag), info.tag, self.struct(s))
            for s, info in zip(structs, infos, strict=True)
        )
        ref = UnionRef(name, infos[0].tag_field, variants)
        self.messages[name] = Message(name, [], oneof=ref)
        return ref

    def _nested(self, kind: Kind) -> Kind:
        return kind if nestable(kind) else self._wrap(kind)

    def _wrap(self, kind: Kind) -> Wrapper:
        name = _kind_name(kind)
        if name not in self.messages:
            self.messages[name] = Message(name, [Field("value", "value", kind)])
        return Wrapper(name, kind)

    def struct(self, struct: type[msgspec.Struct]) -> MessageRef:
        """The message of ``struct`` (registered once, with its fields)."""
        found = self._by_struct.get(struct)
        if found is not None:
            return found
        ref = MessageRef(struct.__name__, struct)
        if struct.__name__ in self.messages:
            raise TypeError(f"two message types are named {struct.__name__}")
        self._by_struct[struct] = ref
        message = Message(ref.name, [])
        self.messages[ref.name] = message
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        hints = typing.get_type_hints(struct, include_extras=True)
        for f in info.fields:
            if issubclass(struct, Op) and f.name == "rid":
                continue
            has_default = f.default is not msgspec.NODEFAULT or (
                f.default_factory is not msgspec.NODEFAULT
            )
            message.fields.append(self.field(f.encode_name, f.name, hints[f.name], has_default))
        return ref

    def field(self, name: str, attr: str, hint: Any, has_default: bool = False) -> Field:
        """A field named ``name`` typed ``hint``; a scalar with a default gets presence."""
        kind = self.kind(hint)
        if has_default and isinstance(kind, Scalar | Packed):
            kind = Optional(kind)
        return Field(name, attr, kind, has_default)


def _kind_name(kind: Kind) -> str:
    if isinstance(kind, Scalar):
        return camel(kind.proto)
    if isinstance(kind, Packed):
        return "Packed"
    if isinstance(kind, MessageRef | UnionRef | Wrapper):
        return kind.name
    if isinstance(kind, Repeated):
        return _kind_name(kind.item) + "List"
    if isinstance(kind, MapOf):
        return _kind_name(kind.value) + "Map"
    return "Optional" + _kind_name(kind.inner)


def _item(hint: Any) -> Any:
    args = typing.get_args(hint)
    return args[0] if args else Any


def _origin_in(hint: Any, kinds: tuple[type, ...]) -> bool:
    origin = typing.get_origin(_strip(hint))
    return isinstance(origin, type) and origin in kinds


def read_service(registry: Registry, proto: type, name: str, file: str, package: str) -> Service:
    """The gRPC service of the Protocol ``proto``: one RPC per method, its request and
    response messages (common structs go to ``registry``)."""
    service = Service(proto, name, file, package, {})
    for method_name, fn in sorted(protocol_methods(proto).items()):
        service.methods[method_name] = _read_method(registry, service, method_name, fn)
    service.writes = [m for m in service.methods.values() if m.shape == "future"]
    if service.writes and "close" in service.methods:
        service.writes.append(service.methods["close"])
    if service.writes:
        calls = [Field(m.name, m.name, _local(m.request.name)) for m in service.writes]
        results = [Field(m.name, m.name, _local(m.response.name)) for m in service.writes]
        results.append(Field(WRITE_ERROR, WRITE_ERROR, Scalar("bytes")))
        head = [Field("id", "id", Scalar("uint64"))]
        service.messages += [
            Message("WriteCall", calls, oneof_name="call", head=head),
            Message("WriteResult", results, oneof_name="result", head=head),
            Message(f"{WRITES}Request", [Field("calls", "calls", Repeated(_local("WriteCall")))]),
            Message(
                f"{WRITES}Response", [Field("results", "results", Repeated(_local("WriteResult")))]
            ),
        ]
    return service


WRITES = "Writes"
"""The RPC of a service's ordered writes (``stream WritesRequest`` →
``stream WritesResponse``, each a list of calls or results matched by ``id``)."""
WRITE_ERROR = "error"
"""The result field of a write that failed: the error's details as MessagePack (the
bytes a unary call carries in its trailing metadata)."""


def _local(name: str) -> MessageRef:
    """A message of the service's own file (no struct behind it)."""
    return MessageRef(name, msgspec.Struct)


def _read_method(registry: Registry, service: Service, name: str, fn: Any) -> Method:
    hints = typing.get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    rpc = camel(name)
    request = Message(f"{rpc}Request", [])
    stream_param: str | None = None
    stream_hint: Any = None
    params: list[str] = []
    lists: set[str] = set()
    struct_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for p in signature.parameters.values():
        if p.name == "self":
            continue
        hint = hints[p.name]
        if _origin_in(hint, _STREAMS):
            stream_param, stream_hint = p.name, _item(hint)
            continue
        if _origin_in(hint, (collections.abc.Iterable, collections.abc.Sequence)):
            lists.add(p.name)
        has_default = p.default is not inspect.Parameter.empty
        params.append(p.name)
        request.fields.append(registry.field(p.name, p.name, hint, has_default))
        struct_fields.append((p.name, hint, p.default) if has_default else (p.name, hint))
    ret = hints.get("return", None)
    shape: Literal["unary", "future", "server_stream", "client_stream"]
    if inspect.iscoroutinefunction(fn):
        shape = "client_stream" if stream_param else "unary"
    elif _origin_in(ret, (collections.abc.Awaitable,)):
        shape, ret = "future", _item(ret)
    elif _origin_in(ret, _STREAMS):
        shape, ret = "server_stream", _item(ret)
    else:
        raise TypeError(f"{service.name}.{name} is synchronous: it cannot be called remotely")
    response = Message(f"{rpc}Response", [])
    if ret is not None and ret is not type(None):
        response.fields.append(registry.field("value", "value", ret))
    service.messages.extend([request, response])
    stream_item: Message | None = None
    if stream_param is not None:
        stream_item = Message(f"{rpc}Part", [], oneof_name="part")
        kind = registry.kind(stream_hint)
        if not nestable(kind):
            raise TypeError(f"{service.name}.{name}: stream items must be one message or scalar")
        stream_item.fields = [
            Field("args", "args", _local(request.name)),
            Field(stream_param, stream_param, kind),
        ]
        service.messages.append(stream_item)
    # The defaults are added in order after the required fields (msgspec's rule).
    required = [f for f in struct_fields if len(f) == 2]
    optional = [f for f in struct_fields if len(f) == 3]
    request_struct = msgspec.defstruct(
        f"{service.name}_{name}_request", [*required, *optional], kw_only=True
    )
    return Method(
        name=name,
        rpc=rpc,
        shape=shape,
        params=tuple(params),
        request=request,
        response=response,
        result=ret,
        stream_param=stream_param,
        stream_item=stream_item,
        stream_hint=stream_hint,
        request_struct=request_struct,
        list_params=frozenset(lists),
    )


def walk_kinds(kind: Kind) -> Iterator[Kind]:
    """``kind`` and every kind inside it."""
    yield kind
    if isinstance(kind, Repeated):
        yield from walk_kinds(kind.item)
    elif isinstance(kind, MapOf):
        yield from walk_kinds(kind.value)
    elif isinstance(kind, Optional | Wrapper):
        yield from walk_kinds(kind.inner)
