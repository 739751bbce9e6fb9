"""An instance's registration: ``<prefix>/services/<service>/<instance>`` under a lease.

The value is JSON (:class:`Instance`): the address clients call, the service's name,
the instance id and its start time. The key is attached to a lease of
``lease_ttl`` seconds, renewed every third of that; so an instance that stops
renewing (killed with ``kill -9``, frozen, cut off) leaves the registry at most
``lease_ttl`` seconds later, when etcd expires the lease and deletes the key.

* **Graceful stop**: the lease is revoked, which deletes the key at once.
* **etcd down**: the keep-alive fails; it is tried again (pauses doubling up to a
  third of the TTL), the failure logged once per outage, and the instance goes on
  serving. When etcd answers again, the lease is renewed if it is still alive;
  if it expired meanwhile (etcd answers a TTL of 0), a new lease is granted and the
  key written again.
* **Start with etcd down**: :meth:`Registration.start` does not wait for etcd; the
  keep-alive loop registers as soon as etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from imserver.discovery.etcd import EtcdClient, EtcdUnavailable
from imserver.discovery.watch import Backoff

logger = logging.getLogger(__name__)


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """What a registration key holds."""

    service: str
    instance: str
    address: str
    """``host:port`` of the instance's gRPC server."""
    started: float
    """Unix time the instance started."""


def services_prefix(prefix: str, service: str) -> str:
    """The key prefix of every instance of ``service`` (ending with ``/``)."""
    return f"{prefix.rstrip('/')}/services/{service}/"


def instance_key(prefix: str, service: str, instance: str) -> str:
    """The registration key of one instance."""
    return services_prefix(prefix, service) + instance


class Registration:
    """One instance's registration, kept alive until :meth:`stop`."""

    def __init__(
        self,
        client: EtcdClient,
        *,
        prefix: str,
        service: str,
        instance: str,
        address: str,
        ttl: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 2:
            raise ValueError("the lease TTL must be at least 2 seconds")
        self.client = client
        self.key = instance_key(prefix, service, instance)
        self.ttl = ttl
        self.record = Instance(service=service, instance=instance, address=address, started=clock())
        self.lease = 0
        """The lease in force (0: not registered now)."""
        self.registrations = 0
        """Leases granted so far: 1 after the first registration, more after each lost lease."""
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()

    async def _register(self) -> None:
        lease = await self.client.grant(self.ttl)
        await self.client.put(self.key, msgspec.json.encode(self.record), lease=lease)
        self.lease = lease
        self.registrations += 1
        self._registered.set()
        logger.info("registered %s (lease %x, ttl %d s)", self.key, lease, self.ttl)

    def start(self) -> None:
        """Register and keep the lease alive, in a task of its own."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcd-lease {self.key}"
            )

    async def wait_registered(self, within: float | None = None) -> bool:
        """Wait for the first registration; False when ``within`` seconds ran out."""
        try:
            await asyncio.wait_for(self._registered.wait(), within)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        period = self.ttl / 3
        backoff = Backoff(period)
        failing = False
        while True:
            try:
                if not self.lease:
                    await self._register()
                elif await self.client.keepalive(self.lease) <= 0:
                    logger.warning("lease of %s expired; registering again", self.key)
                    self.lease = 0
                    await self._register()
                if failing:
                    logger.info("etcd reachable again: %s kept alive", self.key)
                    failing = False
                backoff.reset()
                await asyncio.sleep(period)
            except EtcdUnavailable as exc:
                if not failing:
                    logger.warning("cannot renew %s, retrying: %s", self.key, exc)
                    failing = True
                await asyncio.sleep(backoff.next())
            except Exception:  # a bug or an answer not foreseen: keep the instance registered
                logger.exception("keep-alive of %s failed; trying again", self.key)
                await asyncio.sleep(backoff.next())

    async def stop(self) -> None:
        """Stop renewing and revoke the lease (the key goes at once); a failure to
        reach etcd is logged: the key then goes when the lease expires."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.lease:
            try:
                await self.client.revoke(self.lease)
                logger.info("deregistered %s", self.key)
            except EtcdUnavailable as exc:
                logger.warning(
                    "could not revoke %s (it expires in %d s): %s", self.key, self.ttl, exc
                )
            self.lease = 0
