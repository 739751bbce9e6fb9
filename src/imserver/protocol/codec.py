"""JSON and MessagePack codecs for ops and events, through msgspec.

Decoding is strict about the op's schema and lenient about unknown fields. Every
failure becomes a :class:`~imserver.utils.errors.BadRequest` that names the field
msgspec blamed, and carries the frame's ``rid`` when one could be read, so the
gateway can answer the right request and keep the connection open. Nothing else
escapes: nesting too deep for msgspec (``RecursionError``) is a malformed frame too.

Free-form values (``send.meta``) must be encodable in both codecs whatever codec
they arrive in (:mod:`imserver.protocol.values`): a MessagePack extension, an integer
past 64 bits in JSON, a NaN or a value nested too deep would make the message
impossible to deliver to the sessions of the other codec (or to store), so it is
refused here, at the boundary, rather than failing later for every recipient.

Encoding an event is done once per codec and the bytes are shared by every
recipient (see :class:`EncodedEvent`).
"""

from __future__ import annotations

import enum
import re
from typing import Any, Union

import msgspec

from imserver.protocol.events import Event
from imserver.protocol.ops import ALL_OPS, Op, PushRegister, Send
from imserver.protocol.values import value_problem
from imserver.utils.errors import BadRequest


class Codec(enum.IntEnum):
    """The two wire codecs. WebSocket text frames and TCP payloads starting with ``{`` are JSON."""

    JSON = 0
    MSGPACK = 1


OpUnion = Union[ALL_OPS]  # type: ignore[valid-type]  # noqa: UP007


class _Envelope(msgspec.Struct):
    """Just enough of a frame to answer it when the rest is invalid."""

    op: Any = None
    rid: Any = None


_json_ops = msgspec.json.Decoder(OpUnion)
_msgpack_ops = msgspec.msgpack.Decoder(OpUnion)
_json_env = msgspec.json.Decoder(_Envelope)
_msgpack_env = msgspec.msgpack.Decoder(_Envelope)
_json_enc = msgspec.json.Encoder()
_msgpack_enc = msgspec.msgpack.Encoder()

# A frame nested deeper than msgspec's recursion guard raises RecursionError, not DecodeError.
_DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)

_FIELD_RE = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")
_UNKNOWN_OP_RE = re.compile(r"^Invalid value '(.*)' - at `\$\.op`$", re.S)


def detect_codec(payload: bytes) -> Codec:
    """The codec of a TCP payload: JSON when it starts with ``{``."""
    return Codec.JSON if payload[:1] == b"{" else Codec.MSGPACK


def decode_op(payload: bytes | str, codec: Codec) -> Op:
    """Decode and validate one op. Raises :class:`BadRequest` (with ``rid`` when readable)."""
    try:
        if codec is Codec.JSON:
            op: Op = _json_ops.decode(payload)
        else:
            op = _msgpack_ops.decode(payload.encode() if isinstance(payload, str) else payload)
    except _DECODE_ERRORS as exc:
        raise _bad_request(payload, codec, exc) from None
    _check_values(op)
    return op


def decode_op_as(payload: bytes, op_type: type[Op]) -> Op:
    """Decode a JSON body as one known op (the HTTP API, where the URL names the op)."""
    try:
        op: Op = msgspec.json.decode(payload or b"{}", type=op_type)
    except _DECODE_ERRORS as exc:
        raise _bad_request(payload, Codec.JSON, exc) from None
    _check_values(op)
    return op


def _check_values(op: Op) -> None:
    """Refuse free-form values (``send.meta``, ``push.register.target``) that one of the
    codecs could not encode (module docstring)."""
    if isinstance(op, Send) and op.meta is not None:
        field, value = "meta", op.meta
    elif isinstance(op, PushRegister):
        field, value = "target", op.target
    else:
        return
    problem = value_problem(value, field)
    if problem is not None:
        err = BadRequest(f"invalid field '{field}': {problem}", field=field)
        err.rid = op.rid
        raise err


def _bad_request(payload: bytes | str, codec: Codec, exc: Exception) -> BadRequest:
    rid = read_rid(payload, codec)
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        err = BadRequest(f"malformed frame: {text}")
    elif m := _UNKNOWN_OP_RE.match(text):
        err = BadRequest(f"unknown op '{m.group(1)}'", field="op")
    elif "missing required field `op`" in text:
        err = BadRequest("missing field 'op'", field="op")
    elif "missing required field" in text:
        name = text.rsplit("`", 2)[-2]
        err = BadRequest(f"missing field '{name}'", field=name)
    elif m := _FIELD_RE.search(text):
        err = BadRequest(f"invalid field '{m.group(1)}': {text}", field=m.group(1))
    else:
        err = BadRequest(f"invalid frame: {text}")
    err.rid = rid
    return err


def read_rid(payload: bytes | str, codec: Codec) -> str | None:
    """Best-effort ``rid`` of a frame that failed validation (None if unreadable)."""
    try:
        if codec is Codec.JSON:
            env = _json_env.decode(payload)
        elif isinstance(payload, str):
            return None
        else:
            env = _msgpack_env.decode(payload)
    except _DECODE_ERRORS:
        return None
    rid = env.rid
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


def encode(event: Event | msgspec.Struct, codec: Codec) -> bytes:
    """Encode one server frame."""
    if codec is Codec.JSON:
        return _json_enc.encode(event)
    return _msgpack_enc.encode(event)


def encode_json(obj: Any) -> bytes:
    """JSON-encode anything msgspec supports (HTTP bodies)."""
    return _json_enc.encode(obj)


class EncodedEvent:
    """An event with its encodings, computed at most once per codec and shared.

    The hub builds one of these per delivery; each recipient session takes the bytes
    for its own codec, so N recipients cost at most two encodes.
    """

    __slots__ = ("_json", "_msgpack", "event")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    def for_codec(self, codec: Codec) -> bytes:
        """The encoded bytes for ``codec``."""
        if codec is Codec.JSON:
            if self._json is None:
                self._json = _json_enc.encode(self.event)
            return self._json
        if self._msgpack is None:
            self._msgpack = _msgpack_enc.encode(self.event)
        return self._msgpack
