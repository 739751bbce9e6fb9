"""The message service's initial schema.

Revision ID: message_0001
Revises:
Create Date: 2026-11-27

The tables are spelled out here rather than taken from ``schema.metadata`` so that
this revision stays what it was when later revisions change the store. On SQLite
the full-text index is an external-content FTS5 table over the ``text`` messages'
bodies. New rows enter it in bulk, from the store, right after each batch's insert
(a per-row trigger costs five times as much); triggers re-index a row when an edit
rewrites its body and drop it when it is recalled.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "message_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

SQLITE_FTS = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "body, content='messages', content_rowid='id', columnsize=0, "
    "tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF body, recalled ON messages "
    "WHEN old.type = 'text' BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, body) "
    "SELECT 'delete', old.id, old.body WHERE old.recalled = 0; "
    "INSERT INTO messages_fts(rowid, body) SELECT new.id, new.body WHERE new.recalled = 0; "
    "END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages "
    "WHEN old.type = 'text' AND old.recalled = 0 BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.id, old.body); "
    "END",
)


def upgrade() -> None:
    """Create the tables (and, on SQLite, the FTS5 index with its triggers)."""
    op.create_table(
        "messages",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("body", LONG_TEXT, nullable=False),
        sa.Column("cid", sa.String(64), nullable=False),
        sa.Column("meta", LONG_TEXT, nullable=True),
        sa.Column("reply_to", sa.BigInteger(), nullable=True),
        sa.Column("mentions", sa.Text(), nullable=True),
        sa.Column("target", sa.BigInteger(), nullable=True),
        sa.Column("edited", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("recalled", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("uq_messages_conv_seq", "messages", ["conv", "seq"], unique=True)
    op.create_index(
        "uq_messages_conv_sender_cid", "messages", ["conv", "sender", "cid"], unique=True
    )
    op.create_table(
        "reactions",
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("emoji", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("rseq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conv", "seq", "emoji", "user_id", name="pk_reactions"),
    )
    op.create_table(
        "message_mentions",
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conv", "user_id", "seq", name="pk_message_mentions"),
    )
    op.create_table(
        "direct_peers",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("peer_id", sa.String(64), nullable=False),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "peer_id", name="pk_direct_peers"),
    )
    op.create_table(
        "markers",
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("read_seq", sa.BigInteger(), nullable=False),
        sa.Column("recv_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conv", "user_id", name="pk_markers"),
    )
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    """Drop everything :func:`upgrade` created."""
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("messages_fts_update", "messages_fts_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
    for table in ("markers", "direct_peers", "message_mentions", "reactions"):
        op.drop_table(table)
    op.drop_index("uq_messages_conv_sender_cid", table_name="messages")
    op.drop_index("uq_messages_conv_seq", table_name="messages")
    op.drop_table("messages")
