"""A real ``imserver serve`` whose data directory is a small tmpfs that fills up:
writes over WebSocket and HTTP answer ``unavailable`` (503 over HTTP) with the §2.5
error object, the server logs no traceback, connections stay usable, and once the
space is back the same writes succeed and nothing stored before is lost.

Needs root to mount the tmpfs (``tests/disks.py``): skipped otherwise, failed under
``CI=true``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import pytest
from disks import small_disk
from refusals import refused

from imserver.client import Client, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerFactory

from conftest import PASSWORD

Frame = dict[str, Any]


def unavailable(status: int, body: Frame) -> None:
    """The documented HTTP answer: 503 and ``{"error": {"code": "unavailable", ...}}``."""
    assert status == 503, (status, body)
    assert body == {"error": {"code": "unavailable", "message": body["error"]["message"]}}, body
    assert body["error"]["message"], body


@pytest.mark.sqlite_only  # the full disk is the data directory's, where SQLite keeps the data
async def test_full_disk_answers_unavailable_and_loses_nothing(
    server_factory: ServerFactory, user_factory: Any
) -> None:
    server = server_factory(start=False)
    with small_disk(server.data_dir) as disk:
        await server.astart()
        try:
            alice: Client = await user_factory(server, "alice")
            bob: Client = await user_factory(server, "bob")
            conv = Client.direct_conv(alice.user["id"], bob.user["id"])
            await alice.send_message(conv, "before the disk filled", cid="before")
            room = (await alice.request("room.create", name="before", public=True))["room"]
            kept = os.urandom(200_000)
            fresh = os.urandom(200_000)
            files = {"conv": conv, "name": "a.bin"}
            async with HttpClient(server.http_url, token=alice.token) as http:
                status, _, raw = await http.post("/api/v1/files", kept, params=files)
                assert status == 200, raw
                kept_file = json.loads(raw)["file"]

                disk.fill()
                await refused(
                    alice.request("room.create", name="during", public=True), "unavailable"
                )
                status, body = await http.call(
                    "login", username=alice.user["username"], password=PASSWORD
                )
                unavailable(status, body)
                status, _, raw = await http.post("/api/v1/files", fresh, params=files)
                unavailable(status, json.loads(raw))
                # The connection is usable and reads work on the full disk.
                await alice.ping()
                rooms = (await alice.request("room.list"))["rooms"]
                assert [r["name"] for r in rooms] == ["before"]
                status, _, got = await http.get(kept_file["url"])
                assert (status, got) == (200, kept)

                disk.free()
                created = (await alice.request("room.create", name="during", public=True))["room"]
                status, body = await http.call(
                    "login", username=alice.user["username"], password=PASSWORD
                )
                assert status == 200 and body["token"], body
                status, _, raw = await http.post("/api/v1/files", fresh, params=files)
                assert status == 200, raw
                fresh_file = json.loads(raw)["file"]
                # Nothing stored before the disk filled was lost.
                for info, data in ((kept_file, kept), (fresh_file, fresh)):
                    status, _, got = await http.get(info["url"])
                    assert (status, got) == (200, data)
            history = await bob.history(conv)
            assert [m["body"] for m in history["messages"]] == ["before the disk filled"]
            rooms = (await alice.request("room.list"))["rooms"]
            assert [r["id"] for r in rooms] == [room["id"], created["id"]]
        finally:
            await server.astop()
    log = server.stderr_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, server.logs()
    assert "database or disk is full" in log, server.logs()
    assert os.strerror(28) in log, server.logs()
