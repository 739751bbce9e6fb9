"""A real etcd for the tests: the ``etcd`` fixture (a fresh member on free ports, with
a data directory in the test's ``tmp_path``, stopped after the test).

The binary comes from Debian's ``etcd-server`` package, installed by
:func:`imserver.testing.etcd.etcd_binary` when missing and possible. Where it cannot
be had, the tests that need etcd are skipped with the reason, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imserver.testing.etcd import EtcdMissing, EtcdServer, etcd_binary


def require_etcd() -> None:
    """Skip (fail under ``CI=true``) when no etcd binary can be had."""
    try:
        etcd_binary()
    except EtcdMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"etcd is required under CI=true: {exc}")
        pytest.skip(f"etcd unavailable: {exc}")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd member, stopped (and its directory left to ``tmp_path``) after the test."""
    require_etcd()
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.kill()
