"""The incremental max-min solver agrees with progressive filling."""

from __future__ import annotations

import math
import random

import pytest

from simulations.network import _RATE_TOL, Flow, Link, Network, progressive_filling


def _noop(flow: Flow, now: float) -> None:
    pass


def test_two_links_share_max_min_fairly() -> None:
    # A on l1 only, B on l1 and l2, C on l2 only; l2 is the tight one.
    l1, l2 = Link("l1", 10.0), Link("l2", 2.0)
    net = Network()
    a, b, c = (Flow(links, 100.0, _noop) for links in ((l1,), (l1, l2), (l2,)))
    for flow in (a, b, c):
        net.add_flow(flow, 0.0)
    net.settle(0.0)
    assert (a.rate, b.rate, c.rate) == pytest.approx((9.0, 1.0, 1.0))
    net.remove_flow(c, 0.0)
    net.settle(0.0)
    assert (a.rate, b.rate) == pytest.approx((8.0, 2.0))


def test_flow_cap_and_completion_time() -> None:
    link = Link("origin", 10.0)
    net = Network()
    capped = Flow((link,), 30.0, _noop, cap=3.0)
    free = Flow((link,), 70.0, _noop)
    net.add_flow(capped, 0.0)
    net.add_flow(free, 0.0)
    net.settle(0.0)
    assert (capped.rate, free.rate) == pytest.approx((3.0, 7.0))
    assert net.next_completion() == pytest.approx(10.0)
    first = net.pop_completed(10.0)
    second = net.pop_completed(10.0)
    assert {first, second} == {capped, free}
    assert net.pop_completed(10.0) is None
    assert math.isinf(net.next_completion())


def test_rate_change_midway_keeps_bytes() -> None:
    link = Link("l", 4.0)
    net = Network()
    one = Flow((link,), 8.0, _noop)
    net.add_flow(one, 0.0)
    net.settle(0.0)
    other = Flow((link,), 100.0, _noop)
    net.add_flow(other, 1.0)  # `one` has 4 bytes left, now at 2 B/s
    net.settle(1.0)
    assert net.next_completion() == pytest.approx(3.0)
    assert one.transferred(2.0) == pytest.approx(6.0)


@pytest.mark.parametrize("seed", range(40))
def test_incremental_matches_progressive_filling(seed: int) -> None:
    _check_against_progressive_filling(seed, Network())


def test_exact_fallback_matches_progressive_filling() -> None:
    # With one re-levelling per link allowed, any ripple that comes back to a
    # link hands the settle to the exact solver; rates must still be right.
    net = Network(max_relevels_per_link=1)
    for seed in range(20):
        _check_against_progressive_filling(seed, net)
    assert net.fallbacks > 0


def _check_against_progressive_filling(seed: int, net: Network) -> None:
    rng = random.Random(seed)
    links = [Link(f"l{i}", rng.choice([1.0, 2.0, 5.0, rng.uniform(0.5, 10)])) for i in range(8)]
    flows: list[Flow] = []
    for step in range(30):
        if flows and rng.random() < 0.35:
            net.remove_flow(flows.pop(rng.randrange(len(flows))), step)
        else:
            chosen = tuple(rng.sample(links, rng.randint(1, 3)))
            cap = rng.choice([math.inf, rng.uniform(0.1, 5.0)])
            flow = Flow(chosen, 1e9, _noop, cap=cap)
            net.add_flow(flow, step)
            flows.append(flow)
        if rng.random() < 0.1:
            net.set_capacity(rng.choice(links), rng.uniform(0.0, 10.0), step)
        net.settle(step)
        reference = progressive_filling(flows)
        for flow in flows:
            # A small rise is not passed on (network._RATE_TOL): a flow may run
            # a little below its max-min rate, never above it.
            assert flow.rate <= reference[flow] * (1 + 1e-6) + 1e-9
            assert flow.rate >= reference[flow] * (1 - 5 * _RATE_TOL) - 1e-9
        for link in links:
            assert link.load <= link.capacity * (1 + 1e-9) + 1e-12


def test_bad_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Link("bad", -1.0)


def test_series_spreads_bytes_and_grows_its_bins() -> None:
    from simulations.engine import Series

    series = Series(width=1.0, max_bins=4)
    series.add(0.5, 2.5, 200.0)  # 100 B/s over two seconds
    times, rates = series.rates(2.5)
    assert times == [0.0, 1.0, 2.0]
    assert rates == pytest.approx([50.0, 100.0, 50.0])
    series.add(6.0, 7.0, 10.0)  # past 4 bins: they double to width 2
    times, rates = series.rates(8.0)
    assert series.width == 2.0
    assert sum(r * series.width for r in rates) == pytest.approx(210.0)


def test_flows_frozen_together_come_back_in_the_order_given() -> None:
    # The order of the exact solver's result is the order of completion-heap
    # entries, so of simultaneous completions: it must not depend on where the
    # flows happen to sit in memory (a set of flows would order them so).
    shared = Link("shared", 100.0)
    flows = [Flow((shared, Link(f"own{i}", 1e9)), 10.0, _noop) for i in range(64)]
    order = random.Random(5).sample(flows, len(flows))
    rates = progressive_filling(order)
    assert list(rates) == order
    assert set(rates.values()) == {100.0 / 64}


@pytest.mark.parametrize("seed", range(20))
def test_next_completion_is_the_earliest_live_flow(seed: int) -> None:
    # The completion heap against a scan of every flow, through starts,
    # removals and capacity changes that re-rate flows in place.
    rng = random.Random(seed)
    net = Network()
    links = [Link(f"l{i}", rng.choice([1.0, 2.0, 4.0])) for i in range(5)]
    flows: list[Flow] = []
    now = 0.0
    for _ in range(80):
        roll = rng.random()
        if flows and roll < 0.3:
            net.remove_flow(flows.pop(rng.randrange(len(flows))), now)
        elif roll < 0.45:
            net.set_capacity(rng.choice(links), rng.choice([0.0, 1.0, 3.0, 8.0]), now)
        else:
            chosen = tuple(rng.sample(links, rng.randint(1, 2)))
            flow = Flow(chosen, rng.choice([1.0, 4.0, rng.uniform(1.0, 9.0)]), _noop)
            net.add_flow(flow, now)
            flows.append(flow)
        net.settle(now)
        due = [f.stamp + f.remaining / f.rate for f in flows if f.rate > 0]
        assert net.next_completion() == pytest.approx(min(due, default=math.inf))
        done = net.pop_completed(now + 0.05)
        if done is not None:
            assert done in flows and done.remaining == 0.0
            flows.remove(done)
            net.settle(now)
        now += 0.05


def test_simultaneous_completions_come_out_in_the_order_queued() -> None:
    link = Link("l", 4.0)
    net = Network()
    flows = [Flow((link,), 2.0, _noop) for _ in range(6)]
    for flow in flows:
        net.add_flow(flow, 0.0)
    net.settle(0.0)  # all at 4/6 B/s, due at 3 s
    late = Flow((Link("own", 1.0),), 4.0, _noop)
    net.add_flow(late, 1.0)
    net.settle(1.0)  # 1 B/s, due at 5 s
    net.set_capacity(late.links[0], 3.0, 2.0)
    net.settle(2.0)  # 3 B left at 3 B/s: re-rated to tie with the six, queued after them
    assert net.next_completion() == 3.0
    popped: list[Flow] = []
    for _ in range(10):
        done = net.pop_completed(3.0)
        if done is None:
            break
        popped.append(done)
    assert popped == [*flows, late]
    assert math.isinf(net.next_completion())


@pytest.mark.parametrize("seed", range(30))
def test_pooled_link_gives_the_same_rates_and_completions(seed: int) -> None:
    # The same run twice, once with the origin pooled: capped origin flows
    # become pool members while their downlink cannot saturate, and turn back
    # into ordinary flows when an uncapped flow arrives there.
    rng = random.Random(seed)
    downs = [rng.choice([3.0, 5.0, 40.0]) for _ in range(5)]
    origin_capacity = rng.choice([2.0, 6.0])
    nets: list[tuple[Network, Link, list[Link], list[Link]]] = []
    for pooled in (False, True):
        net = Network()
        origin = Link("origin", origin_capacity)
        if pooled:
            net.pool(origin)
        nets.append(
            (
                net,
                origin,
                [Link(f"down{i}", cap) for i, cap in enumerate(downs)],
                [Link(f"up{i}", 4.0) for i in range(5)],
            )
        )
    rng = random.Random(seed + 1000)
    flows: list[list[Flow]] = [[], []]
    done: list[list[int]] = [[], []]
    now = 0.0
    pooled_net = nets[1][0]
    for _ in range(120):
        roll = rng.random()
        node, size = rng.randrange(5), rng.uniform(1.0, 30.0)
        for k, (net, origin, down, up) in enumerate(nets):
            if roll < 0.55:
                flow = Flow((origin, down[node]), size, _noop, cap=0.5)
            elif roll < 0.7:
                flow = Flow((up[(node + 1) % 5], down[node]), size, _noop)
            else:
                flow = None
            if flow is not None:
                net.add_flow(flow, now)
                flows[k].append(flow)
            elif flows[k]:
                net.remove_flow(flows[k][int(roll * 1000) % len(flows[k])], now)
            net.settle(now)
        for plain, member in zip(flows[0], flows[1], strict=True):
            assert member.current_rate() == pytest.approx(plain.current_rate(), rel=1e-9)
        assert nets[1][0].next_completion() == pytest.approx(nets[0][0].next_completion())
        now += rng.uniform(0.0, 3.0)
        for k, (net, *_) in enumerate(nets):
            for _ in range(50):  # completions one by one, as the engine runs them
                when = net.next_completion()
                if when > now:
                    break
                flow = net.pop_completed(when)
                assert flow is not None
                done[k].append(flows[k].index(flow))
                net.settle(when)
        assert done[1] == done[0]
    assert pooled_net._pools[0].heap or any(f.pool is None for f in flows[1])
    assert len(done[0]) > 10


def test_pool_members_move_together_and_report_their_bytes() -> None:
    net = Network()
    origin = Link("origin", 8.0)
    net.pool(origin)
    flows = [
        Flow((origin, Link(f"down{i}", 100.0)), 8.0 * (i + 1), _noop, cap=5.0) for i in range(4)
    ]
    for flow in flows:
        net.add_flow(flow, 0.0)
    net.settle(0.0)
    assert all(flow.pool is not None for flow in flows)  # members, not ordinary flows
    assert [flow.current_rate() for flow in flows] == [2.0] * 4
    assert origin.load == pytest.approx(8.0)
    assert flows[3].transferred(1.5) == pytest.approx(3.0)
    assert net.next_completion() == pytest.approx(4.0)
    assert net.pop_completed(4.0) is flows[0]
    net.settle(4.0)  # three left at 8/3 each
    assert flows[1].transferred(4.0) == pytest.approx(8.0)
    assert net.next_completion() == pytest.approx(7.0)
