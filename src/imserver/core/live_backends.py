"""Where the live bus, presence and the online devices live (the ``live`` setting):
in memory for one process, or in Redis, shared by the processes of a deployment
under an instance id each. :func:`live_backends` is the only place that imports
redis, and only when it is chosen.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from imserver.services.notification.online import MemoryOnlineDevices, OnlineDevices
from imserver.services.user.online import MemoryOnlineStore, OnlineStore
from imserver.storage.bus import LiveBus, MemoryLiveBus
from imserver.storage.databases import redacted
from imserver.utils.config import Config

logger = logging.getLogger(__name__)


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
