"""A real ``imserver serve`` with ``[events] backend = "rabbitmq"``: a message to an
offline user goes through the message database's outbox, the relay, the broker and
the notification service's queue, and becomes exactly one webhook push."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_push_to_webhook import Receiver, offline_with_webhook, receiver, start, until

from imserver.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
import rabbit

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerFactory

__all__ = ["receiver"]

BACKOFF = [0.2, 0.5]
GROUPS = {"notification": ("message.stored",)}


@pytest.fixture
async def events() -> AsyncIterator[dict[str, Any]]:
    await rabbit.reachable()
    prefix = rabbit.new_prefix()
    yield {"backend": "rabbitmq", "url": rabbit.URL, "prefix": prefix, "backoff": BACKOFF}
    await rabbit.delete_topology(prefix, GROUPS, BACKOFF)


@pytest.mark.embedded_only("sets the server's RabbitMQ events itself (a cluster's are its own)")
async def test_an_offline_users_message_is_one_push_through_rabbitmq(
    server_factory: ServerFactory,
    clients: Clients,
    receiver: Receiver,
    events: dict[str, Any],
) -> None:
    factory: Any = lambda settings: server_factory({**settings, "events": events})  # noqa: E731
    server = start(factory, receiver)
    bob_id, device, alice = await offline_with_webhook(server, clients)
    conv = Client.direct_conv(alice.user_id, bob_id)
    sent = await alice.send_message(conv, "through the broker")
    await until(lambda: len(receiver.received) == 1, within=20)
    _, body = receiver.received[0]
    assert (body["user"], body["device"], body["conv"], body["seq"], body["body"]) == (
        bob_id,
        device,
        conv,
        sent["seq"],
        "through the broker",
    )
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 1 and receiver.bad == 0
    # The event went through the broker: its queue exists and holds nothing now.
    assert await rabbit.drain(f"{events['prefix']}.notification") == []
