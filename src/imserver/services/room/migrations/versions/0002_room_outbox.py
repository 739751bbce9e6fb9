"""The outbox of ``room.member_changed`` events.

Revision ID: room_0002
Revises: room_0001
Create Date: 2026-12-05

``room_outbox`` holds the events each membership change commits with itself when
the event stream is on, until the relay has published them
(:mod:`imserver.storage.outbox`). Empty otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from imserver.storage.outbox import create_outbox_table

revision: str = "room_0002"
down_revision: str | Sequence[str] | None = "room_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``room_outbox``."""
    create_outbox_table("room")


def downgrade() -> None:
    """Drop ``room_outbox``."""
    op.drop_table("room_outbox")
