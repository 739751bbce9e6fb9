"""The transports a service's contract tests run over: ``local`` (direct calls) and
``loopback`` (every call encoded and decoded by :mod:`imserver.services.loopback`).

A contract test gets the service under test, and the services it calls, through
:func:`through`; one test body runs over both. A test may check the service's storage
from outside (its database file, its blob store, its temporary directory) in both
runs: the state is there whichever way the service was called. Tests that reach into
the local object — its private attributes and store, methods only the concrete type
has, or a fault only an in-process call can raise — are marked ``@local_only`` and run
over ``local`` alone (``tests/service/conftest.py`` deselects their ``loopback``
runs). A gRPC transport joins :data:`TRANSPORTS`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest

from imserver.services.loopback import loopback

T = TypeVar("T")

TRANSPORTS = ["local", "loopback"]

local_only = pytest.mark.local_only
"""The test looks inside the local implementation: it has no ``loopback`` run."""


def through(transport: str, proto: Any, service: T) -> T:
    """``service`` as a caller reaches it over ``transport``."""
    if transport == "loopback":
        return loopback(proto, service)
    return service
