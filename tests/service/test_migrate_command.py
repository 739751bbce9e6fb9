"""``imserver migrate`` (the real command, in a process of its own) on every database:
by ``--url``, by a service's URL from the environment, and the SQLite default; the
password is never printed."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

from databases import Databases, admin, rows
from sqlalchemy.engine import make_url

from imserver.storage.sql import sqlite_url

HEADS = {
    "user": "user_0002",
    "message": "message_0006",
    "room": "room_0002",
    "file": "file_0003",
    "notification": "notification_0002",
}


async def imserver(*args: str, **env: str) -> tuple[int, str, str]:
    """Run ``imserver ARGS`` with ``env`` added to the environment: (status, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imserver",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def versions(url: str, services: list[str]) -> dict[str, str]:
    found = {}
    for service in services:
        [(version,)] = await rows(url, f"SELECT version_num FROM alembic_version_{service}")
        found[service] = version
    return found


async def test_migrate_takes_a_url(databases: Databases, tmp_path: Path) -> None:
    url = databases.url("user")  # every service in it, side by side
    status, out, err = await imserver("migrate", "--data-dir", str(tmp_path / "data"), "--url", url)
    assert status == 0, err
    assert out.startswith("migrations applied:")
    assert await versions(url, list(HEADS)) == HEADS
    assert make_url(url).render_as_string(hide_password=True) in out


async def test_migrate_reads_the_url_and_password_from_the_environment(
    databases: Databases, tmp_path: Path
) -> None:
    url = databases.url("file")
    secret = tmp_path / "db-password"
    password = f"pw-{secrets.token_hex(8)}"
    secret.write_text(password + "\n", encoding="utf-8")
    user = f"imserver_t{secrets.token_hex(4)}"
    if databases.dialect == "mariadb":
        # A user of its own whose password only the file holds: a wrong or missing
        # password is refused. (PostgreSQL here trusts local connections.)
        assert databases.server is not None
        await admin(
            "mariadb",
            [
                f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'",
                f"GRANT ALL ON {databases.server.name}.* TO '{user}'@'127.0.0.1'",
            ],
        )
        url = make_url(url).set(username=user).render_as_string(hide_password=False)
    env = {"IMSERVER_STORAGE__FILE__URL": url, "IMSERVER_STORAGE__PASSWORD_FILE": str(secret)}
    try:
        status, out, err = await imserver("migrate", "--data-dir", str(tmp_path / "data"), **env)
    finally:
        if databases.dialect == "mariadb":
            await admin("mariadb", [f"DROP USER '{user}'@'127.0.0.1'"])
    assert status == 0, err
    assert password not in out + err
    if databases.dialect != "sqlite":
        assert "***@" in out
    assert await versions(databases.url("file"), ["file"]) == {"file": HEADS["file"]}
    user_db = sqlite_url(tmp_path / "data", "user")  # no storage.url: the SQLite default
    assert await versions(user_db, ["user"]) == {"user": HEADS["user"]}


async def test_a_bad_url_is_refused_with_the_setting(tmp_path: Path) -> None:
    status, _, err = await imserver("migrate", "--data-dir", str(tmp_path), "--url", "oracle://h/d")
    assert status == 2
    assert "storage.url: unsupported database 'oracle'" in err
