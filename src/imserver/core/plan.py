"""Which services one process runs (``imserver serve --services``), and whether it can.

:func:`check_plan` refuses, before anything starts, a set of services that cannot
work as configured (docs/deployment.md, "What each process needs"). This module
imports nothing of the distributed mode: the embedded mode's command line reads
``--services`` through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from imserver.services.file.api import FileService
from imserver.services.message.api import MessageService
from imserver.services.notification.api import NotificationService
from imserver.services.room.api import RoomService
from imserver.services.user.api import UserService
from imserver.storage.databases import service_database
from imserver.utils.config import Config

APIS: dict[str, type] = {
    "user": UserService,
    "message": MessageService,
    "room": RoomService,
    "file": FileService,
    "notification": NotificationService,
}
"""The services served over gRPC, and their interfaces."""

SERVICE_NAMES = ("gateway", "user", "message", "room", "file", "notification")
"""Every service ``--services`` can name."""


class PlanError(ValueError):
    """A set of services this process cannot run as configured."""


def parse_services(text: str) -> frozenset[str]:
    """The names of ``--services`` (comma-separated); :class:`PlanError` for an
    unknown or missing name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise PlanError("--services names no service")
    unknown = sorted(set(names) - set(SERVICE_NAMES))
    if unknown:
        raise PlanError(
            f"unknown service {', '.join(unknown)} in --services; "
            f"the services are {', '.join(SERVICE_NAMES)}"
        )
    return frozenset(names)


def is_embedded(names: Iterable[str] | None) -> bool:
    """Whether ``names`` (None: no ``--services``) is the whole embedded mode."""
    return names is None or set(names) == set(SERVICE_NAMES)


def check_plan(config: Config, names: frozenset[str]) -> None:
    """Raise :class:`PlanError` listing every reason the services ``names`` cannot
    run in one process of a distributed deployment configured by ``config``."""
    problems = []
    if not config.etcd.endpoints:
        problems.append("the distributed mode finds services through etcd: set [etcd] endpoints")
    if config.live != "redis":
        if "gateway" in names and not {"message", "user", "notification"} <= names:
            problems.append(
                "a gateway apart from the message, user or notification service needs "
                'live = "redis": live events and presence cross processes through Redis'
            )
        elif "gateway" not in names and names & {"message", "user", "notification"}:
            problems.append(
                "the message, user and notification services apart from the gateway need "
                'live = "redis": live events and presence cross processes through Redis'
            )
    if config.events.backend != "rabbitmq" and ("message" in names) != ("notification" in names):
        problems.append(
            "the message and notification services in different processes need [events] "
            'backend = "rabbitmq": committed messages reach the notification service '
            "through the event stream"
        )
    data_dir = Path(config.data_dir)
    for name in sorted(names - {"gateway"}):
        url = service_database(config.storage, data_dir, name).url
        if url.startswith("sqlite"):
            problems.append(
                f"the {name} service runs on SQLite, a file of this process's data "
                f"directory that another instance cannot share: set [storage] url (or "
                f"storage.{name}.url) to a PostgreSQL or MySQL database"
            )
    if problems:
        raise PlanError("; ".join(problems))
