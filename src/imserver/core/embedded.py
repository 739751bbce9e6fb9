"""The composition root of embedded mode: every service in one process.

:func:`build_embedded` turns the configuration into running services — their
databases (by default SQLite files under the data directory; ``storage`` settings,
:mod:`imserver.storage.databases`), the in-memory live bus, direct calls between services —
and answers them as their interfaces (:class:`Embedded`). It is the one place that
knows which implementation stands behind each interface; the process around it
(listeners, the gateway, shutdown order) is :mod:`imserver.core.server`. The
distributed mode's counterpart, some services per process and gRPC clients of the
others, is :func:`imserver.core.distributed.build_distributed`.

Services are complete when their constructor returns: nothing is bound or set on
them afterwards. Three pairs of services call each other — the room and message
services (system messages one way, room members the other), the file and message
services (membership and references one way, file references the other) and the
notification and message services (committed batches one way, badges, membership
checks and the start-up catch-up the other) — so a
cycle is broken deliberately, by service discovery: the room and file services are
built first (the notification service too) and reach the message service through a
:data:`~imserver.services.peers.Peer`, a lookup asked on every call, which this module
answers from the services it has built (``unavailable`` until the message service
exists, which no call can meet: nothing calls the services before
:func:`build_embedded` returns). The message service is then built with the room and
file services themselves. In a distributed mode the same lookup answers a gRPC client
of an instance found in the service registry.

With ``[events] backend = "rabbitmq"`` the message, room and file services write
their events into outboxes, and :mod:`imserver.core.events` starts the relays and
the notification service's consumer: the message service is then built without its
commit listener, and the notification service without its start-up catch-up. Off
(the default), nothing of the event stream is built or imported.

The room service needs no link to the gateway: who is online comes from the user
service's presence records, which the gateway keeps.

With ``live = "redis"`` the live bus, the user service's online set and the
notification service's online devices are Redis's (:func:`live_backends`, which
alone imports redis), under an instance id of this process: several embedded
processes on one database then deliver live events to each other's clients and
share presence.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from imserver.core.events import EventsRuntime, start_events
from imserver.services.file.api import FileService
from imserver.services.file.service import LocalFileService, open_file_service
from imserver.services.message.api import MessageService
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService, LocalBroadcastService
from imserver.services.notification.online import MemoryOnlineDevices, OnlineDevices
from imserver.services.notification.service import (
    LocalNotificationService,
    open_notification_service,
)
from imserver.services.room.api import RoomService
from imserver.services.room.service import LocalRoomService, open_room_service
from imserver.services.user.api import UserService
from imserver.services.user.online import MemoryOnlineStore, OnlineStore
from imserver.services.user.service import LocalUserService, open_user_service
from imserver.storage.bus import LiveBus, MemoryLiveBus
from imserver.storage.databases import SERVICES, redacted, service_database
from imserver.utils.config import Config
from imserver.utils.errors import Unavailable
from imserver.utils.live import LiveSettings
from imserver.utils.metrics import PushMetrics

logger = logging.getLogger(__name__)


class _Discovery:
    """Embedded service discovery: the message service, once it is built."""

    def __init__(self) -> None:
        self.message: LocalMessageService | None = None

    def messages(self) -> MessageService:
        if self.message is None:
            raise Unavailable("the message service is not running")
        return self.message


class Services(Protocol):
    """What the process around the services (:mod:`imserver.core.server`) asks of
    them: :class:`Embedded`, or a distributed process's
    :class:`~imserver.core.distributed.Distributed`."""

    @property
    def users(self) -> UserService: ...
    @property
    def messages(self) -> MessageService: ...
    @property
    def rooms(self) -> RoomService: ...
    @property
    def files(self) -> FileService: ...
    @property
    def broadcasts(self) -> BroadcastService: ...
    @property
    def notifications(self) -> NotificationService: ...
    @property
    def bus(self) -> LiveBus: ...
    @property
    def push_metrics(self) -> PushMetrics | None: ...
    @property
    def events(self) -> EventsRuntime | None: ...

    async def drain(self) -> None:
        """Commit and acknowledge every write already queued."""

    async def close(self) -> None:
        """Stop the services and release every store."""


@dataclass(frozen=True, eq=False)
class Embedded:
    """The services of one embedded process, as the interfaces the edge calls."""

    users: UserService
    messages: MessageService
    rooms: RoomService
    files: FileService
    broadcasts: BroadcastService
    notifications: NotificationService
    bus: LiveBus
    push_metrics: PushMetrics
    """The notification service's counters (for the process's ``/metrics``)."""
    _local_messages: LocalMessageService
    _closers: tuple[
        LocalMessageService,
        LocalNotificationService,
        LocalRoomService,
        LocalFileService,
        LocalUserService,
    ]
    events: EventsRuntime | None = None
    """The event stream's relays and consumer (None: ``[events] backend = "none"``)."""
    _close_live: Callable[[], Awaitable[None]] | None = field(default=None)
    """Closes a networked live bus, after the message writer that publishes on it."""

    async def drain(self) -> None:
        """Commit and acknowledge every write already queued (the first step of a
        shutdown, once the edge refuses new writes)."""
        await self._local_messages.flush()

    async def close(self) -> None:
        """Stop the message writer (after its queue), then the notification service
        (after storing what the writer handed it), and release every store. With the
        event stream: its consumer stops before the notification service, its relays
        after the producing services."""
        if self.events is not None:
            await self.events.close_consumers()
        for service in self._closers:
            await service.close()
        if self.events is not None:
            await self.events.close()
        if self._close_live is not None:
            await self._close_live()


@dataclass(frozen=True, eq=False)
class LiveBackends:
    """Where the live bus and presence live (the ``live`` setting)."""

    bus: LiveBus
    online: OnlineStore
    devices: OnlineDevices
    close: Callable[[], Awaitable[None]] | None = None


def instance_id() -> str:
    """This process's id among the instances sharing a Redis: host, pid and a
    random part (a restarted process is a new instance)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def live_backends(config: Config, instance: str | None = None) -> LiveBackends:
    """The live bus, the online set and the online devices ``config.live`` names:
    in memory, or in Redis (imported only then) under ``instance`` (by default a
    new :func:`instance_id`)."""
    if config.live == "memory":
        return LiveBackends(MemoryLiveBus(), MemoryOnlineStore(), MemoryOnlineDevices())
    from imserver.storage.bus_redis import RedisLiveBus
    from imserver.storage.online_redis import RedisOnlineDevices, RedisOnlineStore

    cfg = config.redis
    instance = instance or instance_id()
    bus = RedisLiveBus(cfg.url, prefix=cfg.prefix, keepalive=cfg.heartbeat)
    await bus.start()
    online = RedisOnlineStore(
        cfg.url, prefix=cfg.prefix, instance=instance, ttl=cfg.ttl, heartbeat=cfg.heartbeat
    )
    devices = RedisOnlineDevices(
        cfg.url, prefix=cfg.prefix, instance=instance, ttl=cfg.ttl, heartbeat=cfg.heartbeat
    )
    online.start()
    devices.start()
    logger.info("live bus and presence: redis %s, instance %s", redacted(cfg.url), instance)
    return LiveBackends(bus, online, devices, bus.close)


async def build_embedded(config: Config, live: LiveSettings | None = None) -> Embedded:
    """Open every service's database (migrating it) and build the services.

    ``live``: the dynamic settings the services read per request (the config
    centre changes them); without it, a fixed copy of the configuration's."""
    live = LiveSettings(config) if live is None else live
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    db = {name: service_database(config.storage, data_dir, name) for name in SERVICES}
    for name, database in db.items():
        lagging = database.read_url
        replica = f" (lag-tolerant reads: {redacted(lagging)})" if lagging else ""
        logger.info("%s database: %s%s", name, redacted(database.url), replica)
    discovery = _Discovery()
    shared = await live_backends(config)
    bus = shared.bus
    events = config.events.backend != "none"
    users = await open_user_service(
        db["user"].url,
        read_url=db["user"].read_url,
        access_ttl=config.auth.access_ttl,
        refresh_ttl=config.auth.refresh_ttl,
        argon2_memory_kib=config.auth.argon2_memory_kib,
        argon2_time_cost=config.auth.argon2_time_cost,
        admins=config.admins,
        online=shared.online,
    )
    rooms = await open_room_service(
        db["room"].url,
        read_url=db["room"].read_url,
        users=users,
        messages=discovery.messages,
        max_room_size=live.room_max_size,
        events=events,
    )
    files = await open_file_service(
        db["file"].url,
        data_dir=data_dir,
        config=config.files,
        messages=discovery.messages,
        max_size=live.upload_max_size,
        quota=live.upload_quota,
        events=events,
    )
    notifications = await open_notification_service(
        db["notification"].url,
        data_dir=data_dir,
        config=config.push,
        messages=discovery.messages,
        catch_up=not events,
        online=shared.devices,
    )
    messages = discovery.message = await open_message_service(
        db["message"].url,
        read_url=db["message"].read_url,
        bus=bus,
        users=users,
        rooms=rooms,
        files=files,
        listener=None if events else notifications,
        max_body=config.limits.max_body,
        max_meta=config.limits.max_meta,
        batch_max=config.storage.batch_max,
        events=events,
    )
    runtime = None
    if events:
        outboxes = {}
        for name, outbox in (
            ("message", messages.outbox),
            ("room", rooms.outbox),
            ("file", files.outbox),
        ):
            assert outbox is not None
            outboxes[name] = (db[name].url, outbox)
        runtime = await start_events(config.events, outboxes=outboxes, notifications=notifications)
    return Embedded(
        users=users,
        messages=messages,
        rooms=rooms,
        files=files,
        broadcasts=LocalBroadcastService(
            users=users, messages=messages, max_body=config.limits.max_body
        ),
        notifications=notifications,
        bus=bus,
        push_metrics=notifications.stats,
        _local_messages=messages,
        _closers=(messages, notifications, rooms, files, users),
        events=runtime,
        _close_live=shared.close,
    )
