"""The outbox of file events (``file.stored``, ``file.deleted``).

Revision ID: file_0003
Revises: file_0002
Create Date: 2026-12-05

``file_outbox`` holds the events each file record's insert or delete commits with itself when
the event stream is on, until the relay has published them
(:mod:`imserver.storage.outbox`). Empty otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from imserver.storage.outbox import create_outbox_table

revision: str = "file_0003"
down_revision: str | Sequence[str] | None = "file_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``file_outbox``."""
    create_outbox_table("file")


def downgrade() -> None:
    """Drop ``file_outbox``."""
    op.drop_table("file_outbox")
