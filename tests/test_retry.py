"""Backoff: a retry loop's streak under a RetryPolicy, driven by a fake clock.

RetryPolicy's own properties (delay windows, Retry-After, budgets) are tested in
test_reader.py; here, the state a loop keeps and the tracker's policy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seeder.retry import Backoff, RetryPolicy, tracker_retry

MAX_TRIES = 10_000  # far above what any budget here allows: a loop that runs away fails


@dataclass
class Outage:
    """A service that fails every try before ``up_at`` (fake seconds), then answers."""

    up_at: float
    tries: list[float] = field(default_factory=list)
    refused: float | None = None  # the delay of the try the loop gave up instead of


def drive(backoff: Backoff, outage: Outage, rng: random.Random, start: float = 0.0) -> bool:
    """A retry loop as the tracker loops run one, on a fake clock; True if a try succeeded."""
    now = start
    for _ in range(MAX_TRIES):
        outage.tries.append(now)
        if now >= outage.up_at:
            backoff.reset()
            return True
        delay = backoff.fail(now, rng)
        if not backoff.allows(now, delay):
            outage.refused = delay
            return False
        now += delay
    raise AssertionError(f"no decision after {MAX_TRIES} tries")


def old_tracker_delay(failures: int, rng: random.Random) -> float:
    """The tracker loops' backoff as it was written out by hand: 0.5 s doubling to 10 s,
    times a factor from 0.5 to 1.5."""
    return min(0.5 * 2 ** (failures - 1), 10.0) * (0.5 + rng.random())


@given(failures=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_tracker_retry_draws_the_delays_of_the_hand_written_loops(failures: int, seed: int) -> None:
    policy = tracker_retry(120.0)
    drawn = policy.delay(failures, None, random.Random(seed))
    assert drawn == pytest.approx(old_tracker_delay(failures, random.Random(seed)), rel=1e-9)


def test_tracker_retry_spans_half_to_one_and_a_half_times_its_step() -> None:
    policy = tracker_retry(120.0)
    rng = random.Random(3)
    for failures, step in ((1, 0.5), (2, 1.0), (5, 8.0), (6, 10.0), (30, 10.0)):
        delays = [policy.delay(failures, None, rng) for _ in range(500)]
        assert step * 0.5 <= min(delays) < step * 0.6
        assert step * 1.4 < max(delays) <= step * 1.5


@given(
    budget=st.floats(0.0, 300.0),
    up_at=st.floats(0.0, 600.0),
    start=st.floats(0.0, 1e6),
    seed=st.integers(0, 2**32),
)
def test_no_try_starts_past_the_budget_and_none_is_given_up_early(
    budget: float, up_at: float, start: float, seed: int
) -> None:
    backoff = Backoff(tracker_retry(budget))
    outage = Outage(start + up_at)
    succeeded = drive(backoff, outage, random.Random(seed), start)
    first, last = outage.tries[0], outage.tries[-1]
    assert last - first <= budget + 1e-9 * max(1.0, start)
    if succeeded:
        assert last >= outage.up_at and backoff.failures == 0
    else:
        assert last < outage.up_at
        # It gave up only because the next try would have started past the budget.
        assert outage.refused is not None
        assert (last - first) + outage.refused > budget
        assert backoff.failing_for(last) == last - first
    assert all(b > a for a, b in zip(outage.tries, outage.tries[1:], strict=False))


def test_failing_for_counts_from_the_first_failure_of_the_streak() -> None:
    backoff = Backoff(RetryPolicy(base_delay=1.0, max_delay=1.0, jitter=0.0, budget=100.0))
    rng = random.Random(1)
    assert backoff.failing_for(50.0) == 0.0
    assert backoff.fail(10.0, rng) == 1.0
    assert backoff.fail(11.0, rng) == 1.0
    assert backoff.failures == 2
    assert backoff.failing_for(12.5) == 2.5
    backoff.reset()
    assert backoff.failures == 0 and backoff.failing_for(40.0) == 0.0


def test_a_success_restarts_the_delays_and_the_budget() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter=0.0, budget=20.0)
    backoff = Backoff(policy)
    rng = random.Random(1)
    first = Outage(up_at=15.0)
    assert drive(backoff, first, rng)
    assert first.tries == [0.0, 1.0, 3.0, 7.0, 15.0]
    # Much later, a second outage: the first delay again, and its own 20 s.
    second = Outage(up_at=1_000.0)
    assert not drive(backoff, second, rng, start=900.0)
    assert second.tries == [900.0, 901.0, 903.0, 907.0, 915.0]  # 915 + 8 would pass 920
    assert backoff.failures == 5 and backoff.failing_for(915.0) == 15.0


def test_a_zero_budget_never_retries_and_an_unlimited_one_never_gives_up() -> None:
    rng = random.Random(2)
    never = Backoff(tracker_retry(0.0))
    outage = Outage(up_at=1.0)
    assert not drive(never, outage, rng)
    assert outage.tries == [0.0]
    forever = Backoff(tracker_retry(float("inf")))
    long_outage = Outage(up_at=3_600.0)
    assert drive(forever, long_outage, rng)
    assert (
        max(b - a for a, b in zip(long_outage.tries, long_outage.tries[1:], strict=False)) <= 15.0
    )


def test_max_attempts_bounds_the_streak_whatever_the_budget() -> None:
    backoff = Backoff(RetryPolicy(base_delay=0.1, max_delay=0.1, budget=1e9, max_attempts=3))
    outage = Outage(up_at=1e6)
    assert not drive(backoff, outage, random.Random(4))
    assert len(outage.tries) == 3


def test_retry_after_is_a_floor_under_the_delay() -> None:
    backoff = Backoff(RetryPolicy(base_delay=0.5, max_delay=1.0, max_retry_after=30.0))
    rng = random.Random(5)
    assert backoff.fail(0.0, rng, retry_after=7.0) == 7.0
    assert backoff.fail(7.0, rng, retry_after=600.0) == 30.0
    assert backoff.fail(37.0, rng) <= 1.0
