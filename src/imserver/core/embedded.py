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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imserver.core.events import EventsRuntime
from imserver.core.live_backends import live_backends
from imserver.core.local_services import open_local_services, start_local_events
from imserver.services.file.api import FileService
from imserver.services.file.service import LocalFileService
from imserver.services.message.api import MessageService
from imserver.services.message.service import LocalMessageService
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService, LocalBroadcastService
from imserver.services.notification.service import LocalNotificationService
from imserver.services.room.api import RoomService
from imserver.services.room.service import LocalRoomService
from imserver.services.user.api import UserService
from imserver.services.user.service import LocalUserService
from imserver.storage.bus import LiveBus
from imserver.storage.databases import SERVICES, redacted, service_database
from imserver.utils.config import Config
from imserver.utils.errors import Unavailable
from imserver.utils.live import LiveSettings
from imserver.utils.metrics import PushMetrics

logger = logging.getLogger(__name__)


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
    shared = await live_backends(config)
    local: dict[str, Any] = {}

    def reach(name: str) -> Any:
        if name not in local:
            raise Unavailable(f"the {name} service is not running")
        return local[name]

    await open_local_services(
        config, SERVICES, local=local, reach=reach, db=db, live=live, shared=shared
    )
    users: LocalUserService = local["user"]
    rooms: LocalRoomService = local["room"]
    files: LocalFileService = local["file"]
    notifications: LocalNotificationService = local["notification"]
    messages: LocalMessageService = local["message"]
    runtime = await start_local_events(config, db, local)
    return Embedded(
        users=users,
        messages=messages,
        rooms=rooms,
        files=files,
        broadcasts=LocalBroadcastService(
            users=users, messages=messages, max_body=config.limits.max_body
        ),
        notifications=notifications,
        bus=shared.bus,
        push_metrics=notifications.stats,
        _local_messages=messages,
        _closers=(messages, notifications, rooms, files, users),
        events=runtime,
        _close_live=shared.close,
    )
