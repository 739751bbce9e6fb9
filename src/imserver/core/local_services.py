"""How a process opens the services it runs itself: one recipe for both modes.

:func:`open_local_services` opens the named services from the configuration, in the
order that lets each be handed the ones it calls (user; room, file and notification;
message last), and :func:`start_local_events` starts the event stream's relays and
consumer for those of them that have one. The embedded mode (:mod:`imserver.core.embedded`)
asks for all five; a distributed process (:mod:`imserver.core.distributed`) for its
subset. What a service is handed for another comes from ``reach(name)``: the local
one once it is built, a gRPC client in a distributed process. The room, file and
notification services reach the message service through a
:data:`~imserver.services.peers.Peer` (``reach`` asked on every call), because the
message service is built after them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from imserver.core.events import EventsRuntime, start_events
from imserver.core.live_backends import LiveBackends
from imserver.services.file.service import open_file_service
from imserver.services.message.api import MessageService
from imserver.services.message.service import open_message_service
from imserver.services.notification.service import (
    LocalNotificationService,
    open_notification_service,
)
from imserver.services.room.service import open_room_service
from imserver.services.user.service import open_user_service
from imserver.storage.databases import ServiceDatabase
from imserver.utils.config import Config
from imserver.utils.live import LiveSettings


async def open_local_services(
    config: Config,
    names: Collection[str],
    *,
    local: dict[str, Any],
    reach: Callable[[str], Any],
    db: dict[str, ServiceDatabase],
    live: LiveSettings,
    shared: LiveBackends,
    sole_instance: bool = True,
) -> None:
    """Open the services of ``names`` into ``local`` (name → service).
    ``sole_instance``: no other process runs these services on the same databases (the
    embedded mode), so a service may keep in memory what only its own writes change."""
    data_dir = Path(config.data_dir)
    events = config.events.backend != "none"

    def messages() -> MessageService:
        found: MessageService = reach("message")
        return found

    if "user" in names:
        local["user"] = await open_user_service(
            db["user"].url,
            read_url=db["user"].read_url,
            access_ttl=config.auth.access_ttl,
            refresh_ttl=config.auth.refresh_ttl,
            argon2_memory_kib=config.auth.argon2_memory_kib,
            argon2_time_cost=config.auth.argon2_time_cost,
            admins=config.admins,
            online=shared.online,
        )
    if "room" in names:
        local["room"] = await open_room_service(
            db["room"].url,
            read_url=db["room"].read_url,
            users=reach("user"),
            messages=messages,
            max_room_size=live.room_max_size,
            events=events,
        )
    if "file" in names:
        local["file"] = await open_file_service(
            db["file"].url,
            data_dir=data_dir,
            config=config.files,
            messages=messages,
            max_size=live.upload_max_size,
            quota=live.upload_quota,
            events=events,
        )
    if "notification" in names:
        local["notification"] = await open_notification_service(
            db["notification"].url,
            data_dir=data_dir,
            config=config.push,
            messages=messages,
            catch_up=not events,
            online=shared.devices,
        )
    if "message" in names:
        local["message"] = await open_message_service(
            db["message"].url,
            read_url=db["message"].read_url,
            bus=shared.bus,
            users=reach("user"),
            rooms=reach("room"),
            files=reach("file"),
            listener=None if events else local["notification"],
            max_body=config.limits.max_body,
            max_meta=config.limits.max_meta,
            batch_max=config.storage.batch_max,
            events=events,
            peer_cache=sole_instance,
        )


async def start_local_events(
    config: Config, db: dict[str, ServiceDatabase], local: dict[str, Any]
) -> EventsRuntime | None:
    """The relays of the local services' outboxes and the local notification
    service's consumer; None when the event stream is off or none is local."""
    if config.events.backend == "none":
        return None
    outboxes: dict[str, tuple[str, Any]] = {}
    for name in ("message", "room", "file"):
        if name in local:
            outbox = local[name].outbox
            assert outbox is not None
            outboxes[name] = (db[name].url, outbox)
    notifications: LocalNotificationService | None = local.get("notification")
    if not outboxes and notifications is None:
        return None
    return await start_events(config.events, outboxes=outboxes, notifications=notifications)
