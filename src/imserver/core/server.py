"""The composition root: builds every service and backend from the configuration.

Embedded mode wires the six services in one process: SQLite files under the data
directory, the in-memory live bus, and direct Python calls between services. This is
the one place that knows which implementation stands behind each interface.

Shutdown order (SIGINT/SIGTERM): stop accepting connections; refuse new writes;
commit and acknowledge every write already queued; send ``closed {shutdown}`` to
every session and wait (bounded) for their queues to flush; close the databases.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from imserver.network.http import app_runner
from imserver.network.listener import Admission, Listener, system_backlog
from imserver.network.tcp import serve_tcp
from imserver.network.ws import WsEntry, serve_http
from imserver.services.file.service import LocalFileService, open_file_service
from imserver.services.gateway.http_api import HttpApi, build_app
from imserver.services.gateway.service import Gateway
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.room.service import LocalRoomService, open_room_service
from imserver.services.user.service import LocalUserService, open_user_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import sqlite_url, upgrade
from imserver.utils.config import Config
from imserver.utils.metrics import Metrics

logger = logging.getLogger(__name__)

SERVICES_WITH_DATABASES = {
    "user": "imserver.services.user.migrations",
    "message": "imserver.services.message.migrations",
    "room": "imserver.services.room.migrations",
    "file": "imserver.services.file.migrations",
}


async def migrate(config: Config) -> None:
    """Apply every service's pending migrations."""
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for service, package in SERVICES_WITH_DATABASES.items():
        await upgrade(sqlite_url(data_dir, service), package)


class Server:
    """One embedded IMServer process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.gateway: Gateway | None = None
        self.users: LocalUserService | None = None
        self.messages: LocalMessageService | None = None
        self.rooms: LocalRoomService | None = None
        self.files: LocalFileService | None = None
        self._runner: web.AppRunner | None = None
        self._api: HttpApi | None = None
        self._tcp: Listener | None = None
        self._http: Listener | None = None
        self._admission: Admission | None = None
        self._ws: WsEntry | None = None
        self.http_port = config.http_port
        self.tcp_port = config.tcp_port

    async def start(self) -> None:
        """Open the stores, build the services and start listening."""
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        bus = MemoryLiveBus()
        self.users = await open_user_service(
            sqlite_url(data_dir, "user"),
            access_ttl=cfg.auth.access_ttl,
            refresh_ttl=cfg.auth.refresh_ttl,
            argon2_memory_kib=cfg.auth.argon2_memory_kib,
            argon2_time_cost=cfg.auth.argon2_time_cost,
        )
        # The room and message services use each other: the room service is built
        # first, serves the message service as its room directory, and is then bound
        # to it (system messages) and to the gateway's hub (who is online).
        self.rooms = await open_room_service(
            sqlite_url(data_dir, "room"), users=self.users, max_room_size=cfg.rooms.max_size
        )
        # The file service, too, is built before the message service (its file
        # directory for image/file sends) and bound to it after (membership, references).
        self.files = await open_file_service(
            sqlite_url(data_dir, "file"), data_dir=data_dir, config=cfg.files
        )
        self.messages = await open_message_service(
            sqlite_url(data_dir, "message"),
            bus=bus,
            users=self.users,
            rooms=self.rooms,
            files=self.files,
            max_body=cfg.limits.max_body,
            max_meta=cfg.limits.max_meta,
            batch_max=cfg.storage.batch_max,
        )
        self.rooms.bind(messages=self.messages)
        self.files.bind(messages=self.messages)
        gateway = self.gateway = Gateway(
            cfg,
            users=self.users,
            messages=self.messages,
            rooms=self.rooms,
            bus=bus,
            metrics=self.metrics,
        )
        self.rooms.bind(online=gateway.hub)
        gateway.start()
        app, self._api = build_app(gateway, self.files)
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
        self._tcp = await serve_tcp(gateway, cfg.host, cfg.tcp_port, backlog, admission)
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

    async def stop(self) -> None:
        """Shut down gracefully; nothing acknowledged is lost."""
        if self._api is not None:
            self._api.ready = False
        if self._tcp is not None:
            self._tcp.close()
        if self.gateway is not None:
            self.gateway.draining = True
        if self.messages is not None:
            await self.messages.flush()
        if self.gateway is not None:
            await self.gateway.shutdown()
        if self._http is not None:  # open until now to answer "unavailable" while draining
            self._http.close()
        if self._ws is not None:
            await self._ws.wait_closed(self.config.shutdown_grace)
        if self._admission is not None:
            self._admission.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.messages is not None:
            await self.messages.close()
        if self.rooms is not None:
            await self.rooms.close()
        if self.files is not None:
            await self.files.close()
        if self.users is not None:
            await self.users.close()
        logger.info("imserver stopped")
