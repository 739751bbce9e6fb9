"""The check every e2e module makes of a refused call: the exact error code (and
field), and a message."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest

from imserver.client import ClientError


async def refused(
    call: Awaitable[Any], code: str, field: str | None = None, *, what: str = ""
) -> ClientError:
    """Await ``call`` and require an error reply with ``code`` (and ``field``)."""
    try:
        result = await call
    except ClientError as exc:
        err = exc
    else:
        pytest.fail(f"{what}: expected {code}, got a success: {result}")
    assert err.code == code, f"{what}: expected {code}, got {err.code}: {err.message}"
    assert err.message, f"{what}: an error has a message"
    if field is not None:
        assert err.field == field, (
            f"{what}: expected field {field!r}, got {err.field!r} ({err.message})"
        )
    return err
