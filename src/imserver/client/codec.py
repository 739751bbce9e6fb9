"""Frames as dicts, and their two encodings: JSON and MessagePack.

One encoder and one decoder of each kind, shared by the whole client: msgspec's
encoders and decoders are reusable, and building one per frame would cost more than
the encoding itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

__all__ = [
    "CodecName",
    "Frame",
    "decode_payload",
    "encode_payload",
    "json_decoder",
    "json_encoder",
    "msgpack_decoder",
    "msgpack_encoder",
]

Frame = dict[str, Any]
"""A decoded frame: the protocol's map, as a dict."""

CodecName = Literal["json", "msgpack"]

json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()
json_decoder = msgspec.json.Decoder()
msgpack_decoder = msgspec.msgpack.Decoder()


def encode_payload(frame: Mapping[str, Any], codec: CodecName) -> bytes:
    """Encode one frame (any map msgspec can encode) with ``codec``."""
    if codec == "json":
        return json_encoder.encode(frame)
    if codec == "msgpack":
        return msgpack_encoder.encode(frame)
    raise ValueError(f"unknown codec {codec!r}")


def decode_payload(payload: bytes, text: bool | None = None) -> Any:
    """Decode one server payload.

    ``text`` is the WebSocket frame type (text = JSON, binary = MessagePack); ``None``
    (TCP) picks JSON when the payload starts with ``{``, as the protocol says. Raises
    :class:`msgspec.DecodeError`.
    """
    if text or (text is None and payload[:1] == b"{"):
        return json_decoder.decode(payload)
    return msgpack_decoder.decode(payload)
