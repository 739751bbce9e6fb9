"""Listening sockets whose accepting stops before the process runs out of descriptors.

Every connection costs a file descriptor, and so do the things a server must keep
doing for the connections it already has: opening a database file, a connection of
the pool, an upload being written. When connections take the last descriptors, the
sessions already open fail (``unable to open database file``). So the process keeps
``limits.reserved_fds`` descriptors out of reach of new connections:

* As each connection is accepted, :class:`DescriptorBudget` answers whether there is
  room for the next. It knows the descriptors open at its last count and the
  connections accepted since, and counts again (``/proc/self/fd``) only when those
  accepts could have used half of what was left under the high-water mark, so the
  common case costs an addition.
* At the mark, every listener stops accepting: new connections wait in the kernel's
  accept queue (``listen_backlog`` long) instead of being refused, and are taken, in
  order, once the count has fallen below the low-water mark. A pause and a resume are
  each logged once and counted in the metrics. The loop's server stops at the end of
  the turn in which the mark was reached; connections it accepted in that turn after
  the one that reached it are closed at once (counted as refused at the limit).

``limits.max_connections_per_ip`` caps the connections one client address may hold
(0: no cap); a connection past it is closed as soon as it is accepted.

The event loop's own server does the accepting (:class:`Listener`); the budget is
asked once per accepted connection, as its protocol is made.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path

from imserver.utils.metrics import Metrics

logger = logging.getLogger(__name__)

RECHECK_S = 0.1
"""Seconds between counts of the open descriptors while accepting is paused."""
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
        # Not at once: this runs while the loop's server is making a connection's
        # protocol, and closing that server under it breaks the accept in progress.
        # Until the call, what the server still accepts is refused (Listener._accepted).
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.call_soon(listener.pause_accepting)
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
        logger.info("accepting resumed: %d of %d descriptors open", self._counted, self.limit)
        for listener in self.listeners:
            listener.resume_accepting()


class AddressLimit:
    """At most ``cap`` open connections per client address (0: no cap).

    Closed connections are noticed lazily, by their transports' ``is_closing()``: an
    address's list is pruned when it reaches the cap (and every address's, now and
    then, so that addresses that left leave nothing behind).
    """

    PRUNE_EVERY = 4096

    def __init__(self, cap: int, metrics: Metrics) -> None:
        self.cap = cap
        self.metrics = metrics
        self._open: dict[str, list[asyncio.BaseTransport]] = {}
        self._admitted = 0

    def admit(self, address: str, conn: asyncio.BaseTransport) -> bool:
        """Whether ``conn`` from ``address`` may stay open; remembers it if so."""
        if self.cap <= 0:
            return True
        self._admitted += 1
        if self._admitted % self.PRUNE_EVERY == 0:
            self._prune_all()
        conns = self._open.setdefault(address, [])
        if len(conns) >= self.cap:
            conns[:] = [c for c in conns if not c.is_closing()]
            if len(conns) >= self.cap:
                self.metrics.refused_per_address.inc()
                return False
        conns.append(conn)
        return True

    def _prune_all(self) -> None:
        for address in list(self._open):
            alive = [c for c in self._open[address] if not c.is_closing()]
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
    """One listening socket (module docstring).

    The socket is ours; the event loop's own server accepts on a duplicate of its
    descriptor, so accepting runs at the loop's native speed. Pausing closes that
    server, which closes only the duplicate: the socket keeps listening and the kernel
    keeps queueing connections, which a new server on a fresh duplicate takes when
    accepting resumes.
    """

    def __init__(
        self, sock: socket.socket, backlog: int, factory: ProtocolFactory, admission: Admission
    ) -> None:
        self.sock = sock
        self.backlog = backlog
        self.factory = factory
        self.admission = admission
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Task[None] | None = None
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
        listener = cls(sock, backlog, factory, admission)
        admission.budget.listeners.add(listener)
        if not admission.budget.paused:
            await listener._serve()
        return listener

    @property
    def port(self) -> int:
        """The port bound (useful when 0 was asked for)."""
        port: int = self.sock.getsockname()[1]
        return port

    def pause_accepting(self) -> None:
        """Stop taking connections: they wait in the kernel's queue."""
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def resume_accepting(self) -> None:
        """Take connections again (those queued first)."""
        if self._server is None and self._starting is None and not self._closed:
            self._starting = asyncio.get_running_loop().create_task(self._serve())
            self._starting.add_done_callback(_log_resume_failure)

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        if self._closed:
            return
        self.pause_accepting()
        self._closed = True
        self.admission.budget.listeners.discard(self)
        self.sock.close()

    async def _serve(self) -> None:
        duplicate = self.sock.dup()
        try:
            # The backlog is given again: the server calls listen() on the duplicate,
            # which sets it for the one socket both descriptors name.
            self._server = await asyncio.get_running_loop().create_server(
                self._accepted, sock=duplicate, backlog=self.backlog
            )
        except BaseException:
            duplicate.close()
            raise
        finally:
            self._starting = None

    def _accepted(self) -> asyncio.BaseProtocol:
        """The protocol of a connection the loop has just accepted."""
        budget = self.admission.budget
        if budget.paused:  # accepted in the same turn of the loop as the one that paused
            budget.metrics.refused_at_limit.inc()
            return _Refused()
        budget.accepted()
        budget.has_room()  # pauses every listener when this was the last one with room
        protocol = self.factory()
        if self.admission.addresses.cap <= 0:
            return protocol
        return _AddressCheck(self.admission.addresses, protocol)


class _Refused(asyncio.Protocol):
    """A connection accepted past the budget: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _AddressCheck(asyncio.Protocol):
    """Admits a connection by its peer's address, then hands it to its protocol."""

    __slots__ = ("limit", "protocol")

    def __init__(self, limit: AddressLimit, protocol: asyncio.BaseProtocol) -> None:
        self.limit = limit
        self.protocol = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self.limit.admit(host, transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        transport.set_protocol(self.protocol)
        self.protocol.connection_made(transport)


def _log_resume_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("resuming a listener failed", exc_info=task.exception())
