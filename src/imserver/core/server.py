"""The server process: the services (:func:`~imserver.core.embedded.build_embedded`),
the gateway in front of them, the listeners, and the order of shutdown.

Shutdown order (SIGINT/SIGTERM): stop accepting connections; refuse new writes;
commit and acknowledge every write already queued; send ``closed {shutdown}`` to
every session and wait (bounded) for their queues to flush and for every connection
to have finished (its end handled: presence, which in the distributed mode is a call
to the user service); close the databases.
A process of the distributed mode leaves the service registry first (in the
services' drain), and stops its gRPC server (calls in flight finish within
``shutdown_grace``) before its services close.

With ``[etcd] endpoints`` set, the process watches the dynamic settings in etcd
(:class:`~imserver.discovery.config_centre.ConfigCentre`) from before the services
are built, so the stored values are in force from the first request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from imserver.core.embedded import Services, build_embedded
from imserver.core.health import Health, health_app
from imserver.network.http import app_runner
from imserver.network.listener import Admission, Listener, system_backlog
from imserver.network.tcp import TcpConnections, serve_tcp
from imserver.network.ws import WsEntry, serve_http
from imserver.services.gateway.http_api import HttpApi, build_app
from imserver.services.gateway.service import Gateway
from imserver.storage.databases import redacted, service_database
from imserver.storage.sql import upgrade
from imserver.utils.config import Config
from imserver.utils.live import LiveSettings
from imserver.utils.metrics import EventMetrics, Metrics

if TYPE_CHECKING:  # imported when [etcd] endpoints is set: gRPC stays out of the rest
    from imserver.discovery.config_centre import ConfigCentre
    from imserver.discovery.etcd import EtcdClient

logger = logging.getLogger(__name__)

SERVICES_WITH_DATABASES = {
    "user": "imserver.services.user.migrations",
    "message": "imserver.services.message.migrations",
    "room": "imserver.services.room.migrations",
    "file": "imserver.services.file.migrations",
    "notification": "imserver.services.notification.migrations",
}


async def migrate(config: Config, url: str | None = None) -> list[str]:
    """Apply every service's pending migrations; ``url`` stands for ``storage.url``.
    Returns one line per service: its name and its database (password masked)."""
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    storage = config.storage
    if url is not None:
        storage = msgspec.structs.replace(storage, url=url)
    lines = []
    for service, package in SERVICES_WITH_DATABASES.items():
        database = service_database(storage, data_dir, service).url
        await upgrade(database, package)
        lines.append(f"{service}\t{redacted(database)}")
    return lines


def _event_metrics(services: Services) -> EventMetrics | None:
    """The event stream's counters of this process, when it runs the stream."""
    return services.events.metrics if services.events is not None else None


class Server:
    """One IMServer process: embedded (every service), or, given ``services``, the
    process of the distributed mode that runs those
    (:func:`~imserver.core.distributed.build_distributed`, which alone imports gRPC)."""

    def __init__(
        self,
        config: Config,
        services: frozenset[str] | None = None,
        *,
        rpc_port: int | None = None,
    ) -> None:
        self.config = config
        self.names = services
        """The services of this process (None: embedded, all of them)."""
        self.rpc_port = rpc_port
        self.metrics = Metrics()
        self.live = LiveSettings(config)
        """The dynamic settings in force (docs/operations.md, "The config centre")."""
        self._etcd: EtcdClient | None = None
        self.config_centre: ConfigCentre | None = None
        self.gateway: Gateway | None = None
        self.services: Services | None = None
        self._health: Health | None = None
        self._runner: web.AppRunner | None = None
        self._api: HttpApi | None = None
        self._tcp: Listener | None = None
        self._http: Listener | None = None
        self._admission: Admission | None = None
        self._ws: WsEntry | None = None
        self._tcp_connections: TcpConnections | None = None
        self.http_port = config.http_port
        self.tcp_port = config.tcp_port

    async def start(self) -> None:
        """Open the stores, build the services and start listening."""
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        if cfg.etcd.endpoints:
            await self._watch_config()
        services: Services
        if self.names is None:
            services = await build_embedded(cfg, self.live)
        else:
            from imserver.core.distributed import build_distributed

            assert self._etcd is not None, "check_plan requires [etcd] endpoints"
            distributed = await build_distributed(
                cfg,
                self.names,
                self._etcd,
                live=self.live,
                metrics=self.metrics.discovery,
                rpc_port=self.rpc_port,
            )
            services = distributed
            if "gateway" not in self.names:
                self.services = services
                self.metrics.push = services.push_metrics
                self.metrics.events = _event_metrics(services)
                await self._serve_health(distributed.check)
                return
        self.services = services
        self.metrics.push = services.push_metrics
        self.metrics.events = _event_metrics(services)
        gateway = self.gateway = Gateway(
            cfg,
            users=services.users,
            messages=services.messages,
            rooms=services.rooms,
            broadcasts=services.broadcasts,
            notifications=services.notifications,
            bus=services.bus,
            metrics=self.metrics,
            live=self.live,
        )
        gateway.start()
        app, self._api = build_app(gateway, services.files)
        self._runner = app_runner(app)
        await self._runner.setup()
        assert self._runner.server is not None
        lim = cfg.limits
        admission = self._admission = Admission(
            reserved_fds=lim.reserved_fds,
            max_per_address=lim.max_connections_per_ip,
            metrics=self.metrics,
        )
        backlog = cfg.listen_backlog or system_backlog()
        self._http, self._ws = await serve_http(
            gateway, self._runner.server, cfg.host, cfg.http_port, backlog, admission
        )
        self._tcp, self._tcp_connections = await serve_tcp(
            gateway, cfg.host, cfg.tcp_port, backlog, admission
        )
        self.http_port = self._http.port
        self.tcp_port = self._tcp.port
        self._api.ready = True
        logger.info(
            "imserver listening: http/ws %s:%d, tcp %s:%d, backlog %d, data %s",
            cfg.host,
            self.http_port,
            cfg.host,
            self.tcp_port,
            backlog,
            data_dir.resolve(),
        )
        budget = admission.budget
        if budget.enabled:
            logger.info(
                "descriptors: limit %d, accepting stops at %d open",
                budget.limit,
                budget.high,
            )

    async def _serve_health(self, check: Callable[[], Awaitable[None]]) -> None:
        """A process without a gateway: only the probes and the metrics on HTTP."""
        cfg = self.config
        health = self._health = Health(check, self.metrics)
        self._runner = web.AppRunner(health_app(health), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port)
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        health.ready = True
        logger.info(
            "imserver services %s: http %s:%d (probes and metrics)",
            ",".join(sorted(self.names or ())),
            cfg.host,
            self.http_port,
        )

    async def _watch_config(self) -> None:
        from imserver.discovery.config_centre import ConfigCentre
        from imserver.discovery.etcd import EtcdClient

        etcd = self.config.etcd
        self._etcd = EtcdClient(etcd.endpoints, timeout=etcd.request_timeout)
        centre = self.config_centre = ConfigCentre(
            self._etcd,
            self.live,
            prefix=etcd.prefix,
            metrics=self.metrics.discovery,
            retry_max=etcd.retry_max,
        )
        centre.start()
        if not await centre.wait_synced(etcd.request_timeout):
            logger.warning(
                "etcd did not answer within %s s: starting on the configured settings; "
                "the stored ones apply once it answers",
                etcd.request_timeout,
            )

    async def stop(self) -> None:
        """Shut down gracefully; nothing acknowledged is lost."""
        if self._api is not None:
            self._api.ready = False
        if self._health is not None:
            self._health.ready = False
        if self._tcp is not None:
            self._tcp.close()
        if self.gateway is not None:
            self.gateway.draining = True
        if self.services is not None:
            await self.services.drain()
        if self.gateway is not None:
            await self.gateway.shutdown()
        if self._http is not None:  # open until now to answer "unavailable" while draining
            self._http.close()
        if self._ws is not None:
            await self._ws.wait_closed(self.config.shutdown_grace)
        if self._tcp_connections is not None:
            await self._tcp_connections.wait_closed(self.config.shutdown_grace)
        if self._admission is not None:
            self._admission.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.services is not None:
            await self.services.close()
        if self.config_centre is not None:
            await self.config_centre.stop()
        if self._etcd is not None:
            await self._etcd.close()
        logger.info("imserver stopped")
