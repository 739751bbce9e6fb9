"""A push provider of our own interface that records what it is given, and the
message and notification services on real SQLite files, linked as in
``build_embedded`` (the writer hands its commits to the notification service, which
reaches the message service through a lookup), over ``local`` or ``loopback``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from databases import Databases
from message_helpers import Directory, Rooms
from transports import through

from imserver.services.caller import Caller
from imserver.services.message.api import MessageService
from imserver.services.message.service import LocalMessageService, open_message_service
from imserver.services.notification.api import MessageSource, NotificationService
from imserver.services.notification.providers.base import Outcome, Push, Registration
from imserver.services.notification.registry import Providers
from imserver.services.notification.service import (
    LocalNotificationService,
    open_notification_service,
)
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.outbox import EventPublisher, OutboxRelay
from imserver.storage.sql import sqlite_url
from imserver.utils.config import PushConfig
from imserver.utils.errors import BadRequest, Unavailable
from imserver.utils.ids import LoginId, UserId


class RecordingProvider:
    """A provider (``name`` ``test``) that records every push it is given and answers
    the outcomes of ``script`` in turn (then ``sent``). ``hang`` makes every send wait
    until it is set. ``keys`` counts each idempotency key once, as a receiver that
    drops repeats of a key does; ``seen`` counts every delivery of a key."""

    def __init__(self, script: list[Outcome] | None = None, name: str = "test") -> None:
        self._name = name
        self.script = list(script or [])
        self.pushes: list[Push] = []
        self.times: list[float] = []
        self.seen: dict[str, int] = {}
        self.hang: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self._name

    def check_target(self, target: dict[str, Any]) -> dict[str, Any]:
        token = target.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest("token must be a non-empty string", field="target.token")
        return {"token": token}

    async def send(self, registration: Registration, push: Push) -> Outcome:
        if self.hang is not None:
            await self.hang.wait()
        self.pushes.append(push)
        self.times.append(time.monotonic())
        self.seen[push.key] = self.seen.get(push.key, 0) + 1
        if self.script:
            return self.script.pop(0)
        return Outcome(status="sent", code=201)

    async def close(self) -> None:
        pass

    def of(self, device: str, kind: str = "message") -> list[Push]:
        return [p for p in self.pushes if p.device == device and p.kind == kind]


FAST = PushConfig(collapse_delay=0.05, backoff_base=0.01, backoff_max=0.05, max_attempts=3)


def login(user: str, device: str = "1") -> Caller:
    """``user`` on the login session (device) ``<user>-<device>``."""
    return Caller(UserId(user), LoginId(f"{user}-{device}"))


@dataclass
class World:
    """The two services as a caller reaches them, and the local objects behind."""

    messages: MessageService
    notifications: NotificationService
    local: LocalNotificationService
    local_messages: LocalMessageService
    provider: RecordingProvider
    rooms: Rooms
    users: Directory
    relay: OutboxRelay | None = None
    """The message outbox's relay, when the event stream is on."""
    message_url: str = ""
    notification_url: str = ""


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``check()`` holds (fails the test after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def open_world(
    where: Path | Databases,
    transport: str,
    *,
    config: PushConfig = FAST,
    provider: RecordingProvider | None = None,
    providers: Providers | None = None,
    users: tuple[str, ...] = ("alice", "bob", "carol"),
    send_timeout: float = 30.0,
    publisher: EventPublisher | None = None,
    relay_backoff: tuple[float, float] = (0.05, 0.5),
) -> AsyncIterator[World]:
    """Both services on ``where``'s databases, or on SQLite files in the directory
    ``where`` (reopenable: a restart), with ``providers`` or else ``provider`` (a new
    :class:`RecordingProvider` by default).

    With ``publisher`` the event stream is on, as ``build_embedded`` wires it: the
    message service writes ``message.stored`` into its outbox, a relay
    (``World.relay``) publishes it through ``publisher``, and the notification
    service takes no commit listener call and runs no catch-up; the test subscribes
    its consumer itself."""
    if isinstance(where, Databases):
        tmp_path = where.tmp_path
        notification_url, message_url = where.url("notification"), where.url("message")
    else:
        tmp_path = where
        notification_url = sqlite_url(where, "notification")
        message_url = sqlite_url(where, "message")
    provider = provider or RecordingProvider()
    directory = Directory(*users)
    rooms = Rooms()
    holder: dict[str, MessageService] = {}

    def messages_peer() -> MessageSource:
        if "m" not in holder:
            raise Unavailable("the message service is not running")
        return holder["m"]

    local = await open_notification_service(
        notification_url,
        data_dir=tmp_path,
        config=config,
        messages=messages_peer,
        providers=providers or Providers(by_name={provider.name: provider}),
        send_timeout=send_timeout,
        catch_up=publisher is None,
    )
    notifications = through(transport, NotificationService, local)
    local_messages = await open_message_service(
        message_url,
        bus=MemoryLiveBus(),
        users=directory,
        rooms=rooms,
        listener=notifications if publisher is None else None,
        events=publisher is not None,
    )
    holder["m"] = through(transport, MessageService, local_messages)
    relay = None
    if publisher is not None:
        assert local_messages.outbox is not None
        relay = OutboxRelay(message_url, local_messages.outbox, publisher, backoff=relay_backoff)
        relay.start()
    try:
        yield World(
            messages=holder["m"],
            notifications=notifications,
            local=local,
            local_messages=local_messages,
            provider=provider,
            rooms=rooms,
            users=directory,
            relay=relay,
            message_url=message_url,
            notification_url=notification_url,
        )
    finally:
        await local_messages.close()
        if relay is not None:
            await relay.close()
        await local.close()
