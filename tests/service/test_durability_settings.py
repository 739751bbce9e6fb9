"""Every SQLite connection the server uses commits durably: WAL and ``synchronous=FULL``
— but the notification service's writer, whose commits are rebuilt after a power cut
(``synchronous=NORMAL``; see ``imserver.services.notification.service``).

The e2e crash tests kill the server with SIGKILL, which keeps the kernel's page cache:
an acknowledged write would survive them even if nothing were ever fsynced. What a
power loss needs is that every commit fsyncs the WAL before the acknowledgement goes
out, which SQLite does in WAL mode with ``synchronous=FULL`` (2). This test starts the
real composition root (:class:`imserver.core.server.Server`) in-process, runs ops
that reach every service's database, and reads both settings back on every pooled
connection each time it is checked out — new connections, reader threads, the
message writer's pinned connection and the migrations' connections included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.pool import Pool

from imserver.client import Client, HttpClient
from imserver.core.server import Server
from imserver.utils.config import AuthConfig, Config

DATABASES = {"user.db", "room.db", "message.db", "file.db", "notification.db"}
FULL = 2
NORMAL = 1
REBUILT = "notification.db"


class Checkouts:
    """(database file name, synchronous, journal_mode) of every connection checkout."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def __call__(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA database_list")
            path = next(row[2] for row in cursor.fetchall() if row[1] == "main")
            cursor.execute("PRAGMA synchronous")
            (synchronous,) = cursor.fetchone()
            cursor.execute("PRAGMA journal_mode")
            (journal_mode,) = cursor.fetchone()
        finally:
            cursor.close()
        self.seen.append((Path(path).name, synchronous, journal_mode))


@pytest.fixture
def checkouts() -> Iterator[Checkouts]:
    # A listener on the Pool class hears every pool of every engine, those made later
    # included: the services' async engines, the message store's own sync engines and
    # the migrations' engines.
    listener = Checkouts()
    event.listen(Pool, "checkout", listener)
    try:
        yield listener
    finally:
        event.remove(Pool, "checkout", listener)


async def exercise(http_url: str) -> None:
    """Ops that read and write every service's database, several at once."""
    async with HttpClient(http_url) as http:
        for name in ("alice", "bob"):
            await http.request("register", username=name, password="correct-horse-1")
        a = await http.request("login", username="alice", password="correct-horse-1")
        b = await http.request("login", username="bob", password="correct-horse-1")
        token, ua, ub = a["token"], a["user"]["id"], b["user"]["id"]
        conv = Client.direct_conv(ua, ub)
        room = (await http.request("room.create", token=token, name="r", members=[ub]))["room"]
        status, _, body = await http.post(
            "/api/v1/files", b"hello file", token=token, params={"conv": conv, "name": "a.txt"}
        )
        assert status == 200, body
        sends = [
            http.request("send", token=token, conv=c, cid=f"c{i}", type="text", body="hi")
            for i, c in enumerate([conv, room["conv"]] * 4)
        ]
        reads = [http.request("history", token=token, conv=conv) for _ in range(8)]
        others = [http.request("user.get", token=b["token"], user=ua) for _ in range(8)]
        rooms = [http.request("room.list", token=token) for _ in range(8)]
        await asyncio.gather(*sends, *reads, *others, *rooms)
        assert len((await http.request("history", token=token, conv=conv))["messages"]) == 4


async def test_every_database_connection_is_wal_and_synchronous_full(
    tmp_path: Path, checkouts: Checkouts
) -> None:
    """And the notification writer's is ``synchronous=NORMAL``, every other FULL."""
    config = Config(
        http_port=0,
        tcp_port=0,
        data_dir=str(tmp_path),
        auth=AuthConfig(argon2_memory_kib=1024, argon2_time_cost=1),
    )
    server = Server(config)
    try:
        await server.start()
        await exercise(f"http://127.0.0.1:{server.http_port}")
    finally:
        await server.stop()

    assert {name for name, _, _ in checkouts.seen} == DATABASES
    assert {c[2] for c in checkouts.seen} == {"wal"}
    wrong = [c for c in checkouts.seen if c[1] != FULL and c[0] != REBUILT]
    assert wrong == [], wrong
    assert {c[1] for c in checkouts.seen if c[0] == REBUILT} == {NORMAL, FULL}
