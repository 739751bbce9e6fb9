"""The HTTP port of a process without a gateway: ``/healthz``, ``/readyz``, ``/metrics``.

A process of the distributed mode that runs only services behind the gateways
(``imserver serve --services message``) serves no client; its HTTP port answers
the orchestrator's probes and the metrics scraper, and every other path
``404``. ``/readyz`` answers 200 once the process is serving and every local
service reaches its store, 503 while it starts or drains.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from imserver.utils.errors import IMError
from imserver.utils.metrics import Metrics


class Health:
    """The handlers; ``ready`` gates ``/readyz`` (set once serving, cleared on stop)."""

    def __init__(self, check: Callable[[], Awaitable[None]], metrics: Metrics) -> None:
        self.ready = False
        self._check = check
        self._metrics = metrics

    async def healthz(self, request: web.Request) -> web.Response:
        """The process runs."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """The process serves and its services reach their stores."""
        if not self.ready:
            return web.json_response({"status": "unavailable"}, status=503)
        try:
            await self._check()
        except IMError as exc:
            return web.json_response({"status": "unavailable", "reason": exc.message}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        """The process's metrics, Prometheus text format."""
        return web.Response(
            body=self._metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def health_app(health: Health) -> web.Application:
    """The application of the three routes."""
    app = web.Application()
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    return app
