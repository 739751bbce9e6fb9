"""Fixtures every test directory shares."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import databases as dbs
import pytest
from disks import SmallDisk, small_disk
from etcd_server import etcd

__all__ = ["etcd"]

from imserver.testing import redis as redis_testing


def pytest_addoption(parser: pytest.Parser) -> None:
    dbs.add_option(parser)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One run per selected database of every test that takes ``dialect``."""
    if "dialect" in metafunc.fixturenames:
        metafunc.parametrize("dialect", dbs.selected(metafunc.config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the runs on a database server that ``--databases`` leaves out, and the
    server runs of tests marked ``sqlite_only``."""
    chosen = set(dbs.selected(config))
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        values = callspec.params.values() if callspec is not None else ()
        servers = {v for v in values if isinstance(v, str) and v in dbs.SERVER_NAMES}
        if servers - chosen or (servers and item.get_closest_marker("sqlite_only")):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def server_databases() -> Iterator[dbs.ServerDatabases]:
    """The session's fresh database on each server, dropped when the session ends."""
    made = dbs.ServerDatabases()
    yield made
    if made.created:
        asyncio.run(made.drop_all())


@pytest.fixture
async def databases(
    dialect: str, tmp_path: Path, server_databases: dbs.ServerDatabases
) -> AsyncIterator[dbs.Databases]:
    """The databases of this test on ``dialect`` (see ``tests/databases.py``), empty."""
    if dialect == "sqlite":
        yield dbs.Databases(dialect, tmp_path)
        return
    server = await server_databases.get(dialect)
    await server_databases.empty(server)
    yield dbs.Databases(dialect, tmp_path, server, server_databases)


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


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis (``IMS_TEST_REDIS``; ``127.0.0.1:6379`` by default). Where it
    does not answer the test is skipped with the reason, except under ``CI=true``,
    where it fails."""
    url = redis_testing.shared_url()
    why = redis_testing.reachable(url)
    if why is not None:
        dbs.unavailable(why)
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key and channel prefix of this test's own; its keys are deleted after it."""
    prefix = redis_testing.unique_prefix()
    yield prefix
    redis_testing.delete_prefix(redis_url, prefix)


@pytest.fixture
def redis_server() -> Iterator[redis_testing.RedisServer]:
    """A ``redis-server`` of this test's own on a free port, to break and restart (a
    missing ``redis-server`` skips, and fails under ``CI=true``)."""
    try:
        server = redis_testing.RedisServer()
    except FileNotFoundError as exc:
        dbs.unavailable(str(exc))
        raise
    try:
        server.start()
        yield server
    finally:
        server.stop()
