"""An asyncio client for IMServer over WebSocket or TCP, in JSON or MessagePack.

Written from the wire contract (docs/protocol.md) alone, so it speaks in plain dicts: it
can send any frame, valid or not, which the project's tests need, and it keeps
working when the server adds fields. It is also the benchmark load generator, so
the receive path is one reader per connection, one msgspec decode per frame and no
task per frame.

Layers, from the bottom, one module each:

- :mod:`~imserver.client.transport`: :class:`ClientTransport` moves whole payloads.
  :class:`WebSocketTransport` (aiohttp; JSON in text frames, MessagePack in binary
  frames) and :class:`TcpTransport` (a 4-byte big-endian length before each payload)
  are the two real ones; tests plug in an in-memory one. Writes are synchronous and
  ordered; :meth:`ClientTransport.drain` is the flow control.
- :mod:`~imserver.client.codec`: frames as dicts, encoded in JSON or MessagePack.
- :mod:`~imserver.client.routing`: :class:`FrameRouter` is the sans-I/O core: each
  decoded server frame is either the reply to a pending ``rid`` (it resolves that
  request) or an event (it is queued, in arrival order). Replies nobody waits for --
  no ``rid``, an unknown ``rid``, or a request that already timed out -- are events
  too, with ``op`` ``"reply"``.
- :mod:`~imserver.client.connection`: :class:`Connection` ties the two together:
  requests and replies, waiting for events, raw frames, closing.
- :mod:`~imserver.client.api`: :class:`Client` is a :class:`Connection` with
  :meth:`Client.connect` and a few helpers (``login``, ``send_message`` ...).

:class:`HttpClient` (:mod:`~imserver.client.http`) calls the HTTP API
(``POST /api/v1/<op>``) and fetches routes.

Exceptions (:mod:`~imserver.client.errors`; timeouts are the builtin
:class:`TimeoutError`)::

    IMClientError
     ├── ClientError        the server answered ok: false (code, message, retry_after, field, rid)
     ├── ConnectFailed      could not connect, or the WebSocket upgrade was refused (status)
     └── ConnectionClosed   the connection is gone (reason of the server's closed event, code)
"""

from __future__ import annotations

from imserver.client.api import Client
from imserver.client.codec import CodecName, Frame, decode_payload, encode_payload
from imserver.client.connection import Connection
from imserver.client.errors import ClientError, ConnectFailed, ConnectionClosed, IMClientError
from imserver.client.http import HttpClient
from imserver.client.routing import INVALID_FRAME_OP, FrameRouter
from imserver.client.transport import (
    DEFAULT_MAX_FRAME,
    ClientTransport,
    PayloadSink,
    TcpTransport,
    TransportName,
    WebSocketTransport,
    tcp_address,
    ws_url,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "INVALID_FRAME_OP",
    "Client",
    "ClientError",
    "ClientTransport",
    "CodecName",
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "Frame",
    "FrameRouter",
    "HttpClient",
    "IMClientError",
    "PayloadSink",
    "TcpTransport",
    "TransportName",
    "WebSocketTransport",
    "decode_payload",
    "encode_payload",
    "tcp_address",
    "ws_url",
]
