"""The client API: :meth:`Client.connect`, ``hello`` and its keepalive, and one
helper per common op (``login``, ``send_message``, ``history`` ...).

Written from the wire contract (docs/protocol.md) alone, so it speaks in plain dicts: it
can send any frame, valid or not, which the project's tests need, and it keeps
working when the server adds fields.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import uuid
from collections.abc import Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp

from imserver.client.codec import CodecName, Frame
from imserver.client.connection import Connection
from imserver.client.errors import ConnectionClosed
from imserver.client.routing import silence
from imserver.client.transport import (
    DEFAULT_MAX_FRAME,
    ClientTransport,
    TransportName,
    open_tcp,
    open_ws,
    tcp_address,
    ws_url,
)
from imserver.protocol.convs import direct_conv as _direct_conv

__all__ = ["PROTOCOL_VERSION", "Client"]

PROTOCOL_VERSION: Final = 1


class _Connecting:
    """What :meth:`Client.connect` returns: await it, or use it with ``async with``."""

    def __init__(self, opening: Coroutine[Any, Any, Client]) -> None:
        self._opening = opening
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._opening.__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._opening
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class Client(Connection):
    """One connection to IMServer (WebSocket or TCP), speaking dicts.

    Open it with :meth:`connect`. :meth:`request` sends an op and returns its reply's
    ``data``; everything the server sends that is not a reply to a pending request
    is an event, read with :meth:`next_event`, :meth:`events` or :meth:`events_nowait`
    (or handed to :attr:`on_event` as it arrives). Those come from
    :class:`~imserver.client.connection.Connection`; this class adds opening,
    ``hello`` with its keepalive, and a helper per common op.
    """

    def __init__(self, transport: ClientTransport, *, codec: CodecName = "json") -> None:
        """Wrap an open ``transport``; :meth:`connect` is the usual way in."""
        self.hello_data: Frame | None = None
        """The ``data`` of the ``hello`` reply."""
        self.user: Frame | None = None
        """The user this connection is logged in as (set by login/auth/register helpers)."""
        self.token: str | None = None
        self.refresh_token: str | None = None
        super().__init__(transport, codec=codec)

    # --- opening

    @classmethod
    def connect(
        cls,
        target: str | tuple[str, int],
        *,
        transport: TransportName = "ws",
        codec: CodecName = "json",
        hello: bool = True,
        client_name: str = "imserver.client",
        device: str | None = None,
        max_frame: int | None = None,
        keepalive: bool = True,
        timeout: float = 10.0,
        ssl: ssl_module.SSLContext | bool | None = None,
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> _Connecting:
        """Open a connection; ``await`` the result, or ``async with`` it.

        ``target`` is a WebSocket URL (``ws://host:port/ws``), ``host:port`` or
        ``(host, port)``. With ``hello`` (the default) the ``hello`` op is sent first
        and its reply kept as :attr:`hello_data`; ``keepalive`` then pings whenever the
        connection has been idle for half the server's heartbeat. ``max_frame`` bounds
        the frames accepted from the server. ``origin``/``headers``/``session`` apply to
        WebSocket only (``session``: a shared aiohttp session, left open on close).
        Raises :class:`ConnectFailed`, or :class:`ClientError` if ``hello`` is refused.
        """
        return _Connecting(
            cls._open(
                target,
                transport=transport,
                codec=codec,
                hello=hello,
                client_name=client_name,
                device=device,
                max_frame=DEFAULT_MAX_FRAME if max_frame is None else max_frame,
                keepalive=keepalive,
                connect_timeout=timeout,
                ssl=ssl,
                origin=origin,
                headers=headers,
                session=session,
            )
        )

    @classmethod
    async def _open(
        cls,
        target: str | tuple[str, int],
        *,
        transport: TransportName,
        codec: CodecName,
        hello: bool,
        client_name: str,
        device: str | None,
        max_frame: int,
        keepalive: bool,
        connect_timeout: float,
        ssl: ssl_module.SSLContext | bool | None,
        origin: str | None,
        headers: Mapping[str, str] | None,
        session: aiohttp.ClientSession | None,
    ) -> Client:
        if codec not in ("json", "msgpack"):
            raise ValueError(f"unknown codec {codec!r}")
        tr: ClientTransport
        if transport == "ws":
            tr = await open_ws(
                ws_url(target), max_frame, connect_timeout, ssl, origin, headers, session
            )
        elif transport == "tcp":
            tr = await open_tcp(tcp_address(target), max_frame, connect_timeout, ssl)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        client = cls(tr, codec=codec)
        if hello:
            try:
                await client.hello(client_name=client_name, device=device, keepalive=keepalive)
            except BaseException:
                await client.close()
                raise
        return client

    # --- session helpers

    # --- session helpers

    async def hello(
        self,
        *,
        v: int = PROTOCOL_VERSION,
        client_name: str | None = "imserver.client",
        device: str | None = None,
        keepalive: bool = True,
    ) -> Frame:
        """Send ``hello``, keep the reply as :attr:`hello_data`, start the keepalive."""
        fields: Frame = {"v": v}
        if client_name is not None:
            fields["client"] = client_name
        if device is not None:
            fields["device"] = device
        data = await self.request("hello", fields)
        self.hello_data = data
        heartbeat = data.get("heartbeat")
        if keepalive and isinstance(heartbeat, int | float) and heartbeat > 0:
            if self._keepalive is not None:
                self._keepalive.cancel()
            self._keepalive = asyncio.create_task(
                self._keepalive_loop(heartbeat / 2), name="imserver-client-keepalive"
            )
        return data

    async def _keepalive_loop(self, idle: float) -> None:
        # The server closes a connection silent for 2 x heartbeat; ping after `idle`
        # seconds without sending anything, so a busy connection sends no extra pings.
        while True:
            delay = self._last_send + idle - self._loop.time()
            if delay <= 0:
                try:
                    self.request_nowait("ping").add_done_callback(silence)
                except ConnectionClosed:
                    return
                delay = idle
            await asyncio.sleep(delay)

    @property
    def session_id(self) -> str | None:
        """The server's id for this connection (from ``hello``)."""
        sid = (self.hello_data or {}).get("session")
        return sid if isinstance(sid, str) else None

    @property
    def user_id(self) -> str:
        """The id of the logged-in user; raises if not logged in."""
        if self.user is None:
            raise RuntimeError("not logged in")
        return str(self.user["id"])

    async def register(
        self, username: str, password: str, display_name: str | None = None
    ) -> Frame:
        """Create an account; returns its ``user`` (this does not log in)."""
        fields: Frame = {"username": username, "password": password}
        if display_name is not None:
            fields["display_name"] = display_name
        data = await self.request("register", fields)
        user: Frame = data["user"]
        return user

    async def login(self, username: str, password: str, device: str | None = None) -> Frame:
        """Log in (this connection too); keeps ``token``, ``refresh_token``, ``user``."""
        fields: Frame = {"username": username, "password": password}
        if device is not None:
            fields["device"] = device
        data = await self.request("login", fields)
        self.token = data.get("token")
        self.refresh_token = data.get("refresh_token")
        self.user = data.get("user")
        return data

    async def auth(self, token: str | None = None) -> Frame:
        """Authenticate this connection with ``token`` (default: the stored one)."""
        token = token or self.token
        if token is None:
            raise RuntimeError("no token: pass one or login first")
        data = await self.request("auth", {"token": token})
        self.token = token
        self.user = data.get("user")
        return data

    async def refresh(self, refresh_token: str | None = None) -> Frame:
        """Trade the refresh token for new tokens, and keep them."""
        refresh_token = refresh_token or self.refresh_token
        if refresh_token is None:
            raise RuntimeError("no refresh token: pass one or login first")
        data = await self.request("refresh", refresh_token=refresh_token)
        self.token = data.get("token")
        self.refresh_token = data.get("refresh_token")
        return data

    async def logout(self) -> Frame:
        """Revoke this session's tokens (the server then closes the connection)."""
        return await self.request("logout")

    async def ping(self) -> Frame:
        """A round trip to the server."""
        return await self.request("ping")

    async def send_message(
        self,
        conv: str,
        body: str,
        *,
        cid: str | None = None,
        type: str = "text",
        **extra: Any,
    ) -> Frame:
        """Send a message (``cid`` defaults to a fresh uuid); returns the reply ``data``
        (``conv``, ``seq``, ``ts``, ``cid``, ``dup``). ``extra``: ``meta``, ``reply_to``,
        ``mentions``..."""
        # Only a missing cid gets a fresh one: an explicit (even invalid) cid is sent as is.
        fields: Frame = {
            "conv": conv,
            "cid": uuid.uuid4().hex if cid is None else cid,
            "type": type,
            "body": body,
        }
        fields.update(extra)
        return await self.request("send", fields)

    async def history(
        self,
        conv: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Frame:
        """One page of a conversation: ``messages`` (ascending by seq) and ``has_more``."""
        fields: Frame = {"conv": conv}
        if after is not None:
            fields["after"] = after
        if before is not None:
            fields["before"] = before
        if limit is not None:
            fields["limit"] = limit
        return await self.request("history", fields)

    async def convs(self) -> list[Frame]:
        """The user's conversations, latest activity first."""
        data = await self.request("convs")
        convs: list[Frame] = data.get("convs", [])
        return convs

    @staticmethod
    def direct_conv(a: str, b: str) -> str:
        """The id of the direct conversation of users ``a`` and ``b``: ``d:<min>:<max>``."""
        return _direct_conv(a, b)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        who = f" user={self.user.get('username')!r}" if self.user else ""
        return f"<Client {self.transport_name}/{self.codec} {state}{who}>"
