"""Byte-rate caps: a token bucket on bytes, and the asyncio limiter that waits on it.

``TokenBucket`` is pure policy: time is passed in, nothing sleeps. Tokens (bytes)
refill at ``rate`` bytes per second up to ``burst``. ``take(n, now)`` debits ``n``
at once, even into debt, and returns how long the caller must wait before using
the bytes: a 4 MiB block against a 256 KiB burst is one call that waits for the
debt to clear, never a loop of small takes. Because every taker debits before it
waits, concurrent takers queue behind each other's debt in the order they came,
and over any interval the bytes let through are at most ``burst + rate × time``.

``RateLimiter`` wraps a bucket for one process's connections (``acquire(n)``
sleeps as the bucket says). A rate of 0 or None means unlimited: ``acquire``
then returns at once without touching the clock, and the callers on hot paths
check ``limited`` first so an uncapped peer pays one attribute read per block.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from swarm.errors import ConfigError

__all__ = [
    "DEFAULT_BURST_SECONDS",
    "MIN_BURST",
    "RateLimiter",
    "TokenBucket",
    "acquire_all",
    "default_burst",
]

DEFAULT_BURST_SECONDS: Final = 0.1
"""A bucket's default burst, as seconds of its rate: short, so a cap is smooth."""
MIN_BURST: Final = 256 * 1024
"""The smallest default burst in bytes, so tiny rates still move whole slices."""


def default_burst(rate: float) -> int:
    """The burst a bucket of ``rate`` bytes/s gets when none is given."""
    return max(MIN_BURST, int(rate * DEFAULT_BURST_SECONDS))


def _check_rate(rate: float | None, what: str = "rate") -> float:
    if rate is None:
        return 0.0
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= 0:
        raise ConfigError(f"{what} must be a number of bytes per second >= 0, got {rate!r}")
    if rate == float("inf"):
        return 0.0
    return float(rate)


class TokenBucket:
    """Tokens are bytes; see the module docstring. A rate of 0 lets everything through.

    ``burst`` (bytes) defaults to :func:`default_burst` of the rate and follows the
    rate when it changes, unless it was given. The bucket starts full at ``now``.
    """

    def __init__(self, rate: float | None, burst: int | None = None, *, now: float = 0.0) -> None:
        self._fixed_burst = burst
        if burst is not None and (isinstance(burst, bool) or burst < 1):
            raise ConfigError(f"burst must be at least 1 byte, got {burst!r}")
        self._rate = _check_rate(rate)
        self._burst = float(burst if burst is not None else default_burst(self._rate))
        self._tokens = self._burst
        self._stamp = now

    @property
    def rate(self) -> float:
        """Bytes per second; 0 means unlimited."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def tokens(self, now: float) -> float:
        """Bytes that may pass at ``now`` without waiting (negative: debt)."""
        self._refill(now)
        return self._tokens

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now

    def take(self, n: int, now: float) -> float:
        """Debit ``n`` bytes at ``now``; the seconds to wait before using them (0: none)."""
        if n < 0:
            raise ValueError(f"can't take a negative number of bytes ({n})")
        if self._rate <= 0:
            return 0.0
        self._refill(now)
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._rate

    def give_back(self, n: int, now: float) -> None:
        """Return ``n`` bytes taken but not used (the taker was cancelled while waiting)."""
        if self._rate <= 0 or n <= 0:
            return
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + n)

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the rate from ``now`` on; time before ``now`` refills at the old rate.

        A debt stays owed and is paid at the new rate. A bucket going from unlimited
        to limited starts full.
        """
        new = _check_rate(rate)
        if new == self._rate:
            return
        was_unlimited = self._rate <= 0
        self._refill(now)
        self._stamp = now
        self._rate = new
        if self._fixed_burst is None:
            self._burst = float(default_burst(new))
        if was_unlimited:
            self._tokens = self._burst
        else:
            self._tokens = min(self._tokens, self._burst)


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
