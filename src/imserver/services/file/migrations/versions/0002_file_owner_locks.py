"""File service: the lock row of each uploading user (quota checks on a server).

Revision ID: file_0002
Revises: file_0001
Create Date: 2026-12-05

On PostgreSQL and MySQL/MariaDB two uploads of one user run their transactions at
the same time; each holds the user's row here while it sums the user's uploads, so
they check the quota one after the other (``imserver.storage.locks``). Rows are
created by the uploads themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "file_0002"
down_revision: str | None = "file_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_LEN = 40


def upgrade() -> None:
    """Create ``file_owner_locks``."""
    op.create_table(
        "file_owner_locks",
        sa.Column("owner", sa.String(ID_LEN), nullable=False),
        sa.PrimaryKeyConstraint("owner", name="pk_file_owner_locks"),
    )


def downgrade() -> None:
    """Drop ``file_owner_locks``."""
    op.drop_table("file_owner_locks")
