"""Every service's Alembic history on every database: from empty to head, from each
earlier revision to head, and head matching the store's tables.

Runs on the databases ``--databases`` selects (``tests/databases.py``). The
notification store runs on SQLite only and is tested there by its own suite.
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
from sqlalchemy import Connection, MetaData

from imserver.services.file.store import metadata as file_metadata
from imserver.services.message.schema import metadata as message_metadata
from imserver.services.room.store import metadata as room_metadata
from imserver.services.user.schema import metadata as user_metadata
from imserver.storage.sql import alembic_config, upgrade

SERVICES: dict[str, tuple[str, MetaData]] = {
    "user": ("imserver.services.user.migrations", user_metadata),
    "message": ("imserver.services.message.migrations", message_metadata),
    "room": ("imserver.services.room.migrations", room_metadata),
    "file": ("imserver.services.file.migrations", file_metadata),
}


def revisions(package: str) -> list[str]:
    """The service's revisions, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://", package))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def differences(conn: Connection, service: str) -> list[Any]:
    metadata = SERVICES[service][1]

    # The service's own tables only: the others' (a shared database) and the search
    # index's are not its store's.
    def own(name: str | None, type_: str, parent: Any) -> bool:
        return type_ != "table" or name in metadata.tables

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
