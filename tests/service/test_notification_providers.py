"""The notification service with real providers built from the ``[push]`` settings
(``registry.build_providers``): a committed message becomes a request to the local
FCM stand-in of ``test_push_fcm.py``, which checks the OAuth2 bearer and the
message's shape; a token FCM no longer knows removes the registration."""

from __future__ import annotations

import json
from pathlib import Path

from message_helpers import send
from notification_helpers import eventually, login, open_world
from test_push_fcm import OK, UNREGISTERED, Google, google  # noqa: F401 (a fixture)

from imserver.protocol.convs import direct_conv
from imserver.services.notification.registry import build_providers
from imserver.utils.config import FcmConfig, PushConfig, WebPushConfig


async def test_a_message_reaches_fcm_and_a_gone_token_is_removed(
    tmp_path: Path,
    google: tuple[Google, FcmConfig],  # noqa: F811
) -> None:
    state, fcm = google
    config = PushConfig(collapse_delay=0.05, fcm=fcm, webpush=WebPushConfig(enabled=False))
    providers = build_providers(config, tmp_path)
    assert sorted(providers.by_name) == ["fcm"] and providers.vapid_key == ""
    async with open_world(tmp_path, "local", config=config, providers=providers) as w:
        await w.notifications.register(login("bob"), "fcm", {"token": OK})
        await w.notifications.register(login("carol"), "fcm", {"token": UNREGISTERED})
        ab, ac = direct_conv("alice", "bob"), direct_conv("alice", "carol")
        await w.messages.send(login("alice"), send(ab, "c1", "dinner at 8"))
        await w.messages.send(login("alice"), send(ac, "c2", "and you?"))
        await w.local_messages.flush()
        await w.notifications.settle()
        await eventually(lambda: sum(w.local.stats.results.values()) == 2)
        [message] = state.messages
        assert message["token"] == OK
        assert f"bob:bob-1:{ab}:1" in json.dumps(message)
        assert "dinner at 8" in json.dumps(message)
        bob = (await w.notifications.trace(login("bob"), ab, 1)).recipients
        [job] = next(r for r in bob if r.user == "bob").pushes
        assert (job.provider, job.state, [a.code for a in job.attempts]) == ("fcm", "sent", [200])
        carol = (await w.notifications.trace(login("carol"), ac, 1)).recipients
        [gone] = next(r for r in carol if r.user == "carol").pushes
        assert (gone.state, [a.code for a in gone.attempts]) == ("gone", [404])
        assert await w.notifications.registrations(login("carol")) == []
        assert len(await w.notifications.registrations(login("bob"))) == 1
