"""``search`` against the real full-text index, for every query a client can send.

The contract (docs/protocol.md §4.10): any ``query`` gives results or ``bad_request``
with ``field: "query"`` — never ``unavailable`` or ``internal``, whatever it holds:
NUL and other control characters, quotes, ``*``, FTS5 operators (``NEAR``, ``AND``,
``OR``, ``NOT``, column filters, ``^``, parentheses), any script. The queries are
those the decoders can produce (any text without lone surrogates, which neither
JSON nor MessagePack decoding lets through) plus, for callers inside the process,
strings with lone surrogates.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from message_helpers import (
    BACKENDS,
    Directory,
    Files,
    Rooms,
    backend_url,
    caller,
    open_backend,
    send,
)

from imserver.protocol import ops
from imserver.services.message.search import fts5_query, like_words
from imserver.services.message.service import LocalMessageService
from imserver.storage.bus import MemoryLiveBus
from imserver.utils.errors import BadRequest, IMError

AB = "d:ua:ub"
CD = "d:uc:ud"
ROOM = "r:r1"
A = caller("ua")
VISIBLE = {AB, ROOM, "s:ua"}
"""The conversations ``ua`` searches: its direct one with ``ub``, room ``r1`` and its
system conversation; ``c`` <-> ``d`` is not one of them."""

SEEDED = [
    (AB, "the quick brown fox"),
    (AB, "zebra\x00quagga"),
    (AB, "zebra quagga"),
    (AB, "zebra, quagga!"),
    (AB, "quagga zebra"),
    (AB, 'she said "NEAR" AND OR NOT * ^start col:value (x) {y} -z +w'),
    (AB, "control\x01chars\x1fand\x7fdel"),
    (AB, "Un café, s'il vous plaît 😀"),
    (AB, "日本語のテキスト"),
    (AB, ""),
    (ROOM, "fox in the room"),
    (CD, "fox that ua cannot see"),
]

FTS5_PIECES = [
    *['"', '""', "'", "*", "^", ":", "-", "+", "(", ")", "{", "}", "[", "]", ",", "."],
    *["NEAR", "NEAR(", "NEAR/2", "AND", "OR", "NOT", "body:", "messages_fts", "rank"],
    *["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u2028", "\ufeff", "\ufffd", "\U0010ffff"],
    *[" ", "\t", "\n", "\u00a0", "\u3000"],
    *["fox", "zebra", "quagga", "café", "CAFE", "日本", "😀", "ß", "İ"],
]

_text_queries = st.text(min_size=1, max_size=200)
_syntax_queries = st.lists(st.sampled_from(FTS5_PIECES), min_size=1, max_size=60).map("".join)
_surrogate_queries = st.lists(
    st.one_of(st.characters(categories=["Cs"]), st.sampled_from(FTS5_PIECES)),
    min_size=1,
    max_size=20,
).map("".join)
QUERIES = st.one_of(_text_queries, _syntax_queries, _surrogate_queries).filter(
    lambda q: 1 <= len(q) <= 200
)
"""Queries within the op's limits (1-200 characters)."""

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Seeded:
    """The service on one backend, with :data:`SEEDED` stored in that order."""

    backend: str
    svc: LocalMessageService


@pytest.fixture(params=BACKENDS)
async def seeded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Seeded]:
    rooms = Rooms()
    rooms.add("r1", "Room One", "ua", "ub")
    svc = await open_backend(
        request.param,
        await backend_url(request, request.param, tmp_path),
        bus=MemoryLiveBus(),
        users=Directory("ua", "ub", "uc", "ud"),
        rooms=rooms,
        files=Files(),
    )
    for i, (conv, body) in enumerate(SEEDED):
        await svc.send(caller("uc") if conv == CD else A, send(conv, f"seed{i}", body))
    try:
        yield Seeded(request.param, svc)
    finally:
        await svc.close()


async def outcome(svc: LocalMessageService, req: ops.Search) -> ops.SearchData | BadRequest:
    """The search's result, or the ``bad_request`` it raised; any other failure fails."""
    try:
        return await svc.search(A, req)
    except IMError as exc:
        assert type(exc) is BadRequest, f"{req.query!r}: {exc.code}: {exc}"
        assert exc.field == "query", f"{req.query!r}: {exc}"
        return exc


@given(query=QUERIES)
@PROPERTY
async def test_any_query_gives_results_or_bad_request(seeded: Seeded, query: str) -> None:
    for conv in (None, AB):
        result = await outcome(seeded.svc, ops.Search(query=query, conv=conv, limit=100))
        if isinstance(result, BadRequest):
            continue
        for m in result.messages:
            assert m.type == "text" and m.conv in ({conv} if conv else VISIBLE), (query, m)
        ids = [(m.conv, m.seq) for m in result.messages]
        assert len(set(ids)) == len(ids), (query, ids)


def test_no_nul_reaches_the_database() -> None:
    assert fts5_query("a\x00b \x00 c\x00") == '"a b" " " "c "*'
    assert like_words("a\x00b \x00 c\x00") == ["a", "b", "c"]


def found(data: ops.SearchData) -> list[str]:
    return [m.body for m in data.messages]


async def test_nul_separates_words_like_any_other_non_word_character(seeded: Seeded) -> None:
    """FTS5 reads a query as a C string, so a NUL inside a quoted phrase ended it early
    ("unterminated string", answered ``unavailable``). The index treats NUL in a body
    as a separator, and so does the query now: ``zebra\\0quagga`` is the phrase
    "zebra quagga", like ``zebra,quagga`` or ``zebra\\x01quagga``."""
    svc = seeded.svc
    phrase = ["zebra, quagga!", "zebra quagga", "zebra\x00quagga"]
    for query in ("zebra\x00quagga", "zebra\x00quag", "\x00zebra\x00\x00quagga\x00"):
        data = await svc.search(A, ops.Search(query=query))
        if seeded.backend == "sqlite-like":
            # LIKE: every word is a substring. SQLite's LIKE stops at a NUL in the
            # body, so the body "zebra\0quagga" reads as "zebra" there.
            assert found(data) == ["quagga zebra", "zebra, quagga!", "zebra quagga"], query
        else:
            assert found(data) == phrase, query
            assert found(await svc.search(A, ops.Search(query=query.replace("\0", "\1")))) == (
                phrase
            )
    for query in ("\x00", "\x00\x00 \x00", "\t\x00\n"):  # no words: nothing found
        assert found(await svc.search(A, ops.Search(query=query))) == [], query


async def test_a_lone_surrogate_is_bad_request(seeded: Seeded) -> None:
    """No decoder produces one (it is not Unicode text); a caller inside the process
    can, and gets ``bad_request`` rather than a database error."""
    for query in ("\ud800", "fox \udfff", "zebra\x00\ud83d"):
        result = await outcome(seeded.svc, ops.Search(query=query))
        assert isinstance(result, BadRequest), query
    assert found(await seeded.svc.search(A, ops.Search(query="fox", conv=ROOM))) == [
        "fox in the room"
    ]


# --- what a query finds -----------------------------------------------------------------

WORDS = ["fox", "Zebra", "café", "CAFÉ", "日本語", "x1", "42", "NEAR", "AND", "OR", "NOT"]
SEPARATORS = [" ", "  ", "\t", "\x00", "\x01", "\x1f", '"', "*", "^", ":", "-", "(", ")", "😀"]
bodies = st.lists(
    st.one_of(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), min_size=1, max_size=20
).map("".join)


@pytest.fixture(params=["sqlite", "sqlite-async", "postgresql", "mariadb"])
async def fts5(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LocalMessageService]:
    """The service on a backend with a full-text index (FTS5, PostgreSQL's ``tsvector``,
    MariaDB's ``FULLTEXT``), shared by all examples of a test (a message per example;
    the newest is found first)."""
    svc = await open_backend(
        request.param,
        await backend_url(request, request.param, tmp_path),
        bus=MemoryLiveBus(),
        users=Directory("ua", "ub"),
        rooms=Rooms(),
        files=Files(),
    )
    try:
        yield svc
    finally:
        await svc.close()


@given(body=bodies)
@PROPERTY
async def test_a_body_searched_for_as_it_is_finds_its_message(
    fts5: LocalMessageService, body: str
) -> None:
    """A body with at least one word, sent as the query, finds its message, whatever
    operators, quotes and control characters (NUL included) it holds. Full-text index
    backends only: the LIKE fallback's case folding and NUL handling are the dialect's
    own."""
    assume(any(ch.isalnum() for ch in body))  # a body without a word is never found
    ack = await fts5.send(A, send(AB, uuid.uuid4().hex, body))
    data = await fts5.search(A, ops.Search(query=body, conv=AB, limit=1))
    assert [(m.seq, m.body) for m in data.messages] == [(ack.seq, body)], body
