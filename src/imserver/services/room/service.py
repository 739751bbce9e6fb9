"""The in-process room service: rooms, members and roles, invitations (docs/protocol.md §5).

What lives in memory, and why it stays correct:

1. **Loaded rooms stay loaded** and are the database's state
   (:mod:`~imserver.services.room.loaded`).
2. **Replaced, never mutated.** A change builds new ``roles``, ``Members`` and
   ``Room`` objects and swaps them in; ``room_members`` (on the send path of every
   room message) answers the same ``Members`` object until the membership changes.
3. **One change at a time per room.** Every change (join, leave, invite, kick, role,
   update) holds the room's ``asyncio.Lock`` while it: checks the rules against memory,
   writes the database, posts the ``system`` message through the message service,
   waits for its commit, and swaps in the new state. Counts, hand-overs and the cache
   agree under concurrent joins and leaves, and the system messages of one room are
   stored in the order of the changes.
4. **A membership change takes effect at its seq.** The ``joined``/``left``/``kicked``
   message carries the new ``Members`` (``post_room_system(members=...)``): the message
   writer fans out everything of the room with a lower seq to the old members, that
   message and everything after to the new ones, and checks sends, reads and typing
   against the list in force at their position. The same list, with the same
   ``version``, is installed here once the post resolves (also if it failed: the
   database already holds the change), so the directory and the writer agree. Each
   change gives the room's ``Members`` a higher ``version``; the writer keeps the list
   it switched to until the directory answers that version or a later one. A room's
   versions start at the time it is loaded, in milliseconds, so a restarted room
   service answers versions above those it handed out before (unless a room changed
   more than once per millisecond since it was loaded). A kicked or departed user gets
   every message before the ``kicked``/``left`` one, that message (``notify``), and
   nothing after it; once the op is acknowledged ``send``, ``history``, ``read`` and
   ``typing`` answer them ``forbidden``. A joining user gets everything from their
   ``joined`` message on.
5. **Empty rooms.** When the last member leaves, the room is empty for good: gone
   from ``room.list``, ``not_found`` to every room op. Its ``Members`` stays (empty) so
   the message service answers ``forbidden`` to its former members, not ``not_found``.

System messages (``type: system``, ``from: system``) and their ``meta``:

=========  ==============================================================  ===========
event      meta                                                            delivered to
=========  ==============================================================  ===========
created    ``{event, actor}``                                              members
joined     ``{event, actor, user}`` (``actor`` = the owner for the         members
           ``members`` of ``room.create``, else the user)
left       ``{event, actor, user}`` (``actor`` = ``user``)                 members + the user
invited    ``{event, actor, user}``                                        members + the invitee
kicked     ``{event, actor, user}``                                        members + the user
role       ``{event, actor, user, role}``; an ownership hand-over is       members
           ``role: "owner"`` with ``actor`` = the owner who left, posted
           right after their ``left``
updated    ``{event, actor, changes}``; ``changes`` holds the fields that  members
           changed (``name``, ``topic``, ``public``) with their new values
=========  ==============================================================  ===========

If the message service fails after the database write, the change stands and the
op answers the error (``unavailable``) without its system message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from imserver.protocol import ops
from imserver.protocol.cursors import (
    decode_directory_cursor,
    decode_member_cursor,
    encode_directory_cursor,
    encode_member_cursor,
)
from imserver.protocol.models import Room, RoomMember, RoomRole
from imserver.services.caller import Caller
from imserver.services.message.api import Members, MessageService, RoomPost
from imserver.services.peers import Peer
from imserver.services.room.api import UserDirectory
from imserver.services.room.loaded import (
    LoadedRoom,
    LoadedRooms,
    replace,
    room_info,
    still_live,
)
from imserver.services.room.store import MemberRecord, RoomRecord, SqlRoomStore
from imserver.storage.outbox import Outbox
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.clock import now_ms
from imserver.utils.errors import BadRequest, Conflict, Forbidden, IMError, NotFound, Unavailable
from imserver.utils.ids import RoomId, UserId, new_room_id
from imserver.utils.live import Live, cell

logger = logging.getLogger(__name__)

MIGRATIONS = "imserver.services.room.migrations"
DEFAULT_MAX_ROOM_SIZE: Final = 10_000

RANK: Final[dict[str, int]] = {"member": 0, "admin": 1, "owner": 2}
"""Owner > admin > member: a kick needs a strictly higher rank than the target's."""
MANAGERS: Final = frozenset({"owner", "admin"})
"""Roles that may invite, kick and update."""


class LocalRoomService:
    """The in-process :class:`~imserver.services.room.api.RoomService`.

    The room and message services use each other: this one is built first (with
    :func:`open_room_service`) and reaches the message service through ``messages``,
    a :data:`~imserver.services.peers.Peer` asked on every post; the message service is
    then built with this one as its ``rooms``. Who is online comes from the user
    service's presence records (``users``).
    """

    def __init__(
        self,
        store: SqlRoomStore,
        *,
        users: UserDirectory,
        messages: Peer[MessageService],
        max_room_size: int | Live[int] = DEFAULT_MAX_ROOM_SIZE,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._max_size = cell(max_room_size)
        if self._max_size.value < 1:
            raise ValueError("max_room_size must be at least 1")
        self._store = store
        self._users = users
        self._messages = messages
        self._clock = clock
        self._loaded = LoadedRooms(store, clock)

    @property
    def _max(self) -> int:
        """The room size limit in force (``rooms.max_size``, a dynamic setting)."""
        return self._max_size.value

    # --- helpers ----------------------------------------------------------------------

    async def _names(self, users: Iterable[str]) -> dict[str, str]:
        """Display names of the users that exist among ``users``."""
        found = await self._users.get_users(UserId(u) for u in users)
        return {uid: u.display_name for uid, u in found.items()}

    @staticmethod
    def _require_user(user: str, names: dict[str, str]) -> None:
        if user not in names:
            raise NotFound(f"no user {user}", field="user")

    async def _post(
        self,
        room: RoomId,
        body: str,
        meta: dict[str, Any],
        notify: Sequence[str] = (),
        members: Members | None = None,
    ) -> None:
        """Store one system message of ``room`` and wait for its commit. ``members``:
        the room's new member list, in effect from this message's seq on."""
        try:
            await self._messages().post_room_system(
                room, body, meta, notify=tuple(UserId(u) for u in notify), members=members
            )
        except IMError:
            raise
        except Exception as exc:
            logger.exception("system message of room %s failed", room)
            raise Unavailable("the message service is unavailable") from exc

    async def _post_many(self, room: RoomId, posts: list[RoomPost]) -> None:
        """Store system messages of ``room`` in this order and wait for their commits."""
        try:
            await self._messages().post_room_systems(room, posts)
        except IMError:
            raise
        except Exception as exc:
            logger.exception("system messages of room %s failed", room)
            raise Unavailable("the message service is unavailable") from exc

    async def _online(self, users: Sequence[str]) -> set[str]:
        """Those of ``users`` the user service's presence records show online."""
        if not users:
            return set()
        found = await self._users.get_presence([UserId(u) for u in users])
        return {p.user for p in found if p.status == "online"}

    def _full(self) -> Forbidden:
        return Forbidden(f"room is full (at most {self._max} members)")

    # --- ops --------------------------------------------------------------------------

    async def create(self, caller: Caller, req: ops.RoomCreate) -> Room:
        """Create a room owned by the caller; ``members`` join at once.

        ``not_found`` (field ``members``) if one of them does not exist, ``forbidden``
        if the room would exceed the maximum size. An empty ``topic`` means none.
        """
        owner = caller.user
        joined = [u for u in dict.fromkeys(req.members or ()) if u != owner]
        names = await self._names([owner, *joined])
        for user in joined:
            if user not in names:
                raise NotFound(f"no user {user}", field="members")
        if 1 + len(joined) > self._max:
            raise self._full()
        now = self._clock()
        record = RoomRecord(
            id=new_room_id(),
            name=req.name,
            topic=req.topic or None,
            public=req.public,
            owner=owner,
            created=now,
            member_count=1 + len(joined),
        )
        await self._store.create_room(record, joined, now)
        roles: dict[str, RoomRole] = {owner: "owner"}
        roles.update((u, "member") for u in joined)
        st = LoadedRoom(room_info(record), roles, Members.of(roles, now))
        self._loaded.add(st)
        async with st.lock:
            who = names.get(owner, owner)
            posts = [
                RoomPost(body=f"{who} created {req.name}", meta=_meta("created", owner)),
                *(
                    RoomPost(
                        body=f"{who} added {names.get(u, u)}", meta=_meta("joined", owner, user=u)
                    )
                    for u in joined
                ),
            ]
            # One call, queued together in this order, so they share one commit.
            await self._post_many(record.id, posts)
            return st.info

    async def get(self, caller: Caller, room: RoomId) -> Room:
        """The room: to members and invitees, and to anyone if it is public."""
        st = await self._loaded.live(room)
        if (
            not st.info.public
            and caller.user not in st.roles
            and not await self._store.is_invited(room, caller.user)
        ):
            raise Forbidden(f"not a member of {room}")
        return st.info

    async def update(self, caller: Caller, req: ops.RoomUpdate) -> Room:
        """Change name, topic (``""`` clears it) and/or visibility: owner and admins.

        Fields equal to the current values are no change; with no change at all
        nothing is stored and the room is answered as it is.
        """
        st = await self._loaded.live(req.room)
        async with st.lock:
            still_live(st)
            if st.roles.get(caller.user) not in MANAGERS:
                raise Forbidden("only the owner or an admin may update the room")
            changes: dict[str, Any] = {}
            if req.name is not None and req.name != st.info.name:
                changes["name"] = req.name
            if req.topic is not None and (req.topic or None) != st.info.topic:
                changes["topic"] = req.topic or None
            if req.public is not None and req.public != st.info.public:
                changes["public"] = req.public
            if not changes:
                return st.info
            await self._store.update_room(
                req.room,
                name=changes.get("name"),
                topic=changes.get("topic"),
                set_topic="topic" in changes,
                public=changes.get("public"),
            )
            replace(st, **changes)
            names = await self._names([caller.user])
            what = ", ".join(_describe(k, v) for k, v in changes.items())
            await self._post(
                req.room,
                f"{names.get(caller.user, caller.user)} {what}",
                {**_meta("updated", caller.user), "changes": changes},
            )
            return st.info

    async def join(self, caller: Caller, room: RoomId) -> Room:
        """Join a public room, or a private one the caller is invited to (the
        invitation is consumed). Already a member: the room, nothing stored."""
        st = await self._loaded.live(room)
        user = caller.user
        async with st.lock:
            still_live(st)
            if user in st.roles:
                return st.info
            if not st.info.public and not await self._store.is_invited(room, user):
                raise Forbidden(f"{room} is private: joining needs an invitation")
            if len(st.roles) >= self._max:
                raise self._full()
            order = await self._store.add_member(room, user, self._clock(), self._max)
            if order is None:  # the database disagrees with memory: refuse, change nothing
                raise self._full()
            roles: dict[str, RoomRole] = {**st.roles, user: "member"}
            members = Members.of(roles, st.members.version + 1)
            try:
                names = await self._names([user])
                await self._post(
                    room,
                    f"{names.get(user, user)} joined",
                    _meta("joined", user, user),
                    members=members,
                )
            finally:
                replace(st, roles, members)
            return st.info

    async def leave(self, caller: Caller, room: RoomId) -> None:
        """Leave a room (``forbidden`` for non-members).

        An owner's leaving hands the ownership to the longest-standing admin, else to
        the longest-standing member; the last member's leaving empties the room.
        """
        st = await self._loaded.live(room)
        user = caller.user
        async with st.lock:
            still_live(st)
            role = st.roles.get(user)
            if role is None:
                raise Forbidden(f"not a member of {room}")
            roles = {u: r for u, r in st.roles.items() if u != user}
            heir: str | None = None
            if role == "owner" and roles:
                heir = next((u for u, r in roles.items() if r == "admin"), next(iter(roles)))
                roles[heir] = "owner"
            await self._store.remove_member(room, user, self._clock(), heir)
            members = Members.of(roles, st.members.version + 1)
            try:
                names = await self._names([user] if heir is None else [user, heir])
                who = names.get(user, user)
                posts = [
                    RoomPost(
                        body=f"{who} left",
                        meta=_meta("left", user, user),
                        notify=(UserId(user),),
                        members=members,
                    )
                ]
                if heir is not None:
                    posts.append(
                        RoomPost(
                            body=f"{names.get(heir, heir)} is now the owner",
                            meta={**_meta("role", user, heir), "role": "owner"},
                        )
                    )
                # One call, queued in this order: the hand-over follows the leave
                # (two calls at once may reach the message service in either order).
                await self._post_many(room, posts)
            finally:
                replace(st, roles, members, **({"owner": heir} if heir is not None else {}))

    async def invite(self, caller: Caller, room: RoomId, user: UserId) -> None:
        """Invite ``user`` (owner and admins). ``conflict`` if already a member; an
        invitation already pending is not renewed (no error, nothing stored)."""
        st = await self._loaded.live(room)
        async with st.lock:
            still_live(st)
            if st.roles.get(caller.user) not in MANAGERS:
                raise Forbidden("only the owner or an admin may invite")
            names = await self._names([caller.user, user])
            self._require_user(user, names)
            if user in st.roles:
                raise Conflict(f"{user} is already a member of {room}", field="user")
            if not await self._store.invite(room, user, caller.user, self._clock()):
                return
            await self._post(
                room,
                f"{names.get(caller.user, caller.user)} invited {names[user]}",
                _meta("invited", caller.user, user),
                notify=(user,),
            )

    async def kick(self, caller: Caller, room: RoomId, user: UserId) -> None:
        """Remove a member of lower role (owner and admins); the kicked user gets the
        ``kicked`` message and nothing of the room after it."""
        st = await self._loaded.live(room)
        async with st.lock:
            still_live(st)
            role = st.roles.get(caller.user)
            if role not in MANAGERS:
                raise Forbidden("only the owner or an admin may kick")
            if user == caller.user:
                raise Forbidden("you cannot kick yourself: use room.leave")
            names = await self._names([caller.user, user])
            target = await self._member_role(st, user, names)
            if RANK[target] >= RANK[role]:
                raise Forbidden(f"the {role} cannot kick the {target} {names[user]}")
            await self._store.remove_member(room, user, self._clock(), None, by=caller.user)
            roles = {u: r for u, r in st.roles.items() if u != user}
            members = Members.of(roles, st.members.version + 1)
            try:
                await self._post(
                    room,
                    f"{names.get(caller.user, caller.user)} removed {names[user]}",
                    _meta("kicked", caller.user, user),
                    notify=(user,),
                    members=members,
                )
            finally:
                replace(st, roles, members)

    async def set_role(self, caller: Caller, room: RoomId, user: UserId, role: str) -> None:
        """Make a member an ``admin`` or a ``member`` again: the owner only, never on the
        owner. Setting the role a member already has stores nothing."""
        if role not in ("admin", "member"):
            raise BadRequest("role must be admin or member", field="role")
        new_role: RoomRole = "admin" if role == "admin" else "member"
        st = await self._loaded.live(room)
        async with st.lock:
            still_live(st)
            if st.roles.get(caller.user) != "owner":
                raise Forbidden("only the owner may set roles")
            if user == caller.user:
                raise Forbidden("the owner's role cannot be changed")
            names = await self._names([caller.user, user])
            current = await self._member_role(st, user, names)
            if current == new_role:
                return
            await self._store.set_role(room, user, new_role, by=caller.user, now=self._clock())
            replace(st, {**st.roles, user: new_role})
            await self._post(
                room,
                f"{names.get(caller.user, caller.user)} made {names[user]} {new_role}",
                {**_meta("role", caller.user, user), "role": new_role},
            )

    async def _member_role(self, st: LoadedRoom, user: str, names: dict[str, str]) -> RoomRole:
        """The role of ``user``; ``not_found`` (field ``user``) for unknown users and
        non-members."""
        self._require_user(user, names)
        role = st.roles.get(user)
        if role is None:
            raise NotFound(f"{user} is not a member of {st.info.id}", field="user")
        return role

    async def members(self, caller: Caller, req: ops.RoomMembers) -> ops.RoomMembersData:
        """A page of members in join order, each with ``online``: to members, and to
        anyone if the room is public."""
        st = await self._loaded.live(req.room)
        if not st.info.public and caller.user not in st.roles:
            raise Forbidden(f"not a member of {req.room}")
        after = decode_member_cursor(req.after) if req.after is not None else 0
        page: Sequence[MemberRecord] = await self._store.members_page(
            req.room, after, req.limit + 1
        )
        more = len(page) > req.limit
        page = page[: req.limit]
        online = await self._online([m.user for m in page])
        return ops.RoomMembersData(
            members=[RoomMember(user=m.user, role=m.role, online=m.user in online) for m in page],
            next=encode_member_cursor(page[-1].join_order) if more else None,
        )

    # --- the message service's RoomDirectory ------------------------------------------

    async def room_members(self, room: RoomId) -> Members:
        """Current members, from memory (``not_found``, field ``conv``, for unknown
        rooms; an empty room has no members)."""
        st = self._loaded.get(room)
        if st is None:
            st = await self._loaded.state(room)
            if st is None:
                raise NotFound(f"no room {room}", field="conv")
        return st.members

    async def room_role(self, room: RoomId, user: UserId) -> str | None:
        """``owner``/``admin``/``member``, or None (not a member, or no such room)."""
        st = self._loaded.get(room) or await self._loaded.state(room)
        return None if st is None else st.roles.get(user)

    async def room_title(self, room: RoomId) -> str:
        """The room's name (``not_found`` for unknown rooms)."""
        st = self._loaded.get(room) or await self._loaded.state(room)
        if st is None:
            raise NotFound(f"no room {room}", field="conv")
        return st.info.name

    async def rooms_of(self, user: UserId) -> Sequence[RoomId]:
        """Rooms the user is a member of (from the database)."""
        return await self._store.rooms_of(user)

    async def invitations_of(self, user: UserId) -> Sequence[RoomId]:
        """Rooms the user is invited to and has not joined (from the database)."""
        return await self._store.invitations_of(user)

    async def listed_rooms(self, users: Sequence[UserId]) -> dict[str, list[RoomId]]:
        """user -> rooms joined or invited to (from the database, one read)."""
        return await self._store.listed_rooms(list(users))

    @property
    def outbox(self) -> Outbox | None:
        """Where ``room.member_changed`` events wait for the relay (None: the event
        stream is off)."""
        return self._store.outbox

    async def check(self) -> None:
        """Raise ``unavailable`` if the room database cannot be reached."""
        try:
            await self._store.check()
        except Exception as exc:
            raise Unavailable("room database unreachable") from exc

    async def close(self) -> None:
        """Dispose the database engine."""
        await self._store.close()

    # Last, so that ``list`` in the annotations above is the built-in.
    async def list(self, caller: Caller, req: ops.RoomList) -> ops.RoomListData:
        """The public directory: non-empty public rooms, oldest first, whose name
        contains ``query`` (case-insensitive, ``%`` and ``_`` literal)."""
        after = decode_directory_cursor(req.after) if req.after is not None else None
        found = await self._store.list_public(req.query, after, req.limit + 1)
        more = len(found) > req.limit
        found = found[: req.limit]
        nxt = encode_directory_cursor(found[-1].created, found[-1].id) if more else None
        return ops.RoomListData(rooms=[room_info(r) for r in found], next=nxt)


def _meta(event: str, actor: str, user: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"event": event, "actor": actor}
    if user is not None:
        meta["user"] = user
    return meta


def _describe(key: str, value: Any) -> str:
    if key == "name":
        return f"renamed the room to {value}"
    if key == "topic":
        return "cleared the topic" if value is None else f"set the topic to {value}"
    return "made the room public" if value else "made the room private"


async def open_room_service(
    url: str,
    *,
    users: UserDirectory,
    messages: Peer[MessageService],
    max_room_size: int | Live[int] = DEFAULT_MAX_ROOM_SIZE,
    read_url: str | None = None,
    events: bool = False,
) -> LocalRoomService:
    """Migrate the database at ``url`` to the latest schema and start the service on it.

    ``messages`` is asked for the message service on each use: that service is built
    after this one, with this one as its room directory. ``read_url``: a replica the
    public directory (``room.list``) is read from. ``events``: write a
    ``room.member_changed`` event per membership change into the outbox, in the
    change's transaction (the store's ``outbox``; a relay publishes it).
    """
    await upgrade(url, MIGRATIONS)
    replica = make_engine(read_url) if read_url is not None else None
    store = SqlRoomStore.on_engine(make_engine(url), replica)
    if events:
        store.with_outbox()
    return LocalRoomService(
        store,
        users=users,
        messages=messages,
        max_room_size=max_room_size,
    )
