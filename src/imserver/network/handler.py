"""The interface between the transports and whatever serves their connections.

``network/`` moves bytes; it makes no protocol decision and imports no service. A
transport (:mod:`imserver.network.ws`, :mod:`imserver.network.tcp`) accepts a
connection, wraps its socket in a :class:`Link`, asks its :class:`ConnectionHandler`
to :meth:`~ConnectionHandler.open` a :class:`Connection` for it, and from then on hands
that connection each decoded frame payload with its codec. The gateway implements
both sides; tests drive it with links of their own, without sockets.
"""

from __future__ import annotations

from typing import Protocol

from imserver.protocol.codec import Codec
from imserver.utils.errors import IMError


class Link(Protocol):
    """The transport side of a connection: framed bytes out, buffer level, close."""

    @property
    def kind(self) -> str:
        """``ws`` or ``tcp``: connections of one kind share one framing."""

    def frame(self, payload: bytes, codec: Codec) -> bytes:
        """Wrap an encoded payload in the transport's framing."""

    def write(self, data: bytes) -> None:
        """Queue framed bytes for the peer (never blocks)."""

    def buffered(self) -> int:
        """Bytes queued and not yet taken by the kernel."""

    def close(self) -> None:
        """Flush what is queued, then close."""

    def abort(self) -> None:
        """Close at once, dropping what is queued."""


class Connection(Protocol):
    """One connection as its transport sees it."""

    @property
    def closing(self) -> bool:
        """True once the connection is closing: the transport stops reading frames."""

    async def receive(self, payload: bytes, codec: Codec) -> None:
        """Handle one frame payload that arrived in ``codec``."""

    def refuse(self, exc: IMError, codec: Codec | None = None) -> None:
        """Answer a frame the transport refused before decoding it (too large)."""

    def flush(self) -> None:
        """Write what is queued for the peer now (before a close frame)."""

    def close(self, reason: str) -> None:
        """Tell the peer why, and close after what is queued."""


class ConnectionHandler(Protocol):
    """What serves the transports' connections (the gateway)."""

    @property
    def max_frame(self) -> int:
        """The largest frame payload handled, in bytes."""

    @property
    def hello_timeout(self) -> float:
        """Seconds a new connection has to say who it is (TCP: hello; HTTP port: its
        first request head)."""

    @property
    def shutdown_grace(self) -> float:
        """Seconds a closing connection is given to flush and finish its close."""

    def ws_refusal(self, origin: str | None) -> IMError | None:
        """Why a WebSocket upgrade from ``origin`` is refused, or ``None`` to accept."""

    def open(self, link: Link) -> Connection:
        """A transport accepted a connection: the object its frames go to."""

    async def closed(self, conn: Connection) -> None:
        """The connection ended (its link is closed or closing)."""
