"""Op handlers: the gateway's translation from protocol ops to service calls.

Each handler takes the op's :class:`~imserver.services.gateway.session.OpContext` and
the validated op and returns the reply ``data`` (or an awaitable of it). Writes
(``send``, ``edit``, ``recall``, ``react``) return the message service's future as it
is, so the session writes the reply from its done-callback. Handlers hold no state of
their own: live sessions are the :class:`SessionBinder`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from imserver.protocol import ops
from imserver.protocol.models import Limits, ReceiptKind, ServerInfo
from imserver.services.caller import Caller
from imserver.services.gateway.router import Router
from imserver.services.gateway.session import OpContext
from imserver.services.message.api import MessageService
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService
from imserver.services.room.api import RoomService
from imserver.services.user.api import Identity, RefreshTokenReused, UserService
from imserver.utils.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
    UnsupportedVersion,
)
from imserver.utils.ids import LoginId, UserId, new_session_id

EMPTY = ops.Empty()
PROTOCOL_VERSIONS = (1,)
"""The protocol versions this server speaks (``hello.v``)."""


class SessionBinder(Protocol):
    """What the handlers need of the gateway's live sessions."""

    @property
    def draining(self) -> bool:
        """True once the server is shutting down: writes are refused."""

    async def authenticate(self, ctx: OpContext, identity: Identity) -> None:
        """Bind the context's live session (if any) to ``identity``'s user."""

    def close_login(self, user: UserId, login: LoginId, reason: str) -> None:
        """Close every connection authenticated by a revoked login session of ``user``."""


class Handlers:
    """One method per op, over the user, message and room services."""

    def __init__(
        self,
        *,
        users: UserService,
        messages: MessageService,
        rooms: RoomService,
        broadcasts: BroadcastService,
        sessions: SessionBinder,
        server_info: ServerInfo,
        limits: Callable[[], Limits],
        heartbeat: int,
        notifications: NotificationService | None = None,
    ) -> None:
        self.users = users
        self.messages = messages
        self.rooms = rooms
        self.broadcasts = broadcasts
        self._notifications = notifications
        self.sessions = sessions
        self.server_info = server_info
        self.limits = limits
        """The limits in force, for ``hello`` (the rate limits are dynamic settings)."""
        self.heartbeat = heartbeat

    def router(self) -> Router:
        """The router of every op to its handler."""
        r = Router()
        r.route(ops.Hello, ops.HelloData, self.hello)
        r.route(ops.Register, ops.UserData, self.register)
        r.route(ops.Login, ops.LoginData, self.login)
        r.route(ops.Auth, ops.UserData, self.auth)
        r.route(ops.Refresh, ops.TokenData, self.refresh)
        r.route(ops.Logout, ops.Empty, self.logout)
        r.route(ops.Ping, ops.Empty, self.ping)
        r.route(ops.Send, ops.SendData, self.send)
        r.route(ops.Edit, ops.SendData, self.edit)
        r.route(ops.Recall, ops.SendData, self.recall)
        r.route(ops.React, ops.SendData, self.react)
        r.route(ops.History, ops.HistoryData, self.history)
        r.route(ops.Convs, ops.ConvsData, self.convs)
        r.route(ops.Read, ops.Empty, self.read)
        r.route(ops.Recv, ops.Empty, self.recv)
        r.route(ops.Search, ops.SearchData, self.search)
        r.route(ops.Typing, ops.Empty, self.typing)
        r.route(ops.RoomCreate, ops.RoomData, self.room_create)
        r.route(ops.RoomGet, ops.RoomData, self.room_get)
        r.route(ops.RoomUpdate, ops.RoomData, self.room_update)
        r.route(ops.RoomList, ops.RoomListData, self.room_list)
        r.route(ops.RoomJoin, ops.RoomData, self.room_join)
        r.route(ops.RoomLeave, ops.Empty, self.room_leave)
        r.route(ops.RoomInvite, ops.Empty, self.room_invite)
        r.route(ops.RoomKick, ops.Empty, self.room_kick)
        r.route(ops.RoomSetRole, ops.Empty, self.room_role)
        r.route(ops.RoomMembers, ops.RoomMembersData, self.room_members)
        r.route(ops.UserGet, ops.UserData, self.user_get)
        r.route(ops.UserUpdate, ops.UserData, self.user_update)
        r.route(ops.PresenceGet, ops.PresenceData, self.presence_get)
        r.route(ops.Block, ops.Empty, self.block)
        r.route(ops.Unblock, ops.Empty, self.unblock)
        r.route(ops.NoticeBroadcast, ops.BroadcastData, self.notice_broadcast)
        r.route(ops.PushRegister, ops.Empty, self.push_register)
        r.route(ops.PushUnregister, ops.Empty, self.push_unregister)
        r.route(ops.PushList, ops.PushListData, self.push_list)
        r.route(ops.PushVapidKey, ops.VapidKeyData, self.push_vapid_key)
        r.route(ops.ConvMute, ops.Empty, self.conv_mute)
        r.route(ops.ConvNotify, ops.Empty, self.conv_notify)
        r.route(ops.PushTrace, ops.PushTraceData, self.push_trace)
        r.check_complete()
        return r

    # --- who may ---------------------------------------------------------------------

    @staticmethod
    def _caller(ctx: OpContext) -> Caller:
        # The router admits the ops that reach here only in the AUTHENTICATED state.
        caller = ctx.caller
        assert caller is not None
        return caller

    def _writer(self, ctx: OpContext) -> Caller:
        if self.sessions.draining:
            raise Unavailable("server is shutting down")
        return self._caller(ctx)

    # --- connection and account --------------------------------------------------------

    async def hello(self, ctx: OpContext, op: ops.Hello) -> ops.HelloData:
        if op.v not in PROTOCOL_VERSIONS:
            versions = ", ".join(str(v) for v in PROTOCOL_VERSIONS)
            raise UnsupportedVersion(f"unsupported version {op.v}; this server speaks: {versions}")
        session = ctx.session
        if session is not None:
            session.greet(op.device)
        return ops.HelloData(
            v=op.v,
            server=self.server_info,
            session=session.id if session is not None else new_session_id(),
            heartbeat=self.heartbeat,
            limits=self.limits(),
        )

    async def register(self, ctx: OpContext, op: ops.Register) -> ops.UserData:
        user = await self.users.register(op.username, op.password, op.display_name)
        return ops.UserData(user=user)

    async def login(self, ctx: OpContext, op: ops.Login) -> ops.LoginData:
        current = ctx.caller
        if current is not None:
            # Checked before the password so a bound connection cannot be re-bound.
            # An unknown name falls through to the login, which answers `unauthorized`
            # like every other login failure (never `not_found`).
            try:
                by_name = await self.users.get_user_by_name(op.username)
            except NotFound:
                by_name = None
            if by_name is not None and by_name.id != current.user:
                raise Conflict("this connection is authenticated as another user")
        result = await self.users.login(op.username, op.password, op.device or ctx.device)
        await self.sessions.authenticate(ctx, Identity(UserId(result.user.id), result.login))
        return ops.LoginData(
            user=result.user,
            token=result.token,
            refresh_token=result.refresh_token,
            expires_in=result.expires_in,
        )

    async def auth(self, ctx: OpContext, op: ops.Auth) -> ops.UserData:
        identity = await self.users.authenticate(op.token)
        await self.sessions.authenticate(ctx, identity)
        return ops.UserData(user=await self.users.get_user(identity.user))

    async def refresh(self, ctx: OpContext, op: ops.Refresh) -> ops.TokenData:
        try:
            pair = await self.users.refresh(op.refresh_token)
        except RefreshTokenReused as exc:
            # The login session is revoked: after the error reply is written, close its
            # connections, as for a logout.
            asyncio.get_running_loop().call_soon(
                self.sessions.close_login, exc.user, exc.login, "revoked"
            )
            raise
        return ops.TokenData(
            token=pair.token, refresh_token=pair.refresh_token, expires_in=pair.expires_in
        )

    async def logout(self, ctx: OpContext, op: ops.Logout) -> ops.Empty:
        caller = self._caller(ctx)
        login_id = caller.login
        await self.users.logout(login_id)
        if self._notifications is not None:
            await self._notifications.forget_device(login_id)
        # After this reply is written: close every connection of the revoked login.
        asyncio.get_running_loop().call_soon(
            self.sessions.close_login, caller.user, login_id, "logout"
        )
        return EMPTY

    def ping(self, ctx: OpContext, op: ops.Ping) -> ops.Empty:
        return EMPTY

    async def user_get(self, ctx: OpContext, op: ops.UserGet) -> ops.UserData:
        if op.user is not None:
            return ops.UserData(user=await self.users.get_user(UserId(op.user)))
        if op.username is not None:
            return ops.UserData(user=await self.users.get_user_by_name(op.username))
        raise BadRequest("user.get needs 'user' or 'username'", field="user")

    async def user_update(self, ctx: OpContext, op: ops.UserUpdate) -> ops.UserData:
        me = self._caller(ctx)
        result = await self.users.update(
            me.user,
            me.login,
            display_name=op.display_name,
            password=op.password,
            old_password=op.old_password,
        )
        for login_id in result.revoked:
            self.sessions.close_login(me.user, login_id, "revoked")
        return ops.UserData(user=result.user)

    async def presence_get(self, ctx: OpContext, op: ops.PresenceGet) -> ops.PresenceData:
        infos = await self.users.get_presence([UserId(u) for u in op.users])
        return ops.PresenceData(presence=infos)

    async def block(self, ctx: OpContext, op: ops.Block) -> ops.Empty:
        await self.users.block(self._caller(ctx).user, UserId(op.user))
        return EMPTY

    async def unblock(self, ctx: OpContext, op: ops.Unblock) -> ops.Empty:
        await self.users.unblock(self._caller(ctx).user, UserId(op.user))
        return EMPTY

    # --- messages --------------------------------------------------------------------

    def send(self, ctx: OpContext, op: ops.Send) -> Awaitable[ops.SendData]:
        return self.messages.send(self._writer(ctx), op)

    def edit(self, ctx: OpContext, op: ops.Edit) -> Awaitable[ops.SendData]:
        return self.messages.edit(self._writer(ctx), op)

    def recall(self, ctx: OpContext, op: ops.Recall) -> Awaitable[ops.SendData]:
        return self.messages.recall(self._writer(ctx), op)

    def react(self, ctx: OpContext, op: ops.React) -> Awaitable[ops.SendData]:
        return self.messages.react(self._writer(ctx), op)

    async def history(self, ctx: OpContext, op: ops.History) -> ops.HistoryData:
        return await self.messages.history(self._caller(ctx), op)

    async def convs(self, ctx: OpContext, op: ops.Convs) -> ops.ConvsData:
        return ops.ConvsData(convs=await self.messages.convs(self._caller(ctx)))

    async def _mark(self, ctx: OpContext, op: ops.Read | ops.Recv, kind: ReceiptKind) -> None:
        await self.messages.mark(self._caller(ctx), op.conv, op.seq, kind)

    async def read(self, ctx: OpContext, op: ops.Read) -> ops.Empty:
        await self._mark(ctx, op, "read")
        return EMPTY

    async def recv(self, ctx: OpContext, op: ops.Recv) -> ops.Empty:
        await self._mark(ctx, op, "recv")
        return EMPTY

    async def search(self, ctx: OpContext, op: ops.Search) -> ops.SearchData:
        return await self.messages.search(self._caller(ctx), op)

    async def typing(self, ctx: OpContext, op: ops.Typing) -> ops.Empty:
        await self.messages.typing(self._caller(ctx), op.conv)
        return EMPTY

    # --- rooms -----------------------------------------------------------------------

    async def room_create(self, ctx: OpContext, op: ops.RoomCreate) -> ops.RoomData:
        return ops.RoomData(room=await self.rooms.create(self._writer(ctx), op))

    async def room_get(self, ctx: OpContext, op: ops.RoomGet) -> ops.RoomData:
        return ops.RoomData(room=await self.rooms.get(self._caller(ctx), op.room))

    async def room_update(self, ctx: OpContext, op: ops.RoomUpdate) -> ops.RoomData:
        return ops.RoomData(room=await self.rooms.update(self._writer(ctx), op))

    async def room_list(self, ctx: OpContext, op: ops.RoomList) -> ops.RoomListData:
        return await self.rooms.list(self._caller(ctx), op)

    async def room_join(self, ctx: OpContext, op: ops.RoomJoin) -> ops.RoomData:
        return ops.RoomData(room=await self.rooms.join(self._writer(ctx), op.room))

    async def room_leave(self, ctx: OpContext, op: ops.RoomLeave) -> ops.Empty:
        await self.rooms.leave(self._writer(ctx), op.room)
        return EMPTY

    async def room_invite(self, ctx: OpContext, op: ops.RoomInvite) -> ops.Empty:
        await self.rooms.invite(self._writer(ctx), op.room, UserId(op.user))
        return EMPTY

    async def room_kick(self, ctx: OpContext, op: ops.RoomKick) -> ops.Empty:
        await self.rooms.kick(self._writer(ctx), op.room, UserId(op.user))
        return EMPTY

    async def room_role(self, ctx: OpContext, op: ops.RoomSetRole) -> ops.Empty:
        await self.rooms.set_role(self._writer(ctx), op.room, UserId(op.user), op.role)
        return EMPTY

    async def room_members(self, ctx: OpContext, op: ops.RoomMembers) -> ops.RoomMembersData:
        return await self.rooms.members(self._caller(ctx), op)

    # --- admin notices ----------------------------------------------------------------

    async def notice_broadcast(self, ctx: OpContext, op: ops.NoticeBroadcast) -> ops.BroadcastData:
        return await self.broadcasts.broadcast(self._writer(ctx), op)

    # --- push notifications ----------------------------------------------------------

    @property
    def notifications(self) -> NotificationService:
        if self._notifications is None:
            raise Unavailable("push notifications are not available")
        return self._notifications

    async def push_register(self, ctx: OpContext, op: ops.PushRegister) -> ops.Empty:
        await self.notifications.register(self._caller(ctx), op.provider, op.target)
        return EMPTY

    async def push_unregister(self, ctx: OpContext, op: ops.PushUnregister) -> ops.Empty:
        await self.notifications.unregister(self._caller(ctx), op.provider)
        return EMPTY

    async def push_list(self, ctx: OpContext, op: ops.PushList) -> ops.PushListData:
        found = await self.notifications.registrations(self._caller(ctx))
        return ops.PushListData(registrations=found)

    async def push_vapid_key(self, ctx: OpContext, op: ops.PushVapidKey) -> ops.VapidKeyData:
        return ops.VapidKeyData(key=await self.notifications.vapid_key())

    async def conv_mute(self, ctx: OpContext, op: ops.ConvMute) -> ops.Empty:
        await self.notifications.mute(self._caller(ctx), op.conv, op.until)
        return EMPTY

    async def conv_notify(self, ctx: OpContext, op: ops.ConvNotify) -> ops.Empty:
        await self.notifications.set_level(self._caller(ctx), op.conv, op.level)
        return EMPTY

    async def push_trace(self, ctx: OpContext, op: ops.PushTrace) -> ops.PushTraceData:
        return await self.notifications.trace(self._caller(ctx), op.conv, op.seq)
