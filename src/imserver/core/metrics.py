"""Prometheus metrics of one server: connections, ops by name and result, ack latency.

A private registry per server keeps test servers in one process apart. Label
children are cached so the per-op cost is a dict lookup and an increment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The server's metric families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "imserver_connections", "Open client connections", ["transport"], registry=self.registry
        )
        self._ops = Counter(
            "imserver_ops",
            "Ops handled, by op name and result",
            ["op", "result"],
            registry=self.registry,
        )
        self.ack_latency = Histogram(
            "imserver_ack_latency_seconds",
            "Time from receiving a send/edit/recall/react to writing its reply",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.slow_consumers = Counter(
            "imserver_slow_consumers",
            "Sessions closed because their queue overflowed",
            registry=self.registry,
        )
        self.deliveries = Counter(
            "imserver_deliveries", "Events queued to sessions", registry=self.registry
        )
        self._op_children: dict[tuple[str, str], Counter] = {}
        self._conn_children: dict[str, Gauge] = {}

    def op(self, name: str, result: str) -> None:
        """Count one op with its result (``ok`` or an error code)."""
        child = self._op_children.get((name, result))
        if child is None:
            child = self._op_children[(name, result)] = self._ops.labels(name, result)
        child.inc()

    def connection(self, transport: str, delta: int) -> None:
        """Add ``delta`` to the open-connection gauge of ``transport``."""
        child = self._conn_children.get(transport)
        if child is None:
            child = self._conn_children[transport] = self.connections.labels(transport)
        child.inc(delta)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]
