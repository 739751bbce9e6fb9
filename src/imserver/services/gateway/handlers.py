"""Op handlers: the gateway's translation from protocol ops to service calls.

Each handler takes the session and the validated op and returns the reply ``data``
(or an awaitable of it). Handlers hold no state; the :class:`Gateway` does.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from imserver.protocol import ops
from imserver.protocol.models import ReceiptKind
from imserver.services.user.api import Identity, RefreshTokenReused
from imserver.utils.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
    UnsupportedVersion,
)
from imserver.utils.ids import UserId

if TYPE_CHECKING:
    from imserver.services.caller import Caller
    from imserver.services.gateway.router import Handler
    from imserver.services.gateway.service import Gateway
    from imserver.services.gateway.session import Session

EMPTY = ops.Empty()
PROTOCOL_VERSIONS = (1,)
"""The protocol versions this server speaks (``hello.v``)."""


def build_handlers(gw: Gateway) -> dict[type[ops.Op], Handler]:
    """The dispatch table of every op."""

    def caller(session: Session) -> Caller:
        assert session.caller is not None
        return session.caller

    def writable(session: Session) -> Caller:
        if gw.draining:
            raise Unavailable("server is shutting down")
        return caller(session)

    async def hello(session: Session, op: ops.Hello) -> ops.HelloData:
        if op.v not in PROTOCOL_VERSIONS:
            versions = ", ".join(str(v) for v in PROTOCOL_VERSIONS)
            raise UnsupportedVersion(f"unsupported version {op.v}; this server speaks: {versions}")
        session.greeted = True
        if op.device is not None:
            session.device = op.device
        return ops.HelloData(
            v=op.v,
            server=gw.server_info,
            session=session.id,
            heartbeat=gw.config.limits.heartbeat,
            limits=gw.limits,
        )

    async def register(session: Session, op: ops.Register) -> ops.UserData:
        user = await gw.users.register(op.username, op.password, op.display_name)
        return ops.UserData(user=user)

    async def login(session: Session, op: ops.Login) -> ops.LoginData:
        current = session.caller
        if current is not None:
            # Checked before the password so a bound connection cannot be re-bound.
            # An unknown name falls through to the login, which answers `unauthorized`
            # like every other login failure (never `not_found`).
            try:
                by_name = await gw.users.get_user_by_name(op.username)
            except NotFound:
                by_name = None
            if by_name is not None and by_name.id != current.user:
                raise Conflict("this connection is authenticated as another user")
        result = await gw.users.login(op.username, op.password, op.device or session.device)
        await gw.authenticate(session, Identity(UserId(result.user.id), result.login))
        return ops.LoginData(
            user=result.user,
            token=result.token,
            refresh_token=result.refresh_token,
            expires_in=result.expires_in,
        )

    async def auth(session: Session, op: ops.Auth) -> ops.UserData:
        identity = await gw.users.authenticate(op.token)
        await gw.authenticate(session, identity)
        return ops.UserData(user=await gw.users.get_user(identity.user))

    async def refresh(session: Session, op: ops.Refresh) -> ops.TokenData:
        try:
            pair = await gw.users.refresh(op.refresh_token)
        except RefreshTokenReused as exc:
            # The login session is revoked: after the error reply is written, close its
            # connections, as for a logout.
            asyncio.get_running_loop().call_soon(gw.close_login, exc.login, "revoked")
            raise
        return ops.TokenData(
            token=pair.token, refresh_token=pair.refresh_token, expires_in=pair.expires_in
        )

    async def logout(session: Session, op: ops.Logout) -> ops.Empty:
        login_id = caller(session).login
        await gw.users.logout(login_id)
        # After this reply is written: close every connection of the revoked login.
        asyncio.get_running_loop().call_soon(gw.close_login, login_id, "logout")
        return EMPTY

    def ping(session: Session, op: ops.Ping) -> ops.Empty:
        return EMPTY

    def send(session: Session, op: ops.Send) -> Any:
        return gw.messages.send(writable(session), op)

    def edit(session: Session, op: ops.Edit) -> Any:
        return gw.messages.edit(writable(session), op)

    def recall(session: Session, op: ops.Recall) -> Any:
        return gw.messages.recall(writable(session), op)

    def react(session: Session, op: ops.React) -> Any:
        return gw.messages.react(writable(session), op)

    async def history(session: Session, op: ops.History) -> ops.HistoryData:
        return await gw.messages.history(caller(session), op)

    async def convs(session: Session, op: ops.Convs) -> ops.ConvsData:
        return ops.ConvsData(convs=await gw.messages.convs(caller(session)))

    def marker(kind: ReceiptKind) -> Handler:
        async def mark(session: Session, op: ops.Read | ops.Recv) -> ops.Empty:
            await gw.messages.mark(caller(session), op.conv, op.seq, kind)
            return EMPTY

        return mark

    async def search(session: Session, op: ops.Search) -> ops.SearchData:
        return await gw.messages.search(caller(session), op)

    async def typing(session: Session, op: ops.Typing) -> ops.Empty:
        await gw.messages.typing(caller(session), op.conv)
        return EMPTY

    async def room_create(session: Session, op: ops.RoomCreate) -> ops.RoomData:
        return ops.RoomData(room=await gw.rooms.create(writable(session), op))

    async def room_get(session: Session, op: ops.RoomGet) -> ops.RoomData:
        return ops.RoomData(room=await gw.rooms.get(caller(session), op.room))

    async def room_update(session: Session, op: ops.RoomUpdate) -> ops.RoomData:
        return ops.RoomData(room=await gw.rooms.update(writable(session), op))

    async def room_list(session: Session, op: ops.RoomList) -> ops.RoomListData:
        return await gw.rooms.list(caller(session), op)

    async def room_join(session: Session, op: ops.RoomJoin) -> ops.RoomData:
        return ops.RoomData(room=await gw.rooms.join(writable(session), op.room))

    async def room_leave(session: Session, op: ops.RoomLeave) -> ops.Empty:
        await gw.rooms.leave(writable(session), op.room)
        return EMPTY

    async def room_invite(session: Session, op: ops.RoomInvite) -> ops.Empty:
        await gw.rooms.invite(writable(session), op.room, UserId(op.user))
        return EMPTY

    async def room_kick(session: Session, op: ops.RoomKick) -> ops.Empty:
        await gw.rooms.kick(writable(session), op.room, UserId(op.user))
        return EMPTY

    async def room_role(session: Session, op: ops.RoomSetRole) -> ops.Empty:
        await gw.rooms.set_role(writable(session), op.room, UserId(op.user), op.role)
        return EMPTY

    async def room_members(session: Session, op: ops.RoomMembers) -> ops.RoomMembersData:
        return await gw.rooms.members(caller(session), op)

    async def user_get(session: Session, op: ops.UserGet) -> ops.UserData:
        if op.user is not None:
            return ops.UserData(user=await gw.users.get_user(UserId(op.user)))
        if op.username is not None:
            return ops.UserData(user=await gw.users.get_user_by_name(op.username))
        raise BadRequest("user.get needs 'user' or 'username'", field="user")

    async def user_update(session: Session, op: ops.UserUpdate) -> ops.UserData:
        me = caller(session)
        result = await gw.users.update(
            me.user,
            me.login,
            display_name=op.display_name,
            password=op.password,
            old_password=op.old_password,
        )
        for login_id in result.revoked:
            gw.close_login(login_id, "revoked")
        return ops.UserData(user=result.user)

    async def presence_get(session: Session, op: ops.PresenceGet) -> ops.PresenceData:
        infos = await gw.users.get_presence([UserId(u) for u in op.users])
        return ops.PresenceData(presence=infos)

    async def block(session: Session, op: ops.Block) -> ops.Empty:
        await gw.users.block(caller(session).user, UserId(op.user))
        return EMPTY

    async def unblock(session: Session, op: ops.Unblock) -> ops.Empty:
        await gw.users.unblock(caller(session).user, UserId(op.user))
        return EMPTY

    return {
        ops.Hello: hello,
        ops.Register: register,
        ops.Login: login,
        ops.Auth: auth,
        ops.Refresh: refresh,
        ops.Logout: logout,
        ops.Ping: ping,
        ops.Send: send,
        ops.Edit: edit,
        ops.Recall: recall,
        ops.React: react,
        ops.History: history,
        ops.Convs: convs,
        ops.Read: marker("read"),
        ops.Recv: marker("recv"),
        ops.Search: search,
        ops.Typing: typing,
        ops.RoomCreate: room_create,
        ops.RoomGet: room_get,
        ops.RoomUpdate: room_update,
        ops.RoomList: room_list,
        ops.RoomJoin: room_join,
        ops.RoomLeave: room_leave,
        ops.RoomInvite: room_invite,
        ops.RoomKick: room_kick,
        ops.RoomSetRole: room_role,
        ops.RoomMembers: room_members,
        ops.UserGet: user_get,
        ops.UserUpdate: user_update,
        ops.PresenceGet: presence_get,
        ops.Block: block,
        ops.Unblock: unblock,
    }
