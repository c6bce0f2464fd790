"""The byte token bucket (``swarm.ratelimit``), driven by a fake clock.

The bucket is pure: these tests pass time in and add up the waits it asks for,
so they check the rate exactly without sleeping. The asyncio ``RateLimiter`` is
checked with a fake clock too; its sleeps are real but short (a tiny rate is
never slept on: the tests only look at what it reserves).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from core.errors import ConfigError
from swarm.limiter import RateLimiter, acquire_all
from swarm.ratelimit import MIN_BURST, TokenBucket, default_burst

MiB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(bucket: TokenBucket, sizes: list[int], start: float = 0.0) -> float:
    """Send ``sizes`` back to back as fast as the bucket allows; the time the last one may go."""
    now = start
    for n in sizes:
        now += bucket.take(n, now)
    return now


def test_unlimited_bucket_never_waits() -> None:
    for rate in (None, 0):
        bucket = TokenBucket(rate)
        assert bucket.rate == 0
        assert all(bucket.take(64 * MiB, t) == 0.0 for t in range(100))


def test_burst_passes_at_once_then_the_rate_holds() -> None:
    bucket = TokenBucket(1_000_000, burst=100_000, now=0.0)
    assert bucket.take(100_000, 0.0) == 0.0  # the full burst, at once
    assert bucket.take(50_000, 0.0) == pytest.approx(0.05)  # then 1 MB/s
    # Half a second later, the debt is paid and 450 kB more came in, capped at burst.
    assert bucket.tokens(0.55) == pytest.approx(100_000)


def test_a_block_larger_than_the_burst_goes_into_debt_and_waits_for_it() -> None:
    bucket = TokenBucket(1 * MiB, burst=MIN_BURST, now=0.0)
    wait = bucket.take(4 * MiB, 0.0)
    assert wait == pytest.approx((4 * MiB - MIN_BURST) / MiB)
    # The next one waits behind that debt: it is owed in order.
    second = bucket.take(1 * MiB, 0.0)
    assert second == pytest.approx(wait + 1.0)
    assert bucket.tokens(wait) == pytest.approx(-1 * MiB)


def test_long_run_average_is_within_one_percent_of_the_rate() -> None:
    rng = random.Random(7)
    rate = 4 * MiB
    bucket = TokenBucket(rate, now=0.0)
    sizes = [rng.choice((16 * 1024, 256 * 1024, 1 * MiB, 4 * MiB)) for _ in range(2000)]
    end = drain(bucket, sizes)
    total = sum(sizes)
    # Bytes let through by ``end``: everything; no more than burst + rate × time.
    assert total <= bucket.burst + rate * end + 1
    achieved = total / end
    assert abs(achieved - rate) / rate < 0.01, achieved / rate


def test_bytes_over_any_window_stay_under_burst_plus_rate() -> None:
    rng = random.Random(3)
    rate = 2 * MiB
    bucket = TokenBucket(rate, burst=512 * 1024, now=0.0)
    now, sent = 0.0, []
    for _ in range(500):
        now += rng.random() * 0.2  # idle at times, so the bucket refills
        n = rng.randrange(1, 2 * MiB)
        now += bucket.take(n, now)
        sent.append((now, n))
    for i in range(0, len(sent), 25):
        for j in range(i, len(sent), 37):
            window = sent[j][0] - sent[i][0]
            moved = sum(n for _, n in sent[i : j + 1])
            assert moved <= bucket.burst + rate * window + 2 * MiB  # + the first one's size


def test_rate_change_keeps_the_debt_and_pays_it_at_the_new_rate() -> None:
    bucket = TokenBucket(1 * MiB, burst=MIN_BURST, now=0.0)
    bucket.take(MIN_BURST + 2 * MiB, 0.0)  # 2 MiB owed
    bucket.set_rate(4 * MiB, 1.0)  # one second at 1 MiB/s paid 1 MiB of it
    assert bucket.tokens(1.0) == pytest.approx(-1 * MiB)
    assert bucket.take(0, 1.0) == pytest.approx(0.25)  # the rest at 4 MiB/s
    assert bucket.burst == MIN_BURST  # a given burst stays
    free = TokenBucket(1 * MiB, now=0.0)
    free.set_rate(40 * MiB, 0.0)
    assert free.burst == default_burst(40 * MiB) > default_burst(1 * MiB)  # one not given follows


def test_going_from_unlimited_to_limited_starts_full_and_back_lets_all_through() -> None:
    bucket = TokenBucket(None, now=0.0)
    bucket.take(100 * MiB, 0.0)
    bucket.set_rate(1 * MiB, 5.0)
    assert bucket.tokens(5.0) == pytest.approx(bucket.burst)
    assert bucket.take(int(bucket.burst) + MiB, 5.0) == pytest.approx(1.0)
    bucket.set_rate(0, 5.0)
    assert bucket.take(100 * MiB, 5.0) == 0.0


def test_bad_rates_and_bursts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bytes per second"):
        TokenBucket(-1)
    with pytest.raises(ConfigError, match="burst"):
        TokenBucket(1000, burst=0)
    with pytest.raises(ConfigError, match="bytes per second"):
        RateLimiter(float("nan"))
    with pytest.raises(ValueError, match="negative"):
        TokenBucket(1000).take(-1, 0.0)


def test_give_back_returns_unused_bytes() -> None:
    bucket = TokenBucket(1 * MiB, burst=MIN_BURST, now=0.0)
    bucket.take(MIN_BURST + MiB, 0.0)
    bucket.give_back(MiB, 0.0)
    assert bucket.tokens(0.0) == pytest.approx(0)
    bucket.give_back(10 * MiB, 0.0)  # never above the burst
    assert bucket.tokens(0.0) == pytest.approx(MIN_BURST)


def test_limiter_unlimited_returns_at_once_without_reading_the_clock() -> None:
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        return 0.0

    limiter = RateLimiter(None, clock=clock)
    before = reads
    asyncio.run(limiter.acquire(1 << 40))
    assert reads == before
    assert not limiter.limited


def test_limiter_sleeps_what_the_bucket_says_and_gives_back_when_cancelled() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10 * MiB, burst=MIN_BURST, clock=clock)

    async def body() -> None:
        await limiter.acquire(MIN_BURST)  # within the burst: no wait
        assert limiter.waited == 0.0
        waiter = asyncio.create_task(limiter.acquire(100 * MiB))  # a 10 s wait
        await asyncio.sleep(0)
        assert limiter.waited == pytest.approx(10.0)
        assert limiter.bucket.tokens(clock.now) == pytest.approx(-100 * MiB)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert limiter.bucket.tokens(clock.now) == pytest.approx(0.0)
        clock.now += 0.01
        await asyncio.wait_for(limiter.acquire(100 * 1024), 1.0)  # paid for: no wait

    asyncio.run(body())


def test_acquire_all_waits_for_the_slowest_cap_not_the_sum() -> None:
    clock = FakeClock()
    slow = RateLimiter(1 * MiB, burst=MIN_BURST, clock=clock)
    fast = RateLimiter(4 * MiB, burst=MIN_BURST, clock=clock)
    off = RateLimiter(None, clock=clock)

    async def body() -> None:
        task = asyncio.create_task(acquire_all(MIN_BURST + MiB, (slow, fast, off)))
        await asyncio.sleep(0)
        assert slow.waited == pytest.approx(1.0)
        assert fast.waited == pytest.approx(1.0)  # the longest wait, charged to both
        assert fast.bucket.tokens(0.0) == pytest.approx(-MiB)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())


def test_a_rate_change_shortens_the_waits_already_under_way() -> None:
    """Four callers waiting out 1 MiB each at 100 KB/s (10-40 s): lifting the cap, or
    raising it, releases them within the bound below, or the test fails on it."""
    import asyncio

    async def main(new_rate: float | None) -> None:
        limiter = RateLimiter(100_000, burst=1)
        waits = [asyncio.create_task(limiter.acquire(1 << 20)) for _ in range(4)]
        await asyncio.sleep(0.05)
        limiter.set_rate(new_rate)
        await asyncio.wait_for(asyncio.gather(*waits), 5.0)
        assert limiter.bucket.rate == (new_rate or 0.0)

    asyncio.run(main(None))
    asyncio.run(main(1e12))
