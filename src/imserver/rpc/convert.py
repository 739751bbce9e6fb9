"""msgspec values ↔ protobuf messages, one converter per schema kind, built once.

**To protobuf.** A value is first turned into builtins by
:func:`msgspec.to_builtins` (one C call: structs become dicts under their encoded
names, tuples and sets lists, ``omit_defaults`` respected), then handed to the
generated class's constructor, which upb fills in C, nested dicts and lists
included. Python touches only what protobuf cannot take as it comes: a ``Packed``
value (encoded to MessagePack), a tagged union (``{"op": "send", …}`` becomes
``{"send": {…}}``), a wrapper (``{"value": …}``), and the keys that never cross
(a tag, an op's ``rid``). For most types that is nothing at all, and the
per-type fix is ``None``.

**From protobuf.** Each kind reads its fields into builtins (a field with presence
that is absent is left out when the struct has a default, ``None`` otherwise), and
:func:`msgspec.convert` turns the builtins into the hinted type in C, with the
hint's constraints checked: a server decodes its request that way, so a request
that breaks a constraint is refused as ``bad_request`` naming its field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from operator import attrgetter
from types import ModuleType
from typing import Any

import msgspec
from google.protobuf.message import Message as ProtoMessage

from imserver.rpc.apis import PACKAGE
from imserver.rpc.schema import (
    Field,
    Kind,
    MapOf,
    Message,
    MessageRef,
    Optional,
    Packed,
    Repeated,
    Scalar,
    UnionRef,
    Wrapper,
)

Fix = Callable[[Any], Any] | None
"""builtins → constructor input; ``None`` when they are the same."""
Read = Callable[[Any], Any]
"""protobuf value → builtins."""

_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.decode


def generated(file: str) -> ModuleType:
    """The generated module of ``<file>.proto``."""
    return importlib.import_module(f"{PACKAGE}.generated.{file}_pb2")


def message_class(file: str, name: str) -> Any:
    """The generated class of message ``name`` of ``<file>.proto`` (typed ``Any``:
    its constructor takes the message's fields as keywords)."""
    return getattr(generated(file), name)


# --- to protobuf ---------------------------------------------------------------------


def _common(name: str) -> Message:
    from imserver.rpc.apis import schema

    return next(m for m in schema().common if m.name == name)


class Fixes:
    """The per-kind fixes, memoised by message name (structs may be recursive).
    ``message_of`` finds a struct's message by name (the APIs' common messages by
    default)."""

    def __init__(self, message_of: Callable[[str], Message] = _common) -> None:
        self._message_of = message_of
        self._structs: dict[str, Fix] = {}

    def kind(self, kind: Kind) -> Fix:
        if isinstance(kind, Scalar):
            return None
        if isinstance(kind, Packed):
            return _ENCODE
        if isinstance(kind, MessageRef):
            return self.struct(kind)
        if isinstance(kind, UnionRef):
            return self.union(kind)
        if isinstance(kind, Optional):
            inner = self.kind(kind.inner)
            return None if inner is None else _unless_none(inner)
        if isinstance(kind, Wrapper):
            return _wrapped(self.kind(kind.inner))
        if isinstance(kind, Repeated):
            item = self.kind(kind.item)
            if item is None:
                return None
            return lambda v: [item(x) for x in v]
        if isinstance(kind, MapOf):
            return _entries(self.kind(kind.value))
        raise TypeError(kind)

    def struct(self, ref: MessageRef) -> Fix:
        if ref.name in self._structs:
            return self._structs[ref.name]
        # A recursive struct refers to itself through this slot until it is built.
        slot: list[Fix] = [None]
        self._structs[ref.name] = lambda v: _apply(slot[0], v)
        message = self._message_of(ref.name)
        fix = self.fields(message.fields, _dropped(ref.struct, message))
        slot[0] = fix
        self._structs[ref.name] = fix
        return fix

    def fields(self, fields: list[Field], dropped: frozenset[str] = frozenset()) -> Fix:
        fixes = [(f.name, one) for f in fields if (one := self.kind(f.kind)) is not None]
        if not fixes and not dropped:
            return None

        def fix(value: dict[str, Any]) -> dict[str, Any]:
            for key in dropped:
                value.pop(key, None)
            for name, one in fixes:
                if name in value:
                    value[name] = one(value[name])
            return value

        return fix

    def union(self, ref: UnionRef) -> Fix:
        by_tag = {tag: (name, self.struct(variant)) for name, tag, variant in ref.variants}
        tag_field = ref.tag_field

        def fix(value: dict[str, Any]) -> dict[str, Any]:
            name, inner = by_tag[value[tag_field]]
            return {name: inner(value) if inner else value}

        return fix


def _entries(fix: Fix) -> Fix:
    if fix is None:
        return lambda v: [{"key": k, "value": x} for k, x in v.items()]
    return lambda v: [{"key": k, "value": fix(x)} for k, x in v.items()]


def _unless_none(fix: Callable[[Any], Any]) -> Fix:
    return lambda v: None if v is None else fix(v)


def _wrapped(fix: Fix) -> Fix:
    if fix is None:
        return lambda v: {"value": v}
    return lambda v: {"value": fix(v)}


def _apply(fix: Fix, value: Any) -> Any:
    return fix(value) if fix is not None else value


def _dropped(struct: type[msgspec.Struct], message: Message) -> frozenset[str]:
    """The keys of ``struct``'s builtins that its message has no field for."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    names = {f.encode_name for f in info.fields}
    if info.tag_field is not None:
        names.add(info.tag_field)
    return frozenset(names - {f.name for f in message.fields})


_FIXES = Fixes()


class Encoder:
    """Builds one message class from a dict of values (a request's arguments, or a
    response's ``{"value": result}``)."""

    def __init__(self, cls: Any, message: Message, fixes: Fixes = _FIXES) -> None:
        self.cls = cls
        self._fix = fixes.fields(message.fields)

    def encode(self, values: dict[str, Any]) -> ProtoMessage:
        """The message of ``values`` (raises ``TypeError``/``ValueError`` for a value
        protobuf cannot hold, such as an int past 64 bits)."""
        message: ProtoMessage = self.cls(**self.builtins(values))
        return message

    def builtins(self, values: dict[str, Any]) -> dict[str, Any]:
        """What the constructor takes for ``values`` (to nest in another message)."""
        builtins: dict[str, Any] = msgspec.to_builtins(values, builtin_types=(bytes,))
        if self._fix is not None:
            builtins = self._fix(builtins)
        return builtins


# --- from protobuf -------------------------------------------------------------------


class Reads:
    """The per-kind readers, memoised by message name (see :class:`Fixes`)."""

    def __init__(self, message_of: Callable[[str], Message] = _common) -> None:
        self._message_of = message_of
        self._structs: dict[str, Read] = {}

    def kind(self, kind: Kind) -> Read | None:
        """``None`` when the protobuf value is already the builtin (a scalar)."""
        if isinstance(kind, Scalar):
            return None
        if isinstance(kind, Packed):
            return _DECODE
        if isinstance(kind, MessageRef):
            return self.struct(kind)
        if isinstance(kind, UnionRef):
            return self.union(kind)
        if isinstance(kind, Optional):
            return self.kind(kind.inner)
        if isinstance(kind, Wrapper):
            read = self.fields([Field("value", "value", kind.inner)])
            return lambda m: read(m).get("value")
        if isinstance(kind, Repeated):
            item = self.kind(kind.item)
            if item is None:
                return list
            return lambda c: [item(x) for x in c]
        if isinstance(kind, MapOf):
            value = self.kind(kind.value)
            if value is None:
                return lambda c: {e.key: e.value for e in c}
            return lambda c: {e.key: value(e.value) for e in c}
        raise TypeError(kind)

    def struct(self, ref: MessageRef) -> Read:
        if ref.name in self._structs:
            return self._structs[ref.name]
        slot: list[Read] = []
        self._structs[ref.name] = lambda m: slot[0](m)
        message = self._message_of(ref.name)
        read = self.fields(message.fields)
        slot.append(read)
        self._structs[ref.name] = read
        return read

    def union(self, ref: UnionRef) -> Read:
        by_name = {name: (tag, self.struct(variant)) for name, tag, variant in ref.variants}
        tag_field = ref.tag_field

        def read(m: Any) -> Any:
            which = m.WhichOneof("variant")
            if which is None:
                raise msgspec.ValidationError("no variant of a union is set")
            tag, inner = by_name[which]
            value = inner(getattr(m, which))
            value[tag_field] = tag
            return value

        return read

    def fields(self, fields: list[Field]) -> Callable[[Any], dict[str, Any]]:
        """A reader of a message with ``fields`` into a dict of builtins."""
        plain = [f.name for f in fields if self.kind(f.kind) is None and _always(f.kind)]
        converted = [
            (f.name, one)
            for f in fields
            if _always(f.kind) and (one := self.kind(f.kind)) is not None
        ]
        present = [
            (f.name, self.kind(f.kind), f.has_default) for f in fields if not _always(f.kind)
        ]
        get_plain: Callable[[Any], Any] | None = None
        if len(plain) == 1:
            only = attrgetter(plain[0])
            get_plain = lambda m: (only(m),)  # noqa: E731
        elif plain:
            get_plain = attrgetter(*plain)

        def read_fields(m: Any) -> dict[str, Any]:
            out = dict(zip(plain, get_plain(m), strict=True)) if get_plain else {}
            for name, convert in converted:
                out[name] = convert(getattr(m, name))
            for name, maybe, has_default in present:
                if m.HasField(name):
                    value = getattr(m, name)
                    out[name] = maybe(value) if maybe is not None else value
                elif not has_default:
                    out[name] = None
            return out

        return read_fields


def _always(kind: Kind) -> bool:
    """Whether a field of ``kind`` is read as it stands (no presence to test)."""
    return not isinstance(kind, Optional | Wrapper | MessageRef | UnionRef)


_READS = Reads()


class Decoder:
    """Reads one message class into the builtins of its fields."""

    def __init__(self, message: Message, reads: Reads = _READS) -> None:
        self.read = reads.fields(message.fields)
