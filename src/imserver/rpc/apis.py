"""The service APIs that cross gRPC, and the one schema read from them.

Each entry names the Protocol, the ``.proto`` file it goes to and its package. The
narrower interfaces a service asks of another (``UserDirectory``, ``RoomDirectory``,
``MemberDirectory``…) are subsets of these APIs: :func:`service_of` finds the API
that serves one, so a client of a narrow interface calls the same RPCs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from imserver.rpc.schema import Message, Registry, Service, read_service
from imserver.services.file.api import FileService
from imserver.services.loopback import protocol_methods
from imserver.services.message.api import MessageService
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService
from imserver.services.room.api import RoomService
from imserver.services.user.api import UserService

PACKAGE = "imserver.rpc"
COMMON = "common"

APIS: tuple[tuple[type, str], ...] = (
    (UserService, "user"),
    (MessageService, "message"),
    (RoomService, "room"),
    (FileService, "file"),
    (NotificationService, "notification"),
    (BroadcastService, "notification"),
)
"""Each Protocol and the ``.proto`` file (under ``src/imserver/rpc/``) it is in."""


@dataclass
class Schema:
    """Every service and the common messages they share."""

    services: dict[type, Service]
    common: list[Message]

    def files(self) -> dict[str, list[Service]]:
        """The services of each ``.proto`` file, in :data:`APIS` order."""
        out: dict[str, list[Service]] = {}
        for service in self.services.values():
            out.setdefault(service.file, []).append(service)
        return out


@functools.cache
def schema() -> Schema:
    """The schema of :data:`APIS` (read once per process)."""
    registry = Registry()
    services = {
        proto: read_service(registry, proto, proto.__name__, file, f"{PACKAGE}.{file}")
        for proto, file in APIS
    }
    return Schema(services, list(registry.messages.values()))


def service_of(proto: type) -> Service:
    """The API serving ``proto``: the API itself, or the first whose methods include
    every method of the narrower interface ``proto``."""
    services = schema().services
    if proto in services:
        return services[proto]
    wanted = set(protocol_methods(proto))
    for api, service in services.items():
        if wanted <= set(protocol_methods(api)):
            return service
    raise TypeError(f"no gRPC API serves {proto.__name__}")
