"""Full-text search of messages on PostgreSQL and MySQL/MariaDB.

Revision ID: message_0004
Revises: message_0003
Create Date: 2026-12-05

SQLite has had its FTS5 index since ``message_0001``; this revision gives the servers
theirs (nothing changes on SQLite):

* PostgreSQL: a stored generated ``tsvector`` column over the bodies of visible text
  messages and a GIN index on it. The text search configuration
  ``imserver_search`` is ``simple`` (no stemming, no stop words, lower case) with
  ``unaccent`` before it on words, so that ``cafe`` finds ``café`` as on SQLite.
  ``unaccent`` is a trusted extension (PostgreSQL 13+): the database's owner may
  create it. The column follows edits and recalls by itself.
* MySQL/MariaDB: a ``search_text`` column holding the words of a visible text
  message, folded as the store's search folds a query (lower case, no diacritics,
  one space between words), written by the store with each batch, and an InnoDB
  ``FULLTEXT`` index on it, built with stop words off (every word is searchable).
  Existing rows are folded here, a page at a time.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "message_0004"
down_revision: str | Sequence[str] | None = "message_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAGE = 1000

POSTGRES_UP = (
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    "CREATE TEXT SEARCH CONFIGURATION imserver_search (COPY = simple)",
    "ALTER TEXT SEARCH CONFIGURATION imserver_search "
    "ALTER MAPPING FOR hword, hword_part, word WITH unaccent, simple",
    "ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS "
    "(CASE WHEN type = 'text' AND NOT recalled "
    "THEN to_tsvector('imserver_search'::regconfig, body) END) STORED",
    "CREATE INDEX ix_messages_search ON messages USING gin (search_vector)",
)
POSTGRES_DOWN = (
    "DROP INDEX IF EXISTS ix_messages_search",
    "ALTER TABLE messages DROP COLUMN IF EXISTS search_vector",
    "DROP TEXT SEARCH CONFIGURATION IF EXISTS imserver_search",
)

_WORD = re.compile(r"[^\W_]+")
_messages = sa.table(
    "messages",
    sa.column("id", sa.BigInteger()),
    sa.column("type", sa.String()),
    sa.column("recalled", sa.Boolean()),
    sa.column("body", sa.Text()),
    sa.column("search_text", sa.Text()),
)


def fold(text: str) -> str:
    """The words of ``text``, lower case and without diacritics, one space apart.
    Spelled out here (the store's ``search.fold`` is the same) so the revision keeps
    doing what it did when the live code moves on."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_WORD.findall(stripped.lower()))


def _fold_existing(bind: sa.Connection) -> None:
    last = 0
    while True:
        rows = bind.execute(
            sa.select(_messages.c.id, _messages.c.body)
            .where(
                _messages.c.id > last,
                _messages.c.type == "text",
                _messages.c.recalled.is_(False),
            )
            .order_by(_messages.c.id)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        bind.execute(
            sa.update(_messages)
            .where(_messages.c.id == sa.bindparam("k_id"))
            .values(search_text=sa.bindparam("k_text")),
            [{"k_id": row_id, "k_text": fold(body)} for row_id, body in rows],
        )
        last = rows[-1][0]


def upgrade() -> None:
    """Create the dialect's search column and index."""
    bind = op.get_bind()
    dialect = bind.dialect.name
    if dialect == "postgresql":
        for statement in POSTGRES_UP:
            op.execute(statement)
    elif dialect in ("mysql", "mariadb"):
        op.execute("ALTER TABLE messages ADD COLUMN search_text MEDIUMTEXT NULL")
        _fold_existing(bind)
        op.execute("SET SESSION innodb_ft_enable_stopword = OFF")
        op.execute("CREATE FULLTEXT INDEX ix_messages_search ON messages (search_text)")


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for statement in POSTGRES_DOWN:
            op.execute(statement)
    elif dialect in ("mysql", "mariadb"):
        op.execute("DROP INDEX ix_messages_search ON messages")
        op.execute("ALTER TABLE messages DROP COLUMN search_text")
