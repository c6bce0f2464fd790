"""The discrete-event core: clock, event queue, topology, origin model, faults, metrics.

A :class:`Simulation` runs one strategy over one scenario. It owns

* the clock and an event heap of ``(time, seq, callback, arg)``; ties run in the
  order they were scheduled, so a run is a pure function of the scenario and its
  seed;
* the topology: per node an uplink and a downlink (the downlink's capacity is
  ``min(NIC, disk write)``), per rack (optional) a top-of-rack uplink and
  downlink of ``rack_size * NIC / oversubscription``, and the origin's
  aggregate egress; flows between them share bandwidth max-min fairly
  (:mod:`simulations.network`);
* the origin: a token-bucket request-rate limit whose excess requests are
  answered with a throttle (429/503, optionally with a ``Retry-After``) after
  the first-byte latency, a per-connection throughput cap, and throttling
  episodes that lower the request budget for a while. Clients retry with the
  real :class:`seeder.retry.RetryPolicy`;
* faults: crashes (the node's flows stop, the strategy is told), stalls (the
  node's origin reads stop moving until the stall ends) and late joins;
* metrics: per-node completion times, origin and peer bytes, and throughput
  over time for the plots.

Strategies (:mod:`simulations.strategies`) decide who sends what to whom; they
talk to the simulation only through :meth:`Simulation.at`,
:meth:`Simulation.origin_get`, :meth:`Simulation.send`,
:meth:`Simulation.cancel` and :meth:`Simulation.node_finished`.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from librt.vecs import vec

from seeder.retry import RetryPolicy
from simulations.network import Flow, Link, Network
from simulations.scenario import Scenario

__all__ = ["OriginRequest", "Result", "Series", "Simulation", "StrategyProtocol"]

INF: Final = math.inf

FlowDone = Callable[[Flow, float], None]


class StrategyProtocol(Protocol):
    """What the engine calls on a strategy."""

    name: str

    def start(self) -> None: ...

    def node_joined(self, node: int) -> None: ...

    def node_crashed(self, node: int) -> None: ...


class Series:
    """Bytes per time bin; bins double in width when the run outlasts them."""

    def __init__(self, width: float, max_bins: int = 400) -> None:
        self.width = max(width, 1e-9)
        self.max_bins = max_bins
        self.bins = vec[float]([0.0] * max_bins)  # machine floats: an add boxes none

    def add(self, start: float, end: float, nbytes: float) -> None:
        """Spread ``nbytes`` evenly over ``[start, end]``."""
        while end >= self.width * self.max_bins:
            merged = [self.bins[i] + self.bins[i + 1] for i in range(0, self.max_bins, 2)]
            self.bins = vec[float](merged + [0.0] * (self.max_bins - len(merged)))
            self.width *= 2
        width = self.width
        first = int(start / width)
        last = int(end / width)
        if first == last or end <= start:
            self.bins[last] += nbytes
            return
        rate = nbytes / (end - start)
        self.bins[first] += rate * ((first + 1) * width - start)
        for i in range(first + 1, last):
            self.bins[i] += rate * width
        self.bins[last] += rate * (end - last * width)

    def rates(self, until: float) -> tuple[list[float], list[float]]:
        """Bin start times and mean rates (B/s) up to ``until``."""
        count = min(self.max_bins, int(until / self.width) + 1)
        return (
            [i * self.width for i in range(count)],
            [b / self.width for b in self.bins[:count]],
        )


@dataclass
class Result:
    """What one run produced. Times are seconds since the burst started."""

    scenario: str
    variant: str
    strategy: str
    seed: int
    nodes: int
    model_bytes: int
    piece_bytes: int
    lower_bound_seconds: float
    completion: list[float | None]
    """Per node: seconds from its start (join) to holding every piece; None if never."""
    finish_time: list[float | None]
    """Per node: time since the burst began when it finished."""
    crashed: int
    origin_bytes: float
    peer_bytes: float
    origin_requests: int
    throttled_requests: int
    sim_seconds: float
    wall_seconds: float
    events: int
    network_fallbacks: int
    network_relevels: int
    """Link re-levellings the network solver did: its share of the wall time."""
    total_series: Series = field(repr=False)
    origin_series: Series = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    cross_rack_bytes: float = 0.0
    """Peer bytes between nodes of different racks: what crossed the ToR uplinks."""
    node_bounds: list[float] = field(default_factory=list, repr=False)
    """Per node: its own bound (:meth:`Scenario.node_bounds`)."""

    def completed(self) -> list[float]:
        return sorted(c for c in self.completion if c is not None)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of completion times of the nodes that finished."""
        done = self.completed()
        if not done:
            return None
        rank = max(1, math.ceil(q / 100 * len(done)))
        return done[min(rank, len(done)) - 1]

    def own_bound_ratio(self) -> dict[str, float | None]:
        """Each finished node's completion over its own bound: the median and the worst.

        On a scenario whose nodes differ, T_min is the slowest node's bound and says
        nothing of the fast ones; this does.
        """
        ratios = sorted(
            c / b for c, b in zip(self.completion, self.node_bounds, strict=False) if c is not None
        )
        if not ratios:
            return {"p50": None, "max": None}
        return {"p50": ratios[max(0, math.ceil(len(ratios) / 2) - 1)], "max": ratios[-1]}

    def summary(self, *, per_node: bool = False) -> dict[str, Any]:
        """The JSON object of ``swarm simulate --json``.

        ``per_node`` adds ``node_completion_seconds`` and ``node_finish_seconds``
        (one entry per node, in node order; null for a node that never finished).
        """
        bound = self.lower_bound_seconds

        def ratio(value: float | None) -> float | None:
            return None if value is None else value / bound

        p50, p99, p999 = self.percentile(50), self.percentile(99), self.percentile(99.9)
        done = self.completed()
        top = done[-1] if done else None
        incomplete = sum(1 for c in self.completion if c is None) - self.crashed
        return {
            "scenario": self.scenario,
            "variant": self.variant,
            "strategy": self.strategy,
            "seed": self.seed,
            "nodes": self.nodes,
            "model_bytes": self.model_bytes,
            "piece_bytes": self.piece_bytes,
            "lower_bound_seconds": bound,
            "completion_seconds": {"p50": p50, "p99": p99, "p999": p999, "max": top},
            "completion_ratio": {
                "p50": ratio(p50),
                "p99": ratio(p99),
                "p999": ratio(p999),
                "max": ratio(top),
            },
            "completed": len(done),
            "crashed": self.crashed,
            "incomplete": incomplete,
            "origin_bytes": self.origin_bytes,
            "origin_ratio": self.origin_bytes / self.model_bytes,
            "peer_bytes": self.peer_bytes,
            "cross_rack_bytes": self.cross_rack_bytes,
            "cross_rack_ratio": self.cross_rack_bytes / self.model_bytes,
            "own_bound_ratio": self.own_bound_ratio(),
            "origin_requests": self.origin_requests,
            "throttled_requests": self.throttled_requests,
            "sim_seconds": self.sim_seconds,
            "wall_seconds": self.wall_seconds,
            "events": self.events,
            "network_fallbacks": self.network_fallbacks,
            "network_relevels": self.network_relevels,
            **self.extra,
            **(
                {
                    "node_completion_seconds": list(self.completion),
                    "node_finish_seconds": list(self.finish_time),
                }
                if per_node
                else {}
            ),
        }


class _PeerFlow(Flow):
    """A peer transfer: a flow that knows its ends and the strategy's callback."""

    __slots__ = ("dst", "src", "then")

    def __init__(
        self, sim: Simulation, src: int, dst: int, size: int, then: FlowDone, data: Any
    ) -> None:
        super().__init__(sim.peer_links(src, dst), size, sim._peer_done, data=data)
        self.src = src
        self.dst = dst
        self.then = then


class OriginRequest:
    """One ranged GET of ``size`` bytes by ``node``, retried until it succeeds or is cancelled."""

    __slots__ = (
        "active",
        "attempt",
        "cancelled",
        "data",
        "flow",
        "node",
        "on_done",
        "size",
        "slept",
        "streams",
    )

    def __init__(self, node: int, size: int, on_done: FlowDone, data: Any, streams: int) -> None:
        self.node = node
        self.size = size
        self.streams = streams  # ranged GETs it keeps open at once
        self.on_done = on_done
        self.data = data
        self.attempt = 0
        self.slept = 0.0
        self.cancelled = False
        self.active = False  # counted in Simulation.origin_active
        self.flow: Flow | None = None


class Simulation:
    """One strategy over one scenario; see the module docstring."""

    def __init__(self, scenario: Scenario, strategy: str) -> None:
        self.scenario = scenario
        self.strategy_name = strategy
        seed = scenario.seed
        # Independent streams per purpose, so adding a draw in one place does not
        # reshuffle every other decision.
        self.rng = random.Random(f"{seed}:strategy:{strategy}")
        self.origin_rng = random.Random(f"{seed}:origin")
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.events = 0
        self.net = Network()

        n = scenario.nodes
        self.piece_lengths = scenario.piece_lengths()
        self.rates = scenario.node_rates()
        self.up = [Link(f"up{i}", r.up) for i, r in enumerate(self.rates)]
        self.down = [Link(f"down{i}", r.down) for i, r in enumerate(self.rates)]
        self.rack = [0] * n
        self.rack_up: list[Link] = []
        self.rack_down: list[Link] = []
        if scenario.rack_size:
            for i in range(n):
                self.rack[i] = i // scenario.rack_size
            for r in range(self.rack[-1] + 1):
                members = range(r * scenario.rack_size, min(n, (r + 1) * scenario.rack_size))
                up = sum(self.rates[i].up for i in members) / scenario.oversubscription
                down = sum(self.rates[i].down for i in members) / scenario.oversubscription
                self.rack_up.append(Link(f"rack{r}-up", up))
                self.rack_down.append(Link(f"rack{r}-down", down))
        self.origin_link = Link("origin", scenario.origin_rate)
        # Thousands of GETs can share it (direct: every node's); the ones only
        # it can limit move as one pool (see simulations.network).
        self.net.pool(self.origin_link)
        self.connection_cap = (
            scenario.origin_connection_gbps * 1e9 / 8
            if scenario.origin_connection_gbps is not None
            else INF
        )
        self.retry = RetryPolicy(base_delay=0.1, max_delay=10.0, max_attempts=12)

        # Origin request budget (token bucket).
        self._request_rate = scenario.origin_request_rate
        self._burst = scenario.origin_request_burst or scenario.origin_request_rate
        self._tokens = self._burst
        self._tokens_at = 0.0
        # Concurrent GETs the origin serves (0: no limit), and those it is serving.
        self._max_requests = scenario.origin_max_requests
        self.origin_active = 0

        # Node state.
        self.alive = [True] * n
        self.joined = [False] * n
        self.start_time = [0.0] * n
        self.finish_time: list[float | None] = [None] * n
        self.stalled_until = [0.0] * n
        self._stalled_requests: dict[int, list[OriginRequest]] = {}
        self._stalled_flows: dict[int, list[tuple[Flow, OriginRequest]]] = {}
        # Origin flows per node (peer flows are found on the node's links).
        self.node_flows: list[dict[Flow, None]] = [{} for _ in range(n)]
        self._open = n  # nodes neither finished nor crashed

        # Metrics.
        self.origin_bytes = 0.0
        self.peer_bytes = 0.0
        self.cross_rack_bytes = 0.0
        self.origin_requests = 0
        self.throttled = 0
        # Throttled answers per node, and the longest Retry-After among them, since
        # the strategy last read them (a peer's announce reports these).
        self.node_throttles = [0] * n
        self.node_retry_after = [0.0] * n
        self.crashed = 0
        width = max(scenario.lower_bound() / 100, 1e-3)
        self.total_series = Series(width)
        self.origin_series = Series(width)
        self.strategy: StrategyProtocol | None = None

    # -- events -------------------------------------------------------------

    def at(self, when: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``callback(arg)`` at time ``when`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._events, (max(when, self.now), self._seq, callback, arg))

    # -- topology -----------------------------------------------------------

    def peer_links(self, src: int, dst: int) -> tuple[Link, ...]:
        if self.rack_up and self.rack[src] != self.rack[dst]:
            return (
                self.up[src],
                self.rack_up[self.rack[src]],
                self.rack_down[self.rack[dst]],
                self.down[dst],
            )
        return (self.up[src], self.down[dst])

    def origin_links(self, dst: int) -> tuple[Link, ...]:
        if self.rack_up:
            return (self.origin_link, self.rack_down[self.rack[dst]], self.down[dst])
        return (self.origin_link, self.down[dst])

    # -- transfers ----------------------------------------------------------

    def send(self, src: int, dst: int, size: int, on_done: FlowDone, data: Any = None) -> Flow:
        """Start a peer transfer of ``size`` bytes from ``src`` to ``dst``.

        ``on_done(flow, now)`` runs when the last byte arrived (``flow.data`` is ``data``).
        """
        flow = _PeerFlow(self, src, dst, size, on_done, data)
        self.net.add_flow(flow, self.now)
        return flow

    def _peer_done(self, flow: Flow, now: float) -> None:
        assert isinstance(flow, _PeerFlow)
        self._account_peer(flow, now)
        flow.then(flow, now)

    def _account_peer(self, flow: _PeerFlow, now: float) -> None:
        moved = flow.size - flow.remaining
        self.peer_bytes += moved
        if self.rack_up and self.rack[flow.src] != self.rack[flow.dst]:
            self.cross_rack_bytes += moved
        self.total_series.add(flow.started, now, moved)

    def origin_get(
        self, node: int, size: int, on_done: FlowDone, data: Any = None
    ) -> OriginRequest:
        """Issue a ranged GET of ``size`` bytes from the origin to ``node``, retried on throttling.

        ``on_done(flow, now)`` runs when the last byte arrived (``flow.data`` is ``data``).
        """
        request = OriginRequest(node, size, on_done, data, self.scenario.pull_streams(size))
        self._origin_attempt(request)
        return request

    def _take_token(self) -> bool:
        rate = self._request_rate
        if self.scenario.origin_request_rate == 0 and not self.scenario.throttles:
            return True
        now = self.now
        self._tokens = min(self._burst, self._tokens + rate * (now - self._tokens_at))
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _origin_attempt(self, request: OriginRequest) -> None:
        if request.cancelled or not self.alive[request.node]:
            return
        if self.stalled_until[request.node] > self.now:
            self._stalled_requests.setdefault(request.node, []).append(request)
            return
        self.origin_requests += 1
        latency = self.scenario.first_byte_latency
        limit = self._max_requests
        streams = request.streams
        # A pull's ranged GETs are admitted or throttled together; one wider than
        # the origin's whole limit is admitted alone rather than never.
        room = not limit or self.origin_active + streams <= max(limit, streams)
        if room and self._take_token():
            # Counted from the request, not its first byte: the origin is serving it.
            request.active = True
            self.origin_active += streams
            if latency:
                self.at(self.now + latency, self._origin_start, request)
            else:
                self._origin_start(request)
        else:
            self.throttled += 1
            node = request.node
            self.node_throttles[node] += 1
            retry_after = self.scenario.retry_after or 0.0
            if retry_after > self.node_retry_after[node]:
                self.node_retry_after[node] = retry_after
            self.at(self.now + latency, self._origin_throttled, request)

    def _origin_throttled(self, request: OriginRequest) -> None:
        if request.cancelled or not self.alive[request.node]:
            return
        request.attempt += 1
        delay = self.retry.delay(request.attempt, self.scenario.retry_after, self.origin_rng)
        if not self.retry.allows(request.attempt, request.slept, delay):
            # The reader gives up; the caller asks again with a fresh budget.
            request.attempt = 0
            request.slept = 0.0
        request.slept += delay
        self.at(self.now + delay, self._origin_attempt, request)

    def _release(self, request: OriginRequest) -> None:
        """The origin stopped serving ``request`` (done, abandoned, or its node died)."""
        if request.active:
            request.active = False
            self.origin_active -= request.streams

    def take_throttles(self, node: int) -> tuple[int, float | None]:
        """Throttled answers ``node``'s pulls got since last asked, and the longest
        Retry-After among them (None: none said); both start over."""
        count = self.node_throttles[node]
        retry_after = self.node_retry_after[node] or None
        self.node_throttles[node] = 0
        self.node_retry_after[node] = 0.0
        return count, retry_after

    def _origin_start(self, request: OriginRequest) -> None:
        if request.cancelled or not self.alive[request.node]:
            self._release(request)
            return
        node = request.node
        flow = Flow(
            self.origin_links(node),
            request.size,
            self._origin_done,
            cap=self.connection_cap * request.streams,
            data=request,
        )
        request.flow = flow
        self.node_flows[node][flow] = None
        if self.stalled_until[node] > self.now:
            flow.started = self.now
            self._stalled_flows.setdefault(node, []).append((flow, request))
            return
        self.net.add_flow(flow, self.now)

    def _origin_done(self, flow: Flow, now: float) -> None:
        request: OriginRequest = flow.data
        del self.node_flows[request.node][flow]
        self._release(request)
        self._account_origin(flow, now)
        flow.data = request.data
        request.on_done(flow, now)

    def _account_origin(self, flow: Flow, now: float) -> None:
        moved = flow.size - flow.remaining
        self.origin_bytes += moved
        self.origin_series.add(flow.started, now, moved)
        self.total_series.add(flow.started, now, moved)

    def cancel(self, target: Flow | OriginRequest) -> None:
        """Abandon a transfer; the bytes it already moved still count."""
        if isinstance(target, OriginRequest):
            target.cancelled = True
            self._release(target)
            flow = target.flow
            if flow is None:
                return
            stalled = self._stalled_flows.get(target.node, [])
            for i, (held, _) in enumerate(stalled):
                if held is flow:
                    del stalled[i]
                    break
        else:
            flow = target
        self._drop_flow(flow)

    def _drop_flow(self, flow: Flow) -> None:
        was_active = flow.running
        self.net.remove_flow(flow, self.now)
        data = flow.data
        if isinstance(data, OriginRequest):
            data.cancelled = True
            self._release(data)
            if flow in self.node_flows[data.node]:
                del self.node_flows[data.node][flow]
                self._account_origin(flow, self.now)
        elif isinstance(flow, _PeerFlow) and was_active:
            self._account_peer(flow, self.now)

    # -- nodes --------------------------------------------------------------

    def node_finished(self, node: int) -> None:
        """``node`` holds every piece now."""
        if self.finish_time[node] is None and self.alive[node]:
            self.finish_time[node] = self.now
            self._open -= 1

    def _join(self, node: int) -> None:
        if self.joined[node]:
            return
        self.joined[node] = True
        self.start_time[node] = self.now
        if self.alive[node] and self.strategy is not None:
            self.strategy.node_joined(node)

    def _crash(self, node: int) -> None:
        if not self.alive[node]:
            return
        peer_flows = [
            flow
            for link in (self.up[node], self.down[node])
            for flow in link.flows
            if isinstance(flow, _PeerFlow)
        ]
        for flow in [*peer_flows, *self.node_flows[node]]:
            self._drop_flow(flow)
        for _, request in self._stalled_flows.pop(node, []):
            request.cancelled = True
        self._stalled_requests.pop(node, None)
        self.alive[node] = False
        self.crashed += 1
        if self.finish_time[node] is None:
            self._open -= 1
        if self.joined[node] and self.strategy is not None:
            self.strategy.node_crashed(node)

    def _stall(self, arg: tuple[int, float]) -> None:
        node, until = arg
        if not self.alive[node]:
            return
        self.stalled_until[node] = max(self.stalled_until[node], until)
        held = self._stalled_flows.setdefault(node, [])
        for flow in list(self.node_flows[node]):
            request = flow.data
            if isinstance(request, OriginRequest) and flow.running:
                self.net.remove_flow(flow, self.now)
                held.append((flow, request))
        self.at(until, self._unstall, node)

    def _unstall(self, node: int) -> None:
        if self.stalled_until[node] > self.now or not self.alive[node]:
            return
        for flow, request in self._stalled_flows.pop(node, []):
            if not request.cancelled:
                started = flow.started
                self.net.add_flow(flow, self.now)
                flow.started = started
        for request in self._stalled_requests.pop(node, []):
            self._origin_attempt(request)

    def _set_max_requests(self, limit: int) -> None:
        self._max_requests = limit

    def _set_request_rate(self, rate: float) -> None:
        self._take_token()  # bank tokens earned at the old rate
        self._request_rate = rate
        if rate == 0:
            self._tokens = 0.0
        self._burst = self.scenario.origin_request_burst or max(rate, 1.0)
        self._tokens = min(self._tokens, self._burst)

    # -- run ----------------------------------------------------------------

    def _loop(self) -> int:
        """Run events and completions until every live node finished; returns the count."""
        net = self.net
        events = self._events
        limit = self.scenario.time_limit
        count = 0
        while self._open > 0:
            t_event = events[0][0] if events else INF
            if t_event <= self.now:
                # Same instant: run it before re-levelling, so a burst of
                # simultaneous starts costs one settle, not one each.
                _, _, callback, arg = heapq.heappop(events)
                count += 1
                callback(arg)
                continue
            net.settle(self.now)
            t_flow = net.next_completion()
            if t_flow <= t_event:
                if t_flow > limit:
                    break
                self.now = t_flow
                # Completions within a nanosecond are one instant: flows that
                # started together at equal rates end together, and handling
                # them in one batch saves a re-levelling per flow.
                horizon = t_flow + 1e-9 + 1e-12 * t_flow
                flow = net.pop_completed(horizon)
                while flow is not None:
                    count += 1
                    flow.on_done(flow, self.now)
                    flow = net.pop_completed(horizon)
            else:
                if t_event > limit:
                    break
                when, _, callback, arg = heapq.heappop(events)
                self.now = when
                count += 1
                callback(arg)
        return count

    def run(self, strategy: StrategyProtocol) -> Result:
        """Run ``strategy`` until every live node finished (or nothing can move)."""
        scenario = self.scenario
        wall = time.perf_counter()
        self.strategy = strategy
        late = scenario.join.count if scenario.join else 0
        for node in range(scenario.nodes - late):
            self.joined[node] = True
        strategy.start()
        if scenario.join is not None:
            for k, node in enumerate(range(scenario.nodes - late, scenario.nodes)):
                self.at(scenario.join.start + k * scenario.join.interval, self._join, node)
        for crash in scenario.crashes:
            self.at(crash.at, self._crash, crash.node)
        for stall in scenario.stalls:
            self.at(stall.at, self._stall, (stall.node, stall.at + stall.duration))
        base_rate = scenario.origin_request_rate
        for throttle in scenario.throttles:
            if throttle.request_rate is not None:
                self.at(throttle.start, self._set_request_rate, throttle.request_rate)
                self.at(throttle.end, self._set_request_rate, base_rate if base_rate else 1e18)
            if throttle.max_requests is not None:
                self.at(throttle.start, self._set_max_requests, throttle.max_requests)
                self.at(throttle.end, self._set_max_requests, scenario.origin_max_requests)
        if scenario.throttles and not base_rate:
            self._request_rate = 1e18
            self._burst = 1e18
            self._tokens = 1e18

        # The run allocates millions of short-lived objects (flows, heap entries,
        # requests) that reference counting frees; the cycle collector only
        # rescans the live ones (measured: a tenth of the run time at 1000
        # nodes). Nothing the loop creates is cyclic, so it is paused meanwhile.
        collecting = gc.isenabled()
        gc.disable()
        try:
            count = self._loop()
        finally:
            if collecting:
                gc.enable()
        self.events = count
        completion: list[float | None] = []
        for node in range(scenario.nodes):
            finish = self.finish_time[node]
            completion.append(None if finish is None else finish - self.start_time[node])
        extra = getattr(strategy, "extra", None)
        return Result(
            scenario=scenario.name,
            variant=scenario.variant,
            strategy=strategy.name,
            seed=scenario.seed,
            nodes=scenario.nodes,
            model_bytes=scenario.model_size,
            piece_bytes=scenario.piece_size,
            lower_bound_seconds=scenario.lower_bound(),
            node_bounds=scenario.node_bounds(),
            completion=completion,
            finish_time=list(self.finish_time),
            crashed=self.crashed,
            origin_bytes=self.origin_bytes,
            peer_bytes=self.peer_bytes,
            cross_rack_bytes=self.cross_rack_bytes,
            origin_requests=self.origin_requests,
            throttled_requests=self.throttled,
            sim_seconds=self.now,
            wall_seconds=time.perf_counter() - wall,
            events=count,
            network_fallbacks=self.net.fallbacks,
            network_relevels=self.net.relevels,
            total_series=self.total_series,
            origin_series=self.origin_series,
            extra=dict(extra()) if callable(extra) else {},
        )
