"""Reading a byte range of an origin object with several concurrent ranged requests.

``RangedReader.read(key, offset, buf)`` splits ``buf`` into ranges of ``range_size``
bytes and fills each with one ``Origin.read_into`` call, at most ``max_concurrency``
requests in flight across every ``read`` sharing the reader (one reader per process
caps the load one peer puts on the origin). A range that fails with
``OriginTransientError`` (429, 5xx, SlowDown, a reset or timeout) is retried after the
``RetryPolicy``'s delay, without holding a concurrency slot while it waits, for as
long as the policy's time budget lasts from its first failure (``retry_time``,
default ten minutes: a brownout of the object store is waited out, not fatal). Each
retry is counted in ``origin.counters.retries`` (and ``throttled`` for
429/503/SlowDown) and logged at WARNING on ``swarm.origin`` with how long the origin
has been failing and when we give up. Permanent errors (not found, permission,
unsupported) end the read at once, as does ``RetryBudgetExceeded`` when a range runs
out of budget; the other ranges of that read are cancelled first.

An optional ``rate_limit`` hook (e.g. ``RateLimiter.acquire`` of
``swarm.limiter``) is awaited with each range's length before that range is
requested, retries included, and before a concurrency slot is taken, so waiting
for the byte-rate cap never holds a slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable

from core.errors import ConfigError
from seeder.backends.common import OriginThrottledError
from seeder.errors import OriginTransientError, RetryBudgetExceeded
from seeder.origin import Origin
from seeder.retry import RetryPolicy

log = logging.getLogger("swarm.origin")

Activity = Callable[[int, int], None]
"""``activity(reading, waiting)``: see :meth:`RangedReader.read`."""

DEFAULT_RANGE_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 16
LIMITED_SLICE = 256 * 1024
"""Largest request made under a byte-rate cap (see ``RangedReader._read_range``)."""


class RangedReader:
    """Concurrent, retried ranged reads from one origin into caller-provided buffers."""

    def __init__(
        self,
        origin: Origin,
        *,
        range_size: int = DEFAULT_RANGE_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        retry: RetryPolicy | None = None,
        retry_time: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_limit: Callable[[int], Awaitable[None]] | None = None,
        rate_limited: Callable[[], bool] | None = None,
    ) -> None:
        """``retry_time``, if given, replaces ``retry``'s budget: the seconds a failing
        range keeps being retried (the CLI's origin retry time). ``clock`` measures it.
        ``rate_limit(n)`` is awaited before each request of ``n`` bytes."""
        if range_size < 1:
            raise ConfigError(f"range size must be at least 1 byte, got {range_size}")
        if max_concurrency < 1:
            raise ConfigError(f"origin concurrency must be at least 1, got {max_concurrency}")
        self.origin = origin
        self.range_size = range_size
        self.max_concurrency = max_concurrency
        policy = retry if retry is not None else RetryPolicy()
        if retry_time is not None:
            policy = dataclasses.replace(policy, budget=retry_time)
        self.retry = policy
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.rate_limit = rate_limit
        # Whether the hook holds reads back right now (None: whenever there is one);
        # only then are ranges read in slices.
        self.rate_limited = rate_limited
        self._slots = asyncio.Semaphore(max_concurrency)

    async def read(
        self,
        key: str,
        offset: int,
        buf: memoryview,
        progress: Callable[[int], None] | None = None,
        activity: Activity | None = None,
    ) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``key`` from ``offset``.

        ``progress`` is called with each range's length as that range completes, so a
        seeder can report progress (the tracker's stall detection) within a piece.
        ``activity(reading, waiting)`` is called with +1 or -1 as a range starts or
        stops reading from the origin (``reading``) or waiting out a throttled answer
        (``waiting``): a pull none of whose ranges is reading, and one or more is
        waiting, has nothing on the wire (the tracker may take it back then).
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset} reading {key!r}")
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if view.readonly:
            raise ValueError(f"read-only buffer passed to read {key!r}")
        length = len(view)
        if length == 0:
            return
        starts = range(0, length, self.range_size)
        if len(starts) == 1:
            await self._read_range(key, offset, view, progress, activity)
            return
        tasks = [
            asyncio.create_task(
                self._read_range(
                    key, offset + start, view[start : start + self.range_size], progress, activity
                ),
                name=f"origin-read {key} @{offset + start}",
            )
            for start in starts
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Cancelled by our caller or a range failed: stop the rest before returning,
            # so no task writes into ``buf`` after we give it back.
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # the first failure in range order, for a stable message
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                raise exc

    async def _read_range(
        self,
        key: str,
        offset: int,
        view: memoryview,
        progress: Callable[[int], None] | None = None,
        activity: Activity | None = None,
    ) -> None:
        if (
            self.rate_limit is not None
            and len(view) > LIMITED_SLICE
            and (self.rate_limited is None or self.rate_limited())
        ):
            # Under a byte-rate cap a whole range may take longer than the tracker's
            # stall timeout to be allowed through, and progress is reported per
            # request: read it in slices, so progress moves while the cap holds it back.
            for start in range(0, len(view), LIMITED_SLICE):
                await self._read_range(
                    key, offset + start, view[start : start + LIMITED_SLICE], progress, activity
                )
            return
        end = offset + len(view) - 1
        failures = 0
        first_failure = 0.0
        while True:
            try:
                if self.rate_limit is not None:
                    await self.rate_limit(len(view))
                async with self._slots:
                    if activity is None:
                        await self.origin.read_into(key, offset, view)
                    else:
                        activity(1, 0)
                        try:
                            await self.origin.read_into(key, offset, view)
                        finally:
                            activity(-1, 0)
                if progress is not None:
                    progress(len(view))
                return
            except OriginTransientError as exc:
                now = self.clock()
                if failures == 0:
                    first_failure = now
                failures += 1
                elapsed = now - first_failure
                throttled = isinstance(exc, OriginThrottledError)
                if throttled:
                    counters = self.origin.counters
                    counters.throttled += 1
                    if exc.retry_after is not None and exc.retry_after > counters.retry_after:
                        counters.retry_after = exc.retry_after
                trouble = "throttling" if throttled else "errors"
                wait = self.retry.delay(failures, exc.retry_after, self.rng)
                if not self.retry.allows(failures, elapsed, wait):
                    raise RetryBudgetExceeded(
                        f"{self.origin.url} {key} bytes {offset}-{end}: giving up after "
                        f"{failures} attempt(s) over {elapsed:.1f} s of origin {trouble} "
                        f"(retry budget {self.retry.budget:g} s; a longer --origin-retry-time "
                        f"waits out longer outages); last error: {exc}"
                    ) from exc
                self.origin.counters.retries += 1
                log.warning(
                    # The backends' errors name the object and range already.
                    "origin %s for %.0f s (attempt %d): %s; retrying in %.1f s, "
                    "giving up after %g s",
                    trouble,
                    elapsed,
                    failures,
                    exc,
                    wait,
                    self.retry.budget,
                    extra={
                        "origin_url": self.origin.url,
                        "origin_key": key,
                        "range_start": offset,
                        "range_end": end,
                        "attempt": failures,
                        "delay": wait,
                        "throttled": throttled,
                        "failing_for": elapsed,
                    },
                )
                if activity is None or not throttled:
                    await asyncio.sleep(wait)
                else:
                    activity(0, 1)
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        activity(0, -1)
