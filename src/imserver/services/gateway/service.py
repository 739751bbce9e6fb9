"""The gateway: live connections, their authentication, presence and heartbeats.

The gateway is the only service that speaks the wire protocol. It owns the set of
live sessions and the :class:`~imserver.services.gateway.hub.Hub`, which subscribes
the live bus's channels of the users attached here, serves the transports'
connections (it is the :class:`~imserver.network.handler.ConnectionHandler` of
:mod:`imserver.network`), and turns the user service's view of login sessions into
connection state: a revoked login closes its connections, the first connection of a
user makes them ``online`` and the last one ``offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import msgspec

from imserver import __version__
from imserver.network.handler import Connection, Link
from imserver.protocol.events import Closed, PresenceEvent
from imserver.protocol.models import Limits, PresenceInfo, RateLimits, ServerInfo
from imserver.services.caller import Caller
from imserver.services.gateway.handlers import Handlers
from imserver.services.gateway.hub import Hub
from imserver.services.gateway.ratelimit import TokenBucket
from imserver.services.gateway.session import Edge, OpContext, Session, State
from imserver.services.message.api import MessageService
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService
from imserver.services.room.api import RoomService
from imserver.services.user.api import Identity, UserService
from imserver.storage.bus import LiveBus, Publication, user_channel
from imserver.utils.config import Config
from imserver.utils.errors import Conflict, Forbidden, IMError, Unavailable
from imserver.utils.ids import LoginId, RoomId, UserId
from imserver.utils.live import Live, LiveSettings
from imserver.utils.metrics import Metrics

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT = 5.0
"""Most seconds an authentication waits for the live bus's subscriptions."""


class Gateway:
    """State shared by every session of one server process."""

    def __init__(
        self,
        config: Config,
        *,
        users: UserService,
        messages: MessageService,
        rooms: RoomService,
        broadcasts: BroadcastService,
        bus: LiveBus,
        metrics: Metrics,
        notifications: NotificationService | None = None,
        live: LiveSettings | None = None,
    ) -> None:
        """``live``: the dynamic settings in force (the rate limits); without it the
        configuration's values hold for the gateway's life."""
        self.config = config
        self.users = users
        self.messages = messages
        self.notifications = notifications
        self._publishing: set[asyncio.Task[None]] = set()
        """Publications of revoked logins on their way to the other gateways."""
        self._devices: dict[Session, Caller] = {}
        """Live sessions reported to the notification service as online devices."""
        self.rooms = rooms
        self.bus = bus
        self.metrics = metrics
        self.hub = Hub(metrics, bus, messages)
        self.sessions: set[Session] = set()
        self.draining = False
        self.server_info = ServerInfo(name=config.server_name, version=__version__)
        lim = config.limits
        self._rate_per_s = live.rate_per_s if live is not None else Live(lim.rate_per_s)
        self._rate_burst = live.rate_burst if live is not None else Live(lim.rate_burst)
        self._limits = Limits(
            max_frame=lim.max_frame,
            max_body=lim.max_body,
            max_meta=lim.max_meta,
            rate=RateLimits(per_s=lim.rate_per_s, burst=lim.rate_burst),
        )
        self.handlers = Handlers(
            users=users,
            messages=messages,
            rooms=rooms,
            broadcasts=broadcasts,
            sessions=self,
            server_info=self.server_info,
            limits=self.limits,
            heartbeat=lim.heartbeat,
            notifications=notifications,
        )
        self.router = self.handlers.router()
        self.edge = Edge(
            self.router.call,
            metrics,
            bad_frames=lim.bad_frames,
            send_queue_bytes=lim.send_queue_bytes,
            rate_per_s=self._rate_per_s,
            rate_burst=self._rate_burst,
            shutdown_grace=config.shutdown_grace,
        )
        self.flusher = self.edge.flusher
        self._sweeper: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()

    def limits(self) -> Limits:
        """The limits in force, as ``hello`` announces them (the rate limits are
        dynamic settings: rebuilt when they changed)."""
        rate = self._limits.rate
        per_s, burst = self._rate_per_s.value, self._rate_burst.value
        if rate.per_s != per_s or rate.burst != burst:
            self._limits = msgspec.structs.replace(
                self._limits, rate=RateLimits(per_s=per_s, burst=burst)
            )
        return self._limits

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat sweeper."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_heartbeats())

    def new_bucket(self) -> TokenBucket:
        """A fresh rate-limit bucket with the configured limits."""
        return self.edge.new_bucket()

    # --- the transports' connection handler ----------------------------------------

    @property
    def max_frame(self) -> int:
        return self.config.limits.max_frame

    @property
    def hello_timeout(self) -> float:
        return self.config.limits.hello_timeout

    @property
    def shutdown_grace(self) -> float:
        return self.config.shutdown_grace

    def ws_refusal(self, origin: str | None) -> IMError | None:
        """Why a WebSocket upgrade from ``origin`` is refused, or ``None`` to accept."""
        allowed = self.config.ws.allowed_origins
        if allowed and origin not in allowed:
            return Forbidden("origin not allowed")
        if self.draining:
            return Unavailable("server is shutting down")
        return None

    def open(self, link: Link) -> Session:
        """A transport accepted a connection: its session, in state CONNECTED."""
        session = Session(self.edge, link)
        self.sessions.add(session)
        self.metrics.connection(link.kind, 1)
        return session

    async def closed(self, conn: Connection) -> None:
        """A transport's connection ended: forget it and update presence."""
        if not isinstance(conn, Session) or conn not in self.sessions:
            return
        session = conn
        session.ended()
        self.sessions.discard(session)
        self.metrics.connection(session.link.kind, -1)
        if self.draining and not self.sessions:
            self._drained.set()
        await self._device_offline(session)
        if self.hub.detach(session) and session.caller is not None:
            user = session.caller.user
            try:
                info = await self.users.set_offline(user)
                if info.status == "offline":  # else online through another gateway
                    await self._publish_presence(info)
            except Exception:
                logger.exception("presence update for %s failed", user)

    # --- authentication ------------------------------------------------------------

    async def authenticate(self, ctx: OpContext, identity: Identity) -> None:
        """Bind the live session of ``ctx`` to a user after ``login`` or ``auth``; a
        context without one (an HTTP request) binds nothing."""
        session = ctx.session
        if session is None or session.closing:
            return
        current = session.caller
        if current is not None:
            if current.user != identity.user:
                raise Conflict("this connection is authenticated as another user")
            if current.login == identity.login:
                return
            self.hub.detach(session)
            await self._device_offline(session)
        session.bind(Caller(identity.user, identity.login, session.id))
        first = self.hub.attach(session)
        await self._device_online(session)
        if not first:
            return
        # The user's rooms are followed before the reply: whatever the client does
        # after it, it gets the rooms' messages live from then on.
        rooms: Sequence[RoomId] = ()
        try:
            rooms = await self.rooms.rooms_of(identity.user)
        finally:
            self.hub.add_rooms(identity.user, rooms)
        # A networked bus subscribes after a round trip: wait for it (bounded; a
        # broker that does not answer is a loss the bus reports, which resyncs).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await self.bus.settle()
        # Re-binding an authenticated connection to another login session of the same
        # user keeps the user online throughout: only a first connection is news.
        if current is None:
            info = await self.users.set_online(identity.user)
            if info is not None:  # else online through another gateway already
                await self._publish_presence(info)

    async def _device_online(self, session: Session) -> None:
        caller = session.caller
        if self.notifications is None or caller is None:
            return
        self._devices[session] = caller
        try:
            await self.notifications.device_online(caller.user, caller.login)
        except Exception:
            logger.exception("online device report for %s failed", caller.user)

    async def _device_offline(self, session: Session) -> None:
        caller = self._devices.pop(session, None)
        if self.notifications is None or caller is None:
            return
        try:
            await self.notifications.device_offline(caller.user, caller.login)
        except Exception:
            logger.exception("offline device report for %s failed", caller.user)

    def close_login(self, user: UserId, login: LoginId, reason: str) -> None:
        """Close every connection authenticated by a revoked login session: those
        here at once, those on other gateways through ``user``'s channel (the hub of
        each gateway closes its own on that publication; here they are closed by then)."""
        for session in self.hub.sessions_of_login(login):
            session.close(reason)
        publication = Publication(event=Closed(reason=reason), close_login=login)
        task = asyncio.get_running_loop().create_task(
            self.bus.publish(user_channel(user), publication)
        )
        self._publishing.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("closing a revoked login elsewhere failed", exc_info=task.exception())

    async def _publish_presence(self, info: PresenceInfo) -> None:
        peers = await self.messages.direct_peers(UserId(info.user))
        if peers:
            event = PresenceEvent(user=info.user, status=info.status, last_seen=info.last_seen)
            publication = Publication(event=event)
            for peer in peers:
                await self.bus.publish(user_channel(peer), publication)

    # --- heartbeats and shutdown ---------------------------------------------------

    async def _sweep_heartbeats(self) -> None:
        """Close connections silent for more than twice the heartbeat interval, and
        connections that have not sent ``hello`` within ``hello_timeout``."""
        lim = self.config.limits
        silence = 2 * lim.heartbeat
        period = max(0.2, min(5.0, lim.heartbeat / 4, lim.hello_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(self.sessions):
                if session.closing:
                    continue
                if session.last_rx < now - silence:
                    session.close("heartbeat_timeout")
                elif session.state is State.CONNECTED and session.opened < now - lim.hello_timeout:
                    session.close("hello_timeout")

    async def shutdown(self) -> None:
        """Tell every session ``closed {shutdown}`` and wait (bounded) for flushes."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for session in list(self.sessions):
            session.close("shutdown")
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.config.shutdown_grace)
        for session in list(self.sessions):
            session.link.abort()
