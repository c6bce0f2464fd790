"""Flow-level network: links with capacities, flows across them, max-min fair rates.

A *link* is anything that caps a byte rate: a node's uplink or downlink (the
downlink's capacity already folds in the node's disk write rate, since both
carry the same bytes), a top-of-rack uplink, the origin's aggregate egress. A
*flow* is one transfer (a piece or block from a peer, a ranged GET from the
origin) crossing a few links, with an optional cap of its own (the origin's
per-connection throughput).

Rates are max-min fair: the allocation progressive filling produces, in which
every flow is either at its own cap or crosses a saturated link on which no
other flow gets more. Two solvers compute it:

* :func:`progressive_filling` -- the textbook algorithm over every flow at
  once. Used as the reference in tests and as the fallback below.
* :meth:`Network.settle` -- incremental. Each link keeps a *level*: the rate
  it grants the flows it limits (``inf`` when it limits none). When flows come
  or go, only their links are re-levelled (water-filling over the flows on the
  link, each flow bounded by the levels of its other links); a flow whose rate
  changes marks its other links for re-levelling, and so on until nothing moves
  (the distributed max-min iteration of Charny, Clark and Jain, 1995). At the
  fixpoint every flow has a bottleneck, which is the max-min condition; the
  work done is proportional to the part of the network that actually changed,
  not to the network; a change can ripple across hundreds of links of a
  large swarm, and that is still far cheaper than solving it all. If the
  iteration oscillates instead (a link re-levelled more than
  ``max_relevels_per_link`` times in one settle; the iteration has no tight
  worst-case bound), the links touched are solved exactly by
  :func:`progressive_filling` and the count is kept in
  :attr:`Network.fallbacks`.

*Pooled links.* A link with thousands of flows (the origin under ``direct``:
8000 GETs) would make every start or finish re-rate all of them. A link
marked with :meth:`Network.pool` keeps the flows that can only ever be
limited by it -- same cap, and every other link they cross *slack-proof*
(no uncapped flow on it, and the caps of its flows sum to less than its
capacity, so it can never saturate) -- as *members* of one pool moving at one
shared rate. The pool keeps a virtual clock (bytes each member has moved
since the pool began) and each member the clock reading at which it will be
done, in a heap; a change of the shared rate then touches the clock and one
completion entry, not the members. A member whose other link stops being
slack-proof (an uncapped flow arrives on it) is turned back into an ordinary
flow first. The rates are the same max-min fair ones.

Each flow knows its bytes left; its completion time is kept in an indexed
binary heap (each flow knows its slot), so a rate change moves one entry and
no stale entries pile up. Ties go to the flow queued first. Time is passed
in; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

from librt.vecs import append, vec

__all__ = ["Flow", "Link", "Network", "progressive_filling"]

# Final: compiled (swarm simulate --native), a constant is a C static, not a
# lookup in the module dict every time a hot loop reads it.
INF: Final = math.inf

# Links with more flows than this sort their bounds as a list, not in place.
_INSERTION_MAX: Final = 32

# Relative change of a rate below which neighbours are not re-levelled. Far below
# anything measurable, far above float rounding.
_REL_TOL: Final = 1e-9

# Relative rise of a flow's rate below which the re-levelling keeps the old
# rate and leaves its other links alone: a rise is capacity a flow could use
# and ripples across the swarm when passed on; a fall is always applied, so no
# link is ever over its capacity. Measured in the session-driven simulator
# (fireworks-kimi n1000-o25, a 16 GiB slice, compiled): with 1e-9, 36.6 M
# re-levellings and 779 s; with 1e-3, 5.1 M and 16.3 s, completion times
# within 0.4 %. Flows may run up to this much below their max-min rate.
_RATE_TOL: Final = 1e-3


def _moves(rate: float, old: float) -> bool:
    """True if a flow re-levelled from ``old`` to ``rate`` takes the new rate."""
    if (rate == 0.0) != (old == 0.0):
        return True
    if rate > old:
        return rate - old > _RATE_TOL * (rate + old)
    return old - rate > _REL_TOL * (rate + old)


class Link:
    """A shared capacity in bytes per second."""

    __slots__ = (
        "capacity",
        "capsum",
        "flows",
        "level",
        "members",
        "name",
        "pool",
        "queued",
        "settle",
        "uncapped",
        "visits",
    )

    def __init__(self, name: str, capacity: float) -> None:
        if not capacity >= 0:
            raise ValueError(f"link {name}: capacity must be >= 0 B/s, got {capacity}")
        self.name = name
        self.capacity = float(capacity)
        self.flows: list[Flow] = []  # in the order they started: runs are reproducible
        self.level = INF
        self.queued = False
        self.settle = 0  # the last settle that re-levelled it ...
        self.visits = 0  # ... and how often it did
        # For the pool of another link: the caps of the flows here summed, how
        # many have no cap, and how many are members of a pool.
        self.capsum = 0.0
        self.uncapped = 0
        self.members = 0
        self.pool: _Pool | None = None  # set by Network.pool: this link's pool

    @property
    def slack_proof(self) -> bool:
        """True if no allocation could ever saturate this link."""
        return self.uncapped == 0 and self.capsum < self.capacity

    def __repr__(self) -> str:
        return f"Link({self.name!r}, {self.capacity:.4g} B/s, {len(self.flows)} flows)"

    @property
    def load(self) -> float:
        """Sum of the rates of the flows on this link now."""
        load = sum(flow.current_rate() for flow in self.flows)
        if self.pool is not None:
            load += self.pool.rate * len(self.pool.heap)
        return load


class Flow:
    """One transfer of ``size`` bytes across ``links``, at most ``cap`` B/s.

    ``on_done(flow, now)`` is called by the owner of the event loop when the
    last byte has arrived; ``data`` is for the caller.
    """

    __slots__ = (
        "cap",
        "data",
        "due",
        "links",
        "mark",
        "on_done",
        "pool",
        "rate",
        "remaining",
        "running",
        "size",
        "slot",
        "stamp",
        "started",
        "turn",
    )

    def __init__(
        self,
        links: tuple[Link, ...],
        size: float,
        on_done: Callable[[Flow, float], None],
        *,
        cap: float = INF,
        data: Any = None,
    ) -> None:
        if not links and cap == INF:
            raise ValueError("a flow needs at least one link or a finite cap")
        self.links = links
        self.size = float(size)
        self.remaining = float(size)
        self.cap = cap
        self.rate = 0.0
        self.stamp = 0.0  # time `remaining` was last brought up to date
        self.started = 0.0
        # Completion queue entry: when it is due, the order in which it was
        # queued (ties go to the earlier) and its slot in the heap (-1: none).
        self.due = INF
        self.turn = 0
        self.slot = -1
        self.mark = 0  # the last settle that changed its rate
        self.running = False  # between add_flow and remove_flow
        # The pool this flow is a member of; while it is, ``due`` holds the
        # pool clock reading at which it is done and ``slot`` its place in the
        # pool's heap (``rate``, ``remaining`` and ``stamp`` are not kept).
        self.pool: _Pool | None = None
        self.on_done = on_done
        self.data = data

    def __repr__(self) -> str:
        return f"Flow({[link.name for link in self.links]}, {self.remaining:.4g}/{self.size:.4g} B at {self.rate:.4g} B/s)"

    def transferred(self, now: float) -> float:
        """Bytes delivered by ``now``."""
        pool = self.pool
        if pool is not None:
            return self.size - (self.due - pool.clock_at(now))
        return self.size - (self.remaining - self.rate * (now - self.stamp))

    def current_rate(self) -> float:
        """Bytes per second now."""
        return self.rate if self.pool is None else self.pool.rate


class _Pool:
    """The members of a pooled link: flows that all move at ``rate``."""

    __slots__ = ("cap", "clock", "heap", "link", "rate", "sentinel", "stamp")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.cap = INF  # every member's cap (set by the first to join)
        self.rate = 0.0
        self.clock = 0.0  # bytes each member has moved since the pool began ...
        self.stamp = 0.0  # ... as of this time
        self.heap: list[Flow] = []  # members by (clock reading when done, turn)
        # Stands for the pool's next completion in the network's heap.
        self.sentinel = Flow((link,), 0.0, _ignore)
        self.sentinel.pool = self

    def clock_at(self, now: float) -> float:
        return self.clock + self.rate * (now - self.stamp) if now > self.stamp else self.clock

    def advance(self, now: float) -> None:
        if now > self.stamp:
            self.clock += self.rate * (now - self.stamp)
            self.stamp = now


def _ignore(flow: Flow, now: float) -> None:
    pass


def _waterfill(capacity: float, ordered: vec[float], n: int, count: int, cap: float) -> float:
    """Level a link of ``capacity`` grants to its flows; ``inf`` if it limits nobody.

    The flows are bounded by ``ordered[:n]`` (ascending) and ``count`` more
    (a pool's members) each by ``cap``.
    """
    left = capacity
    k = n + count
    block = count > 0
    for i in range(n):
        bound = ordered[i]
        if block and cap <= bound:
            # The block as one step: each of its flows passes the test below
            # exactly when the first does.
            if cap * k < left:
                left -= cap * count
                k -= count
                block = False
            else:
                return left / k
        if bound * k < left:
            left -= bound
            k -= 1
        else:
            return left / k
    if block:
        return INF if cap * k < left else left / k
    return INF


def progressive_filling(flows: Iterable[Flow]) -> dict[Flow, float]:
    """Max-min fair rates of ``flows`` by progressive filling (the reference solver).

    All flows grow at the same pace; when a link saturates (or a flow reaches
    its cap) its flows freeze at that rate. Only links crossed by ``flows`` are
    considered, with their full capacity.
    """
    active = list(dict.fromkeys(flows))
    rates: dict[Flow, float] = {}
    links: dict[Link, None] = {}
    for flow in active:
        for link in flow.links:
            links[link] = None
    left = {link: link.capacity for link in links}
    unfrozen = dict.fromkeys(links, 0)
    for flow in active:
        for link in flow.links:
            unfrozen[link] += 1
    level = 0.0
    # Insertion-ordered (not a set of objects hashed by address): the order of
    # the result decides the order of completion-heap entries, and so of
    # simultaneous completions; a run must not depend on memory layout.
    live = dict.fromkeys(active)
    while live:
        step = INF
        for link, count in unfrozen.items():
            if count:
                step = min(step, left[link] / count)
        for flow in live:
            step = min(step, flow.cap - level)
        step = max(step, 0.0)
        level += step
        for link, count in unfrozen.items():
            if count:
                left[link] -= step * count
        frozen: list[Flow] = []
        for flow in live:
            if flow.cap - level <= _REL_TOL * max(level, 1.0) or any(
                unfrozen[link] and left[link] <= _REL_TOL * max(link.capacity, 1.0)
                for link in flow.links
            ):
                frozen.append(flow)
        if not frozen:  # only possible through rounding; freeze the tightest
            frozen = list(live)
        for flow in frozen:
            rates[flow] = level
            del live[flow]
            for link in flow.links:
                unfrozen[link] -= 1
    return rates


class Network:
    """Links and flows with max-min fair rates, kept up to date incrementally.

    The caller adds and removes flows as transfers start and stop, then calls
    :meth:`settle` before letting time advance; :meth:`next_completion` and
    :meth:`pop_completed` hand back flows whose last byte has arrived.
    """

    def __init__(self, *, max_relevels_per_link: int = 64) -> None:
        self._dirty: list[Link] = []
        # Completions: a binary heap of flows ordered by (due, turn), each
        # flow holding its own slot, so a re-rated flow moves in place.
        self._heap: list[Flow] = []
        self._turns = 0
        self._settles = 0
        self._max_relevels = max_relevels_per_link
        self._pools: list[_Pool] = []
        # Scratch for settle: each flow's bound, by flow and sorted (machine
        # doubles: no float object per flow per re-levelling).
        self._bounds = vec[float]()
        self._ordered = vec[float]()
        self.relevels = 0
        """Link re-levellings done so far (a cost counter)."""
        self.fallbacks = 0
        """Times the incremental iteration ran long and the exact solver took over."""

    # -- topology -----------------------------------------------------------

    def _mark(self, link: Link) -> None:
        if not link.queued:
            link.queued = True
            self._dirty.append(link)

    def pool(self, link: Link) -> None:
        """Let ``link`` keep the flows only it can limit as one pool (see the module docstring)."""
        if link.pool is None:
            link.pool = _Pool(link)
            self._pools.append(link.pool)

    def add_flow(self, flow: Flow, now: float) -> None:
        """Start ``flow`` at ``now`` (its rate is set by the next :meth:`settle`)."""
        flow.stamp = now
        flow.started = now
        flow.rate = 0.0
        flow.running = True
        pool: _Pool | None = None
        pools = 0
        capped = flow.cap < INF
        for link in flow.links:
            if link.pool is not None:
                pool = link.pool
                pools += 1
            if capped:
                link.capsum += flow.cap
            else:
                link.uncapped += 1
        for link in flow.links:
            if link.members and not link.slack_proof:
                self._unpool_members(link, now)
        if pools == 1 and pool is not None and (not pool.heap or pool.cap == flow.cap):
            for link in flow.links:
                if link is not pool.link and not link.slack_proof:
                    pool = None
                    break
        else:
            pool = None
        if pool is not None:
            self._join(pool, flow, now)
            return
        for link in flow.links:
            link.flows.append(flow)
            self._mark(link)
        if not flow.links:  # only its own cap limits it
            self._set_rate(flow, flow.cap, now)

    def remove_flow(self, flow: Flow, now: float) -> None:
        """Stop ``flow`` (finished or abandoned); bytes it moved are kept in ``remaining``."""
        if not flow.running:
            return
        flow.running = False
        pool = flow.pool
        if pool is not None:
            self._leave(pool, flow, now)
        else:
            self._advance(flow, now)
            self._unqueue(flow)
            for link in flow.links:
                link.flows.remove(flow)
                self._mark(link)
        flow.rate = 0.0
        capped = flow.cap < INF
        for link in flow.links:
            if capped:
                link.capsum -= flow.cap
            else:
                link.uncapped -= 1
            if not link.flows and link.pool is None:
                link.capsum = 0.0  # no drift from adding and subtracting caps

    def set_capacity(self, link: Link, capacity: float, now: float) -> None:
        """Change ``link``'s capacity at ``now`` (a throttling episode, a measured rate)."""
        if not capacity >= 0:
            raise ValueError(f"link {link.name}: capacity must be >= 0 B/s, got {capacity}")
        link.capacity = float(capacity)
        if link.members and not link.slack_proof:
            self._unpool_members(link, now)
        self._mark(link)

    # -- pools --------------------------------------------------------------

    def _join(self, pool: _Pool, flow: Flow, now: float) -> None:
        """Make ``flow`` (just started) a member of ``pool``."""
        if not pool.heap:
            pool.cap = flow.cap
        pool.advance(now)
        flow.pool = pool
        self._push(pool.heap, pool.clock + flow.remaining, flow)
        for link in flow.links:
            if link is not pool.link:
                link.flows.append(flow)
                link.members += 1
            self._mark(link)
        self._repool(pool, now)

    def _detach(self, pool: _Pool, flow: Flow, now: float) -> None:
        """Take member ``flow`` out of ``pool``: bytes left in ``remaining``, the pool's rate."""
        pool.advance(now)
        flow.remaining = flow.due - pool.clock
        flow.stamp = now
        flow.rate = pool.rate
        _heap_remove(pool.heap, flow)
        flow.pool = None
        for link in flow.links:
            if link is not pool.link:
                link.members -= 1

    def _leave(self, pool: _Pool, flow: Flow, now: float) -> None:
        """Member ``flow`` stops."""
        self._detach(pool, flow, now)
        for link in flow.links:
            if link is not pool.link:
                link.flows.remove(flow)
            self._mark(link)
        self._repool(pool, now)

    def _unpool(self, flow: Flow, now: float) -> None:
        """Turn member ``flow`` into an ordinary flow of its pooled link, at the pool's rate."""
        pool = flow.pool
        assert pool is not None
        self._detach(pool, flow, now)
        pool.link.flows.append(flow)
        self._mark(pool.link)
        self._requeue(flow, now)
        self._repool(pool, now)

    def _unpool_members(self, link: Link, now: float) -> None:
        for flow in [f for f in link.flows if f.pool is not None]:
            self._unpool(flow, now)

    def _repool(self, pool: _Pool, now: float) -> None:
        """Queue the pool's next completion (its first member at the pool's rate)."""
        if pool.heap and pool.rate > 0:
            pool.advance(now)
            left = pool.heap[0].due - pool.clock
            self._queue(now + max(left, 0.0) / pool.rate, pool.sentinel)
        else:
            self._unqueue(pool.sentinel)

    # -- rates --------------------------------------------------------------

    @staticmethod
    def _advance(flow: Flow, now: float) -> None:
        if now > flow.stamp:
            flow.remaining -= flow.rate * (now - flow.stamp)
            flow.stamp = now

    def _set_rate(self, flow: Flow, rate: float, now: float) -> None:
        self._advance(flow, now)
        flow.rate = rate
        self._requeue(flow, now)

    # -- the completion heap --------------------------------------------------

    def _requeue(self, flow: Flow, now: float) -> None:
        """Queue ``flow``'s completion at its current rate (none while it is stopped)."""
        rate = flow.rate
        if rate > 0:
            self._queue(now + max(flow.remaining, 0.0) / rate, flow)
        else:
            self._unqueue(flow)

    def _queue(self, when: float, flow: Flow) -> None:
        """(Re)queue ``flow``'s completion at ``when``, behind any flow already due then."""
        self._push(self._heap, when, flow)

    def _push(self, heap: list[Flow], when: float, flow: Flow) -> None:
        """Put ``flow`` in ``heap`` with key ``when``, after any entry with the same key."""
        self._turns += 1
        flow.due = when
        flow.turn = self._turns
        _heap_fix(heap, flow)

    def _unqueue(self, flow: Flow) -> None:
        """Take ``flow`` out of the completion heap, if it is there."""
        _heap_remove(self._heap, flow)

    def settle(self, now: float) -> None:
        """Bring every rate back to max-min fair after flows or capacities changed."""
        dirty = self._dirty
        if not dirty:
            return
        touched: list[Link] = []  # for the fallback
        # Flows whose rate changed (marked with this settle's number); each
        # gets one completion-heap entry at the end, however often the
        # iteration moved it.
        self._settles += 1
        mark = self._settles
        changed: list[Flow] = []
        limit = self._max_relevels
        count = 0
        while dirty:
            link = dirty.pop()
            link.queued = False
            touched.append(link)
            count += 1
            if link.settle != mark:
                link.settle = mark
                link.visits = 0
            link.visits += 1
            if link.visits > limit:
                self._reschedule(changed, now)
                self._fallback(touched, now)
                return
            flows = link.flows
            pool = link.pool
            members = 0 if pool is None else len(pool.heap)
            if not flows and not members:
                link.level = INF
                continue
            # Each flow's bound from everything except this link, by flow and
            # in ascending order.
            n = len(flows)
            while len(self._bounds) < n:
                self._bounds = append(self._bounds, 0.0)
                self._ordered = append(self._ordered, 0.0)
            bounds = self._bounds
            ordered = self._ordered
            small = n <= _INSERTION_MAX
            for i in range(n):
                flow = flows[i]
                bound = flow.cap
                for other in flow.links:
                    if other is not link and other.level < bound:
                        bound = other.level
                bounds[i] = bound
                if small:
                    j = i
                    while j > 0 and ordered[j - 1] > bound:
                        ordered[j] = ordered[j - 1]
                        j -= 1
                    ordered[j] = bound
            if not small:
                for i, bound in enumerate(sorted([bounds[i] for i in range(n)])):
                    ordered[i] = bound
            if link.capacity <= 0:
                level = 0.0
            elif pool is not None:
                level = _waterfill(link.capacity, ordered, n, members, pool.cap)
            else:
                level = _waterfill(link.capacity, ordered, n, 0, INF)
            link.level = level
            if members and pool is not None:
                # Members cross only links that cannot limit them: the pool
                # moves at this link's level (or the members' cap).
                rate = pool.cap if pool.cap < level else level
                old = pool.rate
                if _moves(rate, old):
                    pool.advance(now)
                    pool.rate = rate
                    self._repool(pool, now)
            for i in range(n):
                flow = flows[i]
                if flow.pool is not None:
                    continue  # a member of another link's pool: its rate is the pool's
                bound = bounds[i]
                rate = bound if bound < level else level
                old = flow.rate
                if _moves(rate, old):
                    if now > flow.stamp:
                        flow.remaining -= old * (now - flow.stamp)
                        flow.stamp = now
                    flow.rate = rate
                    if flow.mark != mark:
                        flow.mark = mark
                        changed.append(flow)
                    for other in flow.links:
                        if other is not link and not other.queued:
                            other.queued = True
                            dirty.append(other)
        self.relevels += count
        self._reschedule(changed, now)

    def _reschedule(self, flows: list[Flow], now: float) -> None:
        """Queue the completion of each of ``flows`` at its current rate (older entries go stale)."""
        for flow in flows:
            self._requeue(flow, now)

    def _fallback(self, touched: list[Link], now: float) -> None:
        """Solve exactly every flow connected to the links touched so far."""
        self.fallbacks += 1
        for pool in self._pools:  # the exact solver rates flows one by one
            for flow in list(pool.heap):
                self._unpool(flow, now)
        for link in self._dirty:
            link.queued = False
            touched.append(link)
        self._dirty.clear()
        touched = list(dict.fromkeys(touched))
        # The connected component of the touched links.
        seen_links: set[Link] = set(touched)
        stack = list(touched)
        component: dict[Flow, None] = {}
        while stack:
            link = stack.pop()
            for flow in link.flows:
                if flow not in component:
                    component[flow] = None
                    for other in flow.links:
                        if other not in seen_links:
                            seen_links.add(other)
                            stack.append(other)
        rates = progressive_filling(component)
        for link in seen_links:
            link.level = INF
        for flow, rate in rates.items():
            if abs(rate - flow.rate) > _REL_TOL * (rate + flow.rate) or flow.rate == 0.0:
                self._set_rate(flow, rate, now)
        # A full link's level is the largest rate on it (the rate of the flows
        # it limits); other links limit nobody.
        for link in seen_links:
            total = sum(rates[f] for f in link.flows)
            if link.flows and total >= link.capacity * (1 - 1e-9):
                link.level = max(rates[f] for f in link.flows)

    # -- completions --------------------------------------------------------

    def next_completion(self) -> float:
        """When the next flow finishes at current rates (``inf`` if none will)."""
        heap = self._heap
        return heap[0].due if heap else INF

    def pop_completed(self, now: float) -> Flow | None:
        """Remove and return one flow finishing at or before ``now``, or None.

        One at a time: handling one completion may cancel another due at the
        same instant, which must then not be reported.
        """
        heap = self._heap
        if not heap or heap[0].due > now:
            return None
        flow = heap[0]
        pool = flow.pool
        if pool is not None:  # the pool's sentinel: its first member is done
            flow = pool.heap[0]
        self.remove_flow(flow, now)
        flow.remaining = 0.0
        return flow


def _heap_fix(heap: list[Flow], flow: Flow) -> None:
    """Put ``flow`` (new, or with a changed key) in its place in ``heap``."""
    slot = flow.slot
    if slot < 0:
        flow.slot = len(heap)
        heap.append(flow)
        _sift_up(heap, flow, len(heap) - 1)
    else:
        _resift(heap, flow, slot)


def _heap_remove(heap: list[Flow], flow: Flow) -> None:
    """Take ``flow`` out of ``heap``, if it is there."""
    slot = flow.slot
    if slot < 0:
        return
    flow.slot = -1
    last = heap.pop()
    if slot < len(heap):
        _resift(heap, last, slot)


def _resift(heap: list[Flow], flow: Flow, slot: int) -> None:
    """Move ``flow``, put at ``slot``, up or down to where its key belongs."""
    if slot > 0 and _before(flow, heap[(slot - 1) >> 1]):
        _sift_up(heap, flow, slot)
    else:
        _sift_down(heap, flow, slot)


def _sift_up(heap: list[Flow], flow: Flow, slot: int) -> None:
    while slot > 0:
        parent = (slot - 1) >> 1
        above = heap[parent]
        if not _before(flow, above):
            break
        heap[slot] = above
        above.slot = slot
        slot = parent
    heap[slot] = flow
    flow.slot = slot


def _sift_down(heap: list[Flow], flow: Flow, slot: int) -> None:
    size = len(heap)
    while True:
        child = 2 * slot + 1
        if child >= size:
            break
        below = heap[child]
        if child + 1 < size:
            right = heap[child + 1]
            if _before(right, below):
                child += 1
                below = right
        if not _before(below, flow):
            break
        heap[slot] = below
        below.slot = slot
        slot = child
    heap[slot] = flow
    flow.slot = slot


def _before(a: Flow, b: Flow) -> bool:
    """Whether ``a`` completes before ``b`` (ties: the one queued first)."""
    return a.due < b.due or (a.due == b.due and a.turn < b.turn)
