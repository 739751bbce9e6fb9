"""The in-process message service: the front of the message service.

It validates each op, queues writes for the group-commit writer
(:mod:`imserver.services.message.writer`, which states the invariants of the write
path: one writer, ack after commit, gap-free seqs, permanent idempotency, publish
order, room membership changes at a seq) and answers reads.

Reads (``history``, ``convs``, ``search``) go straight to the store; they see
exactly what has been committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from imserver.protocol import ops
from imserver.protocol.codec import encode_json
from imserver.protocol.convs import ConvRef, parse_conv, room_conv, system_conv
from imserver.protocol.cursors import decode_search_cursor, encode_search_cursor
from imserver.protocol.events import TypingEvent
from imserver.protocol.models import ConvKind, ConvSummary, ReceiptKind
from imserver.services.caller import Caller
from imserver.services.message import schema
from imserver.services.message.api import (
    CommitListener,
    CommittedMessage,
    FileDirectory,
    Members,
    RoomDirectory,
    RoomPost,
    UserDirectory,
)
from imserver.services.message.lru import LRU
from imserver.services.message.membership import Membership, ask
from imserver.services.message.ports import MessageStore
from imserver.services.message.queued import (
    EditWrite,
    MarkWrite,
    ReactWrite,
    RecallWrite,
    SendWrite,
    SystemWrite,
)
from imserver.services.message.store import SqlMessageStore
from imserver.services.message.writer import MessageWriter, publish_conv
from imserver.storage import sql
from imserver.storage.bus import LiveBus, Publication
from imserver.storage.outbox import Outbox
from imserver.utils.errors import BadRequest, Forbidden, IMError, NotFound, TooLarge, Unavailable
from imserver.utils.ids import ConvId, RoomId, UserId, random_id

MIGRATIONS = "imserver.services.message.migrations"
SYSTEM_SENDER: Final = "system"
"""The ``from`` of ``system`` messages (notices and room events)."""

_CONV_CACHE = 100_000
"""Parsed conversation ids kept."""


def _check_query(query: str) -> None:
    """Refuse a search query that is not Unicode text (it holds a lone surrogate).
    Neither decoder produces one, but a caller inside the process can, and the
    database cannot take it."""
    if not query.isascii():
        try:
            query.encode()
        except UnicodeEncodeError:
            raise BadRequest("query is not valid Unicode text", field="query") from None


class LocalMessageService:
    """:class:`~imserver.services.message.api.MessageService` in process, on SQL.

    Build it with :func:`open_message_service`.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        bus: LiveBus,
        users: UserDirectory,
        rooms: RoomDirectory | None = None,
        files: FileDirectory | None = None,
        listener: CommitListener | None = None,
        outbox: Outbox | None = None,
        max_body: int = 16384,
        max_meta: int = 8192,
        batch_max: int = 512,
        peer_cache: bool = True,
    ) -> None:
        """``peer_cache``: keep the direct peers of users in memory, in step with this
        instance's commits; only right when no other instance writes the database
        (several message instances: :meth:`direct_peers` reads the store)."""
        self._store = store
        self._peer_cache = peer_cache
        self._bus = bus
        self._users = users
        self._rooms = rooms
        self._max_body = max_body
        self._max_meta = max_meta
        self._refs: LRU[str, ConvRef] = LRU(_CONV_CACHE)
        self._membership = Membership(users, rooms)
        self._writer = MessageWriter(
            store,
            bus=bus,
            users=users,
            membership=self._membership,
            files=files,
            listener=listener,
            outbox=outbox,
            batch_max=batch_max,
        )
        self.outbox = outbox
        """Where the writer's ``message.stored`` events wait for the relay (None: the
        event stream is off)."""

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        self._writer.start()

    # --- writes (queued for the group-commit writer) ----------------------------------

    def _new_future(self) -> asyncio.Future[ops.SendData]:
        return asyncio.get_running_loop().create_future()

    def _parse(self, conv: str) -> ConvRef:
        ref = self._refs.get(conv)
        if ref is None:
            ref = parse_conv(conv)
            self._refs.put(conv, ref)
        return ref

    def _writable(self, conv: str) -> ConvRef:
        ref = self._parse(conv)
        if ref.kind == "system":
            raise Forbidden("system conversation is read-only")
        return ref

    def _check_body(self, body: str) -> None:
        if len(body) > self._max_body:
            raise TooLarge(f"body longer than {self._max_body} characters", field="body")

    def _accept(
        self,
        fut: asyncio.Future[ops.SendData],
        conv_id: ConvId,
        body: str | None,
        check: Callable[[], None] | None = None,
    ) -> ConvRef | None:
        """The checks of a client write that need no other service: the conversation
        must be writable, ``body`` (when the op has one) within bounds, and ``check``
        (an op's own rule) must pass. On a refusal ``fut`` fails and None is returned."""
        try:
            conv = self._writable(conv_id)
            if body is not None:
                self._check_body(body)
            if check is not None:
                check()
        except IMError as exc:
            fut.set_exception(exc)
            return None
        return conv

    def _send_check(self, req: ops.Send) -> Callable[[], None] | None:
        """``meta`` within ``max_meta`` bytes; image and file messages must name their
        file in ``meta.file``."""
        if req.meta is None and req.type not in ("image", "file"):
            return None

        def check() -> None:
            if req.meta is not None and len(encode_json(req.meta)) > self._max_meta:
                raise TooLarge(f"meta larger than {self._max_meta} bytes", field="meta")
            if req.type not in ("image", "file"):
                return
            file_id = (req.meta or {}).get("file")
            if not isinstance(file_id, str) or not file_id:
                raise BadRequest(f"{req.type} messages need meta.file", field="meta")

        return check

    def send(self, caller: Caller, req: ops.Send) -> asyncio.Future[ops.SendData]:
        """Store a message; resolves after commit. Idempotent on (conv, sender, cid)."""
        fut = self._new_future()
        conv = self._accept(fut, req.conv, req.body, self._send_check(req))
        if conv is not None:
            mentions = list(dict.fromkeys(req.mentions)) if req.mentions is not None else None
            self._writer.enqueue(
                SendWrite(
                    conv=conv,
                    user=caller.user,
                    future=fut,
                    session=caller.session,
                    cid=req.cid,
                    type=req.type,
                    body=req.body,
                    meta=req.meta,
                    reply_to=req.reply_to,
                    mentions=mentions,
                )
            )
        return fut

    def edit(self, caller: Caller, req: ops.Edit) -> asyncio.Future[ops.SendData]:
        """Store an ``edit`` of the caller's own message ``target``."""
        fut = self._new_future()
        conv = self._accept(fut, req.conv, req.body)
        if conv is not None:
            self._writer.enqueue(
                EditWrite(
                    conv=conv,
                    user=caller.user,
                    future=fut,
                    session=caller.session,
                    cid=req.cid,
                    target=req.target,
                    body=req.body,
                )
            )
        return fut

    def recall(self, caller: Caller, req: ops.Recall) -> asyncio.Future[ops.SendData]:
        """Store a ``recall`` of ``target`` (its sender, or a room owner/admin)."""
        fut = self._new_future()
        conv = self._accept(fut, req.conv, None)
        if conv is not None:
            self._writer.enqueue(
                RecallWrite(
                    conv=conv,
                    user=caller.user,
                    future=fut,
                    session=caller.session,
                    cid=req.cid,
                    target=req.target,
                )
            )
        return fut

    def react(self, caller: Caller, req: ops.React) -> asyncio.Future[ops.SendData]:
        """Store a ``reaction`` (add or remove one emoji of the caller on ``target``)."""
        fut = self._new_future()
        conv = self._accept(fut, req.conv, None)
        if conv is not None:
            self._writer.enqueue(
                ReactWrite(
                    conv=conv,
                    user=caller.user,
                    future=fut,
                    session=caller.session,
                    cid=req.cid,
                    target=req.target,
                    emoji=req.emoji,
                    remove=req.remove,
                )
            )
        return fut

    async def post_system(
        self, user: UserId, body: str, meta: dict[str, Any] | None = None
    ) -> ops.SendData:
        """Store a notice in ``s:<user>`` (the user's read-only system conversation)."""
        fut = self._new_future()
        self._writer.enqueue(
            SystemWrite(
                conv=parse_conv(system_conv(user)),
                user=SYSTEM_SENDER,
                future=fut,
                cid=random_id("sys-"),
                body=body,
                meta=meta,
            )
        )
        return await fut

    async def post_system_many(
        self, users: Sequence[UserId], body: str, meta: dict[str, Any] | None, cid: str
    ) -> list[ops.SendData]:
        """Store one notice in the ``s:`` conversation of each of ``users``, every
        write queued before the first is awaited, so the group-commit writer takes
        them ``batch_max`` at a time. Idempotent on ``cid`` per conversation."""
        futures = []
        for user in users:
            fut = self._new_future()
            self._writer.enqueue(
                SystemWrite(
                    conv=parse_conv(system_conv(user)),
                    user=SYSTEM_SENDER,
                    future=fut,
                    cid=cid,
                    body=body,
                    meta=meta,
                )
            )
            futures.append(fut)
        # Every future is awaited, so none of the failures of a refused batch is left
        # unretrieved; the first one answers the call.
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if not isinstance(r, BaseException)]

    async def post_room_system(
        self,
        room: RoomId,
        body: str,
        meta: dict[str, Any] | None = None,
        *,
        notify: Iterable[UserId] = (),
        cid: str | None = None,
        members: Members | None = None,
    ) -> ops.SendData:
        """Store a ``system`` message (a membership change, a room update) in ``r:<room>``.

        Delivered to the room's members plus ``notify`` (e.g. the user just kicked,
        who is no longer a member). ``cid`` makes the post idempotent (the sender is
        ``system``); a random one is used when absent.

        ``members``: the room's members from this message on, for a membership change.
        Everything of the room with a lower seq goes to the members before it, this
        message and everything after to ``members``, whenever the room directory
        starts answering the new list (the room service installs a list of this
        ``version`` once the post has resolved).
        """
        return await self._queue_room_system(
            room, RoomPost(body=body, meta=meta, notify=tuple(notify), cid=cid, members=members)
        )

    async def post_room_systems(
        self, room: RoomId, posts: Sequence[RoomPost]
    ) -> list[ops.SendData]:
        """Store several system messages of ``r:<room>`` in this order (see the API)."""
        futures = [self._queue_room_system(room, post) for post in posts]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if not isinstance(r, BaseException)]

    def _queue_room_system(self, room: RoomId, post: RoomPost) -> asyncio.Future[ops.SendData]:
        """Queue one system message of ``r:<room>`` now (the order of calls is the
        order of the queue); the future resolves after its commit."""
        fut = self._new_future()
        self._writer.enqueue(
            SystemWrite(
                conv=parse_conv(room_conv(room)),
                user=SYSTEM_SENDER,
                future=fut,
                cid=post.cid or random_id("sys-"),
                body=post.body,
                meta=post.meta,
                notify=post.notify,
                members=post.members,
            )
        )
        return fut

    async def mark(self, caller: Caller, conv: ConvId, seq: int, kind: ReceiptKind) -> None:
        """Move the caller's read or recv watermark forward and publish a ``receipt``.

        ``seq`` is clamped to the conversation's last seq; a lower one is a no-op.
        ``read`` also raises ``recv`` to at least the same seq.
        """
        ref = self._parse(conv)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writer.enqueue(
            MarkWrite(
                conv=ref,
                user=caller.user,
                future=fut,
                session=caller.session,
                seq=seq,
                receipt=kind,
                login=caller.login,
            )
        )
        await fut

    async def flush(self) -> None:
        """Wait until every write queued before this call is committed (or refused)
        and published. Writes queued meanwhile do not delay it."""
        await self._writer.flush()

    async def write_barrier(self) -> None:
        """:meth:`flush`, as the API's barrier (see ``MessageService.write_barrier``)."""
        await self._writer.flush()

    # --- membership -------------------------------------------------------------------

    async def _member_access(self, caller: Caller, conv: ConvId) -> tuple[ConvRef, Members]:
        """Parse ``conv``, resolve its members and require the caller to be one."""
        ref = self._parse(conv)
        members = await self._membership.members(ref)
        if caller.user not in members.set:
            raise Forbidden(f"not a member of {ref.id}")
        return ref, members

    # --- reads ------------------------------------------------------------------------

    async def history(self, caller: Caller, req: ops.History) -> ops.HistoryData:
        """A page of messages, ascending by seq, annotated with edits/recalls/reactions.

        ``after``: the next ``limit`` messages after that seq; ``before``: the
        ``limit`` messages before it; neither: the latest. ``has_more`` tells whether
        more exist beyond the page in the direction of travel.
        """
        if req.after is not None and req.before is not None:
            raise BadRequest("give after or before, not both", field="before")
        ref, _ = await self._member_access(caller, req.conv)
        page, has_more = await self._store.history(
            ref.id, after=req.after, before=req.before, limit=req.limit
        )
        return ops.HistoryData(messages=page, has_more=has_more)

    async def convs(self, caller: Caller) -> list[ConvSummary]:
        """The caller's conversations, latest activity first."""
        user = caller.user
        peers = await self._store.direct_convs(user)
        system = system_conv(user)
        rooms: list[RoomId] = []
        if self._rooms is not None:
            rooms.extend(await ask(self._rooms.rooms_of(user)))
            joined = set(rooms)
            rooms.extend(r for r in await ask(self._rooms.invitations_of(user)) if r not in joined)
        kinds: dict[ConvId, ConvKind] = {conv: "direct" for conv in peers.values()}
        kinds[system] = "system"
        for room in rooms:
            kinds[room_conv(room)] = "room"
        states = await self._store.conv_states(user, list(kinds))
        if states[system].last_seq == 0:
            del states[system]
        titles: dict[ConvId, str] = {}
        if peers:
            found = await ask(self._users.get_users(list(peers)))
            for peer, conv in peers.items():
                u = found.get(peer)
                titles[conv] = u.display_name if u is not None else peer
        for room in rooms:
            assert self._rooms is not None
            try:
                titles[room_conv(room)] = await ask(self._rooms.room_title(room))
            except NotFound:
                titles[room_conv(room)] = room
        out: list[tuple[tuple[int, int], ConvSummary]] = []
        for conv, st in states.items():
            summary = ConvSummary(
                conv=conv,
                kind=kinds[conv],
                title="System" if kinds[conv] == "system" else titles.get(conv, conv),
                last_seq=st.last_seq,
                read_seq=st.read_seq,
                recv_seq=st.recv_seq,
                unread=st.unread,
                mentions=st.mentions,
                last=st.last.message if st.last is not None else None,
            )
            # Latest activity first; the storage id breaks ties within a millisecond.
            order = (st.last.message.ts, st.last.id) if st.last is not None else (0, 0)
            out.append((order, summary))
        out.sort(key=lambda e: e[0], reverse=True)
        return [s for _, s in out]

    async def typing(self, caller: Caller, conv: ConvId) -> None:
        """Publish a ``typing`` event to the other members' live sessions."""
        if parse_conv(conv).kind == "system":
            raise Forbidden("system conversation is read-only")
        ref, _ = await self._member_access(caller, conv)
        event = TypingEvent(conv=ref.id, user=caller.user)
        await publish_conv(
            self._bus, ref, Publication(event=event, conv=ref.id, exclude_user=caller.user)
        )

    async def search(self, caller: Caller, req: ops.Search) -> ops.SearchData:
        """Full-text search over the caller's conversations, newest first.

        ``next`` is an opaque cursor for ``before``; null on the last page. Any query
        is searched as plain text (docs/protocol.md §4.10).
        """
        _check_query(req.query)
        before = decode_search_cursor(req.before) if req.before is not None else None
        if req.conv is not None:
            ref, _ = await self._member_access(caller, req.conv)
            convs: list[ConvId] = [ref.id]
        else:
            convs = list((await self._store.direct_convs(caller.user)).values())
            convs.append(system_conv(caller.user))
            if self._rooms is not None:
                convs.extend(room_conv(r) for r in await ask(self._rooms.rooms_of(caller.user)))
        found = await self._store.search(req.query, convs, before, req.limit + 1)
        page = found[: req.limit]
        nxt = encode_search_cursor(page[-1].id) if len(found) > req.limit else None
        return ops.SearchData(messages=[s.message for s in page], next=nxt)

    async def check_member(self, user: UserId, conv: ConvId) -> None:
        """Raise unless ``user`` is a member of ``conv`` now (``bad_request`` for a
        malformed id, ``not_found`` for unknown users or rooms, ``forbidden``)."""
        ref = self._parse(conv)
        members = await self._membership.members(ref)
        if user not in members.set:
            raise Forbidden(f"not a member of {ref.id}")

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` that a stored message names in ``meta.file``."""
        return await self._store.referenced_files(file_ids)

    async def direct_peers(self, user: UserId) -> list[UserId]:
        """Users who share a direct conversation (with messages) with ``user``."""
        peers = self._writer.peers.get(user) if self._peer_cache else None
        if peers is None:
            changes = self._writer.peer_changes
            peers = tuple(await self._store.direct_convs(user))
            if self._peer_cache and changes == self._writer.peer_changes:
                self._writer.peers.put(user, peers)
        return list(peers)

    async def unread_totals(self, users: Sequence[UserId]) -> dict[str, int]:
        """user -> unread messages over the conversations ``convs`` lists for the user
        (system, direct, rooms joined and invited to): one store read for all."""
        listed = await ask(self._rooms.listed_rooms(users)) if self._rooms is not None else {}
        wanted: dict[str, list[ConvId]] = {
            user: [system_conv(user), *(room_conv(r) for r in listed.get(user, ()))]
            for user in dict.fromkeys(users)
        }
        return await self._store.unread_totals(wanted)

    async def conv_members(self, conv: ConvId) -> list[str]:
        """The conversation's members now."""
        return list((await self._membership.members(self._parse(conv))).users)

    async def stored_since(self, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
        """Messages stored at ``ts`` or later with an id above ``after_id``, by id,
        each with its conversation's members now (see ``MessageService``)."""
        found = await self._store.stored_since(ts, after_id, max(1, min(limit, 1000)))
        out: list[CommittedMessage] = []
        members: dict[ConvId, tuple[str, ...]] = {}
        for msg in found:
            users = members.get(msg.conv)
            if users is None:
                try:
                    users = (await self._membership.members(self._parse(msg.conv))).users
                except IMError:
                    users = ()
                members[msg.conv] = users
            out.append(msgspec.structs.replace(msg, members=users))
        return out

    async def check(self) -> None:
        """Raise if the message database cannot be reached (readiness probe)."""
        try:
            await self._store.check()
        except Exception as exc:
            raise Unavailable("message database unreachable") from exc

    async def close(self) -> None:
        """Flush every queued write, stop the writer and release the store."""
        if self._writer.closed:
            return
        await self._writer.close()
        await self._store.close()


async def open_message_service(
    url: str,
    *,
    bus: LiveBus,
    users: UserDirectory,
    rooms: RoomDirectory | None = None,
    files: FileDirectory | None = None,
    listener: CommitListener | None = None,
    max_body: int = 16384,
    max_meta: int = 8192,
    batch_max: int = 512,
    read_url: str | None = None,
    events: bool = False,
    peer_cache: bool = True,
) -> LocalMessageService:
    """Migrate the database at ``url``, open it and start the writer. ``read_url``: a
    replica that ``search`` reads from (history, ``convs`` and every read a write
    depends on stay on ``url``). ``events``: write a ``message.stored`` event per
    stored message into the outbox, in the batch's transaction (the service's
    ``outbox``; a relay publishes it). ``peer_cache``: see :class:`LocalMessageService`."""
    try:
        await sql.upgrade(url, MIGRATIONS)
    except IMError:
        raise
    except Exception as exc:
        raise Unavailable("cannot migrate the message database") from exc
    engine = sql.make_engine(url)
    service = LocalMessageService(
        SqlMessageStore.open(url, engine, replica_url=read_url),
        bus=bus,
        users=users,
        rooms=rooms,
        files=files,
        listener=listener,
        outbox=Outbox(schema.outbox) if events else None,
        max_body=max_body,
        max_meta=max_meta,
        batch_max=batch_max,
        peer_cache=peer_cache,
    )
    service.start()
    return service
