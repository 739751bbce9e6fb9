"""``notice.broadcast`` over a real server (docs/protocol.md §6.6), and
``imserver admin grant | revoke | list`` on a running server's data directory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from imserver.client import Client, ClientError

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerFactory, ServerProcess


async def admin_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``imserver admin ARGS`` on the server's configuration and data directory."""
    command = [sys.executable, "-m", "imserver", "admin", *args]
    command += ["--config", str(server.config_path), "--data-dir", str(server.data_dir)]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def broadcast_refused(c: Client, fields: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(ClientError) as info:
        await c.request("notice.broadcast", fields)
    assert await c.ping() == {}
    return info.value.code, info.value.field


async def test_a_broadcast_reaches_live_sessions_and_history(
    server_factory: ServerFactory, user_factory: Any, make_client: Any
) -> None:
    server = server_factory({"admins": ["boss"]})
    alice = await user_factory(server, "alice")
    bob = await user_factory(server, "bob", transport="tcp", codec="msgpack")
    assert await broadcast_refused(alice, {"body": "hi", "to": "all"}) == ("forbidden", None)
    boss = await make_client(server)
    await boss.register("boss", "correct-horse-battery", None)
    await boss.login("boss", "correct-horse-battery")

    fields = {"body": "Maintenance at 02:00 UTC", "to": [alice.user_id, bob.user_id, "u_gone"]}
    reply = await boss.request("notice.broadcast", {**fields, "cid": "m-1"})
    assert reply["id"].startswith("bc-")
    assert (reply["reached"], reply["unknown"], reply["dup"]) == (2, ["u_gone"], False)
    for c in (alice, bob):
        conv = f"s:{c.user_id}"
        event = await c.next_event("msg", match=lambda e, conv=conv: e.get("conv") == conv)
        assert (event["from"], event["type"], event["body"]) == ("system", "system", fields["body"])
        assert event["meta"] == {"broadcast": reply["id"]}
        [stored] = (await c.history(conv))["messages"]
        assert (stored["seq"], stored["body"]) == (event["seq"], fields["body"])

    again = await boss.request("notice.broadcast", {**fields, "cid": "m-1"})
    assert (again["id"], again["reached"], again["dup"]) == (reply["id"], 2, True)
    assert len((await alice.history(f"s:{alice.user_id}"))["messages"]) == 1

    assert await broadcast_refused(boss, {"body": "x" * 20_000, "to": "all"}) == (
        "too_large",
        "body",
    )
    code, field = await broadcast_refused(boss, {"body": "hi", "to": "everyone"})
    assert code == "bad_request" and field is not None and "to" in field
    everyone = await boss.request("notice.broadcast", {"body": "to all", "to": "all"})
    assert everyone["reached"] == 3  # boss, alice and bob
    event = await alice.next_event("msg", match=lambda e: e.get("body") == "to all")
    assert event["conv"] == f"s:{alice.user_id}"


async def test_admin_grant_works_on_a_running_server(
    server_factory: ServerFactory, user_factory: Any, make_client: Any
) -> None:
    server = server_factory({"admins": ["setting_admin"]})
    carol = await user_factory(server, "carol")
    dave = await user_factory(server, "dave")
    req = {"body": "hello", "to": [dave.user_id]}
    assert await broadcast_refused(carol, req) == ("forbidden", None)

    username = carol.user["username"]
    granted = await admin_cli(server, "grant", username)
    assert granted.returncode == 0, granted.stderr
    assert f"granted admin to {username}" in granted.stdout
    assert (await carol.request("notice.broadcast", req))["reached"] == 1
    await dave.next_event("msg", match=lambda e: e.get("body") == "hello")

    listed = await admin_cli(server, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["setting_admin\tsetting", f"{username}\tgranted"]

    revoked = await admin_cli(server, "revoke", username)
    assert revoked.returncode == 0, revoked.stderr
    assert await broadcast_refused(carol, req) == ("forbidden", None)

    unknown = await admin_cli(server, "grant", "nobody_here")
    assert unknown.returncode == 1
    assert "no user named nobody_here" in unknown.stderr
    assert len((await dave.history(f"s:{dave.user_id}"))["messages"]) == 1
