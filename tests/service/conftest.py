"""Service-test fixtures shared by the contract tests: the transport parametrisation."""

from __future__ import annotations

import pytest
from transports import TRANSPORTS


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """``local`` or ``loopback`` (see ``transports.py``)."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the ``loopback`` runs of ``local_only`` tests (deselected, not skipped)."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if item.get_closest_marker("local_only") and params.get("transport") == "loopback":
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
