"""Many accounts at once, for the tests and benchmarks that need thousands of users.

:func:`bulk_register` writes the accounts straight into a data directory's
``user.db`` in one transaction, with one argon2 hash shared by all (they share the
password), where ``register`` would hash and commit once per account. It writes the
rows ``register`` writes, so the accounts log in and are listed like any other; use
it before the server starts, or on a running server's data directory for accounts
nobody has asked about yet (the user service caches only what it has read).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert

from imserver.protocol.models import User
from imserver.services.user.schema import presence, users
from imserver.services.user.service import MIGRATIONS, default_hasher
from imserver.storage.sql import make_engine, sqlite_url, upgrade
from imserver.utils.clock import now_ms
from imserver.utils.config import AuthConfig
from imserver.utils.ids import UserId, new_user_id


async def bulk_register(
    data_dir: Path, usernames: list[str], password: str, auth: AuthConfig
) -> list[User]:
    """Create an account for each of ``usernames`` (none may exist yet), all with
    ``password`` hashed with ``auth``'s argon2 settings; the users, in order."""
    url = sqlite_url(data_dir, "user")
    await upgrade(url, MIGRATIONS)
    password_hash = default_hasher(auth.argon2_memory_kib, auth.argon2_time_cost).hash(password)
    now = now_ms()
    created = [
        User(id=new_user_id(), username=name, display_name=name, created=now) for name in usernames
    ]
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(users),
                [
                    {
                        "id": u.id,
                        "username": u.username,
                        "display_name": u.display_name,
                        "password_hash": password_hash,
                        "created": u.created,
                    }
                    for u in created
                ],
            )
            await conn.execute(
                insert(presence), [{"user_id": UserId(u.id), "last_seen": None} for u in created]
            )
    finally:
        await engine.dispose()
    return created
