"""The outbox worker of the notification service: it sends the waiting pushes.

One loop of turns, each ONE transaction of ``notification.db``
(:meth:`~imserver.services.notification.store.SqlNotificationStore.exchange`): it
records the answers that came since the previous turn and claims due jobs (now
``sending``, each with its registration) for every provider with room, a group commit
of both. Claimed jobs wait in memory, their badges asked in one call
(``unread_totals``), until one of the provider's ``concurrency`` slots frees; a freed
slot starts the next at once, and the loop keeps up to :data:`PREFETCH` times
``concurrency`` jobs claimed per provider so that the database turn is off the path
of each push. An answer is ``sent``; ``retry`` → ``retry-wait`` after exponential
backoff with full jitter (or the provider's ``Retry-After``), ``dead`` after
``max_attempts``; ``gone`` deletes the registration; ``failed`` is final. A send that
takes longer than ``send_timeout`` is a ``retry``. At start, jobs left ``sending``
(in flight, claimed or answered but not recorded at a stop) are due again with the
same key: delivery to a provider is at least once, and exactly once per key at a
receiver that drops repeats of a key (every push carries its key). The queue of each
provider is bounded (``queue_max``): the oldest waiting jobs past it are ``dropped``.
Finished jobs, their attempts and decisions older than
:data:`~imserver.services.notification.schema.RETENTION_MS` are deleted by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence

from imserver.services.notification.api import MessageSource
from imserver.services.notification.providers.base import Outcome, Provider, Push
from imserver.services.notification.registry import Providers
from imserver.services.notification.rules import backoff
from imserver.services.notification.schema import DEAD, FAILED, GONE, RETENTION_MS, RETRY_WAIT, SENT
from imserver.services.notification.store import Claimed, Finished, Job, SqlNotificationStore
from imserver.services.peers import Peer
from imserver.utils.clock import now_ms
from imserver.utils.config import PushConfig
from imserver.utils.ids import UserId
from imserver.utils.metrics import PushMetrics

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0
PREFETCH = 4
"""Jobs claimed per provider: up to ``PREFETCH * concurrency`` in flight or ready, so
a slot that frees starts the next push at once, not after a database turn."""
CLOSE_GRACE_S = 2.0
"""Seconds a stopping worker waits for the pushes in flight to be answered."""


class PushWorker:
    """Sends the outbox of ``store`` through ``providers`` (see the module docstring)."""

    def __init__(
        self,
        store: SqlNotificationStore,
        providers: Providers,
        *,
        messages: Peer[MessageSource],
        config: PushConfig,
        stats: PushMetrics,
        send_timeout: float,
        rand: random.Random,
    ) -> None:
        self._store = store
        self._providers = providers
        self._messages = messages
        self._config = config
        self.stats = stats
        self._send_timeout = send_timeout
        self._rand = rand
        self._wake = asyncio.Event()
        self._inflight: dict[str, int] = dict.fromkeys(providers.by_name, 0)
        self._ready: dict[str, deque[tuple[Job, int]]] = {
            name: deque() for name in providers.by_name
        }
        """Claimed jobs (with their badges) waiting for a free slot of their provider."""
        self._sends: set[asyncio.Task[None]] = set()
        self._answers: list[Finished] = []
        """Answers of finished sends not recorded yet."""
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop (it first makes the jobs a stop left ``sending`` due again)."""
        self._task = asyncio.get_running_loop().create_task(self._work_loop(), name="push-worker")

    def wake(self) -> None:
        """New jobs are waiting: take a turn now."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, give the pushes in flight :data:`CLOSE_GRACE_S` to answer
        (the others, and the claimed ones not started, stay ``sending`` and are sent
        again at the next start), record the answers."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=CLOSE_GRACE_S)
        for send in list(self._sends):
            send.cancel()
        for send in list(self._sends):
            with contextlib.suppress(asyncio.CancelledError):
                await send
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _work_loop(self) -> None:
        """One transaction per turn: store the answers that came since the last turn
        and claim what the free slots can take (a group commit of both), start those
        sends, then sleep until an answer, a new job or the next due time."""
        try:
            await self._store.resume(now_ms())
        except Exception:
            logger.exception("push worker could not resume")
        loop = asyncio.get_running_loop()
        next_prune = next_depth = loop.time()
        while True:
            self._wake.clear()
            closing = self._closed
            answers, self._answers = self._answers, []
            free = {
                name: PREFETCH * self._config.concurrency - self._inflight[name] - len(ready)
                for name, ready in self._ready.items()
                if not closing
            }
            try:
                if loop.time() >= next_prune:
                    next_prune = loop.time() + PRUNE_INTERVAL_S
                    await self._store.prune(now_ms() - RETENTION_MS)
                if loop.time() >= next_depth:
                    next_depth = loop.time() + 1.0
                    self.stats.depth = await self._store.waiting()
                turn = await self._store.exchange(answers, free, now_ms())
            except Exception:
                logger.exception("push worker failed")
                self._answers[:0] = answers
                if closing and not self._sends:
                    return  # the unrecorded stay ``sending``: sent again at the next start
                await asyncio.sleep(1.0)
                continue
            self._count(answers)
            await self._start(turn.claimed)
            if closing and not self._sends and not self._answers:
                return
            full = any(
                len(turn.claimed[name].jobs) + turn.claimed[name].abandoned == n
                for name, n in free.items()
                if n > 0
            )
            if full or self._answers:
                continue  # more may be due, or answers came meanwhile
            # Each provider with room took all its due jobs: what is due now waits for
            # room, which an answer makes (it wakes the loop, as a new job does).
            due = turn.next_due
            wait = 1.0 if due is None else min(1.0, (due - now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait if wait > 0 else 1.0)

    def _count(self, answers: Sequence[Finished]) -> None:
        for done in answers:
            self.stats.results[(done.job.provider, done.state)] += 1
            if done.state == DEAD:
                self.stats.dead += 1

    async def _start(self, claimed: dict[str, Claimed]) -> None:
        """Start the sends of the claimed jobs (their badges asked in one call)."""
        jobs = [job for taken in claimed.values() for job in taken.jobs]
        for name, taken in claimed.items():
            self.stats.results[(name, FAILED)] += taken.abandoned
        if not jobs:
            return
        badges = await self._badges([job.registration.user for job in jobs])
        for job in jobs:
            self._ready[job.provider].append((job, badges.get(job.registration.user, 0)))
        for name in claimed:
            self._pump(name)

    def _pump(self, name: str) -> None:
        """Start ready jobs of provider ``name`` while it has free slots."""
        ready = self._ready[name]
        if self._closed:
            ready.clear()  # still ``sending``: sent at the next start
        provider = self._providers.by_name[name]
        while ready and self._inflight[name] < self._config.concurrency:
            job, badge = ready.popleft()
            self._inflight[name] += 1
            task = asyncio.get_running_loop().create_task(self._send(provider, job, badge))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _badges(self, users: list[str]) -> dict[str, int]:
        """user -> badge (unread total) for a claimed batch; none when the message
        service does not answer (the pushes go without)."""
        try:
            return await self._messages().unread_totals([UserId(u) for u in users])
        except Exception as exc:  # an error reply, or a service already stopped
            logger.warning("no badges for %d pushes: %s", len(users), exc)
            return {}

    async def _send(self, provider: Provider, job: Job, badge: int) -> None:
        """Send one push, free its slot and hand its answer to the worker."""
        try:
            outcome = await self._deliver(provider, job, badge)
        except asyncio.CancelledError:
            self._release(job.provider)  # still ``sending``: sent again at the next start
            raise
        except Exception as exc:  # a bug outside the provider: recorded as a retry
            logger.exception("push %s failed outside its provider", job.key)
            outcome = Outcome(status="retry", detail=f"{type(exc).__name__}: {exc}")
        self._answers.append(self._next_state(job, outcome))
        self._release(job.provider)

    async def _deliver(self, provider: Provider, job: Job, badge: int) -> Outcome:
        reg = job.registration
        push = Push(
            key=job.key,
            kind="read" if job.kind == "read" else "message",
            user=reg.user,
            device=reg.device,
            conv=job.conv,
            seq=job.seq,
            count=job.count,
            badge=badge,
            title=job.title,
            body=job.body,
        )
        try:
            return await asyncio.wait_for(provider.send(reg, push), self._send_timeout)
        except TimeoutError:
            return Outcome(status="retry", detail=f"no answer in {self._send_timeout:g} s")
        except Exception as exc:
            logger.exception("push provider %s raised", job.provider)
            return Outcome(status="retry", detail=f"{type(exc).__name__}: {exc}")

    def _next_state(self, job: Job, outcome: Outcome) -> Finished:
        """The job's state after ``outcome``: final, or ``retry-wait`` until a backoff
        (or the provider's ``Retry-After``), or ``dead`` after ``max_attempts``."""
        now = now_ms()
        next_at = now
        if outcome.status == "sent":
            state = SENT
        elif outcome.status == "gone":
            state = GONE
        elif outcome.status == "failed":
            state = FAILED
        elif job.attempts + 1 >= self._config.max_attempts:
            state = DEAD
        else:
            state = RETRY_WAIT
            if outcome.retry_after is not None:
                delay = outcome.retry_after
            else:
                delay = backoff(
                    job.attempts + 1,
                    self._config.backoff_base,
                    self._config.backoff_max,
                    self._rand.random(),
                )
            next_at = now + int(delay * 1000)
        return Finished(job=job, outcome=outcome, state=state, next_at=next_at, at=now)

    def _release(self, provider: str) -> None:
        self._inflight[provider] -= 1
        self._pump(provider)
        self._wake.set()
