"""Listening sockets whose accepting stops before the process runs out of descriptors.

Every connection costs a file descriptor, and so do the things a server must keep
doing for the connections it already has: opening a database file, a connection of
the pool, an upload being written. When connections take the last descriptors, the
sessions already open fail (``unable to open database file``). So the process keeps
``limits.reserved_fds`` descriptors out of reach of new connections:

* Before each ``accept``, :class:`DescriptorBudget` answers whether there is room. It
  knows the descriptors open at its last count and the connections accepted since,
  and counts again (``/proc/self/fd``) only when those accepts could have used half of
  what was left under the high-water mark, so the common case costs an addition.
* Past the mark, every listener stops calling ``accept``: new connections wait in the
  kernel's accept queue (``listen_backlog`` long) instead of being refused, and are
  taken, in order, once the count has fallen below the low-water mark. A pause and a
  resume are each logged once and counted in the metrics.
* ``EMFILE``/``ENFILE`` from ``accept`` itself (descriptors taken by something else)
  pause the same way.

``limits.max_connections_per_ip`` caps the connections one client address may hold
(0: no cap); a connection past it is closed as soon as it is accepted.

A listener accepts from a reader callback on its socket, taking every connection
already queued (up to a batch) in one call, as asyncio's own server does; pausing
removes the callback, so not one more connection is taken.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path

from imserver.core.metrics import Metrics

logger = logging.getLogger(__name__)

ACCEPT_BATCH = 256
"""Most connections taken from the accept queue in one turn of the event loop."""
RECHECK_S = 0.1
"""Seconds between counts of the open descriptors while accepting is paused."""
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


def system_backlog() -> int:
    """The kernel's cap on a listen backlog (``net.core.somaxconn``), or Python's default."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def open_descriptors() -> int | None:
    """How many descriptors the process has open, or None where that cannot be read."""
    for folder in _FD_DIRS:
        try:
            return len(os.listdir(folder)) - 1  # listdir's own descriptor
        except OSError:
            continue
    return None


class DescriptorBudget:
    """Whether the process may accept another connection (module docstring).

    The limit is read again on every check (one ``getrlimit``), so a limit changed on
    the running process (``prlimit --nofile``) takes effect at once.
    """

    def __init__(self, reserved: int, metrics: Metrics) -> None:
        self.reserved = reserved
        self.metrics = metrics
        self.enabled = open_descriptors() is not None
        self.limit = self.high = self.low = 0
        self._counted = 0
        self._since = 0
        self._paused = False
        self._watcher: asyncio.Task[None] | None = None
        self.listeners: set[Listener] = set()
        self._read_limit()
        if self.enabled:
            self._recount()

    def _read_limit(self) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == self.limit:
            return
        if limit == resource.RLIM_INFINITY:
            limit = 2**31 - 1
        self.limit = limit
        self.high = max(1, limit - self.reserved)
        # Resume a little below the mark, so that one closing connection does not flip
        # accepting on and off.
        self.low = self.high - max(1, min(self.reserved // 4, self.high // 10))

    @property
    def paused(self) -> bool:
        """True while accepting is paused."""
        return self._paused

    def has_room(self) -> bool:
        """Whether one more connection fits; pauses accepting when it does not."""
        if not self.enabled:
            return True
        if self._paused:
            return False
        self._read_limit()
        # Counted again once the accepts since the last count could have used half of
        # what was left: rarely far from the limit, at every accept right next to it,
        # and whatever else opened descriptors meanwhile is noticed in time.
        if self._counted + 2 * self._since < self.high:
            return True
        if self._recount() < self.high:
            return True
        self._pause(f"{self._counted} of {self.limit} descriptors open")
        return False

    def accepted(self) -> None:
        """Note one accepted connection."""
        self._since += 1

    def exhausted(self, exc: OSError) -> None:
        """``accept`` itself failed for want of descriptors: pause."""
        self._recount()
        self._pause(f"accept failed: {exc.strerror}")

    def close(self) -> None:
        """Stop watching for room."""
        if self._watcher is not None:
            self._watcher.cancel()

    def _recount(self) -> int:
        self._counted = open_descriptors() or 0
        self._since = 0
        return self._counted

    def _pause(self, why: str) -> None:
        if self._paused:
            return
        self._paused = True
        for listener in self.listeners:
            listener.pause_accepting()
        self.metrics.accept_paused = 1
        self.metrics.accept_pauses.inc()
        logger.warning(
            "accepting paused: %s (resumes below %d; limit %d, %d reserved)",
            why,
            self.low,
            self.limit,
            self.limit - self.high,
        )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        # Polled: descriptors are freed by whatever closes them, with no event to await.
        while self._recount() >= self.low:
            await asyncio.sleep(RECHECK_S)
            self._read_limit()
        self._paused = False
        self.metrics.accept_paused = 0
        logger.warning("accepting resumed: %d of %d descriptors open", self._counted, self.limit)
        for listener in self.listeners:
            listener.resume_accepting()


class AddressLimit:
    """At most ``cap`` open connections per client address (0: no cap).

    Closed connections are noticed lazily: a connection's socket reports ``fileno()
    == -1`` once its transport has closed it, and an address's list is pruned when it
    reaches the cap (and every address's, now and then, so that addresses that left
    leave nothing behind).
    """

    PRUNE_EVERY = 4096

    def __init__(self, cap: int, metrics: Metrics) -> None:
        self.cap = cap
        self.metrics = metrics
        self._open: dict[str, list[socket.socket]] = {}
        self._admitted = 0

    def admit(self, address: str, conn: socket.socket) -> bool:
        """Whether ``conn`` from ``address`` may stay open; remembers it if so."""
        if self.cap <= 0:
            return True
        self._admitted += 1
        if self._admitted % self.PRUNE_EVERY == 0:
            self._prune_all()
        conns = self._open.setdefault(address, [])
        if len(conns) >= self.cap:
            conns[:] = [c for c in conns if c.fileno() != -1]
            if len(conns) >= self.cap:
                self.metrics.refused_per_address.inc()
                return False
        conns.append(conn)
        return True

    def _prune_all(self) -> None:
        for address in list(self._open):
            alive = [c for c in self._open[address] if c.fileno() != -1]
            if alive:
                self._open[address] = alive
            else:
                del self._open[address]


class Admission:
    """What every listener of one process shares: the descriptor budget and the
    per-address cap."""

    def __init__(self, *, reserved_fds: int, max_per_address: int, metrics: Metrics) -> None:
        self.budget = DescriptorBudget(reserved_fds, metrics)
        self.addresses = AddressLimit(max_per_address, metrics)

    def close(self) -> None:
        """Stop background work."""
        self.budget.close()


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Listener:
    """One listening socket, accepting when the socket is readable and the budget has
    room (module docstring)."""

    def __init__(self, sock: socket.socket, factory: ProtocolFactory, admission: Admission) -> None:
        self.sock = sock
        self.factory = factory
        self.admission = admission
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False

    @classmethod
    async def start(
        cls, host: str, port: int, backlog: int, factory: ProtocolFactory, admission: Admission
    ) -> Listener:
        """Bind ``host:port``, listen with ``backlog`` and start accepting."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        listener = cls(sock, factory, admission)
        admission.budget.listeners.add(listener)
        if not admission.budget.paused:
            listener.resume_accepting()
        return listener

    @property
    def port(self) -> int:
        """The port bound (useful when 0 was asked for)."""
        port: int = self.sock.getsockname()[1]
        return port

    def pause_accepting(self) -> None:
        """Stop taking connections: they wait in the kernel's queue."""
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def resume_accepting(self) -> None:
        """Take connections again (those queued first)."""
        if not self._reading and not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True
            self._loop.call_soon(self._accept)  # some may have queued while paused

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        if self._closed:
            return
        self.pause_accepting()
        self._closed = True
        self.admission.budget.listeners.discard(self)
        self.sock.close()

    async def wait_closed(self) -> None:
        """Nothing is left to wait for once :meth:`close` has returned."""

    def _accept(self) -> None:
        """Take every queued connection the budget has room for, up to a batch."""
        budget = self.admission.budget
        for _ in range(ACCEPT_BATCH):
            if self._closed or not self._reading or not budget.has_room():
                return
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    budget.exhausted(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    logger.error("accept on port %d failed", self.port, exc_info=exc)
                return
            self._take(conn, address)

    def _take(self, conn: socket.socket, address: object) -> None:
        self.admission.budget.accepted()
        host = address[0] if isinstance(address, tuple) else str(address)
        if not self.admission.addresses.admit(host, conn):
            conn.close()
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self.factory, conn))
        task.add_done_callback(_connected)


def _connected(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("setting up an accepted connection failed", exc_info=task.exception())
