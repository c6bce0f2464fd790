"""How long to wait before retrying a transient origin failure, and when to give up.

Pure policy: no clock, no asyncio, no global randomness. The caller counts attempts,
adds up the delays it slept and passes a ``random.Random`` in; ``seeder.reader`` is
the caller that sleeps.

Backoff is exponential with full jitter (the delay is drawn uniformly from
``[0, min(max_delay, base_delay * 2**(attempt-1))]``), so a burst of seeders that
were throttled together does not come back together. A server's ``Retry-After``
is a floor under the drawn delay: we never come back sooner than asked. Every
delay is capped at ``max_delay``, a ``Retry-After`` above it included, so a hostile
or confused server can't park a seeder for an hour; the total budget still ends
the retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from swarm.errors import ConfigError

# 2**62 * any sane base_delay is already far above any max_delay; a larger exponent
# only risks float overflow for absurd attempt numbers.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff and budget for retrying one origin request.

    ``max_attempts`` counts every try, the first included: 1 means never retry.
    ``max_total_delay`` bounds the sum of the delays slept for one request.
    """

    base_delay: float = 0.25
    max_delay: float = 30.0
    max_attempts: int = 10
    max_total_delay: float = 300.0

    def __post_init__(self) -> None:
        if not self.base_delay > 0:
            raise ConfigError(f"retry base_delay must be > 0 s, got {self.base_delay}")
        if not self.max_delay >= self.base_delay:
            raise ConfigError(
                f"retry max_delay ({self.max_delay} s) must be >= base_delay ({self.base_delay} s)"
            )
        if self.max_attempts < 1:
            raise ConfigError(f"retry max_attempts must be >= 1, got {self.max_attempts}")
        if not self.max_total_delay >= 0:
            raise ConfigError(f"retry max_total_delay must be >= 0 s, got {self.max_total_delay}")

    def ceiling(self, attempt: int) -> float:
        """The upper end of the jitter window before retry number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        exponent = min(attempt - 1, _MAX_EXPONENT)
        return min(self.max_delay, self.base_delay * float(2**exponent))

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry).

        Drawn uniformly from ``[0, ceiling(attempt)]``, raised to ``retry_after`` if the
        server asked for more, and capped at ``max_delay``.
        """
        wait = rng.uniform(0.0, self.ceiling(attempt))
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        return min(wait, self.max_delay)

    def allows(self, failures: int, slept: float, next_delay: float) -> bool:
        """Whether another try fits the budget.

        ``failures`` is how many tries have failed so far, ``slept`` the seconds already
        waited between them and ``next_delay`` the wait before the next try.
        """
        return failures < self.max_attempts and slept + next_delay <= self.max_total_delay
