"""How long to wait before retrying a transient origin failure, and when to give up.

Pure policy: no clock, no asyncio, no global randomness. The caller counts failures,
measures the time since the first one with its own clock and passes a
``random.Random`` in; ``seeder.reader`` is the caller that sleeps, the simulator
another.

Backoff is exponential (``base_delay * multiplier**(attempt-1)``, capped at
``max_delay``) with jitter: the delay is drawn uniformly from the top ``jitter``
fraction of that window (1.0, the default, is full jitter), so a burst of seeders
that were throttled together does not come back together. A server's
``Retry-After`` is a floor under the drawn delay, honoured up to
``max_retry_after``: we never come back sooner than asked, but a confused server's
"come back tomorrow" is a long pause, not a day's sleep.

The budget is time, not a count: object stores have brownouts of minutes (503
SlowDown for every request), and a fetch that gives up after ten quick tries turns
one into an outage. ``budget`` seconds after a request first failed, its retries
stop; with the default of ten minutes and a 20 s cap, a brownout costs a few
dozen requests per range, far below what the origin is throttling.
``max_attempts`` can still bound the count (the simulator uses it).

The same policy paces every retry loop: origin reads (``seeder.reader``), and an
unreachable tracker (``tracker_retry``: the peer's announces, the CLI's manifest
request). A loop keeps its streak of failures in a :class:`Backoff`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from core.errors import ConfigError

# Seconds a request keeps being retried after its first transient failure.
DEFAULT_RETRY_TIME: Final = 600.0
# Any sane base_delay times multiplier**62 is far above any max_delay; a larger
# exponent only risks float overflow for absurd attempt numbers.
_MAX_EXPONENT: Final = 62
_MAX_MULTIPLIER: Final = 16.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff and budget for retrying one origin request.

    ``base_delay`` is the ceiling of the first retry's delay, ``max_delay`` the cap of
    every delay; ``budget`` is the seconds from the first failure after which no retry
    starts. ``max_attempts``, if set, counts every try, the first included (1 means
    never retry).
    """

    base_delay: float = 0.5
    max_delay: float = 20.0
    multiplier: float = 2.0
    jitter: float = 1.0
    max_retry_after: float = 120.0
    budget: float = DEFAULT_RETRY_TIME
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.base_delay > 0:
            raise ConfigError(f"retry base_delay must be > 0 s, got {self.base_delay}")
        if not self.max_delay >= self.base_delay:
            raise ConfigError(
                f"retry max_delay ({self.max_delay} s) must be >= base_delay ({self.base_delay} s)"
            )
        if not 1.0 <= self.multiplier <= _MAX_MULTIPLIER:
            raise ConfigError(
                f"retry multiplier must be between 1 and {_MAX_MULTIPLIER:g}, got {self.multiplier}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"retry jitter must be between 0 and 1, got {self.jitter}")
        if not self.max_retry_after >= 0:
            raise ConfigError(f"retry max_retry_after must be >= 0 s, got {self.max_retry_after}")
        if not self.budget >= 0:
            raise ConfigError(
                f"origin retry time must be >= 0 s (0: never retry), got {self.budget}"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError(f"retry max_attempts must be >= 1, got {self.max_attempts}")

    def ceiling(self, attempt: int) -> float:
        """The upper end of the jitter window before retry number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        exponent = min(attempt - 1, _MAX_EXPONENT)
        return min(self.max_delay, self.base_delay * self.multiplier**exponent)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry).

        Drawn uniformly from ``[(1 - jitter) * ceiling, ceiling]``, then raised to
        ``retry_after`` (itself capped at ``max_retry_after``) if the server asked for more.
        """
        top = self.ceiling(attempt)
        wait = rng.uniform(top * (1.0 - self.jitter), top)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait

    def allows(self, failures: int, elapsed: float, next_delay: float) -> bool:
        """Whether another try fits the budget.

        ``failures`` is how many tries have failed so far, ``elapsed`` the seconds since
        the first of them failed and ``next_delay`` the wait before the next try.
        """
        if self.max_attempts is not None and failures >= self.max_attempts:
            return False
        return elapsed + next_delay <= self.budget


def tracker_retry(timeout: float) -> RetryPolicy:
    """How an unreachable tracker is retried, giving up ``timeout`` seconds after it
    first failed (``--tracker-timeout``).

    0.5 s doubling to 10 s, times a factor drawn from 0.5 to 1.5 so that a burst of
    peers the tracker lost together does not come back together: a window whose top
    is 1.5 times that and whose bottom is a third of its top.
    """
    return RetryPolicy(base_delay=0.75, max_delay=15.0, jitter=2 / 3, budget=timeout)


class Backoff:
    """One retry loop's current streak of failures under a :class:`RetryPolicy`.

    Pure, as the policy is: the caller passes the time from its own clock and its
    ``random.Random``. A loop calls :meth:`fail` when a try fails, gives up unless
    :meth:`allows` the delay it returned, sleeps that long otherwise, and calls
    :meth:`reset` when a try succeeds, so the next outage starts from the first
    delay with a fresh budget.
    """

    __slots__ = ("_first_failure", "failures", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0  # tries failed since the last success
        self._first_failure = 0.0

    def fail(self, now: float, rng: random.Random, retry_after: float | None = None) -> float:
        """Record a failed try at ``now``; the seconds to wait before the next one.

        ``retry_after`` is the server's ``Retry-After``, if it sent one.
        """
        if self.failures == 0:
            self._first_failure = now
        self.failures += 1
        return self.policy.delay(self.failures, retry_after, rng)

    def failing_for(self, now: float) -> float:
        """Seconds since the first failure of the current streak (0 when there is none)."""
        return now - self._first_failure if self.failures else 0.0

    def allows(self, now: float, delay: float) -> bool:
        """Whether a next try, ``delay`` seconds after ``now``, fits the policy's budget."""
        return self.policy.allows(self.failures, self.failing_for(now), delay)

    def reset(self) -> None:
        """A try succeeded: the streak is over."""
        self.failures = 0
