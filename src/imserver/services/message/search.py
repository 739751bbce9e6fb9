"""Full-text search over messages, behind :class:`MessageSearch`.

:class:`Fts5Search` for SQLite (an FTS5 table over ``messages``) and
:class:`LikeSearch`, a portable fallback. A PostgreSQL ``tsvector`` implementation
is one more class plus its migration; the service never sees the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import ColumnElement, Connection, bindparam, func, select, text

from imserver.services.message.schema import messages
from imserver.utils.ids import ConvId


class MessageSearch(Protocol):
    """Full-text search over the visible text messages of some conversations.

    The store calls :meth:`index_new` in the write transaction right after
    inserting a batch of messages; re-indexing edited and recalled rows is left to
    the database (triggers or generated columns created by that dialect's migration).
    """

    def index_new(self, conn: Connection, after_id: int) -> None:
        """Index the messages just inserted: every row with id > ``after_id``."""

    def search(
        self, conn: Connection, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[int]:
        """Ids of matching messages in ``convs`` with id < ``before``, newest first."""


def fts5_query(query: str) -> str:
    """Quote a user's query for FTS5: every whitespace-separated word becomes a
    quoted phrase (internal quotes doubled) and the last one a prefix match, so no
    user input is ever parsed as FTS5 syntax. Empty for a blank query.

    Inside a quoted phrase every character is text to the tokenizer except NUL: FTS5
    reads the query as a C string, so a NUL would end it inside the phrase
    ("unterminated string"). The tokenizer treats NUL in a body as a separator, like
    any character that is not a letter or digit, so it becomes a space: ``a<NUL>b`` is
    the phrase "a b", as ``a,b`` is.
    """
    words = query.split()
    if not words:
        return ""
    phrases = ['"' + word.replace('"', '""').replace("\0", " ") + '"' for word in words]
    phrases[-1] += "*"
    return " ".join(phrases)


def like_words(query: str) -> list[str]:
    """The words of a query for :class:`LikeSearch`: split on whitespace and NUL.
    A NUL cannot go into a ``LIKE`` pattern: SQLite's ``LIKE`` stops reading at it
    and PostgreSQL refuses it in text."""
    return query.replace("\0", " ").split()


class Fts5Search:
    """SQLite FTS5 over ``messages_fts`` (an external-content index of ``messages``).

    New rows are indexed by one ``INSERT ... SELECT`` per batch: five times cheaper
    than a per-row trigger. The migration's triggers handle edits and recalls.
    """

    _index = text(
        "INSERT INTO messages_fts(rowid, body) SELECT id, body FROM messages "
        "WHERE id > :after AND type = 'text' AND recalled = 0"
    )
    _search = text(
        "SELECT m.id FROM messages_fts JOIN messages AS m ON m.id = messages_fts.rowid "
        "WHERE messages_fts MATCH :match AND messages_fts.rowid < :before "
        "AND m.conv IN :convs AND m.type = 'text' AND m.recalled = 0 "
        "ORDER BY messages_fts.rowid DESC LIMIT :limit"
    ).bindparams(bindparam("convs", expanding=True))

    def index_new(self, conn: Connection, after_id: int) -> None:
        conn.execute(self._index, {"after": after_id})

    def search(
        self, conn: Connection, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[int]:
        match = fts5_query(query)
        if not match or not convs:
            return []
        params = {
            "match": match,
            "before": before if before is not None else 2**63 - 1,
            "convs": list(convs),
            "limit": limit,
        }
        return [int(r[0]) for r in conn.execute(self._search, params)]


class LikeSearch:
    """Portable fallback: every token must occur in the body (``LIKE``, no index)."""

    def index_new(self, conn: Connection, after_id: int) -> None:
        return None

    def search(
        self, conn: Connection, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[int]:
        tokens = like_words(query)
        if not tokens or not convs:
            return []
        conds: list[ColumnElement[bool]] = [
            messages.c.conv.in_(list(convs)),
            messages.c.type == "text",
            messages.c.recalled.is_(False),
        ]
        for token in tokens:
            escaped = token.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append(func.lower(messages.c.body).like(f"%{escaped.lower()}%", escape="\\"))
        if before is not None:
            conds.append(messages.c.id < before)
        stmt = select(messages.c.id).where(*conds).order_by(messages.c.id.desc()).limit(limit)
        return [int(r[0]) for r in conn.execute(stmt)]


def search_for_dialect(dialect: str) -> MessageSearch:
    """The search implementation whose index the migration builds on ``dialect``."""
    if dialect == "sqlite":
        return Fts5Search()
    return LikeSearch()
