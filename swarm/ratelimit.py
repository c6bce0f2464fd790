"""Byte-rate caps: a token bucket on bytes (the asyncio limiter that waits on it is
:mod:`swarm.limiter`).

``TokenBucket`` is pure policy: time is passed in, nothing sleeps. Tokens (bytes)
refill at ``rate`` bytes per second up to ``burst``. ``take(n, now)`` debits ``n``
at once, even into debt, and returns how long the caller must wait before using
the bytes: a 4 MiB block against a 256 KiB burst is one call that waits for the
debt to clear, never a loop of small takes. Because every taker debits before it
waits, concurrent takers queue behind each other's debt in the order they came,
and over any interval the bytes let through are at most ``burst + rate × time``.

A rate of 0 or None means unlimited: ``take`` returns 0 at once.
"""

from __future__ import annotations

from typing import Final

from core.errors import ConfigError

__all__ = [
    "DEFAULT_BURST_SECONDS",
    "MIN_BURST",
    "TokenBucket",
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
