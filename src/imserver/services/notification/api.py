"""The notification service's API, and what it needs from the message service.

Every method can cross a process boundary (async, msgspec structs and plain values
in and out; :mod:`imserver.services.loopback` proves it in the contract tests).
The service is also the message service's
:class:`~imserver.services.message.api.CommitListener`: the message writer hands it
every committed batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from imserver.protocol import ops
from imserver.protocol.models import PushRegistration
from imserver.services.caller import Caller
from imserver.services.message.api import CommittedMessage, ReadMoved
from imserver.utils.ids import ConvId, UserId


class MessageSource(Protocol):
    """What the notification service needs from the message service."""

    async def unread_totals(self, users: Sequence[UserId]) -> dict[str, int]:
        """The badges: user -> unread messages over every conversation."""

    async def check_member(self, user: UserId, conv: ConvId) -> None:
        """Raise unless ``user`` may read ``conv`` (``forbidden``, ``not_found``,
        ``bad_request``)."""

    async def conv_members(self, conv: ConvId) -> list[str]:
        """The conversation's members now."""

    async def stored_since(self, ts: int, after_id: int, limit: int) -> list[CommittedMessage]:
        """Messages stored at ``ts`` or later with a storage id above ``after_id``,
        in storage order (the catch-up after a restart)."""

    async def history(self, caller: Caller, req: ops.History) -> ops.HistoryData:
        """A page of messages (``push.trace`` reads a message's sender from it)."""


class NotificationService(Protocol):
    """Offline push: registrations, per-conversation settings, the push outbox and
    its trace."""

    async def committed(
        self, messages: Sequence[CommittedMessage], reads: Sequence[ReadMoved]
    ) -> None:
        """The message writer committed these (see ``CommitListener``)."""

    async def device_online(self, user: UserId, device: str) -> None:
        """A live session of ``device`` (a login session) started."""

    async def device_offline(self, user: UserId, device: str) -> None:
        """A live session of ``device`` ended."""

    async def register(self, caller: Caller, provider: str, target: dict[str, Any]) -> None:
        """Register the caller's device with ``provider`` (``bad_request`` on field
        ``provider`` for one that is not enabled; the provider checks ``target``)."""

    async def unregister(self, caller: Caller, provider: str | None) -> None:
        """Remove the caller's device's registration with ``provider`` (all when None)."""

    async def forget_device(self, device: str) -> None:
        """Remove every registration of a device (its login session ended)."""

    async def registrations(self, caller: Caller) -> list[PushRegistration]:
        """The caller's registrations, every device."""

    async def vapid_key(self) -> str:
        """The Web Push application server key; ``unavailable`` when Web Push is off."""

    async def mute(self, caller: Caller, conv: ConvId, until: int) -> None:
        """Mute ``conv`` for the caller until ``until`` ms (0 unmutes); members only."""

    async def set_level(self, caller: Caller, conv: ConvId, level: str) -> None:
        """Set the caller's level for ``conv``: ``all``, ``mentions`` or ``none``."""

    async def trace(self, caller: Caller, conv: ConvId, seq: int) -> ops.PushTraceData:
        """Why each member did or did not get a push for message ``seq``; members only."""

    async def settle(self) -> None:
        """Answer once every event handed over before the call is stored (a barrier
        for tests and shutdown)."""

    async def check(self) -> None:
        """Raise ``unavailable`` if the service's database cannot be reached."""

    async def close(self) -> None:
        """Store what was handed over, stop the worker and release the store."""
