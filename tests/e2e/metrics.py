"""The server's Prometheus metrics (``GET /metrics``) as e2e tests read them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from imserver.client import HttpClient

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: HttpClient) -> Samples:
    """Every sample of ``/metrics``, by (name, labels)."""
    status, headers, raw = await http.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for line in raw.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


async def scrape_server(server: Any) -> Samples:
    """The samples of every process of ``server`` (its ``metrics_urls``: the one
    server's, or each member's of a cluster), summed by (name, labels): a
    deployment's counters and gauges are the sums of its processes'."""
    total: Samples = {}
    for url in server.metrics_urls:
        async with HttpClient(url) as http:
            for key, value in (await scrape(http)).items():
                total[key] = total.get(key, 0.0) + value
    return total


async def server_metric_reaches(
    server: Any,
    name: str,
    accept: Callable[[float], bool],
    *,
    within: float = 10.0,
    **labels: str,
) -> float:
    """:func:`metric_reaches` over every process of ``server`` (:func:`scrape_server`)."""
    async with asyncio.timeout(within):
        while True:
            value = metric(await scrape_server(server), name, **labels)
            if accept(value):
                return value
            await asyncio.sleep(0.02)


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value (0 when the server has not reported it)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metric_reaches(
    http: HttpClient,
    name: str,
    accept: Callable[[float], bool],
    *,
    within: float = 10.0,
    **labels: str,
) -> float:
    """Scrape until the sample satisfies ``accept`` (the server's state changes after
    something the test cannot await, e.g. its side of a close); returns the value."""
    async with asyncio.timeout(within):
        while True:
            value = metric(await scrape(http), name, **labels)
            if accept(value):
                return value
            await asyncio.sleep(0.02)
