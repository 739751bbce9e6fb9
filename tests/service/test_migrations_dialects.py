"""Every service's Alembic history on every database: from empty to head, from each
earlier revision to head, and head matching the store's tables.

Runs on the databases ``--databases`` selects (``tests/databases.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from databases import Databases, on_connection, rows
from message_helpers import Directory, Files, Rooms, caller, send
from sqlalchemy import Connection, MetaData

from imserver.protocol import ops
from imserver.services.file.store import metadata as file_metadata
from imserver.services.message.counters import metadata as counters_metadata
from imserver.services.message.schema import metadata as message_metadata
from imserver.services.message.service import open_message_service
from imserver.services.notification.schema import metadata as notification_metadata
from imserver.services.room.store import metadata as room_metadata
from imserver.services.user.schema import metadata as user_metadata
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import alembic_config, upgrade

AB = "d:ua:ub"

SERVICES: dict[str, tuple[str, MetaData]] = {
    "user": ("imserver.services.user.migrations", user_metadata),
    "message": ("imserver.services.message.migrations", message_metadata),
    "room": ("imserver.services.room.migrations", room_metadata),
    "file": ("imserver.services.file.migrations", file_metadata),
    "notification": ("imserver.services.notification.migrations", notification_metadata),
}


SEARCH_INDEX = {"search_vector", "search_text", "ix_messages_search"}
"""The servers' full-text search column and index (``message_0004``), which the
store's portable tables leave out as they leave out SQLite's FTS5 table."""


def _with_counters() -> MetaData:
    combined = MetaData()
    for table in (*message_metadata.tables.values(), *counters_metadata.tables.values()):
        table.to_metadata(combined)
    return combined


MESSAGE_ON_SERVERS = _with_counters()
"""The message tables a server has: the portable ones and the conversation counters
(``message_0005``)."""


def revisions(package: str) -> list[str]:
    """The service's revisions, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://", package))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def differences(conn: Connection, service: str) -> list[Any]:
    metadata = SERVICES[service][1]
    if service == "message" and conn.dialect.name != "sqlite":
        metadata = MESSAGE_ON_SERVERS

    # The service's own tables only: the others' (a shared database) and the search
    # index's are not its store's.
    def own(name: str | None, type_: str, parent: Any) -> bool:
        if type_ == "table":
            return name in metadata.tables
        return name not in SEARCH_INDEX

    context = MigrationContext.configure(
        conn, opts={"version_table": f"alembic_version_{service}", "include_name": own}
    )
    return list(compare_metadata(context, metadata))


async def upgrade_to(url: str, package: str, revision: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(url, package), revision)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_from_empty_to_head_matches_the_store(databases: Databases, service: str) -> None:
    url = databases.url(service)
    package = SERVICES[service][0]
    await upgrade(url, package)
    await upgrade(url, package)  # a second run is a no-op
    assert await on_connection(url, differences, service) == []
    [(version,)] = await rows(url, f"SELECT version_num FROM alembic_version_{service}")
    assert version == revisions(package)[-1]


@pytest.mark.parametrize("service", list(SERVICES))
async def test_from_every_earlier_revision(databases: Databases, service: str) -> None:
    package = SERVICES[service][0]
    for start in revisions(package):
        await databases.reset()
        url = databases.url(service)
        await upgrade_to(url, package, start)
        await upgrade(url, package)
        assert await on_connection(url, differences, service) == [], start


async def test_every_service_shares_one_database(databases: Databases) -> None:
    """``storage.url`` alone: the four histories side by side in one database."""
    for service, (package, _) in SERVICES.items():
        await upgrade(databases.url(service), package)
    for service in SERVICES:
        assert await on_connection(databases.url(service), differences, service) == []


async def test_messages_stored_before_the_search_index_are_found(databases: Databases) -> None:
    """``message_0004`` indexes the messages already stored (MariaDB: their folded
    words, written by the revision; PostgreSQL: the generated column)."""
    url = databases.url("message")
    package = SERVICES["message"][0]
    await upgrade_to(url, package, "message_0003")
    insert = (
        "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, edited, recalled) "
        "VALUES (:conv, :seq, 'ua', 1, 'text', :body, :cid, :f, :recalled)"
    )
    for seq, body, recalled in ((1, "Un Café au lait", False), (2, "café recalled", True)):
        params = {"conv": AB, "seq": seq, "body": body, "cid": f"c{seq}", "f": False}
        await rows(url, insert, {**params, "recalled": recalled})
    peers = "INSERT INTO direct_peers (user_id, peer_id, conv) VALUES (:u, :p, :c)"
    await rows(url, peers, {"u": "ua", "p": "ub", "c": AB})
    await rows(url, peers, {"u": "ub", "p": "ua", "c": AB})
    if databases.dialect == "sqlite":  # FTS5 rows are the store's to write (message_0001)
        await rows(
            url,
            "INSERT INTO messages_fts(rowid, body) SELECT id, body FROM messages "
            "WHERE recalled = 0",
        )
    svc = await open_message_service(
        url, bus=MemoryLiveBus(), users=Directory("ua", "ub"), rooms=Rooms(), files=Files()
    )
    try:
        found = (await svc.search(caller("ua"), ops.Search(query="cafe"))).messages
        assert [(m.seq, m.body) for m in found] == [(1, "Un Café au lait")]
        await svc.send(caller("ub"), send(AB, "c3", "un autre café"))
        found = (await svc.search(caller("ua"), ops.Search(query="CAF"))).messages
        assert [m.seq for m in found] == [3, 1]
    finally:
        await svc.close()
