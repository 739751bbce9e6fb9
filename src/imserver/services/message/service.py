"""The in-process message service: group commit, gap-free seqs, history, markers.

Invariants of the write path (``send``, ``edit``, ``recall``, ``react``, markers and
system notices all go through it):

1. **One writer.** Every write is queued; a single writer task takes everything
   queued (up to ``batch_max`` items) and stores the batch in ONE transaction. No
   other code writes the message tables, so the writer's in-memory state (the last
   seq of each conversation, recent idempotency keys) is the database's state.
2. **Ack after commit.** A write's future resolves only after its transaction has
   committed; if the commit fails, every pending write of the batch fails with
   ``unavailable``/``internal`` and nothing of the batch is remembered.
3. **Gap-free seqs.** Seqs are allocated inside the batch from a working copy of the
   per-conversation counters; the copy replaces the counters only after commit, so
   a refused item or a failed commit consumes no seq.
4. **Idempotency is permanent.** (conv, sender, cid) is unique in the database; a
   repeat (also within one batch) stores nothing and answers the original seq/ts
   with ``dup: true``. Recent keys are answered from memory; a key memory does not
   hold is taken to be new, and the unique index has the last word: when the
   commit meets a stored key, the batch is abandoned and applied again with every
   key looked up. The common case, a new message, reads nothing before it writes.
5. **Publish order.** After commit, deliveries are published in batch order, which
   is ascending seq within each conversation, from this one task: every session
   sees a conversation's ``msg`` events in seq order. Duplicates publish nothing.
6. **Room membership changes at a seq.** A room ``system`` message posted with
   ``members`` switches the room's member list at its position in the batch: writes
   before it are checked against, and fanned out to, the old members; it and
   everything after, the new ones. The list stays pinned here until the room
   directory answers the same object, so later batches, ``typing`` and reads agree.

Reads (``history``, ``convs``, ``search``) go straight to the store; they see
exactly what has been committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar

from imserver.protocol import ops
from imserver.protocol.codec import encode_json
from imserver.protocol.convs import ConvRef, parse_conv, room_conv, system_conv
from imserver.protocol.cursors import decode_search_cursor, encode_search_cursor
from imserver.protocol.events import Event, Msg, Receipt, TypingEvent
from imserver.protocol.models import ConvKind, ConvSummary, Message, ReceiptKind
from imserver.services.caller import Caller
from imserver.services.message.api import (
    FileDirectory,
    FileRef,
    Members,
    RoomDirectory,
    UserDirectory,
)
from imserver.services.message.ports import MessageStore, WriteTransaction
from imserver.services.message.schema import IdemKey, MessageKey, message_row
from imserver.services.message.store import SqlMessageStore
from imserver.services.message.writes import KeyConflict, Loaded, Target, WriteBatch
from imserver.storage import sql
from imserver.storage.bus import Delivery, LiveBus
from imserver.utils.clock import now_ms
from imserver.utils.errors import (
    BadRequest,
    Forbidden,
    IMError,
    Internal,
    NotFound,
    TooLarge,
    Unavailable,
)
from imserver.utils.ids import ConvId, RoomId, UserId, random_id

logger = logging.getLogger(__name__)

MIGRATIONS = "imserver.services.message.migrations"
SYSTEM_SENDER: Final = "system"
"""The ``from`` of ``system`` messages (notices and room events)."""

CONTENT_TYPES: Final = frozenset({"text", "image", "file", "custom"})
"""Types a client sends; the only valid targets of edit, recall and react."""
_FILE_TYPES: Final = frozenset({"image", "file"})
"""Types whose ``meta.file`` names an uploaded file of the same conversation."""

_KEY_CACHE = 100_000
_SEQ_CACHE = 100_000
_USER_CACHE = 100_000

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _check_query(query: str) -> None:
    """Refuse a search query that is not Unicode text (it holds a lone surrogate).
    Neither decoder produces one, but a caller inside the process can, and the
    database cannot take it."""
    if not query.isascii():
        try:
            query.encode()
        except UnicodeEncodeError:
            raise BadRequest("query is not valid Unicode text", field="query") from None


# --- queued writes ------------------------------------------------------------------

WriteKind = Literal["send", "edit", "recall", "react", "system", "mark"]


@dataclass(slots=True, eq=False)
class _Write:
    """One queued write; ``future`` resolves after the batch's commit."""

    kind: WriteKind
    conv: ConvRef
    user: str
    future: asyncio.Future[Any]
    session: str | None = None
    cid: str = ""
    type: str = ""
    body: str = ""
    meta: dict[str, Any] | None = None
    reply_to: int | None = None
    mentions: list[str] | None = None
    target: int = 0
    emoji: str = ""
    remove: bool = False
    seq: int = 0
    receipt: ReceiptKind = "read"
    notify: tuple[str, ...] = ()
    members: Members | None = None


_Out = tuple[int, Event, Members, Message | None]
"""An event a batch publishes after commit: (item index, event, recipients, stored
message), in batch order."""


@dataclass(slots=True)
class _BatchState:
    """The writer's working state during one batch (discarded if the commit fails)."""

    last: dict[str, int]
    targets: dict[MessageKey, Target]
    markers: dict[tuple[str, str], tuple[int, int, bool]]
    known: dict[IdemKey, tuple[int, int]]
    ts: int
    write: WriteBatch = field(default_factory=WriteBatch)
    new_keys: dict[IdemKey, tuple[int, int]] = field(default_factory=dict)


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
        max_body: int = 16384,
        max_meta: int = 8192,
        batch_max: int = 512,
    ) -> None:
        self._store = store
        self._bus = bus
        self._users = users
        self._rooms = rooms
        self._files = files
        self._max_body = max_body
        self._max_meta = max_meta
        self._batch_max = batch_max
        self._queue: deque[_Write] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._seqs: LRU[str, int] = LRU(_SEQ_CACHE)
        self._keys: LRU[IdemKey, tuple[int, int]] = LRU(_KEY_CACHE)
        self._known_users: LRU[str, bool] = LRU(_USER_CACHE)
        self._refs: LRU[str, ConvRef] = LRU(_SEQ_CACHE)
        self._peers: LRU[str, tuple[UserId, ...]] = LRU(_USER_CACHE)
        """user -> direct-conversation peers (presence recipients), kept in step by the
        writer when a direct conversation stores its first message."""
        self._peer_changes = 0
        """Commits that added direct peers: a load that raced one is not cached."""
        self._pinned: dict[str, Members] = {}
        """Room members set by a committed system message (``post_room_system(members=)``)
        that the room directory may not answer yet; dropped once it does."""
        self._writer: asyncio.Task[None] | None = None
        self._enqueued = 0
        self._processed = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="message-writer"
            )

    # --- writes (group commit) --------------------------------------------------------

    def _enqueue(self, item: _Write) -> None:
        if self._closed:
            item.future.set_exception(Unavailable("message service is closed"))
            return
        self._queue.append(item)
        self._enqueued += 1
        self._wake.set()

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _failed(self, fut: asyncio.Future[Any], exc: IMError) -> asyncio.Future[Any]:
        fut.set_exception(exc)
        return fut

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

    def _submit(
        self,
        kind: WriteKind,
        caller: Caller,
        conv_id: ConvId,
        body: str | None,
        check: Callable[[], None] | None = None,
        **fields: Any,
    ) -> asyncio.Future[Any]:
        """Queue one client write after the checks that need no other service: the
        conversation must be writable, ``body`` (when the op has one) within bounds,
        and ``check`` (an op's own rule) must pass."""
        fut = self._new_future()
        try:
            conv = self._writable(conv_id)
            if body is not None:
                self._check_body(body)
            if check is not None:
                check()
        except IMError as exc:
            return self._failed(fut, exc)
        self._enqueue(
            _Write(kind, conv, caller.user, fut, caller.session, body=body or "", **fields)
        )
        return fut

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
        mentions = list(dict.fromkeys(req.mentions)) if req.mentions is not None else None
        return self._submit(
            "send",
            caller,
            req.conv,
            req.body,
            self._send_check(req),
            cid=req.cid,
            type=req.type,
            meta=req.meta,
            reply_to=req.reply_to,
            mentions=mentions,
        )

    def edit(self, caller: Caller, req: ops.Edit) -> asyncio.Future[ops.SendData]:
        """Store an ``edit`` of the caller's own message ``target``."""
        return self._submit("edit", caller, req.conv, req.body, cid=req.cid, target=req.target)

    def recall(self, caller: Caller, req: ops.Recall) -> asyncio.Future[ops.SendData]:
        """Store a ``recall`` of ``target`` (its sender, or a room owner/admin)."""
        return self._submit("recall", caller, req.conv, None, cid=req.cid, target=req.target)

    def react(self, caller: Caller, req: ops.React) -> asyncio.Future[ops.SendData]:
        """Store a ``reaction`` (add or remove one emoji of the caller on ``target``)."""
        return self._submit(
            "react",
            caller,
            req.conv,
            None,
            cid=req.cid,
            target=req.target,
            emoji=req.emoji,
            remove=req.remove,
        )

    async def post_system(
        self, user: UserId, body: str, meta: dict[str, Any] | None = None
    ) -> ops.SendData:
        """Store a notice in ``s:<user>`` (the user's read-only system conversation)."""
        conv = parse_conv(system_conv(user))
        fut: asyncio.Future[ops.SendData] = self._new_future()
        self._enqueue(
            _Write(
                "system",
                conv,
                SYSTEM_SENDER,
                fut,
                cid=random_id("sys-"),
                type="system",
                body=body,
                meta=meta,
            )
        )
        return await fut

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
        starts answering the new list (the room service installs this same object
        once the post has resolved).
        """
        conv = parse_conv(room_conv(room))
        fut: asyncio.Future[ops.SendData] = self._new_future()
        self._enqueue(
            _Write(
                "system",
                conv,
                SYSTEM_SENDER,
                fut,
                cid=cid or random_id("sys-"),
                type="system",
                body=body,
                meta=meta,
                notify=tuple(notify),
                members=members,
            )
        )
        return await fut

    async def mark(self, caller: Caller, conv: ConvId, seq: int, kind: ReceiptKind) -> None:
        """Move the caller's read or recv watermark forward and publish a ``receipt``.

        ``seq`` is clamped to the conversation's last seq; a lower one is a no-op.
        ``read`` also raises ``recv`` to at least the same seq.
        """
        ref = self._parse(conv)
        fut: asyncio.Future[None] = self._new_future()
        self._enqueue(_Write("mark", ref, caller.user, fut, caller.session, seq=seq, receipt=kind))
        await fut

    # --- the writer -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            # One more loop iteration before taking the batch: the frames that have
            # already arrived on other connections join it, so a moderately loaded
            # server commits fewer, larger batches (each commit has a fixed cost).
            await asyncio.sleep(0)
            self._wake.clear()
            while self._queue:
                n = min(len(self._queue), self._batch_max)
                batch = [self._queue.popleft() for _ in range(n)]
                try:
                    await self._run_batch(batch)
                except Exception:  # a bug: never leave a caller waiting forever
                    logger.exception("message writer failed on a batch of %d", len(batch))
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(Internal("message writer failed"))
                self._processed += n
                if self._flush_waiters:
                    self._wake_flushers()
            if self._closed and not self._queue:
                return

    def _wake_flushers(self) -> None:
        waiting = []
        for target, fut in self._flush_waiters:
            if target <= self._processed:
                if not fut.done():
                    fut.set_result(None)
            else:
                waiting.append((target, fut))
        self._flush_waiters = waiting

    async def flush(self) -> None:
        """Wait until every write queued before this call is committed (or refused)
        and published. Writes queued meanwhile do not delay it."""
        target = self._enqueued
        if self._processed >= target:
            return
        fut: asyncio.Future[None] = self._new_future()
        self._flush_waiters.append((target, fut))
        await fut

    async def _run_batch(self, batch: list[_Write]) -> None:
        n = len(batch)
        results: list[Any] = [None] * n  # IMError | SendData | True (mark done)
        pre: list[IMError | None] = [None] * n
        members: dict[str, Members | IMError] = {}
        roles: dict[tuple[str, str], str | None] = {}
        blocked: dict[tuple[str, str], bool] = {}

        # Stage A: checks against the other services, before the transaction opens.
        for i, item in enumerate(batch):
            conv = item.conv
            got = members.get(conv.id)
            if got is None:
                try:
                    got = await self._members(conv)
                except IMError as exc:
                    got = exc
                members[conv.id] = got
            if isinstance(got, IMError):
                results[i] = got
                continue
            if item.kind == "system":
                continue
            # Room membership can change within the batch (a system message carrying
            # the new members): rooms are checked in seq order, when applied.
            if conv.kind != "room" and item.user not in got.set:
                pre[i] = Forbidden(f"not a member of {conv.id}")
                continue
            try:
                if conv.kind == "direct" and item.kind in ("send", "edit", "react"):
                    recipient = conv.b if item.user == conv.a else conv.a
                    pair = (recipient, item.user)
                    if pair not in blocked:
                        blocked[pair] = await self._ask(
                            self._users.is_blocked(UserId(recipient), UserId(item.user))
                        )
                    if blocked[pair]:
                        pre[i] = Forbidden("blocked")
                elif conv.kind == "room" and item.kind == "recall":
                    rkey = (conv.a, item.user)
                    if rkey not in roles:
                        roles[rkey] = await self._room_role(RoomId(conv.a), item.user)
            except IMError as exc:
                pre[i] = exc

        await self._check_files(batch, results, pre)

        if all(r is not None for r in results):
            self._resolve(batch, results)
            return
        decided = results.copy()
        try:
            try:
                done = await self._transact(batch, results, members, pre, roles, check_all=False)
            except KeyConflict:
                # A resend of a message stored before the key cache knew it: apply the
                # batch again, this time looking every key up.
                results[:] = decided
                done = await self._transact(batch, results, members, pre, roles, check_all=True)
        except KeyConflict:
            logger.exception("message batch conflicts with stored keys")
            self._fail_pending(batch, results, Internal("message store error"))
            return
        except IMError as exc:
            self._fail_pending(batch, results, exc)
            return
        except Exception:
            logger.exception("message batch failed")
            self._fail_pending(batch, results, Internal("message store error"))
            return
        state, outbox, pinned = done
        # Committed: the working state becomes the truth.
        self._pinned.update(pinned)
        if state.write.peers:
            self._peer_changes += 1
        for row in state.write.peers:
            known = self._peers.get(row["user_id"])
            if known is not None and row["peer_id"] not in known:
                self._peers.put(row["user_id"], (*known, UserId(row["peer_id"])))
        for conv_id, last in state.last.items():
            self._seqs.put(conv_id, last)
        for key, value in state.new_keys.items():
            self._keys.put(key, value)
        for key, value in state.known.items():
            self._keys.put(key, value)
        for i, event, m, stored in outbox:
            item = batch[i]
            users: Sequence[str] = m.users
            if item.notify:
                users = m.users + tuple(u for u in item.notify if u not in m.set)
            self._publish(Delivery(users=users, event=event, exclude_session=item.session))
            if stored is not None:
                results[i] = ops.SendData(
                    conv=stored.conv, seq=stored.seq, ts=stored.ts, cid=stored.cid, dup=False
                )
        self._resolve(batch, results)

    async def _transact(
        self,
        batch: list[_Write],
        results: list[Any],
        members: dict[str, Members | IMError],
        pre: list[IMError | None],
        roles: dict[tuple[str, str], str | None],
        *,
        check_all: bool,
    ) -> tuple[_BatchState, list[_Out], dict[str, Members]]:
        """Apply the batch in one transaction and commit it; decided answers go to
        ``results``. Returns the committed state, the events to publish and the room
        memberships the batch set.

        ``check_all``: look up every idempotency key the cache does not hold. Without
        it such keys are taken to be new, and a stored one makes the commit raise
        :class:`KeyConflict` (see :meth:`_run_batch`).
        """
        outbox: list[_Out] = []
        pinned: dict[str, Members] = {}  # room -> members set by this batch
        members = dict(members)  # a membership change within the batch replaces an entry
        pre = list(pre)
        async with self._store.begin() as tx:
            state = await self._load_state(tx, batch, results, check_all=check_all)
            for i, item in enumerate(batch):
                if results[i] is not None:
                    continue
                m = members[item.conv.id]
                assert not isinstance(m, IMError)
                if (
                    item.kind != "system"
                    and pre[i] is None
                    and item.conv.kind == "room"
                    and item.user not in m.set
                ):
                    pre[i] = Forbidden(f"not a member of {item.conv.id}")
                if item.kind == "mark":
                    if pre[i] is not None:
                        results[i] = pre[i]
                        continue
                    receipt = self._apply_mark(state, item)
                    results[i] = True
                    if receipt is not None:
                        outbox.append((i, receipt, m, None))
                    continue
                key = (item.conv.id, item.user, item.cid)
                dup = state.known.get(key) or state.new_keys.get(key)
                if dup is not None:
                    results[i] = ops.SendData(
                        conv=item.conv.id, seq=dup[0], ts=dup[1], cid=item.cid, dup=True
                    )
                    continue
                err = pre[i]
                if err is None:
                    try:
                        msg = self._apply(state, item, m, roles)
                    except IMError as exc:
                        err = exc
                    else:
                        state.new_keys[key] = (msg.seq, msg.ts)
                        if item.members is not None:
                            # A membership change takes effect at its own seq.
                            m = members[item.conv.id] = pinned[item.conv.a] = item.members
                        outbox.append((i, Msg.of(msg), m, msg))
                        continue
                results[i] = err
            await tx.commit(state.write)
        return state, outbox, pinned

    @staticmethod
    def _resolve(batch: list[_Write], results: list[Any]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():  # the caller gave up waiting
                continue
            if isinstance(result, IMError):
                item.future.set_exception(result)
            elif result is True:
                item.future.set_result(None)
            else:
                item.future.set_result(result)

    def _fail_pending(self, batch: list[_Write], results: list[Any], exc: IMError) -> None:
        """Answer a batch whose transaction failed: decided refusals and duplicates
        keep their answer, every write that was to be stored gets ``exc``."""
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, IMError):
                item.future.set_exception(result)
            elif isinstance(result, ops.SendData) and result.dup:
                item.future.set_result(result)
            else:
                item.future.set_exception(type(exc)(exc.message))

    async def _load_state(
        self, tx: WriteTransaction, batch: list[_Write], results: list[Any], *, check_all: bool
    ) -> _BatchState:
        """Read what the batch needs in one step: last seqs of conversations not in
        memory, targets, markers and, with ``check_all``, the stored idempotency keys
        not known from memory. Nothing is read when memory holds it all."""
        idem_keys: dict[IdemKey, None] = {}
        known: dict[IdemKey, tuple[int, int]] = {}
        last: dict[str, int] = {}
        unknown_convs: list[str] = []
        target_keys: dict[MessageKey, None] = {}
        marker_keys: dict[tuple[str, str], None] = {}
        for i, item in enumerate(batch):
            if results[i] is not None:
                continue
            conv_id = item.conv.id
            if conv_id not in last:
                cached = self._seqs.get(conv_id)
                if cached is None:
                    last[conv_id] = 0
                    unknown_convs.append(conv_id)
                else:
                    last[conv_id] = cached
            if item.kind == "mark":
                marker_keys[(conv_id, item.user)] = None
                continue
            key = (conv_id, item.user, item.cid)
            hit = self._keys.get(key)
            if hit is not None:
                known[key] = hit
            elif check_all:
                idem_keys[key] = None
            if item.kind in ("edit", "recall", "react"):
                target_keys[(conv_id, item.target)] = None
        if idem_keys or unknown_convs or target_keys or marker_keys:
            loaded = await tx.load(
                list(idem_keys), unknown_convs, list(target_keys), list(marker_keys)
            )
        else:
            loaded = Loaded(existing={}, last={}, targets={}, markers={})
        known.update(loaded.existing)
        last.update(loaded.last)
        return _BatchState(
            last=last,
            targets=loaded.targets,
            markers={k: (v[0], v[1], True) for k, v in loaded.markers.items()},
            known=known,
            ts=now_ms(),
        )

    def _apply(
        self,
        state: _BatchState,
        item: _Write,
        members: Members,
        roles: dict[tuple[str, str], str | None],
    ) -> Message:
        """Check one write against the batch's state and add it to the batch."""
        conv = item.conv
        last = state.last[conv.id]
        kind = item.kind
        meta = item.meta
        body = item.body
        msg_type = item.type
        reply_to: int | None = None
        mentions: list[str] | None = None
        target: int | None = None
        if kind == "send":
            if item.reply_to is not None:
                if item.reply_to > last:
                    raise BadRequest(f"no message {item.reply_to} in {conv.id}", field="reply_to")
                reply_to = item.reply_to
            if item.mentions is not None:
                for user in item.mentions:
                    if user not in members.set:
                        raise BadRequest(f"{user} is not a member of {conv.id}", field="mentions")
                mentions = item.mentions
        elif kind != "system":
            target = item.target
            tkey = (conv.id, target)
            t = state.targets.get(tkey)
            if t is None:
                raise NotFound(f"no message {target} in {conv.id}", field="target")
            if t.type not in CONTENT_TYPES:
                raise BadRequest(f"a {t.type} message cannot be a target", field="target")
            if kind == "edit" and t.sender != item.user:
                raise Forbidden("only the sender may edit a message")
            if kind == "recall" and t.sender != item.user:
                role = roles.get((conv.a, item.user)) if conv.kind == "room" else None
                if role not in ("owner", "admin"):
                    raise Forbidden("only the sender or a room admin may recall a message")
            if t.recalled:
                raise BadRequest(f"message {target} was recalled", field="target")
            if kind == "edit":
                msg_type = "edit"
                meta = {"target": target}
                state.write.edits[tkey] = body
            elif kind == "recall":
                msg_type = "recall"
                body = ""
                meta = {"target": target}
                state.write.recalls.append(tkey)
                state.write.edits.pop(tkey, None)
                state.targets[tkey] = t._replace(recalled=True)
            else:
                msg_type = "reaction"
                body = ""
                meta = {"target": target, "emoji": item.emoji, "remove": item.remove}
        seq = last + 1
        state.last[conv.id] = seq
        msg = Message(
            conv=conv.id,
            seq=seq,
            from_=item.user,
            ts=state.ts,
            type=msg_type,
            body=body,
            cid=item.cid,
            meta=meta,
            reply_to=reply_to,
            mentions=mentions,
        )
        write = state.write
        write.messages.append(message_row(msg, target))
        if kind == "react":
            assert target is not None
            rkey = (conv.id, target, item.emoji, item.user)
            write.reactions[rkey] = None if item.remove else seq
        if msg_type in CONTENT_TYPES:
            state.targets[(conv.id, seq)] = Target(item.user, msg_type, False)
        if msg_type in _FILE_TYPES:
            assert meta is not None
            write.files.append({"file_id": meta["file"], "conv": conv.id, "seq": seq})
        if mentions:
            write.mentions.extend(
                {"conv": conv.id, "user_id": user, "seq": seq} for user in mentions
            )
        if seq == 1 and conv.kind == "direct":
            write.peers.append({"user_id": conv.a, "peer_id": conv.b, "conv": conv.id})
            write.peers.append({"user_id": conv.b, "peer_id": conv.a, "conv": conv.id})
        return msg

    async def _check_files(
        self, batch: list[_Write], results: list[Any], pre: list[IMError | None]
    ) -> None:
        """Resolve the files of the batch's ``image``/``file`` sends (one lookup for the
        batch): each must be a file of the message's own conversation. The stored and
        delivered ``meta`` then carries the file's name, size, mime and thumb URL."""
        wanted: dict[str, None] = {}
        for i, item in enumerate(batch):
            if results[i] is None and pre[i] is None and item.type in _FILE_TYPES:
                assert item.meta is not None  # send() checked meta.file
                wanted[item.meta["file"]] = None
        if not wanted:
            return
        refs: dict[str, FileRef] = {}
        try:
            if self._files is None:
                raise BadRequest("this server stores no files", field="meta")
            refs = await self._ask(self._files.file_refs(list(wanted)))
        except IMError as exc:
            for i, item in enumerate(batch):
                if results[i] is None and pre[i] is None and item.type in _FILE_TYPES:
                    pre[i] = exc
            return
        for i, item in enumerate(batch):
            if results[i] is not None or pre[i] is not None or item.type not in _FILE_TYPES:
                continue
            assert item.meta is not None
            ref = refs.get(item.meta["file"])
            if ref is None or ref.conv != item.conv.id:
                # The same answer for an unknown id and another conversation's file:
                # a send must not reveal which ids exist elsewhere.
                pre[i] = BadRequest(f"no file {item.meta['file']} in {item.conv.id}", field="meta")
                continue
            item.meta = {
                **item.meta,
                "name": ref.name,
                "size": ref.size,
                "mime": ref.mime,
                "thumb_url": ref.thumb_url,
            }

    def _apply_mark(self, state: _BatchState, item: _Write) -> Receipt | None:
        """Move a watermark forward within the batch; the receipt to publish, if it moved."""
        conv_id = item.conv.id
        seq = min(item.seq, state.last[conv_id])
        key = (conv_id, item.user)
        read, recv, exists = state.markers.get(key, (0, 0, False))
        if item.receipt == "read":
            if seq <= read:
                return None
            read = seq
            recv = max(recv, seq)
        else:
            if seq <= recv:
                return None
            recv = seq
        state.markers[key] = (read, recv, exists)
        state.write.markers[key] = (read, recv, exists)
        return Receipt(conv=conv_id, user=item.user, seq=seq, kind=item.receipt)

    def _publish(self, delivery: Delivery) -> None:
        try:
            self._bus.publish(delivery)
        except Exception:  # a subscriber's fault must not undo a committed write
            logger.exception("live bus subscriber failed")

    # --- membership -------------------------------------------------------------------

    async def _ask(self, call: Awaitable[K]) -> K:
        """Await another service, translating foreign failures to ``unavailable``."""
        try:
            return await call
        except IMError:
            raise
        except Exception as exc:
            logger.warning("directory call failed: %r", exc)
            raise Unavailable("a backend service is unavailable") from exc

    async def _room_role(self, room: RoomId, user: str) -> str | None:
        if self._rooms is None:
            raise NotFound(f"no room {room}", field="conv")
        return await self._ask(self._rooms.room_role(room, UserId(user)))

    async def _members(self, conv: ConvRef) -> Members:
        """Every member of ``conv`` (``not_found`` for unknown users or rooms)."""
        if conv.kind == "direct":
            missing = [u for u in (conv.a, conv.b) if self._known_users.get(u) is None]
            if missing:
                found = await self._ask(self._users.get_users([UserId(u) for u in missing]))
                for u in missing:
                    if u not in found:
                        raise NotFound(f"no user {u}", field="conv")
                    self._known_users.put(u, True)
            return Members((conv.a, conv.b), frozenset((conv.a, conv.b)))
        if conv.kind == "system":
            return Members((conv.a,), frozenset((conv.a,)))
        if self._rooms is None:
            raise NotFound(f"no room {conv.a}", field="conv")
        current = await self._ask(self._rooms.room_members(RoomId(conv.a)))
        pinned = self._pinned.get(conv.a)
        if pinned is None:
            return current
        if pinned is current:  # the room service has caught up
            del self._pinned[conv.a]
        return pinned

    async def _member_access(self, caller: Caller, conv: ConvId) -> tuple[ConvRef, Members]:
        """Parse ``conv``, resolve its members and require the caller to be one."""
        ref = self._parse(conv)
        members = await self._members(ref)
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
            rooms.extend(await self._ask(self._rooms.rooms_of(user)))
            joined = set(rooms)
            rooms.extend(
                r for r in await self._ask(self._rooms.invitations_of(user)) if r not in joined
            )
        kinds: dict[str, ConvKind] = {conv: "direct" for conv in peers.values()}
        kinds[system] = "system"
        for room in rooms:
            kinds[room_conv(room)] = "room"
        states = await self._store.conv_states(user, list(kinds))
        if states[system].last_seq == 0:
            del states[system]
        titles: dict[str, str] = {}
        if peers:
            found = await self._ask(self._users.get_users([UserId(p) for p in peers]))
            for peer, conv in peers.items():
                u = found.get(UserId(peer))
                titles[conv] = u.display_name if u is not None else peer
        for room in rooms:
            assert self._rooms is not None
            try:
                titles[room_conv(room)] = await self._ask(self._rooms.room_title(room))
            except NotFound:
                titles[room_conv(room)] = room
        out: list[tuple[tuple[int, int], ConvSummary]] = []
        for conv, st in states.items():
            summary = ConvSummary(
                conv=ConvId(conv),
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
        ref, members = await self._member_access(caller, conv)
        self._publish(
            Delivery(
                users=members.users,
                event=TypingEvent(conv=ref.id, user=caller.user),
                exclude_user=caller.user,
            )
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
            convs: list[str] = [ref.id]
        else:
            convs = list((await self._store.direct_convs(caller.user)).values())
            convs.append(system_conv(caller.user))
            if self._rooms is not None:
                convs.extend(
                    room_conv(r) for r in await self._ask(self._rooms.rooms_of(caller.user))
                )
        found = await self._store.search(req.query, convs, before, req.limit + 1)
        page = found[: req.limit]
        nxt = encode_search_cursor(page[-1].id) if len(found) > req.limit else None
        return ops.SearchData(messages=[s.message for s in page], next=nxt)

    async def check_member(self, user: UserId, conv: str) -> None:
        """Raise unless ``user`` is a member of ``conv`` now (``bad_request`` for a
        malformed id, ``not_found`` for unknown users or rooms, ``forbidden``)."""
        ref = self._parse(conv)
        members = await self._members(ref)
        if user not in members.set:
            raise Forbidden(f"not a member of {ref.id}")

    async def referenced_files(self, file_ids: Sequence[str]) -> set[str]:
        """Those of ``file_ids`` that a stored message names in ``meta.file``."""
        return await self._store.referenced_files(file_ids)

    async def direct_peers(self, user: UserId) -> list[UserId]:
        """Users who share a direct conversation (with messages) with ``user``."""
        peers = self._peers.get(user)
        if peers is None:
            changes = self._peer_changes
            peers = tuple(UserId(p) for p in await self._store.direct_convs(user))
            if changes == self._peer_changes:
                self._peers.put(user, peers)
        return list(peers)

    async def check(self) -> None:
        """Raise if the message database cannot be reached (readiness probe)."""
        try:
            await self._store.check()
        except Exception as exc:
            raise Unavailable("message database unreachable") from exc

    async def close(self) -> None:
        """Flush every queued write, stop the writer and release the store."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        await self._store.close()


async def open_message_service(
    url: str,
    *,
    bus: LiveBus,
    users: UserDirectory,
    rooms: RoomDirectory | None = None,
    files: FileDirectory | None = None,
    max_body: int = 16384,
    max_meta: int = 8192,
    batch_max: int = 512,
) -> LocalMessageService:
    """Migrate the database at ``url``, open it and start the writer."""
    try:
        await sql.upgrade(url, MIGRATIONS)
    except IMError:
        raise
    except Exception as exc:
        raise Unavailable("cannot migrate the message database") from exc
    engine = sql.make_engine(url)
    service = LocalMessageService(
        SqlMessageStore.open(url, engine),
        bus=bus,
        users=users,
        rooms=rooms,
        files=files,
        max_body=max_body,
        max_meta=max_meta,
        batch_max=batch_max,
    )
    service.start()
    return service
