"""Room service: initial schema (rooms, members, invitations).

Revision ID: room_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "room_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_LEN = 40


def upgrade() -> None:
    """Create the room service's tables."""
    op.create_table(
        "rooms",
        sa.Column("id", sa.String(ID_LEN), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("name_folded", sa.String(400), nullable=False),
        sa.Column("topic", sa.String(500), nullable=True),
        sa.Column("public", sa.Boolean(name="ck_rooms_public_bool"), nullable=False),
        sa.Column("owner", sa.String(ID_LEN), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("member_count", sa.Integer(), nullable=False),
        sa.Column("last_join", sa.BigInteger(), nullable=False),
        sa.Column("emptied", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rooms"),
    )
    op.create_index("ix_rooms_directory", "rooms", ["public", "created", "id"])
    op.create_table(
        "members",
        sa.Column("room_id", sa.String(ID_LEN), nullable=False),
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("joined", sa.BigInteger(), nullable=False),
        sa.Column("join_order", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "user_id", name="pk_members"),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_members_room_id_rooms"),
    )
    op.create_index("ix_members_order", "members", ["room_id", "join_order"], unique=True)
    op.create_index("ix_members_user_id", "members", ["user_id"])
    op.create_table(
        "invitations",
        sa.Column("room_id", sa.String(ID_LEN), nullable=False),
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("inviter", sa.String(ID_LEN), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("room_id", "user_id", name="pk_invitations"),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_invitations_room_id_rooms"),
    )
    op.create_index("ix_invitations_user_id", "invitations", ["user_id"])


def downgrade() -> None:
    """Drop the room service's tables."""
    op.drop_index("ix_invitations_user_id", table_name="invitations")
    op.drop_table("invitations")
    op.drop_index("ix_members_user_id", table_name="members")
    op.drop_index("ix_members_order", table_name="members")
    op.drop_table("members")
    op.drop_index("ix_rooms_directory", table_name="rooms")
    op.drop_table("rooms")
