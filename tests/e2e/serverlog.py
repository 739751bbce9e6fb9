"""What a server's log says went wrong: tracebacks and ``ERROR``/``CRITICAL`` records.

The e2e harness (``conftest.py``) reads what every ``imserver serve`` process wrote
to stdout and stderr during each test and fails the test when this module finds a
problem in it: a task that died with a traceback in the background leaves the
clients none the wiser, so a test that only looks at replies would pass.

A log is cut into *entries*: each starts at a record line of the server's format
(``2025-01-31 12:00:00,123 ERROR imserver.services.gateway.session: op send failed``) or at a
harness marker line (``===== ...``, a line of its own); the lines after a record (a traceback, a
multi-line message) belong to it. Text before the first record is an entry of its own. An
entry is a problem when its record is ``ERROR`` or ``CRITICAL``, or when it holds a
traceback, an ``Exception ignored in`` report (``sys.unraisablehook``) or a
``Fatal Python error``, whatever its level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imserver.testing.process import MARKER

RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+?): ", re.M
)
"""A record line of ``logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s:
%(message)s")`` (``imserver.cli``)."""
BAD_LEVELS = frozenset({"ERROR", "CRITICAL"})
SIGNS = ("Traceback (most recent call last):", "Exception ignored in", "Fatal Python error")
"""Text that marks a problem in an entry of any level."""
MAX_LINE = 300
HEAD_LINES = 3
TAIL_LINES = 30


@dataclass(frozen=True)
class Problem:
    """One entry of a log that reports a failure."""

    text: str
    """The whole entry (record line and the lines that follow it)."""
    level: str | None
    """The record's level, None for text outside a record."""

    def shown(self) -> str:
        """The entry cut for a test report: long lines shortened, a long traceback
        reduced to its first and last lines (where the exception is)."""
        lines = [
            line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}... ({len(line)} chars)"
            for line in self.text.splitlines()
        ]
        if len(lines) > HEAD_LINES + TAIL_LINES:
            skipped = len(lines) - HEAD_LINES - TAIL_LINES
            lines = [*lines[:HEAD_LINES], f"    ... {skipped} lines ...", *lines[-TAIL_LINES:]]
        return "\n".join(lines)


def entries(text: str) -> Iterator[tuple[str | None, str]]:
    """Split ``text`` into entries: ``(level or None, entry text)`` in order."""
    start = 0
    level: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        m = RECORD.match(line)
        marker = line.startswith(MARKER)
        if m is not None or marker:
            if pos > start:
                yield level, text[start:pos]
            start = pos
            level = m.group("level") if m is not None else None
        pos += len(line)
        if marker:  # one line; what follows it is not part of it
            yield None, line
            start = pos
    if pos > start:
        yield level, text[start:pos]


def problems(text: str) -> list[Problem]:
    """Every entry of ``text`` that reports a failure."""
    found = []
    for level, entry in entries(text):
        if level in BAD_LEVELS or any(sign in entry for sign in SIGNS):
            found.append(Problem(entry.rstrip("\n"), level))
    return found


def unexpected(found: Iterable[Problem], allowed: Iterable[str]) -> list[Problem]:
    """The problems that no pattern of ``allowed`` (regular expressions, searched in
    the whole entry) accounts for."""
    patterns = [re.compile(p) for p in allowed]
    return [p for p in found if not any(pat.search(p.text) for pat in patterns)]


def read_new(paths: Iterable[Path], offsets: dict[Path, int]) -> list[tuple[Path, Problem]]:
    """The problems written to ``paths`` since the offsets in ``offsets`` (updated):
    complete lines only, a line still being written waits for the next call."""
    found = []
    for path in paths:
        start = offsets.get(path, 0)
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
        except FileNotFoundError:
            continue
        end = data.rfind(b"\n") + 1
        offsets[path] = start + end
        found += [(path, p) for p in problems(data[:end].decode(errors="replace"))]
    return found
