"""The user service's tables (``user.db``); the Alembic history in ``migrations/``
must create exactly these (a test compares them).

- ``users`` — one row per account: the unique username, the display name and the
  argon2id password hash.
- ``logins`` — one row per login session (a device); ``revoked`` is set when it ends.
- ``tokens`` — the SHA-256 hashes of a login session's live tokens, of kind
  :data:`ACCESS` or :data:`REFRESH`; ``used`` marks a spent refresh token.
- ``blocks`` — (user, target): ``user`` receives no direct messages from ``target``.
- ``presence`` — when a user's last live session closed (``last_seen``).
- ``admin_grants`` — admin rights granted in the database (besides the ``admins``
  setting).

Portable SQLAlchemy Core only, so the same code runs on SQLite, PostgreSQL and MySQL.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

ID_LEN = 40
"""Room for a prefix plus the base-36 ids of :mod:`imserver.utils.ids`."""

users = Table(
    "users",
    metadata,
    Column("id", String(ID_LEN), nullable=False),
    Column("username", String(32), nullable=False),
    Column("display_name", String(64), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("id", name="pk_users"),
    UniqueConstraint("username", name="uq_users_username"),
)

logins = Table(
    "logins",
    metadata,
    Column("id", String(ID_LEN), nullable=False),
    Column("user_id", String(ID_LEN), nullable=False),
    Column("device", String(128), nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("revoked", BigInteger, nullable=True),
    PrimaryKeyConstraint("id", name="pk_logins"),
    ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_logins_user_id_users"),
    Index("ix_logins_user_id", "user_id"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("hash", String(64), nullable=False),
    Column("login_id", String(ID_LEN), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("expires", BigInteger, nullable=False),
    Column("used", BigInteger, nullable=True),
    PrimaryKeyConstraint("hash", name="pk_tokens"),
    ForeignKeyConstraint(["login_id"], ["logins.id"], name="fk_tokens_login_id_logins"),
    Index("ix_tokens_login_id", "login_id"),
    Index("ix_tokens_expires", "expires"),
)

blocks = Table(
    "blocks",
    metadata,
    Column("user_id", String(ID_LEN), nullable=False),
    Column("target_id", String(ID_LEN), nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", "target_id", name="pk_blocks"),
    ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_blocks_user_id_users"),
    ForeignKeyConstraint(["target_id"], ["users.id"], name="fk_blocks_target_id_users"),
)

presence = Table(
    "presence",
    metadata,
    Column("user_id", String(ID_LEN), nullable=False),
    Column("last_seen", BigInteger, nullable=True),
    PrimaryKeyConstraint("user_id", name="pk_presence"),
    ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_presence_user_id_users"),
)

admin_grants = Table(
    "admin_grants",
    metadata,
    Column("user_id", String(ID_LEN), nullable=False),
    Column("granted", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", name="pk_admin_grants"),
    ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_admin_grants_user_id_users"),
)

ACCESS: Final = "access"
REFRESH: Final = "refresh"
