"""The asyncio side of byte-rate caps: wait as a :class:`~swarm.ratelimit.TokenBucket` says.

``RateLimiter`` wraps a bucket for one process's connections (``acquire(n)``
sleeps as the bucket says). A rate of 0 or None means unlimited: ``acquire``
then returns at once without touching the clock, and the callers on hot paths
check ``limited`` first so an uncapped peer pays one attribute read per block.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from swarm.ratelimit import TokenBucket

__all__ = ["RateLimiter", "acquire_all"]


class RateLimiter:
    """A process's cap on one direction of traffic: ``await acquire(n)`` before moving n bytes.

    Shared by every connection (or origin read) it limits. ``clock`` is monotonic
    seconds.
    """

    def __init__(
        self,
        rate: float | None = None,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.bucket = TokenBucket(rate, burst, now=clock())
        self.waited = 0.0
        """Seconds callers were told to wait on this limiter, summed (for metrics)."""
        # Futures of callers waiting out a debt, resolved when the rate changes so
        # that they wait what is left at the new rate rather than at the old one.
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def limited(self) -> bool:
        return self.bucket.rate > 0

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def set_rate(self, rate: float | None) -> None:
        """A new rate (bytes/s; 0 or None: unlimited) from now on; callers already
        waiting wait what is left of their debt at the new rate."""
        before = self.bucket.rate
        self.bucket.set_rate(rate, self._clock())
        if self.bucket.rate != before:
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def reserve(self, n: int) -> float:
        """Debit ``n`` bytes now; the seconds to wait before moving them."""
        if self.bucket.rate <= 0 or n <= 0:
            return 0.0
        return self.bucket.take(n, self._clock())

    def give_back(self, n: int) -> None:
        self.bucket.give_back(n, self._clock())

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes may move; at once when unlimited."""
        if self.bucket.rate > 0:
            await acquire_all(n, (self,))


async def acquire_all(n: int, limiters: tuple[RateLimiter, ...]) -> None:
    """Wait until ``n`` bytes may pass every one of ``limiters`` (the longest wait, not the sum)."""
    taken = [limiter for limiter in limiters if limiter.limited]
    wait = max((limiter.reserve(n) for limiter in taken), default=0.0)
    if wait <= 0:
        return
    for limiter in taken:
        limiter.waited += wait
    loop = asyncio.get_running_loop()
    try:
        while wait > 0:
            rates = [limiter.rate for limiter in taken]
            woken: asyncio.Future[None] = loop.create_future()
            for limiter in taken:
                limiter._waiters.add(woken)
            started = loop.time()
            try:
                await asyncio.wait({woken}, timeout=wait)
            finally:
                for limiter in taken:
                    limiter._waiters.discard(woken)
            if not woken.done():
                return
            # A rate changed: the debt left is paid at the new rate (at once if lifted).
            left = wait - (loop.time() - started)
            wait = max(
                (
                    left * old / limiter.rate if limiter.rate > 0 else 0.0
                    for limiter, old in zip(taken, rates, strict=True)
                ),
                default=0.0,
            )
    except asyncio.CancelledError:
        # The bytes will not move: let whoever comes next have them.
        for limiter in taken:
            limiter.give_back(n)
        raise
