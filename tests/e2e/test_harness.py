"""The harness's log check can fail: the scanner on captured logs, and a pytest run
of its own whose servers fail in the background on a signal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import serverlog

CAPTURED = """\
===== start #1: python -m imserver serve --config imserver.toml
2026-12-05 04:31:32,965 INFO imserver.core.server: imserver listening: http/ws 127.0.0.1:1
2026-12-05 04:31:33,100 WARNING imserver.network.tcp: a warning is no problem
2026-12-05 04:31:33,237 ERROR imserver.services.gateway.session: op send failed
Traceback (most recent call last):
  File "/src/imserver/services/gateway/session.py", line 133, in dispatch
    result = await result
ValueError: out of range
2026-12-05 04:31:33,300 INFO imserver.core.server: an info record mentioning ERROR
2026-12-05 04:31:33,400 WARNING asyncio: a warning with a traceback is one
Traceback (most recent call last):
  File "<stdin>", line 1, in <module>
OSError: [Errno 24] Too many open files
===== test tests/e2e/test_x.py::test_y
Exception ignored in: <function Thing.__del__ at 0x7f>
Traceback (most recent call last):
RuntimeError: from a finaliser
2026-12-05 04:31:34,000 CRITICAL imserver: no traceback, still a problem
2026-12-05 04:31:35,000 INFO imserver.core.server: imserver stopped
"""


def test_the_scanner_finds_tracebacks_and_error_records() -> None:
    found = serverlog.problems(CAPTURED)
    assert [(p.level, p.text.splitlines()[0], p.text.splitlines()[-1]) for p in found] == [
        (
            "ERROR",
            "2026-12-05 04:31:33,237 ERROR imserver.services.gateway.session: op send failed",
            "ValueError: out of range",
        ),
        (
            "WARNING",
            "2026-12-05 04:31:33,400 WARNING asyncio: a warning with a traceback is one",
            "OSError: [Errno 24] Too many open files",
        ),
        (
            None,
            "Exception ignored in: <function Thing.__del__ at 0x7f>",
            "RuntimeError: from a finaliser",
        ),
        (
            "CRITICAL",
            "2026-12-05 04:31:34,000 CRITICAL imserver: no traceback, still a problem",
            "2026-12-05 04:31:34,000 CRITICAL imserver: no traceback, still a problem",
        ),
    ]
    # An INFO record with a traceback is still a problem; without one it is not.
    relabelled = CAPTURED.replace(
        "ERROR imserver.services.gateway.session", "INFO imserver.services.gateway.session"
    )
    assert [p.level for p in serverlog.problems(relabelled)] == [
        "INFO",
        "WARNING",
        None,
        "CRITICAL",
    ]
    assert serverlog.problems("2026-12-05 04:31:33,237 INFO x: fine\n") == []


def test_allowed_patterns_and_the_shown_text() -> None:
    found = serverlog.problems(CAPTURED)
    left = serverlog.unexpected(found, [r"out of range", r"Too many open files"])
    assert [p.level for p in left] == [None, "CRITICAL"]
    assert serverlog.unexpected(found, []) == found
    long = serverlog.Problem("x" * 10_000 + "\n" + "\n".join(f"line {i}" for i in range(100)), None)
    shown = long.shown().splitlines()
    assert shown[0] == "x" * serverlog.MAX_LINE + "... (10000 chars)"
    assert shown[serverlog.HEAD_LINES] == "    ... 68 lines ..."
    assert shown[-1] == "line 99"


# --- the check in a pytest run of its own ---------------------------------------------

SITECUSTOMIZE = """\
# Loaded by every Python process of the inner run (PYTHONPATH): a server started there
# raises in an event-loop callback whenever it receives SIGUSR1.
import asyncio
import signal

import imserver.core.server as _server

_start = _server.Server.start


def _fail() -> None:
    raise RuntimeError("deliberate failure in a background callback")


async def _start_and_arm(self):
    await _start(self)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _fail)


_server.Server.start = _start_and_arm
"""

INNER_TESTS = """\
import os
import signal
import time

import pytest


def failures(server):
    return server.stderr_path.read_text().count("RuntimeError: deliberate failure")


def fail_in_background(server):
    before = failures(server)
    os.kill(server.proc.pid, signal.SIGUSR1)
    # Wait until it is logged, so that it is logged during this test.
    deadline = time.monotonic() + 20
    while failures(server) == before:
        assert time.monotonic() < deadline, "the server did not log the failure"
        time.sleep(0.02)


def test_shared_before(shared_server):
    assert shared_server.running


def test_shared_failure(shared_server):
    fail_in_background(shared_server)


@pytest.mark.server_errors(r"RuntimeError: deliberate failure")
def test_shared_failure_that_is_expected(shared_server):
    fail_in_background(shared_server)


def test_shared_after(shared_server):
    assert shared_server.running


def test_failure_in_its_own_server(server):
    fail_in_background(server)
"""


@pytest.mark.embedded_only("its inner run signals the one server process (SIGUSR1 to its pid)")
def test_a_server_failing_in_the_background_fails_the_test_it_ran_in(tmp_path: Path) -> None:
    """Five tests run in a pytest of their own against servers that raise in an
    event-loop callback on SIGUSR1 (no client sees anything of it). The two tests
    during which a server failed error at teardown, with the traceback; the tests
    before and after on the same shared server, and the test that declared the
    failure, pass."""
    here = Path(__file__).parent
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(here / "conftest.py", inner / "conftest.py")
    shutil.copy(here / "serverlog.py", inner / "serverlog.py")
    shutil.copy(here / "cluster_process.py", inner / "cluster_process.py")
    shutil.copy(here.parent / "databases.py", inner / "databases.py")
    (inner / "test_inner.py").write_text(INNER_TESTS)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(inner),
            "-rA",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",  # e2e, registered in pyproject.toml
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            f"--basetemp={tmp_path / 'basetemp'}",
        ],
        cwd=inner,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = run.stdout
    outcomes: dict[str, list[str]] = {}
    for m in re.finditer(r"^(PASSED|ERROR|FAILED) test_inner\.py::(\w+)", out, re.M):
        outcomes.setdefault(m.group(2), []).append(m.group(1))
    assert outcomes == {
        "test_shared_before": ["PASSED"],
        "test_shared_failure": ["PASSED", "ERROR"],  # the call, then the teardown
        "test_shared_failure_that_is_expected": ["PASSED"],
        "test_shared_after": ["PASSED"],
        "test_failure_in_its_own_server": ["PASSED", "ERROR"],
    }, out[-6000:] + run.stderr[-3000:]
    assert "5 passed, 2 errors" in out, out[-3000:]
    for name in ("test_failure_in_its_own_server", "test_shared_failure"):
        section = out.split(f"ERROR at teardown of {name}", 1)[1].split("\n___", 1)[0]
        assert f"during test_inner.py::{name}:" in section, section
        assert "ERROR asyncio: Exception in callback" in section, section
        assert "Traceback (most recent call last):" in section, section
        assert "RuntimeError: deliberate failure in a background callback" in section, section
