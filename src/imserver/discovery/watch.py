"""A mirror of every key under one etcd prefix, kept current by a watch.

The loop: read the whole range (its entries and the store's revision ``R``), hand the
mirror to the listener, then watch from ``R + 1`` and apply each change as it comes,
handing the mirror over again after each. etcd's watch starts exactly after the
range read, so no change is missed or seen twice. When the watch breaks:

* **compacted** (the revision to resume from is gone): read the range again;
* **etcd unreachable** (stream broken, every member down): keep the mirror as it
  is, the last known state, and try again after a pause that doubles from 0.1 s to
  ``retry_max``; the first success reads the range again, so whatever changed
  meanwhile (an instance that left, a setting set) is seen.

The listener is a plain function called on the event loop; it must not raise (what
it raises is logged and the mirror goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from imserver.discovery.etcd import Compacted, Entry, EtcdClient, EtcdUnavailable

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Entry], int], None]
"""Given the mirror (key → entry) and the revision it is current as of."""

RETRY_FIRST = 0.1


class Backoff:
    """Pauses that double from ``first`` up to ``limit`` and start over on :meth:`reset`."""

    def __init__(self, limit: float, first: float = RETRY_FIRST) -> None:
        self.first = first
        self.limit = max(limit, first)
        self._next = first

    def next(self) -> float:
        """The pause before the next attempt."""
        pause = self._next
        self._next = min(self._next * 2, self.limit)
        return pause

    def reset(self) -> None:
        self._next = self.first


class PrefixWatch:
    """Keys under ``prefix`` mirrored from etcd (see the module docstring)."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        listener: Listener,
        *,
        retry_max: float = 5.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.syncs = 0
        """Range reads done: 1 after the first sync, one more after each resync."""
        self.connected = False
        """Whether the watch stream is open now."""
        self._listener = listener
        self._backoff = Backoff(retry_max)
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop in a task of its own."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcd-watch {self.prefix}"
            )

    async def wait_synced(self, within: float | None = None) -> bool:
        """Wait until the first range read is done; False when ``within`` seconds ran out."""
        try:
            await asyncio.wait_for(self._synced.wait(), within)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """End the loop; the mirror stays as it is."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notify(self) -> None:
        try:
            self._listener(self.entries, self.revision)
        except Exception:  # a listener's bug must not end the mirror
            logger.exception("listener of %s failed", self.prefix)

    async def _run(self) -> None:
        down_since_logged = False
        while True:
            try:
                entries, revision = await self.client.get_prefix(self.prefix)
                self.entries = {entry.key: entry for entry in entries}
                self.revision = revision
                self.syncs += 1
                self._synced.set()
                if down_since_logged:
                    logger.info(
                        "etcd reachable again: %s resynced at revision %d", self.prefix, revision
                    )
                    down_since_logged = False
                self._backoff.reset()
                self._notify()
                self.connected = True
                async for change in self.client.watch_prefix(self.prefix, revision + 1):
                    if change.value is None:
                        self.entries.pop(change.key, None)
                    else:
                        self.entries[change.key] = Entry(change.key, change.value, change.revision)
                    self.revision = max(self.revision, change.revision)
                    self._notify()
            except Compacted as exc:
                self.connected = False
                logger.info("watch of %s compacted (%s): reading it again", self.prefix, exc)
            except EtcdUnavailable as exc:
                self.connected = False
                if not down_since_logged:
                    logger.warning(
                        "etcd unreachable; %s keeps its %d last known keys: %s",
                        self.prefix,
                        len(self.entries),
                        exc,
                    )
                    down_since_logged = True
                await asyncio.sleep(self._backoff.next())
            except Exception:  # a bug or an answer not foreseen: the mirror must go on
                self.connected = False
                logger.exception("watch of %s failed; trying again", self.prefix)
                await asyncio.sleep(self._backoff.next())
