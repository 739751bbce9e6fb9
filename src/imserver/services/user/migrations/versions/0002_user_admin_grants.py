"""User service: admin grants (``imserver admin grant``).

Revision ID: user_0002
Revises: user_0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "user_0002"
down_revision: str | None = "user_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_LEN = 40


def upgrade() -> None:
    """Create the table of users granted admin rights."""
    op.create_table(
        "admin_grants",
        sa.Column("user_id", sa.String(ID_LEN), nullable=False),
        sa.Column("granted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_admin_grants"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_admin_grants_user_id_users"),
    )


def downgrade() -> None:
    """Drop the admin grants."""
    op.drop_table("admin_grants")
