"""Full-text search over messages, behind :class:`MessageSearch`, one class per engine.

Every engine answers the same query the same way: the query's whitespace-separated
words (NUL separates words too) must all occur, each as a phrase of its tokens
(``zebra,quagga`` is the phrase "zebra quagga"), the last token of the last word as a
prefix; case and diacritics are ignored; no character of the query is syntax. Only
visible (not recalled) ``text`` messages are found.

* :class:`Fts5Search` — SQLite: an FTS5 table over ``messages`` (``message_0001``).
* :class:`PostgresSearch` — a generated ``tsvector`` column with a GIN index
  (``message_0004``); the query's words are turned into lexemes by the same text
  search configuration as the bodies, then into a phrase ``tsquery``.
* :class:`MySqlSearch` — MySQL/MariaDB: an InnoDB ``FULLTEXT`` index over
  ``search_text``, the folded words of each visible text message (:func:`fold`),
  which this class writes with each batch and after edits and recalls. InnoDB
  indexes no word shorter than ``innodb_ft_min_token_size`` and has no prefix inside
  a phrase, so the index only narrows the candidates (every long enough token must
  be there) and each candidate's words are checked here, in order; a query with no
  long enough token checks every visible text message of the conversations.
* :class:`LikeSearch` — a portable fallback without an index (``LIKE``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Protocol

from sqlalchemy import ColumnElement, Connection, bindparam, func, select, text

from imserver.services.message.schema import messages
from imserver.utils.ids import ConvId


class MessageSearch(Protocol):
    """Full-text search over the visible text messages of some conversations.

    The store calls :meth:`index_new` in the write transaction right after
    inserting a batch of messages, and :meth:`index_changed` after applying its
    edits and recalls (a no-op where the database re-indexes by itself: triggers or
    generated columns created by that dialect's migration).
    """

    def index_new(self, conn: Connection, after_id: int) -> None:
        """Index the messages just inserted: every row with id > ``after_id``."""

    def index_changed(
        self,
        conn: Connection,
        edits: Mapping[tuple[ConvId, int], str],
        recalls: Sequence[tuple[ConvId, int]],
    ) -> None:
        """Re-index the messages whose body an edit replaced, drop the recalled ones."""

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

    def index_changed(
        self,
        conn: Connection,
        edits: Mapping[tuple[ConvId, int], str],
        recalls: Sequence[tuple[ConvId, int]],
    ) -> None:
        return None  # the migration's triggers

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

    def index_changed(
        self,
        conn: Connection,
        edits: Mapping[tuple[ConvId, int], str],
        recalls: Sequence[tuple[ConvId, int]],
    ) -> None:
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


_WORD = re.compile(r"[^\W_]+")


def fold(text: str) -> str:
    """The words of ``text`` (runs of letters and digits), lower case and without
    diacritics, one space apart: what :class:`MySqlSearch` indexes and compares."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_WORD.findall(stripped.lower()))


_NO_ID = 2**63 - 1


class PostgresSearch:
    """PostgreSQL: ``messages.search_vector`` (generated, GIN-indexed) ``@@`` a phrase
    ``tsquery`` built from the lexemes the same configuration gives the query's words."""

    _lexemes = text(
        "SELECT w.n, t.lexeme, t.positions "
        "FROM unnest(CAST(:words AS text[])) WITH ORDINALITY AS w(word, n), "
        "unnest(to_tsvector('imserver_search'::regconfig, w.word)) AS t"
    )
    _search = text(
        "SELECT id FROM messages WHERE search_vector @@ CAST(:q AS tsquery) "
        "AND id < :before AND conv IN :convs ORDER BY id DESC LIMIT :limit"
    ).bindparams(bindparam("convs", expanding=True))

    def index_new(self, conn: Connection, after_id: int) -> None:
        return None  # a generated column

    def index_changed(
        self,
        conn: Connection,
        edits: Mapping[tuple[ConvId, int], str],
        recalls: Sequence[tuple[ConvId, int]],
    ) -> None:
        return None  # a generated column

    def tsquery(self, conn: Connection, words: Sequence[str]) -> str:
        """The ``tsquery`` text of ``words`` (empty when none has a lexeme)."""
        by_word: dict[int, list[tuple[int, str]]] = {}
        # The words go as one text[] parameter, whose elements skip the NUL-escaping
        # codec of scalar text: a NUL becomes a space, which separates tokens alike.
        params = {"words": [word.replace("\0", " ") for word in words]}
        for n, lexeme, positions in conn.execute(self._lexemes, params):
            by_word.setdefault(n, []).extend((p, lexeme) for p in positions)
        phrases = []
        for n in sorted(by_word):
            found = sorted(by_word[n])
            terms = [_ts_literal(lexeme) for _, lexeme in found]
            if n == len(words):
                terms[-1] += ":*"
            phrase = terms[0]
            for (prev, _), (pos, _), term in zip(found, found[1:], terms[1:], strict=False):
                phrase += f" <{max(pos - prev, 1)}> " + term
            phrases.append(f"({phrase})")
        return " & ".join(phrases)

    def search(
        self, conn: Connection, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[int]:
        # Whitespace separates words; NUL, like any other separator, splits a word
        # into the tokens of one phrase (the text codec stores NUL as a separator).
        words = query.split()
        if not words or not convs:
            return []
        q = self.tsquery(conn, words)
        if not q:
            return []
        params = {
            "q": q,
            "before": before if before is not None else _NO_ID,
            "convs": list(convs),
            "limit": limit,
        }
        return [int(r[0]) for r in conn.execute(self._search, params)]


def _ts_literal(lexeme: str) -> str:
    """``lexeme`` quoted for ``tsquery`` input."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


class MySqlSearch:
    """MySQL/MariaDB: an InnoDB ``FULLTEXT`` index over ``messages.search_text`` (see the
    module docstring)."""

    PAGE = 200
    """Candidates read per round while checking them here."""

    _visible_new = text(
        "SELECT id, body FROM messages WHERE id > :after AND type = 'text' AND recalled = 0"
    )
    _set_text = text("UPDATE messages SET search_text = :text WHERE id = :id")
    _edit = text(
        "UPDATE messages SET search_text = :text "
        "WHERE conv = :conv AND seq = :seq AND type = 'text' AND recalled = 0"
    )
    _recall = text("UPDATE messages SET search_text = NULL WHERE conv = :conv AND seq = :seq")

    def __init__(self) -> None:
        self._min_token: int | None = None

    def index_new(self, conn: Connection, after_id: int) -> None:
        rows = conn.execute(self._visible_new, {"after": after_id}).all()
        if rows:
            conn.execute(self._set_text, [{"id": i, "text": fold(body)} for i, body in rows])

    def index_changed(
        self,
        conn: Connection,
        edits: Mapping[tuple[ConvId, int], str],
        recalls: Sequence[tuple[ConvId, int]],
    ) -> None:
        if edits:
            conn.execute(
                self._edit,
                [{"conv": c, "seq": s, "text": fold(body)} for (c, s), body in edits.items()],
            )
        if recalls:
            conn.execute(self._recall, [{"conv": c, "seq": s} for c, s in recalls])

    def _min_token_size(self, conn: Connection) -> int:
        if self._min_token is None:
            found = conn.exec_driver_sql("SELECT @@innodb_ft_min_token_size").scalar()
            self._min_token = int(found) if found is not None else 3
        return self._min_token

    def search(
        self, conn: Connection, query: str, convs: Sequence[ConvId], before: int | None, limit: int
    ) -> list[int]:
        phrases = [tokens for word in query.split() if (tokens := fold(word).split())]
        if not phrases or not convs:
            return []
        shortest = self._min_token_size(conn)
        terms = [f'+"{t}"' for phrase in phrases for t in phrase if len(t) >= shortest]
        last = phrases[-1][-1]
        if terms and len(last) >= shortest:
            terms[-1] = f"+{last}*"
        conds = ["search_text IS NOT NULL", "conv IN :convs", "id < :before"]
        if terms:
            conds.append("MATCH (search_text) AGAINST (:match IN BOOLEAN MODE)")
        stmt = text(
            f"SELECT id, search_text FROM messages WHERE {' AND '.join(conds)} "
            "ORDER BY id DESC LIMIT :page"
        ).bindparams(bindparam("convs", expanding=True))
        found: list[int] = []
        below = before if before is not None else _NO_ID
        while len(found) < limit:
            params = {"convs": list(convs), "before": below, "page": self.PAGE}
            if terms:
                params["match"] = " ".join(terms)
            rows = conn.execute(stmt, params).all()
            found.extend(i for i, words in rows if _matches(words.split(), phrases))
            if len(rows) < self.PAGE:
                break
            below = rows[-1][0]
        return found[:limit]


def _matches(words: Sequence[str], phrases: Sequence[Sequence[str]]) -> bool:
    """Whether every phrase occurs in ``words``; the last token of the last phrase
    may be the start of a word."""
    for index, phrase in enumerate(phrases):
        prefix = index == len(phrases) - 1
        if not _phrase_in(words, phrase, prefix):
            return False
    return True


def _phrase_in(words: Sequence[str], phrase: Sequence[str], prefix: bool) -> bool:
    size = len(phrase)
    for start in range(len(words) - size + 1):
        window = words[start : start + size]
        if list(window[:-1]) == list(phrase[:-1]) and (
            window[-1].startswith(phrase[-1]) if prefix else window[-1] == phrase[-1]
        ):
            return True
    return False


def search_for_dialect(dialect: str) -> MessageSearch:
    """The search implementation whose index the migration builds on ``dialect``."""
    if dialect == "sqlite":
        return Fts5Search()
    if dialect == "postgresql":
        return PostgresSearch()
    if dialect in ("mysql", "mariadb"):
        return MySqlSearch()
    return LikeSearch()
