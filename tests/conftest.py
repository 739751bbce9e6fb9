"""Fixtures every test directory shares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from disks import SmallDisk, small_disk


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (a real S3 API over HTTP) in a thread of the test process, on a
    free loopback port. Without the ``moto`` package the S3 tests are skipped with the
    reason, except under ``CI=true``, where they fail: CI must exercise every backend."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("moto[server] is required under CI=true for the S3 tests")
        pytest.skip("moto[server] is not installed: S3 tests skipped (pip install -e '.[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A small tmpfs of the test's own, at ``tmp_path / "disk"`` (see ``tests/disks.py``):
    ``disk.fill()`` makes it full, ``disk.free()`` gives the space back."""
    with small_disk(tmp_path / "disk") as mounted:
        yield mounted
