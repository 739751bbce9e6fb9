"""The per-connection token bucket."""

from __future__ import annotations

import pytest

from imserver.services.gateway.ratelimit import TokenBucket


def test_burst_then_refusal_with_retry_after() -> None:
    bucket = TokenBucket(per_s=50, burst=200)
    now = bucket._stamp
    assert all(bucket.take(now) == 0.0 for _ in range(200))
    wait = bucket.take(now)
    assert wait == pytest.approx(1 / 50)


def test_refill_at_rate_and_capped_at_burst() -> None:
    bucket = TokenBucket(per_s=10, burst=5)
    now = bucket._stamp
    for _ in range(5):
        assert bucket.take(now) == 0.0
    assert bucket.take(now) > 0
    # 0.25 s later: 2.5 tokens back, so two ops pass and the third waits 0.05 s.
    now += 0.25
    assert bucket.take(now) == 0.0
    assert bucket.take(now) == 0.0
    assert bucket.take(now) == pytest.approx(0.05)
    # A long idle period refills to the burst, not beyond.
    now += 1000
    assert sum(1 for _ in range(10) if bucket.take(now) == 0.0) == 5


def test_refused_take_consumes_nothing() -> None:
    bucket = TokenBucket(per_s=1, burst=1)
    now = bucket._stamp
    assert bucket.take(now) == 0.0
    first = bucket.take(now + 0.5)
    second = bucket.take(now + 0.5)
    assert first == pytest.approx(0.5)
    assert second == pytest.approx(0.5)
    assert bucket.take(now + 1.0) == 0.0


def test_a_refusal_a_moment_before_the_next_token_still_asks_for_a_wait() -> None:
    """A token 0.2 ms away: the refusal's ``retry_after`` is 0.001 s, never 0 (a
    client told to wait 0 s would be refused again at once)."""
    bucket = TokenBucket(per_s=50, burst=1)
    now = bucket._stamp
    assert bucket.check(now) is None
    refused = bucket.check(now + 0.02 - 0.0002)
    assert refused is not None
    assert refused.retry_after == 0.001
