"""User service: initial schema (users, logins, tokens, blocks, presence).

Revision ID: user_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "user_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_LEN = 40


def upgrade() -> None:
    """Create the user service's tables."""
    op.create_table(
        "users",
        sa.Column("id", sa.String(ID_LEN), nullable=False),
        sa.Column("username", sa.String(32), nullable=False),
        sa.Column("display_name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "logins",
        sa.Column("id", sa.String(ID_LEN), nullable=False),
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("device", sa.String(128), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("revoked", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_logins"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_logins_user_id_users"),
    )
    op.create_index("ix_logins_user_id", "logins", ["user_id"])
    op.create_table(
        "tokens",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("login_id", sa.String(ID_LEN), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("hash", name="pk_tokens"),
        sa.ForeignKeyConstraint(["login_id"], ["logins.id"], name="fk_tokens_login_id_logins"),
    )
    op.create_index("ix_tokens_login_id", "tokens", ["login_id"])
    op.create_index("ix_tokens_expires", "tokens", ["expires"])
    op.create_table(
        "blocks",
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("target_id", sa.String(ID_LEN), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "target_id", name="pk_blocks"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_blocks_user_id_users"),
        sa.ForeignKeyConstraint(["target_id"], ["users.id"], name="fk_blocks_target_id_users"),
    )
    op.create_table(
        "presence",
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("user_id", name="pk_presence"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_presence_user_id_users"),
    )


def downgrade() -> None:
    """Drop the user service's tables."""
    op.drop_table("presence")
    op.drop_table("blocks")
    op.drop_index("ix_tokens_expires", table_name="tokens")
    op.drop_index("ix_tokens_login_id", table_name="tokens")
    op.drop_table("tokens")
    op.drop_index("ix_logins_user_id", table_name="logins")
    op.drop_table("logins")
    op.drop_table("users")
