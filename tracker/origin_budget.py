"""How many pieces the cluster pulls from the origin at once: adapted to what the origin gives.

Invariant 3 of the design: origin reads are spread over many seeders within a
per-cluster budget that adapts to throttling. :class:`OriginBudget` is that
adaptation, pure policy (time and counts are passed in; no clock, no I/O). The
tracker feeds it, once per round, the origin bytes its seeders reported
(:attr:`tracker.assignment.AssignmentStats.origin_bytes`) and whether the budget
was what held pulls back, and between rounds the throttled answers (429, 503,
SlowDown) and the largest ``Retry-After`` the seeders saw; it answers the cap
that :meth:`tracker.assignment.SeederAssignment.set_cap` applies.

The rule, per round. The budget is searched for between ``good`` (the largest
budget a round was served at without a throttle while pulls waited for it) and
``limit`` (the smallest budget that was throttled, or that bought no more
throughput than the one below it):

* **Throttled** (any 429/503/SlowDown in the round): ``limit`` drops to the
  budget; the budget goes back to ``good`` if that is below it, else it is
  halved (never below ``floor``) and ``good`` is forgotten (the origin gives
  less than it did). The tracker takes back the pulls over the new budget that
  have not started (:meth:`tracker.assignment.SeederAssignment.shed`): a lower
  budget alone takes nothing away, and their retries would keep the origin
  throttling. No growth for the ``Retry-After`` the origin asked for, two
  rounds at least.
* **Quiet and budget-bound**: the budget grows, doubling while no ``limit`` is
  known, else to the midpoint of ``good`` and ``limit`` (bisection: an origin
  whose limit is a count of concurrent requests is found in a few rounds). A
  growth by a fraction x that did not raise the measured throughput by
  ``gain`` * x (half of x, by default) is undone and becomes the ``limit``: more pulls than the origin serves at full speed only
  split its egress, so every piece takes longer to leave it and to become
  shareable. Once ``good`` and ``limit`` meet, the budget holds for
  ``probe_rounds`` quiet rounds, then forgets ``limit`` and tries a quarter
  more (doubling again if that is served): an origin that recovers from a
  throttling window (or was throttled by another tenant) is found again, at
  the cost of a few throttled requests per probe. A probe that fails puts the
  budget and ``limit`` back where they were and doubles the wait before the
  next (at most ``MAX_PROBE_WAIT`` times ``probe_rounds``); one that is served
  resets it.
* Otherwise (pulls held back by something else, or nothing left to pull, or
  the round after a decrease, while pulls over the new budget drain) it holds:
  throughput says nothing about the budget then.

It never goes above ``ceiling`` (the operator's ``--origin-max-pulls``) nor
below ``floor``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["START_BUDGET", "BudgetRound", "OriginBudget"]

MAX_HOLD = 120.0
"""The longest Retry-After the budget waits out, in seconds (the seeders' readers
honour no longer one either): a confused or hostile report can't freeze it for a day."""

MAX_PROBE_WAIT = 4
"""Failed probes at most stretch the wait between probes to this many times
``probe_rounds``."""

START_BUDGET = 64
"""Origin pulls a swarm starts with: 64 single-stream GETs of ~100 MB/s fill a
50 Gbit/s origin; a faster one is found by doubling, a round per announce interval."""


@dataclass(frozen=True, slots=True)
class BudgetRound:
    """One round's decision, for status pages and tests."""

    at: float
    rate: float
    """Origin bytes per second measured over the round."""
    throttles: int
    budget: int
    """The budget in effect after the round."""
    why: str


class OriginBudget:
    """The cluster's origin pulls in flight; see the module docstring."""

    def __init__(
        self,
        ceiling: int,
        *,
        start: int | None = START_BUDGET,
        floor: int = 1,
        round_seconds: float = 2.0,
        decrease: float = 0.5,
        gain: float = 0.5,
        probe_rounds: int = 2,
        history: int = 256,
    ) -> None:
        if floor < 1:
            raise ValueError(f"origin budget floor must be >= 1, got {floor}")
        if ceiling < floor:
            raise ValueError(f"origin budget ceiling {ceiling} is below its floor {floor}")
        if not round_seconds > 0:
            raise ValueError(f"round_seconds must be > 0, got {round_seconds}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        if not gain >= 0:
            raise ValueError(f"gain must be >= 0, got {gain}")
        if probe_rounds < 1:
            raise ValueError(f"probe_rounds must be >= 1, got {probe_rounds}")
        self.ceiling = ceiling
        self.floor = floor
        self.round_seconds = round_seconds
        self.decrease = decrease
        self.gain = gain
        self.probe_rounds = probe_rounds
        self.budget = max(floor, min(ceiling, ceiling if start is None else start))
        self.shedding = False
        """True from a throttled round to the next quiet one: pulls over the budget
        that have not started should be taken back (never after a plateau: those
        pulls are served, and taking them back could read a piece twice)."""
        self.good: int | None = None
        """The largest budget served without a throttle while pulls waited for it."""
        self.limit: int | None = None
        """The smallest budget throttled, or that bought nothing over the one below."""
        self.throttles_seen = 0
        """Throttled answers reported since the start."""
        self.backoffs = 0
        """Rounds that ended in a back-off."""
        self.rounds: list[BudgetRound] = []
        """The last ``history`` rounds, oldest first."""
        self._history = history
        self._round_start: float | None = None
        self._round_bytes = 0
        self._throttles = 0
        self._retry_after = 0.0
        self._hold_until = float("-inf")
        self._quiet = 0  # rounds without a throttle since the last one
        # The growth on trial: the budget before it and the rate measured there.
        self._trial: tuple[int, float] | None = None
        # The round now running follows a decrease: pulls over the new budget are
        # still draining, so its rate measures no budget.
        self._draining = False
        # The limit a probe forgot (restored if the probe fails), and the quiet
        # rounds before the next probe: doubled by each failed probe, at most
        # MAX_PROBE_WAIT times probe_rounds, back to probe_rounds when one succeeds.
        self._probing: int | None = None
        self._probe_wait = probe_rounds

    def throttled(self, count: int, retry_after: float | None = None) -> None:
        """The seeders saw ``count`` throttled answers; ``retry_after`` is the longest
        ``Retry-After`` among them, in seconds, if any had one."""
        if count < 0:
            raise ValueError(f"throttle count must be >= 0, got {count}")
        self._throttles += count
        self.throttles_seen += count
        if retry_after is not None and retry_after > self._retry_after:
            self._retry_after = min(retry_after, MAX_HOLD)

    def update(self, now: float, origin_bytes: int, budget_bound: bool) -> int:
        """Close the round if it is over; returns the budget in effect.

        ``origin_bytes`` is the cumulative count of bytes the seeders reported;
        ``budget_bound`` whether pulls were waiting for the budget (pieces left to
        assign, every slot of the budget in use).
        """
        if self._round_start is None:
            self._round_start, self._round_bytes = now, origin_bytes
            return self.budget
        elapsed = now - self._round_start
        if elapsed < self.round_seconds:
            return self.budget
        rate = max(0, origin_bytes - self._round_bytes) / elapsed
        self._round_start, self._round_bytes = now, origin_bytes
        throttles, retry_after = self._throttles, self._retry_after
        self._throttles, self._retry_after = 0, 0.0
        self.shedding = bool(throttles)
        before = self.budget
        draining, self._draining = self._draining, False
        why = (
            self._back_off(now, retry_after)
            if throttles
            else self._grow(now, rate, budget_bound, draining)
        )
        self._draining = self.budget < before
        self.rounds.append(BudgetRound(now, rate, throttles, self.budget, why))
        if len(self.rounds) > self._history:
            del self.rounds[: len(self.rounds) - self._history]
        return self.budget

    def _back_off(self, now: float, retry_after: float) -> str:
        budget = self.budget
        self.backoffs += 1
        self._quiet = 0
        self._trial = None
        self.limit = budget if self.limit is None else min(self.limit, budget)
        if self._probe_failed():
            return "throttled"
        if self.good is not None and self.good < budget:
            self.budget = self.good
        else:
            self.good = None
            self.budget = max(self.floor, int(budget * self.decrease))
        # Two rounds at least: pulls taken back (SeederAssignment.shed) and retries
        # already under way drain in the first, and its rate is no measure.
        self._hold_until = now + max(retry_after, self.round_seconds)
        return "throttled"

    def _probe_failed(self) -> bool:
        """If a probe was under way, go back to where it started and wait longer
        before the next one; returns whether one was."""
        probed, self._probing = self._probing, None
        if probed is None or self.good is None:
            return False
        self.limit = min(probed, self.limit if self.limit is not None else probed)
        self.budget = self.good
        self._probe_wait = min(self._probe_wait * 2, MAX_PROBE_WAIT * self.probe_rounds)
        return True

    def _grow(self, now: float, rate: float, bound: bool, draining: bool) -> str:
        self._quiet += 1
        trial, self._trial = self._trial, None
        if trial is not None and bound:
            before, before_rate = trial
            # A growth by a fraction x must raise the rate by gain * x at least
            # (half, by default): an origin far from its limit gives all of it.
            if rate < before_rate * (1.0 + self.gain * (self.budget - before) / before):
                # The growth bought nothing: undo it; it is the limit now.
                self.limit = self.budget if self.limit is None else min(self.limit, self.budget)
                if not self._probe_failed():
                    self.budget = before
                return "plateau"
            if self._probing is not None:
                self._probing = None  # the probe was served: the origin gives more
                self._probe_wait = self.probe_rounds
        if not bound:
            return "steady"
        self.good = self.budget if self.good is None else max(self.good, self.budget)
        if draining:
            return "settle"  # no baseline for a growth to be judged against
        if now < self._hold_until or self.budget >= self.ceiling:
            return "hold"
        limit = self.limit
        if limit is not None and self.good + 1 >= limit:
            if self._quiet < self._probe_wait:
                return "hold"
            # Probe: the origin may give more now. A quarter more, not double: at
            # an origin that still has its limit, few requests are throttled.
            self._probing = limit
            self.limit = None
            self._quiet = 0
            grown = self.budget + max(1, self.budget // 4)
        else:
            grown = self.budget * 2 if limit is None else (self.good + limit) // 2
        self._trial = (self.budget, rate)
        self.budget = min(self.ceiling, max(grown, self.budget + 1))
        return "grow"
