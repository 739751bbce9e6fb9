"""Client-side balancing over the registered instances of one service.

:class:`ServiceUpstream` watches ``<prefix>/services/<service>/`` (a
:class:`~imserver.discovery.watch.PrefixWatch`) and keeps one :class:`InstanceEndpoint`
per instance: its channel (made by the injected channel factory, a ``grpc.aio``
insecure channel by default) and its circuit breaker. An instance that leaves the
registry leaves the rotation at once and its channel is closed; one whose address
changed gets a new channel. While etcd is down the mirror keeps its last known
instances, so calls go on to them.

**Round robin** over the instances whose breaker lets a call through: each
:meth:`~ServiceUpstream.pick` starts one past the previous pick and skips open
breakers (and half-open ones with no probe slot left). Round robin was chosen over
power of two choices: the calls of a gateway to a service are short and uniform, the
instances alike, and the breaker already takes a failing instance out; two choices
pays off when load per instance differs and is known, which would need in-flight
counts the caller does not report. With no instance able to take a call, ``pick``
raises :class:`~imserver.utils.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from imserver.discovery.breaker import STATE_VALUES, Breaker, BreakerPolicy, State
from imserver.discovery.etcd import Entry, EtcdClient
from imserver.discovery.registry import Instance, services_prefix
from imserver.discovery.watch import PrefixWatch
from imserver.rpc.upstream import Upstream
from imserver.utils.errors import Unavailable
from imserver.utils.metrics import DiscoveryMetrics

logger = logging.getLogger(__name__)


class Closable(Protocol):
    """What the balancer needs of a channel: closing it (``grpc.aio.Channel`` is one)."""

    async def close(self, grace: float | None = None) -> None: ...


ChannelFactory = Callable[[str], Any]
"""An instance's address (``host:port``) → its channel."""


def grpc_channel(address: str) -> Any:
    """The default channel factory: an insecure ``grpc.aio`` channel to ``address``."""
    import grpc.aio

    return grpc.aio.insecure_channel(address)


class InstanceEndpoint:
    """One instance: its key, address, channel and breaker (an ``Endpoint``)."""

    __slots__ = ("address", "breaker", "channel", "instance", "key")

    def __init__(self, key: str, instance: str, address: str, channel: Any, breaker: Breaker):
        self.key = key
        self.instance = instance
        self.address = address
        self.channel = channel
        self.breaker = breaker

    def succeeded(self) -> None:
        """The instance answered the call."""
        self.breaker.success()

    def failed(self) -> None:
        """The instance did not answer the call."""
        self.breaker.failure()

    def __repr__(self) -> str:
        return f"InstanceEndpoint({self.key!r}, {self.address!r}, {self.breaker.state.value})"


def _rank(affinity: str, instance: str) -> int:
    """The weight of ``instance`` for ``affinity`` (rendezvous hashing)."""
    digest = hashlib.blake2b(f"{affinity}\0{instance}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def first_for(affinity: str, keys: Iterable[str]) -> str:
    """The instance key among ``keys`` that ranks first for ``affinity``: where the
    calls with that affinity go while every one of those instances takes calls."""
    return max(keys, key=lambda key: _rank(affinity, key))


class Balancer:
    """The endpoints of one service and the round robin over them (see the module
    docstring); :meth:`update` is told the registry's contents."""

    def __init__(
        self,
        service: str,
        channel_factory: ChannelFactory = grpc_channel,
        *,
        policy: BreakerPolicy | None = None,
        metrics: DiscoveryMetrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.service = service
        self.policy = policy or BreakerPolicy()
        self._factory = channel_factory
        self._metrics = metrics
        self._clock = clock
        self.endpoints: dict[str, InstanceEndpoint] = {}
        self._order: list[InstanceEndpoint] = []
        self._next = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _breaker_moved(self, breaker: Breaker, old: State, new: State) -> None:
        log = logger.warning if new is State.OPEN else logger.info
        log("breaker of %s instance %s: %s -> %s", self.service, breaker.name, old.value, new.value)
        if self._metrics is not None:
            self._metrics.breaker_state[(self.service, breaker.name)] = STATE_VALUES[new]
            self._metrics.breaker_transitions[
                (self.service, breaker.name, old.value, new.value)
            ] += 1

    def _add(self, key: str, record: Instance) -> None:
        kwargs: dict[str, Any] = {"name": record.instance, "listener": self._breaker_moved}
        if self._clock is not None:
            kwargs["clock"] = self._clock
        breaker = Breaker(self.policy, **kwargs)
        channel = self._factory(record.address)
        self.endpoints[key] = InstanceEndpoint(
            key, record.instance, record.address, channel, breaker
        )
        if self._metrics is not None:
            self._metrics.breaker_state[(self.service, record.instance)] = STATE_VALUES[
                State.CLOSED
            ]
        logger.info("%s instance %s at %s joined", self.service, record.instance, record.address)

    def _remove(self, key: str) -> None:
        endpoint = self.endpoints.pop(key)
        if self._metrics is not None:
            self._metrics.breaker_state.pop((self.service, endpoint.instance), None)
        self._close_channel(endpoint.channel)
        logger.info("%s instance %s at %s left", self.service, endpoint.instance, endpoint.address)

    def _close_channel(self, channel: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing can be pending on the channel either
            return
        task = loop.create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def update(self, entries: dict[str, Entry], revision: int = 0) -> None:
        """Match the endpoints to the registry's ``entries`` (key → entry)."""
        wanted: dict[str, Instance] = {}
        for key, entry in entries.items():
            try:
                wanted[key] = msgspec.json.decode(entry.value, type=Instance)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("ignoring the registration %s: %s", key, exc)
        for key in [k for k in self.endpoints if k not in wanted]:
            self._remove(key)
        for key, record in wanted.items():
            current = self.endpoints.get(key)
            if current is not None and current.address != record.address:
                self._remove(key)
                current = None
            if current is None:
                self._add(key, record)
        self._order = [self.endpoints[k] for k in sorted(self.endpoints)]
        if self._order:
            self._next %= len(self._order)

    def pick(self, affinity: str | None = None) -> InstanceEndpoint:
        """The next endpoint whose breaker lets a call through; ``Unavailable`` if none.

        With an ``affinity`` key: the endpoint that ranks first for the key among
        those whose breaker lets a call through (rendezvous hashing), so one key keeps
        its instance while the instances stay, and only the keys of an instance that
        leaves or fails move."""
        order = self._order
        count = len(order)
        if affinity is not None and count:
            ranked = sorted(order, key=lambda e: _rank(affinity, e.key), reverse=True)
            for endpoint in ranked:
                if endpoint.breaker.allow():
                    return endpoint
        for step in range(count):
            index = (self._next + step) % count
            endpoint = order[index]
            if endpoint.breaker.allow():
                self._next = (index + 1) % count
                return endpoint
        if not count:
            raise Unavailable(f"no instance of the {self.service} service is registered")
        raise Unavailable(f"no instance of the {self.service} service can take calls now")

    async def close(self) -> None:
        """Close every channel."""
        for key in list(self.endpoints):
            self._remove(key)
        self._order = []
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class ServiceUpstream:
    """The ``Upstream`` of one service found through etcd: a registry watch feeding a
    :class:`Balancer`."""

    def __init__(
        self,
        client: EtcdClient,
        *,
        prefix: str,
        service: str,
        channel_factory: ChannelFactory = grpc_channel,
        policy: BreakerPolicy | None = None,
        metrics: DiscoveryMetrics | None = None,
        retry_max: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.balancer = Balancer(
            service, channel_factory, policy=policy, metrics=metrics, clock=clock
        )
        self.watch = PrefixWatch(
            client, services_prefix(prefix, service), self.balancer.update, retry_max=retry_max
        )

    def start(self) -> None:
        """Start watching the registry."""
        self.watch.start()

    async def wait_synced(self, within: float | None = None) -> bool:
        """Wait for the first read of the registry; False when ``within`` seconds ran out."""
        return await self.watch.wait_synced(within)

    def pick(self, affinity: str | None = None) -> InstanceEndpoint:
        """See :meth:`Balancer.pick`."""
        return self.balancer.pick(affinity)

    async def stop(self) -> None:
        """Stop watching and close every channel."""
        await self.watch.stop()
        await self.balancer.close()


def as_upstream(upstream: ServiceUpstream) -> Upstream:
    """``upstream`` as the interface the gRPC clients take (mypy checks the fit)."""
    return upstream
