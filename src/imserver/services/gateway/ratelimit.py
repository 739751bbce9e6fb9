"""Per-connection rate limiting: a token bucket (docs/protocol.md §1).

Each op takes one token; tokens refill at ``per_s`` per second up to ``burst``. A
refused op is answered ``rate_limited`` with ``retry_after`` = the seconds until one
token is back, and is not executed at all. Both limits are dynamic settings
(``limits.rate_per_s``, ``limits.rate_burst``): a bucket reads their live cells at
each op, so a change applies to every connection from its next op.
"""

from __future__ import annotations

import math
import time

from imserver.utils.errors import RateLimited
from imserver.utils.live import Live, cell


class TokenBucket:
    """A token bucket read against the monotonic clock."""

    __slots__ = ("_burst", "_per_s", "_stamp", "_tokens")

    def __init__(self, per_s: float | Live[float], burst: int | Live[int]) -> None:
        self._per_s = cell(per_s)
        self._burst = cell(burst)
        self._tokens = float(self._burst.value)
        self._stamp = time.monotonic()

    @property
    def per_s(self) -> float:
        return self._per_s.value

    @property
    def burst(self) -> int:
        return self._burst.value

    def take(self, now: float | None = None) -> float:
        """Take one token. Returns 0.0 on success, else the seconds to wait for one."""
        t = time.monotonic() if now is None else now
        per_s = self._per_s.value
        burst = self._burst.value
        tokens = self._tokens + (t - self._stamp) * per_s
        if tokens > burst:
            tokens = float(burst)
        self._stamp = t
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / per_s if per_s > 0 else float("inf")

    def check(self, now: float | None = None) -> RateLimited | None:
        """Take one token; the ``rate_limited`` answer when there was none (every
        transport refuses an op over its rate this way). Its ``retry_after`` is
        rounded up to the millisecond: a wait under half a millisecond is not 0."""
        wait = self.take(now)
        return RateLimited(math.ceil(wait * 1000) / 1000) if wait else None
