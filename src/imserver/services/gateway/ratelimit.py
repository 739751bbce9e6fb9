"""Per-connection rate limiting: a token bucket (docs/protocol.md §1).

Each op takes one token; tokens refill at ``per_s`` per second up to ``burst``. A
refused op is answered ``rate_limited`` with ``retry_after`` = the seconds until one
token is back, and is not executed at all.
"""

from __future__ import annotations

import time

from imserver.utils.errors import RateLimited


class TokenBucket:
    """A token bucket read against the monotonic clock."""

    __slots__ = ("_stamp", "_tokens", "burst", "per_s")

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """Take one token. Returns 0.0 on success, else the seconds to wait for one."""
        t = time.monotonic() if now is None else now
        tokens = self._tokens + (t - self._stamp) * self.per_s
        if tokens > self.burst:
            tokens = float(self.burst)
        self._stamp = t
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.per_s if self.per_s > 0 else float("inf")

    def check(self, now: float | None = None) -> RateLimited | None:
        """Take one token; the ``rate_limited`` answer when there was none (every
        transport refuses an op over its rate this way)."""
        wait = self.take(now)
        return RateLimited(round(wait, 3)) if wait else None
