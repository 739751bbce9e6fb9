"""The message service's group-commit writer: one queue, one task, one transaction per batch.

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
   a refused item or a failed commit consumes no seq. On a database other
   processes may write too (PostgreSQL, MySQL/MariaDB: ``store.shared``), the
   counters are read in each batch's transaction from rows it locks, never from
   memory (:mod:`imserver.services.message.counters`), and invariant 1 holds per
   conversation and batch instead of per process.
4. **Idempotency is permanent.** (conv, sender, cid) is unique in the database; a
   repeat (also within one batch) stores nothing and answers the original seq/ts
   with ``dup: true``. Recent keys are answered from memory; a key memory does not
   hold is taken to be new, and the unique index has the last word: when the
   commit meets a stored key, the batch is abandoned and applied again with every
   key looked up. The common case, a new message, reads nothing before it writes.
5. **Publish order.** After commit, publications are put on the live bus in batch
   order, which is ascending seq within each conversation, from this one task:
   every session sees a conversation's ``msg`` events in seq order, and each
   publication carries its seq as its position. Duplicates publish nothing. A room
   message is published once, on the room's channel; a direct message on both
   users' channels; a system notice on its user's (see :mod:`imserver.storage.bus`).
6. **Room membership changes at a seq.** A room ``system`` message posted with
   ``members`` switches the room's member list at its position in the batch: writes
   before it are checked against the old members; it and everything after, the new
   ones. Its publication names the users it adds and removes (``joined``/``left``;
   a room's first message adds every member), so each gateway delivers the room's
   earlier messages to the old members, and it and everything after to the new
   ones; each of those users, and each ``notify`` user who is a member on neither
   side, also gets it on their own channel. The list stays pinned (in
   :class:`~imserver.services.message.membership.Membership`) until the room
   directory answers its ``version`` or a later one, so later batches, ``typing``
   and reads agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Final

from imserver.protocol import ops
from imserver.protocol.convs import ConvRef
from imserver.protocol.events import Event, Msg, Receipt
from imserver.services.message.api import (
    PREVIEW_CHARS,
    CommitListener,
    CommittedMessage,
    FileDirectory,
    FileRef,
    Members,
    MessageStored,
    ReadMoved,
    UserDirectory,
)
from imserver.services.message.batch import FILE_TYPES, BatchState, apply, apply_mark
from imserver.services.message.lru import LRU
from imserver.services.message.membership import USER_CACHE, Membership, ask
from imserver.services.message.ports import MessageStore, WriteTransaction
from imserver.services.message.queued import (
    EditWrite,
    MarkDone,
    MarkWrite,
    ReactWrite,
    RecallWrite,
    SendWrite,
    SystemWrite,
    Write,
)
from imserver.services.message.schema import IdemKey, MarkerKey, MessageKey
from imserver.services.message.writes import KeyConflict, Loaded
from imserver.storage.bus import LiveBus, Publication, user_channel
from imserver.storage.events import MESSAGE_STORED
from imserver.storage.outbox import Outbox
from imserver.utils.clock import now_ms
from imserver.utils.errors import BadRequest, Forbidden, IMError, Internal, Unavailable
from imserver.utils.ids import ConvId, RoomId, UserId

logger = logging.getLogger(__name__)

_KEY_CACHE = 100_000
_SEQ_CACHE = 100_000

_Change = tuple[tuple[str, ...], tuple[str, ...]]
"""The users a room membership change adds and removes: (joined, left)."""
_NO_CHANGE: Final[_Change] = ((), ())

_Out = tuple[Write, Event, int | None, Members, _Change]
"""An event a batch publishes after commit: (its write, event, seq of a stored
message, members before it, membership change), in batch order."""


def _change(before: Members, after: Members) -> _Change:
    """The users a room membership change adds and removes."""
    joined = tuple(u for u in after.users if u not in before.set)
    left = tuple(u for u in before.users if u not in after.set)
    return joined, left


def _committed(event: Msg, before: Members) -> CommittedMessage:
    """A stored message as a commit listener and a ``message.stored`` event carry it."""
    return CommittedMessage(
        conv=event.conv,
        seq=event.seq,
        ts=event.ts,
        sender=event.from_,
        type=event.type,
        body=event.body[:PREVIEW_CHARS],
        mentions=tuple(event.mentions or ()),
        members=before.users,
    )


async def publish_conv(bus: LiveBus, conv: ConvRef, publication: Publication) -> None:
    """Publish an event of ``conv`` on its channels: the room's for a room, both
    users' for a direct conversation, the user's for a system conversation. A bus
    failure is logged: it must not undo a committed write."""
    try:
        if conv.kind == "room":
            await bus.publish(conv.id, publication)
        else:
            await bus.publish(user_channel(conv.a), publication)
            if conv.kind == "direct":
                await bus.publish(user_channel(conv.b), publication)
    except Exception:
        logger.exception("live bus publish of a %s event failed", type(publication.event).__name__)


class MessageWriter:
    """The single writer: takes everything queued (up to ``batch_max`` items), checks
    it against the other services, stores it in ONE transaction and, after commit,
    answers every write and publishes its deliveries. Start it with :meth:`start`."""

    def __init__(
        self,
        store: MessageStore,
        *,
        bus: LiveBus,
        users: UserDirectory,
        membership: Membership,
        files: FileDirectory | None = None,
        listener: CommitListener | None = None,
        outbox: Outbox | None = None,
        batch_max: int = 512,
    ) -> None:
        self._store = store
        self._listener = listener
        self._outbox = outbox
        self._bus = bus
        self._users = users
        self._membership = membership
        self._files = files
        self._batch_max = batch_max
        self._queue: deque[Write] = deque()
        self._wake = asyncio.Event()
        self.closed = False
        """Set by :meth:`close`: new writes are refused with ``unavailable``."""
        self._seqs: LRU[ConvId, int] = LRU(_SEQ_CACHE)
        self._keys: LRU[IdemKey, tuple[int, int]] = LRU(_KEY_CACHE)
        self.peers: LRU[str, tuple[UserId, ...]] = LRU(USER_CACHE)
        """user -> direct-conversation peers (presence recipients), kept in step by the
        writer when a direct conversation stores its first message."""
        self.peer_changes = 0
        """Commits that added direct peers: a load that raced one is not cached."""
        self._task: asyncio.Task[None] | None = None
        self._enqueued = 0
        self._processed = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._write_loop(), name="message-writer"
            )

    def enqueue(self, item: Write) -> None:
        """Queue ``item``; its future resolves after its batch's commit."""
        if self.closed:
            item.future.set_exception(Unavailable("message service is closed"))
            return
        self._queue.append(item)
        self._enqueued += 1
        self._wake.set()

    async def close(self) -> None:
        """Refuse new writes, then commit and answer everything queued and stop."""
        self.closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

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
            if self.closed and not self._queue:
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
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, fut))
        await fut

    async def _run_batch(self, batch: list[Write]) -> None:
        # Refusals decided before the transaction, kept if it is applied again.
        refused: list[IMError | None] = [None] * len(batch)
        pre: list[IMError | None] = [None] * len(batch)
        members: dict[ConvId, Members | IMError] = {}
        roles: dict[tuple[str, str], str | None] = {}
        # (recipient, sender) of each direct write to check for a block, asked of the
        # user directory in one call for the whole batch after the loop.
        direct: dict[int, tuple[str, str]] = {}

        # Stage A: checks against the other services, before the transaction opens.
        for i, item in enumerate(batch):
            conv = item.conv
            got = members.get(conv.id)
            if got is None:
                try:
                    got = await self._membership.members(conv)
                except IMError as exc:
                    got = exc
                members[conv.id] = got
            if isinstance(got, IMError):
                item.answer = refused[i] = got
                continue
            if isinstance(item, SystemWrite):
                continue
            # Room membership can change within the batch (a system message carrying
            # the new members): rooms are checked in seq order, when applied.
            if conv.kind != "room" and item.user not in got.set:
                pre[i] = Forbidden(f"not a member of {conv.id}")
                continue
            if conv.kind == "direct" and isinstance(item, (SendWrite, EditWrite, ReactWrite)):
                direct[i] = (conv.b if item.user == conv.a else conv.a, item.user)
            elif conv.kind == "room" and isinstance(item, RecallWrite):
                rkey = (conv.a, item.user)
                try:
                    if rkey not in roles:
                        roles[rkey] = await self._membership.room_role(RoomId(conv.a), item.user)
                except IMError as exc:
                    pre[i] = exc

        await self._check_blocks(direct, pre)
        await self._check_files(batch, pre)

        if all(item.answer is not None for item in batch):
            for item in batch:
                item.settle()
            return
        try:
            try:
                done = await self._transact(batch, members, pre, roles, check_all=False)
            except KeyConflict:
                # A resend of a message stored before the key cache knew it: apply the
                # batch again, this time looking every key up.
                for item, answer in zip(batch, refused, strict=True):
                    item.answer = answer
                done = await self._transact(batch, members, pre, roles, check_all=True)
        except KeyConflict:
            logger.exception("message batch conflicts with stored keys")
            self._fail_pending(batch, Internal("message store error"))
            return
        except IMError as exc:
            self._fail_pending(batch, exc)
            return
        except Exception:
            logger.exception("message batch failed")
            self._fail_pending(batch, Internal("message store error"))
            return
        state, outbox, pinned = done
        # Committed: the working state becomes the truth.
        self._membership.pinned.update(pinned)
        if state.write.peers:
            self.peer_changes += 1
        for row in state.write.peers:
            known = self.peers.get(row["user_id"])
            if known is not None and row["peer_id"] not in known:
                self.peers.put(row["user_id"], (*known, UserId(row["peer_id"])))
        for conv_id, last in state.last.items():
            self._seqs.put(conv_id, last)
        for key, value in state.new_keys.items():
            self._keys.put(key, value)
        for key, value in state.known.items():
            self._keys.put(key, value)
        for item, event, seq, before, change in outbox:
            conv = item.conv
            await publish_conv(
                self._bus,
                conv,
                Publication(
                    event=event,
                    conv=conv.id,
                    seq=seq,
                    exclude_session=item.session,
                    joined=change[0],
                    left=change[1],
                ),
            )
            if conv.kind == "room" and isinstance(item, SystemWrite):
                await self._publish_notices(item, event, before, change)
        if self._listener is not None and outbox:
            await self._tell_listener(self._listener, outbox)
        if state.write.events and self._outbox is not None:
            self._outbox.committed()
        for item in batch:
            item.settle()

    @staticmethod
    async def _tell_listener(listener: CommitListener, outbox: list[_Out]) -> None:
        """Hand the batch's stored messages and read moves to the commit listener:
        one call per commit, whatever the batch holds."""
        stored: list[CommittedMessage] = []
        reads: list[ReadMoved] = []
        for item, event, _seq, before, _change in outbox:
            if isinstance(event, Msg):
                stored.append(_committed(event, before))
            elif isinstance(event, Receipt) and event.kind == "read":
                login = item.login if isinstance(item, MarkWrite) else ""
                reads.append(
                    ReadMoved(conv=event.conv, user=event.user, seq=event.seq, login=login)
                )
        if not (stored or reads):
            return
        try:
            await listener.committed(stored, reads)
        except Exception:
            logger.exception("commit listener failed on %d messages", len(stored))

    async def _transact(
        self,
        batch: list[Write],
        members: dict[ConvId, Members | IMError],
        pre: list[IMError | None],
        roles: dict[tuple[str, str], str | None],
        *,
        check_all: bool,
    ) -> tuple[BatchState, list[_Out], dict[str, Members]]:
        """Apply the batch in one transaction and commit it, deciding every write's
        answer. Returns the committed state, the events to publish and the room
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
            state = await self._load_state(tx, batch, check_all=check_all)
            loaded_last = dict(state.last)
            for i, item in enumerate(batch):
                if item.answer is not None:
                    continue
                m = members[item.conv.id]
                assert not isinstance(m, IMError)
                if (
                    not isinstance(item, SystemWrite)
                    and pre[i] is None
                    and item.conv.kind == "room"
                    and item.user not in m.set
                ):
                    pre[i] = Forbidden(f"not a member of {item.conv.id}")
                if isinstance(item, MarkWrite):
                    if pre[i] is not None:
                        item.answer = pre[i]
                        continue
                    receipt = apply_mark(state, item)
                    if receipt is None:
                        item.answer = MarkDone.UNCHANGED
                    else:
                        item.answer = MarkDone.MOVED
                        outbox.append((item, receipt, None, m, _NO_CHANGE))
                    continue
                key = (item.conv.id, item.user, item.cid)
                dup = state.known.get(key) or state.new_keys.get(key)
                if dup is not None:
                    item.answer = ops.SendData(
                        conv=item.conv.id, seq=dup[0], ts=dup[1], cid=item.cid, dup=True
                    )
                    continue
                err = pre[i]
                if err is None:
                    try:
                        msg = apply(state, item, m, roles)
                    except IMError as exc:
                        err = exc
                    else:
                        state.new_keys[key] = (msg.seq, msg.ts)
                        before, change = m, _NO_CHANGE
                        if isinstance(item, SystemWrite) and item.members is not None:
                            # A membership change takes effect at its own seq.
                            change = _change(m, item.members)
                            m = members[item.conv.id] = pinned[item.conv.a] = item.members
                        elif msg.seq == 1 and item.conv.kind == "room":
                            change = (m.users, ())  # a new room: every member joins
                        item.answer = ops.SendData(
                            conv=msg.conv, seq=msg.seq, ts=msg.ts, cid=msg.cid, dup=False
                        )
                        outbox.append((item, Msg.of(msg), msg.seq, before, change))
                        continue
                item.answer = err
            if self._outbox is not None:
                # In the batch's own transaction: the events commit with the messages.
                row = self._outbox.row
                state.write.events = [
                    row(MESSAGE_STORED, MessageStored(message=_committed(event, before)))
                    for _item, event, _seq, before, _change in outbox
                    if isinstance(event, Msg)
                ]
            if self._store.shared:
                state.write.counters = {
                    conv: last for conv, last in state.last.items() if last != loaded_last[conv]
                }
            await tx.commit(state.write)
        return state, outbox, pinned

    async def _publish_notices(
        self, item: SystemWrite, event: Event, before: Members, change: _Change
    ) -> None:
        """After a room message, the same message on the personal channels of the
        users it adds or removes and of the ``notify`` users who are members on
        neither side of it (an invitee)."""
        joined, left = change
        if not (joined or left or item.notify):
            return
        noticed = [*joined, *left]
        after = item.members if item.members is not None else before
        for user in item.notify:
            if user not in noticed and user not in before.set and user not in after.set:
                noticed.append(user)
        notice = Publication(event=event, conv=item.conv.id, joined=joined, left=left)
        for user in noticed:
            try:
                await self._bus.publish(user_channel(user), notice)
            except Exception:
                logger.exception("live bus publish of a room notice failed")

    @staticmethod
    def _fail_pending(batch: list[Write], exc: IMError) -> None:
        """Answer a batch whose transaction failed: decided refusals and duplicates
        keep their answer, every write that was to be stored gets ``exc``."""
        for item in batch:
            item.fail(exc)

    async def _load_state(
        self, tx: WriteTransaction, batch: list[Write], *, check_all: bool
    ) -> BatchState:
        """Read what the batch needs in one step: last seqs of conversations not in
        memory, targets, markers and, with ``check_all``, the stored idempotency keys
        not known from memory. Nothing is read when memory holds it all."""
        idem_keys: dict[IdemKey, None] = {}
        known: dict[IdemKey, tuple[int, int]] = {}
        last: dict[ConvId, int] = {}
        unknown_convs: list[ConvId] = []
        target_keys: dict[MessageKey, None] = {}
        marker_keys: dict[MarkerKey, None] = {}
        for item in batch:
            if item.answer is not None:
                continue
            conv_id = item.conv.id
            if conv_id not in last:
                cached = None if self._store.shared else self._seqs.get(conv_id)
                if cached is None:
                    last[conv_id] = 0
                    unknown_convs.append(conv_id)
                else:
                    last[conv_id] = cached
            if isinstance(item, MarkWrite):
                marker_keys[(conv_id, item.user)] = None
                continue
            key = (conv_id, item.user, item.cid)
            hit = self._keys.get(key)
            if hit is not None:
                known[key] = hit
            elif check_all:
                idem_keys[key] = None
            if isinstance(item, (EditWrite, RecallWrite, ReactWrite)):
                target_keys[(conv_id, item.target)] = None
        if idem_keys or unknown_convs or target_keys or marker_keys:
            loaded = await tx.load(
                list(idem_keys), unknown_convs, list(target_keys), list(marker_keys)
            )
        else:
            loaded = Loaded(existing={}, last={}, targets={}, markers={})
        known.update(loaded.existing)
        last.update(loaded.last)
        return BatchState(
            last=last,
            targets=loaded.targets,
            markers={k: (v[0], v[1], True) for k, v in loaded.markers.items()},
            known=known,
            ts=now_ms(),
        )

    async def _check_blocks(
        self, direct: dict[int, tuple[str, str]], pre: list[IMError | None]
    ) -> None:
        """Refuse the direct writes whose recipient blocked the sender: one
        ``blocked_pairs`` call for every distinct (recipient, sender) of the batch."""
        if not direct:
            return
        pairs = list(dict.fromkeys(direct.values()))
        try:
            answers = await ask(
                self._users.blocked_pairs(
                    [UserId(r) for r, _ in pairs], [UserId(s) for _, s in pairs]
                )
            )
        except IMError as exc:
            for i in direct:
                pre[i] = exc
            return
        if len(answers) != len(pairs):
            logger.error("blocked_pairs answered %d of %d pairs", len(answers), len(pairs))
            for i in direct:
                pre[i] = Internal("user directory error")
            return
        blocked = {pair for pair, yes in zip(pairs, answers, strict=True) if yes}
        for i, pair in direct.items():
            if pair in blocked:
                pre[i] = Forbidden("blocked")

    async def _check_files(self, batch: list[Write], pre: list[IMError | None]) -> None:
        """Resolve the files of the batch's ``image``/``file`` sends (one lookup for the
        batch): each must be a file of the message's own conversation. The stored and
        delivered ``meta`` then carries the file's name, size, mime and thumb URL."""
        sends: list[tuple[int, SendWrite, str]] = []
        for i, item in enumerate(batch):
            if (
                isinstance(item, SendWrite)
                and item.type in FILE_TYPES
                and item.answer is None
                and pre[i] is None
            ):
                assert item.meta is not None  # send() checked meta.file
                sends.append((i, item, item.meta["file"]))
        if not sends:
            return
        refs: dict[str, FileRef] = {}
        try:
            if self._files is None:
                raise BadRequest("this server stores no files", field="meta")
            refs = await ask(self._files.file_refs(list(dict.fromkeys(f for _, _, f in sends))))
        except IMError as exc:
            for i, _, _ in sends:
                pre[i] = exc
            return
        for i, item, file_id in sends:
            ref = refs.get(file_id)
            if ref is None or ref.conv != item.conv.id:
                # The same answer for an unknown id and another conversation's file:
                # a send must not reveal which ids exist elsewhere.
                pre[i] = BadRequest(f"no file {file_id} in {item.conv.id}", field="meta")
                continue
            item.meta = {
                **(item.meta or {}),
                "name": ref.name,
                "size": ref.size,
                "mime": ref.mime,
                "thumb_url": ref.thumb_url,
            }
