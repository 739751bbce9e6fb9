"""The etcd v3 client of IMServer: the few calls discovery and the config centre need.

The client underneath is aetcd (the maintained asyncio fork of python-etcd3, over
``grpc.aio``). It was chosen over etcd's JSON gateway because it installs beside the
grpcio and protobuf versions the project's own gRPC uses (its generated code accepts
protobuf 5 to 7) and speaks etcd's native gRPC API, watch streams included; the
gateway would have meant a second hand-written protocol (base64 keys, chunked JSON
watch responses) for the same calls. aetcd ships no type hints, so this module is
the only one that touches it: everything above sees typed results
(:class:`Entry`, :class:`Change`) and two errors.

Errors, translated once here:

* :class:`EtcdUnavailable`: no member answered within ``timeout`` (down, partitioned,
  or refusing). Each call tries every endpoint once, starting from the one that
  answered last.
* :class:`Compacted`: a watch asked for a revision etcd has compacted away; the
  caller reads the range again and watches from there.

Keys and values are bytes on the wire; keys are handled as ``str`` (UTF-8) here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

logger = logging.getLogger(__name__)


class EtcdUnavailable(Exception):
    """No etcd member could be reached (see the module docstring)."""


class Compacted(Exception):
    """The watched revision is compacted; ``revision`` is the oldest one etcd keeps."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted below {revision}")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class Entry:
    """A key with its value, as of ``mod_revision`` (the revision that last wrote it)."""

    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """One watched change: ``value`` is None for a deletion (or a lease's expiry)."""

    key: str
    value: bytes | None
    revision: int


def prefix_end(prefix: str) -> bytes:
    """The end of the key range that holds every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme not in ("http", ""):
        raise ValueError(f"etcd endpoint {url!r}: only plain http:// endpoints are supported")
    return parts.hostname or "127.0.0.1", parts.port or 2379


class EtcdClient:
    """A client of the etcd members at ``endpoints`` (``http://host:port`` each)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 3.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._clients: list[Any] = []
        for url in self.endpoints:
            host, port = _host_port(url)
            self._clients.append(
                aetcd.Client(host=host, port=port, timeout=timeout, connect_wait_timeout=timeout)
            )
        self._current = 0

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of the first member that answers; :class:`EtcdUnavailable` if none."""
        failures: list[str] = []
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            client = self._clients[index]
            try:
                result = await asyncio.wait_for(
                    getattr(client, method)(*args, **kwargs), self.timeout
                )
            except (aetcd.exceptions.ClientError, TimeoutError, OSError) as exc:
                failures.append(f"{self.endpoints[index]}: {exc or type(exc).__name__}")
                continue
            self._current = index
            return result
        raise EtcdUnavailable("etcd unreachable (" + "; ".join(failures) + ")")

    async def get(self, key: str) -> tuple[Entry | None, int]:
        """The entry at ``key`` (None when absent) and the store's revision."""
        # A range of one key ([key, key + NUL)): unlike aetcd's get, it answers the
        # store's revision even when the key is absent.
        raw = key.encode()
        found = await self._call("get_range", raw, raw + b"\0")
        entry = None
        for kv in found:
            entry = Entry(kv.key.decode(), kv.value, kv.mod_revision)
        return entry, int(found.header.revision)

    async def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        """Every entry under ``prefix``, sorted by key, and the store's revision."""
        found = await self._call("get_prefix", prefix.encode(), sort_order="ascend")
        entries = [Entry(kv.key.decode(), kv.value, kv.mod_revision) for kv in found]
        return entries, int(found.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``value`` at ``key`` (attached to ``lease`` when given); the revision."""
        lease_arg = lease or None
        done = await self._call("put", key.encode(), value, lease=lease_arg)
        return int(done.header.revision)

    async def delete(self, key: str) -> int:
        """Delete ``key``; the revision."""
        done = await self._call("delete", key.encode())
        return int(done.header.revision)

    async def compact(self, revision: int) -> None:
        """Discard the history before ``revision`` (operators and tests; etcd's own
        auto-compaction does this in production)."""
        await self._call("compact", revision)

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        lease = await self._call("lease", ttl)
        return int(lease.id)

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; the seconds it now has, 0 when it has expired."""
        reply = await self._call("refresh_lease", lease)
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys."""
        await self._call("revoke_lease", lease)

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """The changes under ``prefix`` from ``start_revision`` on, until the stream
        breaks: :class:`Compacted` or :class:`EtcdUnavailable` then."""
        client = self._clients[self._current]
        try:
            watch = await asyncio.wait_for(
                client.watch(
                    prefix.encode(), range_end=prefix_end(prefix), start_revision=start_revision
                ),
                self.timeout,
            )
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise Compacted(int(exc.compacted_revision)) from None
        except (aetcd.exceptions.ClientError, TimeoutError, OSError) as exc:
            self._current = (self._current + 1) % len(self._clients)
            raise EtcdUnavailable(f"watch of {prefix}: {exc or type(exc).__name__}") from None
        try:
            async for event in watch:
                kv = event.kv
                deleted = str(event.kind) in ("DELETE", "EventKind.DELETE")
                yield Change(kv.key.decode(), None if deleted else kv.value, kv.mod_revision)
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise Compacted(int(exc.compacted_revision)) from None
        except (aetcd.exceptions.ClientError, OSError) as exc:
            self._current = (self._current + 1) % len(self._clients)
            raise EtcdUnavailable(f"watch of {prefix}: {exc or type(exc).__name__}") from None
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), self.timeout)
            except Exception:  # the stream is gone already; nothing to cancel
                logger.debug("watch cancel failed", exc_info=True)
        # The stream ended without an error: etcd closed it.
        raise EtcdUnavailable(f"watch of {prefix}: the stream ended")

    async def close(self) -> None:
        """Close every member's channel."""
        for client in self._clients:
            try:
                await client.close()
            except Exception:  # closing after a failure; the channel is discarded anyway
                logger.debug("etcd client close failed", exc_info=True)
