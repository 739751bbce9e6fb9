"""``imserver admin grant | revoke | list``: admin grants in the user database.

The command opens the user service on the database of the configuration (its
migrations included, as ``imserver migrate`` does) and changes the grants through
its API. SQLite in WAL mode lets it run beside a running server: a grant is one
short transaction, and the server reads grants on every admin check, so the change
takes effect at the next ``notice.broadcast`` without a restart.
"""

from __future__ import annotations

from pathlib import Path

from imserver.services.user.service import open_user_service
from imserver.storage.databases import service_database
from imserver.utils.config import Config


async def admin_command(config: Config, action: str, username: str | None) -> list[str]:
    """Run ``action`` (``grant``, ``revoke`` or ``list``); the lines to print.

    ``not_found`` for an unknown username.
    """
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    users = await open_user_service(
        service_database(config.storage, data_dir, "user").url,
        argon2_memory_kib=config.auth.argon2_memory_kib,
        argon2_time_cost=config.auth.argon2_time_cost,
        admins=config.admins,
    )
    try:
        if action == "list":
            lines = [f"{name}\tsetting" for name in sorted(config.admins)]
            lines += [f"{u.username}\tgranted" for u in await users.granted_admins()]
            return lines
        assert username is not None
        if action == "grant":
            changed = await users.grant_admin(username)
            return [f"granted admin to {username}" if changed else f"{username} already granted"]
        changed = await users.revoke_admin(username)
        lines = [f"revoked admin of {username}" if changed else f"{username} held no grant"]
        if username in config.admins:
            lines.append(f"{username} stays an admin: named in the admins setting")
        return lines
    finally:
        await users.close()
