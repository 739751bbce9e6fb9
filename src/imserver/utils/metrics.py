"""Prometheus metrics of one server: connections, ops by name and result, ack latency.

The hot paths only touch plain Python integers (no locks: everything runs on the
event loop); a custom collector turns them into Prometheus families when
``/metrics`` is scraped. A private registry per server keeps test servers apart.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Count:
    """A lock-free counter (event-loop thread only)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Histogram:
    """A cumulative histogram over fixed upper bounds (event-loop thread only)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class PushMetrics:
    """The notification service's counters (event-loop thread only): pushes by
    provider and final answer of an attempt, dead letters, drops, and the queue depth
    per provider (refreshed by the worker at most once a second)."""

    def __init__(self) -> None:
        self.results: Counter[tuple[str, str]] = Counter()
        self.dead = 0
        self.dropped = 0
        self.depth: dict[str, int] = {}


class EventMetrics:
    """The durable event stream's figures (event-loop thread only): the events each
    consumer group dead-lettered, and the rows of each outbox relay's last claim
    (at the relay's claim limit while it is behind its writer)."""

    def __init__(self) -> None:
        self.dead: dict[str, int] = {}
        """group -> events sent to its dead-letter queue."""
        self.claims: dict[str, int] = {}
        """service -> rows in its relay's last claim."""


class DiscoveryMetrics:
    """Circuit breakers and the config centre (event-loop thread only): each breaker's
    state by (service, instance), its transitions by (service, instance, from, to),
    the etcd revision of the newest dynamic setting applied and the changes applied
    or ignored by setting name."""

    def __init__(self) -> None:
        self.breaker_state: dict[tuple[str, str], int] = {}
        """0 closed, 1 half-open, 2 open."""
        self.breaker_transitions: Counter[tuple[str, str, str, str]] = Counter()
        self.config_revision = 0
        self.config_changes: Counter[tuple[str, str]] = Counter()
        """(name, ``applied`` or ``ignored``)."""


class Metrics(Collector):
    """The server's metric values and their Prometheus exposition."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], int] = {}
        self.connections: dict[str, int] = {}
        self.ack_latency = Histogram(ACK_BUCKETS)
        self.slow_consumers = Count()
        self.encode_failures: dict[tuple[str, str], int] = {}
        self.accept_paused = 0
        self.accept_pauses = Count()
        self.refused_per_address = Count()
        self.refused_at_limit = Count()
        self.bus_gaps = Count()
        self.bus_fills = Count()
        self.push: PushMetrics | None = None
        """The notification service's counters, when it runs in this process."""
        self.discovery = DiscoveryMetrics()
        self.events: EventMetrics | None = None
        """The event stream's figures, when it runs in this process."""
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def op(self, name: str, result: str) -> None:
        """Count one op with its result (``ok`` or an error code)."""
        key = (name, result)
        self.ops[key] = self.ops.get(key, 0) + 1

    def connection(self, transport: str, delta: int) -> None:
        """Add ``delta`` to the open-connection gauge of ``transport``."""
        self.connections[transport] = self.connections.get(transport, 0) + delta

    def encode_failure(self, frame: str, codec: str) -> None:
        """Count one ``reply`` or ``event`` that could not be encoded in ``codec``."""
        key = (frame, codec)
        self.encode_failures[key] = self.encode_failures.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "imserver_connections", "Open client connections", labels=["transport"]
        )
        for transport, value in sorted(self.connections.items()):
            conns.add_metric([transport], value)
        yield conns
        ops = CounterMetricFamily(
            "imserver_ops", "Ops handled, by op name and result", labels=["op", "result"]
        )
        for (name, result), value in sorted(self.ops.items()):
            ops.add_metric([name, result], value)
        yield ops
        hist = self.ack_latency
        yield HistogramMetricFamily(
            "imserver_ack_latency_seconds",
            "Time from receiving a send/edit/recall/react to writing its reply",
            buckets=hist.buckets(),
            sum_value=hist.sum,
        )
        yield CounterMetricFamily(
            "imserver_slow_consumers",
            "Sessions closed because their queue overflowed",
            value=self.slow_consumers.value,
        )
        failures = CounterMetricFamily(
            "imserver_encode_failures",
            "Replies and events that could not be encoded in a session's codec",
            labels=["frame", "codec"],
        )
        for (frame, codec), value in sorted(self.encode_failures.items()):
            failures.add_metric([frame, codec], value)
        yield failures
        yield GaugeMetricFamily(
            "imserver_accept_paused",
            "1 while the listeners stop accepting to keep descriptors in reserve",
            value=self.accept_paused,
        )
        yield CounterMetricFamily(
            "imserver_accept_pauses",
            "Times the listeners stopped accepting near the descriptor limit",
            value=self.accept_pauses.value,
        )
        yield CounterMetricFamily(
            "imserver_connections_refused_at_limit",
            "Connections closed on accept: taken in the same turn that reached the descriptor mark",
            value=self.refused_at_limit.value,
        )
        yield CounterMetricFamily(
            "imserver_connections_refused_per_address",
            "Connections closed on accept: their address had max_connections_per_ip open",
            value=self.refused_per_address.value,
        )
        yield CounterMetricFamily(
            "imserver_bus_gaps",
            "Live-bus losses (missing positions, a broken broker connection); "
            "the sessions concerned were closed with resync",
            value=self.bus_gaps.value,
        )
        yield CounterMetricFamily(
            "imserver_bus_fills",
            "Live-bus gaps filled from the stored messages, with no session closed",
            value=self.bus_fills.value,
        )

        if self.push is not None:
            yield from self._push_families(self.push)
        yield from self._discovery_families(self.discovery)
        if self.events is not None:
            yield from self._event_families(self.events)

    @staticmethod
    def _event_families(events: EventMetrics) -> Iterator[Metric]:
        dead = CounterMetricFamily(
            "imserver_events_dead",
            "Durable events dead-lettered after their last attempt, by consumer group",
            labels=["group"],
        )
        for group, value in sorted(events.dead.items()):
            dead.add_metric([group], value)
        yield dead
        claim = GaugeMetricFamily(
            "imserver_outbox_claim",
            "Rows in the outbox relay's last claim (at its limit while it is behind)",
            labels=["service"],
        )
        for service, value in sorted(events.claims.items()):
            claim.add_metric([service], value)
        yield claim

    @staticmethod
    def _discovery_families(disc: DiscoveryMetrics) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "imserver_breaker_state",
            "Circuit breaker of each instance called: 0 closed, 1 half-open, 2 open",
            labels=["service", "instance"],
        )
        for (service, instance), value in sorted(disc.breaker_state.items()):
            state.add_metric([service, instance], value)
        yield state
        moves = CounterMetricFamily(
            "imserver_breaker_transitions",
            "Circuit breaker state changes",
            labels=["service", "instance", "from_state", "to_state"],
        )
        for labels, value in sorted(disc.breaker_transitions.items()):
            moves.add_metric(list(labels), value)
        yield moves
        yield GaugeMetricFamily(
            "imserver_config_revision",
            "etcd revision of the newest dynamic setting applied (0: none)",
            value=disc.config_revision,
        )
        changes = CounterMetricFamily(
            "imserver_config_changes",
            "Dynamic setting changes seen in etcd, applied or ignored (ill-typed, unknown)",
            labels=["name", "result"],
        )
        for (name, result), value in sorted(disc.config_changes.items()):
            changes.add_metric([name, result], value)
        yield changes

    @staticmethod
    def _push_families(push: PushMetrics) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "imserver_push",
            "Push attempts by provider and the state they left the push in",
            labels=["provider", "result"],
        )
        for (provider, result), value in sorted(push.results.items()):
            total.add_metric([provider, result], value)
        yield total
        yield CounterMetricFamily(
            "imserver_push_dead",
            "Pushes dead-lettered after their last attempt",
            value=push.dead,
        )
        yield CounterMetricFamily(
            "imserver_push_dropped",
            "Waiting pushes dropped because their provider's queue was full",
            value=push.dropped,
        )
        depth = GaugeMetricFamily(
            "imserver_push_queue_depth", "Pushes waiting, by provider", labels=["provider"]
        )
        for provider, value in sorted(push.depth.items()):
            depth.add_metric([provider], value)
        yield depth

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
