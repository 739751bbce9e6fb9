"""File service: initial schema (files).

Revision ID: file_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "file_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_LEN = 40


def upgrade() -> None:
    """Create the file service's tables."""
    op.create_table(
        "files",
        sa.Column("id", sa.String(ID_LEN), nullable=False),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(ID_LEN), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mime", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("thumb_mime", sa.String(32), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_index("ix_files_owner", "files", ["owner"])
    op.create_index("ix_files_state_created", "files", ["state", "created"])


def downgrade() -> None:
    """Drop the file service's tables."""
    op.drop_index("ix_files_state_created", table_name="files")
    op.drop_index("ix_files_owner", table_name="files")
    op.drop_index("ix_files_sha256", table_name="files")
    op.drop_table("files")
