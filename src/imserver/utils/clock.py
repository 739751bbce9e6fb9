"""The server's clock: integer milliseconds since the Unix epoch, UTC."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Return the current wall-clock time in integer milliseconds (the protocol's ``ts``)."""
    return time.time_ns() // 1_000_000
