"""The benchmark suite end to end, tiny: ``python -m benchmarks --smoke``.

Checks the machinery, not the numbers: every scenario ran (or is reported skipped
because its module is not there), the combined JSON and the PNG plots were written,
and nothing the run started is still alive afterwards. No timing assertions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.ab import FIGURES

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180.0
MARKER_ENV = "BENCH_SMOKE_MARKER"
"""Set in the suite's environment: every process it starts (scenarios, servers,
workers, reference servers) inherits it, which is how leftovers are found."""

STEPS = {
    # step key -> the module that provides its scenario
    "dm": "dm",
    "dm-rate": "dm",
    "room-20": "room",
    "connections": "connections",
    "auth-storm": "authstorm",
    "mixed": "mixed",
    "broadcast": "broadcast",
    "push": "push",
    "push-rate": "push",
    "baselines": "baselines",
}


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != b"Z":
            found.append(int(entry))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmarks read /proc")
def test_suite_smoke(tmp_path: Path) -> None:
    marker = secrets.token_hex(8)
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[MARKER_ENV] = marker
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the suite took over {TIMEOUT_S} s:\n{output.decode()[-6000:]}")
    finally:
        # Whatever the outcome, nothing it started may outlive it.
        deadline = time.monotonic() + 10
        leftovers = _processes_with(marker)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.2)
            leftovers = _processes_with(marker)
        _kill(leftovers)
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{text[-8000:]}"
    assert not leftovers, f"processes left behind: {leftovers}"

    summary = json.loads((out / "suite.json").read_text())
    assert summary["suite"]["mode"] == "smoke"
    scenarios = summary["scenarios"]
    for key, module in STEPS.items():
        assert key in scenarios, f"{key} missing from suite.json"
        status = scenarios[key]["status"]
        if importlib.util.find_spec(f"benchmarks.{module}") is None:
            assert status == "skipped", f"{key}: module missing but status {status}"
        else:
            assert status == "ok", f"{key}: {status} {scenarios[key].get('note')}"
            assert scenarios[key]["data"], f"{key}: no results in suite.json"
            assert (out / f"{key}.json").exists()
    assert summary["table"], "the results table is empty"
    assert (out / "table.md").exists()

    # benchmarks.ab compares these figures between two commits: each must be found.
    for key, scenario in (("dm", "dm"), ("room-20", "room")):
        doc = json.loads((out / f"{key}.json").read_text())
        for label, get, _ in FIGURES[scenario]:
            assert get(doc) is not None, f"benchmarks.ab finds no {label!r} in {key}.json"

    for png in ("latency.png", "throughput-dm.png", "throughput-room-20-members.png"):
        path = out / png
        assert path.exists() and path.stat().st_size > 1000, f"{png} missing"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"suite --smoke took {elapsed:.1f} s")
