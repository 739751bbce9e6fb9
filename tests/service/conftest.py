"""Service-test fixtures shared by the contract tests: the transport parametrisation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from transports import TRANSPORTS, close_served


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """``local``, ``loopback`` or ``grpc`` (see ``transports.py``); the gRPC servers
    a test started are stopped after it."""
    yield str(request.param)
    await close_served()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the ``loopback`` and ``grpc`` runs of ``local_only`` tests and the ``grpc``
    runs of ``in_step`` tests (deselected, not skipped)."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        transport = params.get("transport")
        off_local = item.get_closest_marker("local_only") and transport not in (None, "local")
        off_grpc = item.get_closest_marker("in_step") and transport == "grpc"
        if off_local or off_grpc:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
