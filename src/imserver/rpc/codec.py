"""One RPC's requests, responses and stream parts as protobuf bytes.

A :class:`MethodCodec` is built once per method (:func:`method_codec`) from the
schema and the generated classes; the server and the client both use it, so a
request is encoded and decoded by the same converters on both sides.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from google.protobuf.message import Message as ProtoMessage

from imserver.rpc.apis import service_of
from imserver.rpc.convert import Decoder, Encoder, message_class
from imserver.rpc.schema import WRITE_ERROR, WRITES, Message, Method, Scalar, Service
from imserver.services.loopback import protocol_methods, refused_request
from imserver.utils.errors import BadRequest


class MethodCodec:
    """The request, response and part codecs of one method of one service."""

    def __init__(self, service: Service, method: Method) -> None:
        self.method = method
        self.path = f"/{service.full_name}/{method.rpc}"
        file = service.file
        self.request_cls = message_class(file, method.request.name)
        self.response_cls = message_class(file, method.response.name)
        self._request = Encoder(self.request_cls, method.request)
        self._request_read = Decoder(method.request).read
        self._response = Encoder(self.response_cls, method.response)
        self._response_read = Decoder(method.response).read
        self._struct = method.request_struct
        self._fields = method.params
        self._result = method.result
        self._void = method.result is None or method.result is type(None)
        self.part_cls: Any = None
        self._item_plain = False
        if method.stream_item is not None:
            self.part_cls = message_class(file, method.stream_item.name)
            item_field = method.stream_item.fields[1]
            self._item_name = item_field.name
            self._item_plain = isinstance(item_field.kind, Scalar)
            items_only = Message(method.stream_item.name, [item_field])
            self._part = Encoder(self.part_cls, items_only)
            self._part_read = Decoder(items_only).read
            self._item_hint = method.stream_hint

    # --- requests ---

    def encode_request(self, values: dict[str, Any]) -> bytes:
        """The request of ``values`` (the call's non-stream arguments) as bytes.

        A value protobuf cannot hold (an int past 64 bits) that the request's
        constraints also refuse answers the same ``bad_request`` the server would."""
        try:
            return self._request.encode(values).SerializeToString()
        except (TypeError, ValueError, OverflowError):
            self.validate(values)
            raise

    def validate(self, values: dict[str, Any]) -> None:
        """Raise ``bad_request`` for ``values`` that break the request's constraints."""
        assert self._struct is not None
        try:
            msgspec.convert(
                msgspec.to_builtins(values, builtin_types=(bytes,)), self._struct, strict=False
            )
        except msgspec.ValidationError as exc:
            raise refused_request(exc) from None

    def decode_request(self, data: bytes | ProtoMessage) -> dict[str, Any]:
        """The call's keyword arguments from a request (``bad_request`` naming the
        field when one breaks its constraints)."""
        message = self.request_cls.FromString(data) if isinstance(data, bytes) else data
        assert self._struct is not None
        try:
            request = msgspec.convert(self._request_read(message), self._struct)
        except msgspec.ValidationError as exc:
            raise refused_request(exc) from None
        return {name: getattr(request, name) for name in self._fields}

    # --- responses ---

    def encode_response(self, value: Any) -> bytes:
        """A result (or a server stream's item) as bytes."""
        if self._void:
            return b""
        return self._response.encode({"value": value}).SerializeToString()

    def decode_response(self, data: bytes | ProtoMessage) -> Any:
        """The result of a response (its bytes, or the message nested in a write's)."""
        if self._void:
            return None
        message = self.response_cls.FromString(data) if isinstance(data, bytes) else data
        return msgspec.convert(self._response_read(message).get("value"), self._result)

    # --- the ordered writes (see WritesCodec) ---

    def request_fields(self, values: dict[str, Any]) -> dict[str, Any]:
        """The request of ``values`` as the constructor input of a nested message."""
        try:
            return self._request.builtins(values)
        except (TypeError, ValueError, OverflowError):
            self.validate(values)
            raise

    def response_fields(self, value: Any) -> dict[str, Any]:
        """A result as the constructor input of a nested message."""
        if self._void:
            return {}
        return self._response.builtins({"value": value})

    # --- client-stream parts ---

    def encode_args(self, values: dict[str, Any]) -> ProtoMessage:
        """A client stream's first part: the call's other arguments."""
        assert self.part_cls is not None
        try:
            part: ProtoMessage = self.part_cls(args=self._request.encode(values))
            return part
        except (TypeError, ValueError, OverflowError):
            self.validate(values)
            raise

    def encode_item(self, item: Any) -> ProtoMessage:
        """A client stream's item as a part."""
        assert self.part_cls is not None
        if self._item_plain:
            part: ProtoMessage = self.part_cls(**{self._item_name: item})
            return part
        return self._part.encode({self._item_name: item})

    def decode_part(self, data: bytes) -> tuple[dict[str, Any] | None, Any]:
        """``(arguments, None)`` for the first part, ``(None, item)`` for the others."""
        assert self.part_cls is not None
        part = self.part_cls.FromString(data)
        which = part.WhichOneof("part")
        if which == "args":
            return self.decode_request(part.args), None
        if which is None:
            raise BadRequest("empty stream part")
        if self._item_plain:
            return None, getattr(part, which)
        return None, msgspec.convert(self._part_read(part)[which], self._item_hint)


@functools.cache
def method_codec(proto: type, name: str) -> MethodCodec:
    """The codec of method ``name`` of the API that serves ``proto`` (built once)."""
    service = service_of(proto)
    return MethodCodec(service, service.methods[name])


class WritesCodec:
    """The ordered writes of a service (``schema.WRITES``): its writes on one stream,
    the calls a client issued in one loop turn in one message, each call and result
    tagged with the call's ``id``."""

    def __init__(self, proto: type) -> None:
        service = service_of(proto)
        self.path = f"/{service.full_name}/{WRITES}"
        self.request_cls = message_class(service.file, f"{WRITES}Request")
        self.response_cls = message_class(service.file, f"{WRITES}Response")
        self.methods = {m.name: method_codec(proto, m.name) for m in service.writes}

    def call(self, call_id: int, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """One call of method ``name`` (``bad_request`` if ``values`` cannot be sent)."""
        return {"id": call_id, name: self.methods[name].request_fields(values)}

    def encode_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One message of calls, in order."""
        data: bytes = self.request_cls(calls=calls).SerializeToString()
        return data

    def decode_calls(self, data: bytes) -> list[tuple[int, str | None, Any]]:
        """``(id, method, request)`` of each call (``None`` for an unknown method)."""
        out: list[tuple[int, str | None, Any]] = []
        for call in self.request_cls.FromString(data).calls:
            name = call.WhichOneof("call")
            if name is None or name not in self.methods:
                out.append((call.id, None, None))
            else:
                out.append((call.id, name, getattr(call, name)))
        return out

    def result(self, call_id: int, name: str, value: Any) -> dict[str, Any]:
        """The result of call ``call_id``."""
        return {"id": call_id, name: self.methods[name].response_fields(value)}

    @staticmethod
    def error(call_id: int, details: bytes) -> dict[str, Any]:
        """The failure of call ``call_id`` (an error's details, as MessagePack)."""
        return {"id": call_id, WRITE_ERROR: details}

    def encode_results(self, results: list[dict[str, Any]]) -> bytes:
        """One message of results."""
        data: bytes = self.response_cls(results=results).SerializeToString()
        return data

    def decode_results(self, data: bytes) -> list[tuple[int, str | None, Any]]:
        """``(id, method or None for an error, result message or error details)``."""
        out: list[tuple[int, str | None, Any]] = []
        for result in self.response_cls.FromString(data).results:
            which = result.WhichOneof("result")
            if which == WRITE_ERROR or which is None:
                out.append((result.id, None, getattr(result, WRITE_ERROR)))
            else:
                out.append((result.id, which, getattr(result, which)))
        return out


@functools.cache
def writes_codec(proto: type) -> WritesCodec | None:
    """The ordered writes of the API serving ``proto``, if it has any."""
    service = service_of(proto)
    wanted = set(protocol_methods(proto))
    if not any(m.name in wanted for m in service.writes):
        return None
    return WritesCodec(proto)
