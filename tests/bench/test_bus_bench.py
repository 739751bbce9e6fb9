"""``python -m benchmarks.bus``, tiny: the machinery (a redis-server of its own,
subscriber processes, the table). No timing assertions. Without ``redis-server``
the test skips (fails under ``CI=true``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_bus_benchmark_prints_its_table() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI=true")
        pytest.skip("redis-server is not installed")
    args = ["--publications", "500", "--channels", "5", "--subscribers", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bus", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| memory") or line.startswith("| redis")
    ]
    assert [row.split("|")[1].strip() for row in rows] == ["memory", "redis"]
    assert all(row.split("|")[2].strip() == "500" for row in rows)
