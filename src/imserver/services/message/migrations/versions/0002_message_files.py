"""Which stored messages name which files.

Revision ID: message_0002
Revises: message_0001
Create Date: 2026-11-27

One row per (file, message) for every ``image``/``file`` message, written in the
message's own transaction, so the file service can ask which uploads are still
referenced before it deletes an orphaned blob.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "message_0002"
down_revision: str | Sequence[str] | None = "message_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``message_files``."""
    op.create_table(
        "message_files",
        sa.Column("file_id", sa.String(64), nullable=False),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("file_id", "conv", "seq", name="pk_message_files"),
    )


def downgrade() -> None:
    """Drop ``message_files``."""
    op.drop_table("message_files")
