"""The notification service: offline push that is durable, retried and explained.

**Ingest.** The message writer calls :meth:`LocalNotificationService.committed` once
per committed batch (it is the writer's
:class:`~imserver.services.message.api.CommitListener`). The call only queues the
events; one ingest task stores each queued run in ONE transaction of
``notification.db`` (decisions, new and collapsed jobs, the queue bound — see
:mod:`~imserver.services.notification.ingest`), so the writer's hot path gains one
call per commit and never waits for this database or a provider.

**The crash window** between the message commit and the notification commit is
closed by a catch-up: the store keeps the newest message timestamp it ingested
(``push_cursor``), and at start, before any live event, the ingest task asks the
message service for the messages stored since (``stored_since``, by storage id,
at most :data:`CATCH_UP_MS` back) and ingests them like live ones; a message whose
decisions are stored is skipped, so the overlap is harmless. A first start begins
at now (history never pushes). Read-marker moves are best effort: one lost in a
crash sends no ``read`` push (the next read or message sets the badge again). Members
of a room message read back by the catch-up are the room's members at restart. The
cursor is a timestamp (live events carry no storage id): a message the writer stamped
with a clock that stepped back behind the cursor is not caught up.

**Online.** The gateway reports each live session's device (login session) with
``device_online``/``device_offline``; a user with any is online and gets no push, and
the trace names the devices. They are kept by an
:class:`~imserver.services.notification.online.OnlineDevices`: in memory for one
process, in Redis (every instance's) for several.

**Worker.** :mod:`~imserver.services.notification.worker` sends the outbox: turns
of one transaction each, claimed jobs prefetched per provider, retries with backoff,
dead letters, the queue bound. Finished jobs, their attempts and decisions older than
:data:`~imserver.services.notification.schema.RETENTION_MS` are deleted by it.

**Durability.** ``notification.db`` is written by one thread (the ingest and the
worker never wait on each other for SQLite's lock) and its commits are not fsynced
(``synchronous=NORMAL``): a crash of the process loses nothing, and what a power cut
loses is rebuilt — an ingest by the catch-up (the cursor is lost with it), a worker
turn by sending its pushes again with the same keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from imserver.protocol import ops
from imserver.protocol.models import PushRecipient, PushRegistration
from imserver.services.caller import Caller
from imserver.services.message.api import CommittedMessage, ReadMoved
from imserver.services.notification.api import MessageSource
from imserver.services.notification.ingest import IngestPlan
from imserver.services.notification.online import MemoryOnlineDevices, OnlineDevices
from imserver.services.notification.providers.base import Provider, Registration
from imserver.services.notification.registry import Providers, build_providers
from imserver.services.notification.rules import LEVELS, pushes
from imserver.services.notification.store import SqlNotificationStore
from imserver.services.notification.worker import PushWorker
from imserver.services.peers import Peer
from imserver.storage.sql import upgrade
from imserver.utils.clock import now_ms
from imserver.utils.config import PushConfig
from imserver.utils.errors import BadRequest, Unavailable
from imserver.utils.ids import ConvId, UserId
from imserver.utils.metrics import PushMetrics

logger = logging.getLogger(__name__)

MIGRATIONS = "imserver.services.notification.migrations"

CATCH_UP_MS = 10 * 60 * 1000
"""How far back the start-up catch-up looks: a longer outage pushes nothing stale."""
CATCH_UP_PAGE = 500
CURSOR_INTERVAL_MS = 1000
"""How often the cursor alone is written while no message concerns a registered user:
a catch-up then reads at most this much more than it must (the overlap is skipped)."""


_Handed = tuple[Sequence[CommittedMessage], Sequence[ReadMoved], "asyncio.Future[None] | None"]
"""A run handed to the ingest: its messages, read moves, and the future of a
:meth:`LocalNotificationService.take` waiting for its commit."""


class LocalNotificationService:
    """The notification service in this process (see the module docstring)."""

    def __init__(
        self,
        store: SqlNotificationStore,
        providers: Providers,
        *,
        messages: Peer[MessageSource],
        config: PushConfig,
        send_timeout: float = 30.0,
        rand: random.Random | None = None,
        catch_up: bool = True,
        online: OnlineDevices | None = None,
    ) -> None:
        self._store = store
        self._providers = providers
        self._messages = messages
        self._config = config
        self.stats = PushMetrics()
        self._online: OnlineDevices = online or MemoryOnlineDevices()
        self._registered: set[str] = set()
        """Users who may have a registration (every one who has; after an unregister
        possibly some who no longer have, until the next start): only they, and the
        sender, get a decision row, so a message to a large room of users without
        push costs a set lookup per member, not a row."""
        self._queue: deque[_Handed] = deque()
        self._catch_up_on = catch_up
        self._queued = 0
        self._ingested = 0
        self._settle_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._ingest_wake = asyncio.Event()
        self._worker = PushWorker(
            store,
            providers,
            messages=messages,
            config=config,
            stats=self.stats,
            send_timeout=send_timeout,
            rand=rand or random.Random(),
        )
        self._ingest_task: asyncio.Task[None] | None = None
        self._closed = False
        self._caught_up = asyncio.Event()
        self._cursor_seen = 0
        """The newest timestamp of a message ingested without a write of its own."""
        self._cursor_written = 0

    # --- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the ingest (after its catch-up) and the worker."""
        loop = asyncio.get_running_loop()
        self._ingest_task = loop.create_task(self._ingest_loop(), name="push-ingest")
        self._worker.start()

    async def close(self) -> None:
        """Store what was handed over, stop the worker (see
        :meth:`~imserver.services.notification.worker.PushWorker.stop`), release
        everything."""
        if self._closed:
            return
        self._closed = True
        self._ingest_wake.set()
        if self._ingest_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ingest_task
        await self._worker.stop()
        for provider in self._providers.by_name.values():
            try:
                await provider.close()
            except Exception:
                logger.exception("closing push provider %s failed", provider.name)
        await self._store.close()
        await self._online.close()

    async def check(self) -> None:
        """Raise ``unavailable`` if ``notification.db`` cannot be reached."""
        await self._store.check()

    # --- ingest ---------------------------------------------------------------------

    async def committed(
        self, messages: Sequence[CommittedMessage], reads: Sequence[ReadMoved]
    ) -> None:
        """Queue a committed batch for the ingest task; answers at once."""
        if self._closed:
            return
        self._queue.append((messages, reads, None))
        self._queued += 1
        self._ingest_wake.set()

    async def take(self, messages: Sequence[CommittedMessage]) -> None:
        """Ingest ``messages`` (``message.stored`` events) and answer once they are
        stored; raise if the ingest failed (the event stream then retries them).

        Queued with everything else, so the events a consumer holds at once are
        stored in one transaction. A repeat of a stored message is skipped: its
        decisions exist (one row per (conv, seq, member) that could be pushed), and a
        message without any writes nothing either way.
        """
        if self._closed:
            raise Unavailable("notification service is closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, (), done))
        self._queued += 1
        self._ingest_wake.set()
        await done

    async def settle(self) -> None:
        """Answer once every batch handed over before the call is stored."""
        target = self._queued
        if self._ingested >= target and self._caught_up.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settle_waiters.append((target, fut))
        await fut

    def _wake_settlers(self) -> None:
        if not self._caught_up.is_set():
            return
        waiting = []
        for target, fut in self._settle_waiters:
            if target <= self._ingested:
                if not fut.done():
                    fut.set_result(None)
            else:
                waiting.append((target, fut))
        self._settle_waiters = waiting

    async def _ingest_loop(self) -> None:
        try:
            self._registered |= await self._store.registered_users()
        except Exception:
            logger.exception("push registrations could not be loaded")
        if self._catch_up_on:
            await self._catch_up()
        self._caught_up.set()
        self._wake_settlers()
        dedupe = True  # the live events queued during the catch-up may overlap it
        while True:
            await self._ingest_wake.wait()
            self._ingest_wake.clear()
            while self._queue:
                taken = list(self._queue)
                self._queue.clear()
                messages = [m for batch in taken for m in batch[0]]
                reads = [r for batch in taken for r in batch[1]]
                waiting = [batch[2] for batch in taken if batch[2] is not None]
                try:
                    # Events of the stream can be redelivered: always look for repeats.
                    await self._ingest(messages, reads, dedupe=dedupe or bool(waiting))
                    dedupe = False
                except Exception as exc:
                    logger.exception("push ingest of %d messages failed", len(messages))
                    for fut in waiting:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for fut in waiting:
                        if not fut.done():
                            fut.set_result(None)
                self._ingested += len(taken)
                self._wake_settlers()
            if self._closed and not self._queue:
                return

    async def _catch_up(self) -> None:
        """Ingest what the message service stored after the cursor (see the module
        docstring); a first start only sets the cursor."""
        try:
            since = await self._store.cursor()
            now = now_ms()
            if since == 0:
                await self._ingest([], [], cursor=now)
                return
            since = max(since, now - CATCH_UP_MS)
            after = 0
            while not self._closed:
                page = await self._ask_messages(since, after)
                if not page:
                    return
                await self._ingest(page, [])
                after = page[-1].id
        except Exception:
            logger.exception("push catch-up failed")

    async def _ask_messages(self, since: int, after: int) -> list[CommittedMessage]:
        """A catch-up page; waits for the message service while it is not yet built."""
        while True:
            try:
                source = self._messages()
            except Unavailable:
                if self._closed:
                    return []
                await asyncio.sleep(0.05)
                continue
            return await source.stored_since(since, after, CATCH_UP_PAGE)

    async def _ingest(
        self,
        messages: Sequence[CommittedMessage],
        reads: Sequence[ReadMoved],
        *,
        cursor: int | None = None,
        dedupe: bool = True,
    ) -> None:
        registered = self._registered
        # Only a message that a registered member other than its sender could be pushed
        # is stored (its decisions, with the sender's); the others cost no write, and the
        # cursor passes them at most once every CURSOR_INTERVAL_MS.
        kept = []
        newest = 0
        for m in messages:
            newest = max(newest, m.ts)
            if not registered or not pushes(m.type, m.conv):
                continue
            members = tuple(u for u in m.members if u in registered or u == m.sender)
            if len(members) > (m.sender in members):
                kept.append(msgspec.structs.replace(m, members=members))
        messages = kept
        now = now_ms()
        if not messages and not reads and cursor is None:
            self._cursor_seen = max(self._cursor_seen, newest)
            if self._cursor_seen <= self._cursor_written or (
                now - self._cursor_written < CURSOR_INTERVAL_MS
            ):
                return
            cursor = self._cursor_seen
        if cursor is None and self._cursor_seen > max((m.ts for m in messages), default=0):
            cursor = self._cursor_seen
        users = {u for m in messages for u in m.members}
        try:
            online = await self._online.devices(users)
        except Unavailable as exc:
            # Pushing to someone online costs a duplicate notification; not pushing
            # to someone offline would lose one.
            logger.warning("online devices unknown, every member taken as offline: %s", exc)
            online = {}
        result = await self._store.ingest(
            IngestPlan(
                messages=messages,
                reads=reads,
                online=online,
                providers=frozenset(self._providers.by_name),
                now=now,
                collapse_ms=int(self._config.collapse_delay * 1000),
                queue_max=self._config.queue_max,
                cursor=cursor,
                dedupe=dedupe,
            )
        )
        if cursor is not None:
            self._cursor_written = now
        self.stats.dropped += result.dropped
        if result.jobs or result.collapsed:
            self._worker.wake()

    # --- online devices ---------------------------------------------------------------

    async def device_online(self, user: UserId, device: str) -> None:
        """A live session of ``device`` started."""
        await self._online.add(user, device)

    async def device_offline(self, user: UserId, device: str) -> None:
        """A live session of ``device`` ended."""
        await self._online.remove(user, device)

    # --- registrations and settings ------------------------------------------------

    def _provider(self, name: str) -> Provider:
        provider = self._providers.by_name.get(name)
        if provider is None:
            raise BadRequest(f"push provider {name!r} is not enabled", field="provider")
        return provider

    async def register(self, caller: Caller, provider: str, target: dict[str, Any]) -> None:
        """Register the caller's device (login session) with ``provider``."""
        checked = self._provider(provider).check_target(target)
        self._registered.add(caller.user)
        await self._store.register(
            Registration(
                user=caller.user,
                device=caller.login,
                provider=provider,
                target=checked,
                created=now_ms(),
            )
        )

    async def unregister(self, caller: Caller, provider: str | None) -> None:
        """Remove the caller's device's registrations (of ``provider`` when given)."""
        await self._store.unregister(caller.user, caller.login, provider)

    async def forget_device(self, device: str) -> None:
        """Remove every registration of a login session that ended (logout)."""
        await self._store.forget_device(device)

    async def registrations(self, caller: Caller) -> list[PushRegistration]:
        """The caller's registrations (all devices)."""
        return await self._store.registrations(caller.user)

    async def vapid_key(self) -> str:
        """The Web Push application server key."""
        if not self._providers.vapid_key:
            raise Unavailable("web push is not enabled")
        return self._providers.vapid_key

    async def mute(self, caller: Caller, conv: ConvId, until: int) -> None:
        """Mute ``conv`` until ``until`` ms (0 unmutes); members only."""
        if until < 0:
            raise BadRequest("until must be 0 or a time in ms", field="until")
        await self._messages().check_member(caller.user, conv)
        await self._store.set_setting(caller.user, conv, muted_until=until)

    async def set_level(self, caller: Caller, conv: ConvId, level: str) -> None:
        """Set the caller's push level for ``conv``; members only."""
        if level not in LEVELS:
            raise BadRequest("level must be all, mentions or none", field="level")
        await self._messages().check_member(caller.user, conv)
        await self._store.set_setting(caller.user, conv, level=level)

    async def trace(self, caller: Caller, conv: ConvId, seq: int) -> ops.PushTraceData:
        """The decisions and pushes of message ``seq`` of ``conv``; members only."""
        source = self._messages()
        await source.check_member(caller.user, conv)
        recipients = await self._store.trace(conv, seq)
        decided = {r.user for r in recipients}
        sender: str | None = None
        if not recipients:
            # No member could have been pushed, so nothing was stored: the message
            # itself says who sent it.
            page = await source.history(caller, ops.History(conv=conv, after=seq - 1, limit=1))
            if page.messages and page.messages[0].seq == seq:
                sender = page.messages[0].from_
        # Members without a decision row had no registration when the message came.
        for user in await source.conv_members(conv):
            if user not in decided:
                recipients.append(
                    PushRecipient(
                        user=user,
                        due=False,
                        reason="sender" if user == sender else "no_registration",
                        online=[],
                        muted_until=0,
                        level="all",
                        mentioned=False,
                        pushes=[],
                    )
                )
        recipients.sort(key=lambda r: r.user)
        return ops.PushTraceData(conv=conv, seq=seq, recipients=recipients)

    # --- the worker ---------------------------------------------------------------------

    async def queue_depth(self) -> dict[str, int]:
        """provider -> pushes waiting."""
        return await self._store.waiting()


async def open_notification_service(
    url: str,
    *,
    data_dir: Path,
    config: PushConfig,
    messages: Peer[MessageSource],
    providers: Providers | None = None,
    send_timeout: float = 30.0,
    catch_up: bool = True,
    online: OnlineDevices | None = None,
) -> LocalNotificationService:
    """Migrate the database at ``url``, build the providers ``config`` enables (or
    take ``providers``), build the service and start its tasks. ``send_timeout``:
    seconds one provider call may take before it counts as a ``retry``.
    ``catch_up=False`` when the messages come from the event stream (:meth:`take`),
    which keeps what is not yet ingested: no start-up catch-up is needed. ``online``:
    the online devices (in memory by default)."""
    await upgrade(url, MIGRATIONS)
    if providers is None:
        providers = await asyncio.to_thread(build_providers, config, data_dir)
    service = LocalNotificationService(
        # No commit here needs its own fsync (see "Durability" above).
        SqlNotificationStore.with_one_writer(url, durable=False),
        providers,
        messages=messages,
        config=config,
        send_timeout=send_timeout,
        catch_up=catch_up,
        online=online,
    )
    service.start()
    return service
