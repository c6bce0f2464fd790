"""Strategies against their analytical limits, determinism, and faults (small runs)."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from simulations.runner import run_strategy
from simulations.scenario import (
    Crash,
    Join,
    NodeGroup,
    Scenario,
    Stall,
    Throttle,
    gbps,
    list_scenarios,
    load_scenario,
)
from simulations.strategies import cache_bound, cache_owners

MiB = 1024**2


def _max(result_completion: list[float | None]) -> float:
    done = [c for c in result_completion if c is not None]
    assert len(done) == len(result_completion)
    return max(done)


def test_direct_is_n_copies_over_the_origin() -> None:
    scenario = Scenario(nodes=10, model_size=64 * MiB, piece_size=4 * MiB, origin_gbps=1)
    result = run_strategy(scenario, "direct")
    expected = 10 * 64 * MiB / gbps(1)
    assert _max(result.completion) == pytest.approx(expected, rel=0.01)
    assert result.origin_bytes == pytest.approx(10 * 64 * MiB)


def test_an_origin_pull_reads_ranges_in_parallel_as_the_peer_does() -> None:
    # One node, one 256 MiB piece, each GET capped at 1 Gbit/s: the peer reads a
    # piece four 16 MiB ranges at a time, so a pull is four GETs wide.
    scenario = Scenario(
        nodes=1,
        model_size=256 * MiB,
        piece_size=256 * MiB,
        nic_gbps=100,
        origin_gbps=100,
        origin_connection_gbps=1,
    )
    assert scenario.pull_streams(256 * MiB) == 4
    assert scenario.pull_streams(20 * MiB) == 2
    assert scenario.pull_streams(4 * MiB) == 1
    wide = _max(run_strategy(scenario, "direct").completion)
    assert wide == pytest.approx(256 * MiB / gbps(4), rel=0.01)
    single = scenario.with_overrides(origin_streams=1)
    assert single.pull_streams(256 * MiB) == 1
    assert _max(run_strategy(single, "direct").completion) == pytest.approx(4 * wide, rel=0.01)
    with pytest.raises(ConfigError, match="origin_streams"):
        Scenario(origin_streams=-1)


def test_swarm_reaches_the_lower_bound_in_an_ideal_network() -> None:
    # Many small pieces, a full mesh, uplinks to spare: the downlink is the limit.
    scenario = Scenario(
        nodes=10,
        model_size=512 * MiB,
        piece_size=1 * MiB,
        nic_gbps=10,
        up_gbps=20,
        origin_gbps=20,
        peer_connections=9,
    )
    bound = scenario.lower_bound()
    assert bound == pytest.approx(512 * MiB / gbps(10))
    result = run_strategy(scenario, "swarm")
    done = result.completed()
    assert len(done) == 10
    assert min(done) >= bound * (1 - 1e-9)
    assert max(done) <= bound * 1.05
    assert result.origin_bytes == scenario.model_size


@pytest.mark.parametrize("origin_gbps", [1.0, 100.0])
def test_cache_against_its_own_bound(origin_gbps: float) -> None:
    scenario = Scenario(
        nodes=8, model_size=256 * MiB, piece_size=2 * MiB, nic_gbps=10, origin_gbps=origin_gbps
    )
    bound = cache_bound(scenario)
    assert bound >= scenario.lower_bound()
    result = run_strategy(scenario, "cache")
    finish = _max(result.completion)
    assert finish >= bound * (1 - 1e-9)
    # Readers in file order all hit the same owners at once; the slow-origin
    # case hides that, the fast one shows it.
    assert finish <= bound * (1.05 if origin_gbps == 1.0 else 1.35)  # measured 1.03, 1.27
    assert result.origin_bytes == scenario.model_size


def test_cache_owners_cover_every_node_roughly_evenly() -> None:
    scenario = Scenario(nodes=16, model_size=1024 * MiB, piece_size=1 * MiB, cache_vnodes=64)
    owners = cache_owners(scenario)
    counts = [owners.count(node) for node in range(16)]
    assert sum(counts) == 1024
    assert min(counts) > 0
    assert max(counts) < 2.5 * 1024 / 16


def test_same_seed_same_result_and_seed_matters() -> None:
    scenario = Scenario(nodes=12, model_size=96 * MiB, piece_size=4 * MiB, nic_gbps=10)
    first = run_strategy(scenario, "swarm").completion
    assert run_strategy(scenario, "swarm").completion == first
    assert run_strategy(scenario.with_overrides(seed=2), "swarm").completion != first


def test_swarm_random_runs_and_pulls_each_piece_once() -> None:
    scenario = Scenario(nodes=12, model_size=96 * MiB, piece_size=4 * MiB, nic_gbps=10)
    result = run_strategy(scenario, "swarm-random")
    assert result.strategy == "swarm-random"
    assert len(result.completed()) == 12
    assert result.origin_bytes == scenario.model_size


def test_heterogeneous_lower_bound_uses_slowest_download_and_sum_of_uploads() -> None:
    scenario = Scenario(
        nodes=4,
        model_size=1000,
        nic_gbps=8,
        origin_gbps=8,
        node_groups=(NodeGroup(1, up_gbps=0.8, down_gbps=0.8),),
    )
    slow = 1000 / gbps(0.8)
    assert scenario.lower_bound() == pytest.approx(slow)
    result = run_strategy(scenario.with_overrides(piece_size=100), "swarm")
    assert result.completion[0] is not None
    assert result.completion[0] >= slow * (1 - 1e-9)


def test_crash_of_a_seeder_costs_a_counted_refetch_and_others_finish() -> None:
    scenario = Scenario(
        nodes=10,
        model_size=64 * MiB,
        piece_size=2 * MiB,
        nic_gbps=1,
        origin_gbps=1,
        crashes=(Crash(node=0, at=0.1),),
    )
    for strategy in ("swarm", "cache", "direct"):
        result = run_strategy(scenario, strategy)
        assert result.crashed == 1
        assert result.completion[0] is None
        assert all(c is not None for c in result.completion[1:]), strategy
    swarm = run_strategy(scenario, "swarm")
    assert swarm.origin_bytes >= scenario.model_size


def test_stalled_seeder_loses_its_pieces_to_others() -> None:
    scenario = Scenario(
        nodes=6,
        model_size=32 * MiB,
        piece_size=2 * MiB,
        nic_gbps=1,
        origin_gbps=1,
        stall_timeout=2.0,
        announce_interval=0.5,
        stalls=(Stall(node=2, at=0.01, duration=30.0),),
    )
    result = run_strategy(scenario, "swarm")
    assert result.extra["stall_reclaims"] >= 1
    assert len(result.completed()) == 6
    assert result.sim_seconds < 30.0  # nobody waited for the stalled node
    assert result.origin_bytes > scenario.model_size  # the partial pulls were counted


def test_throttling_episode_delays_but_does_not_break() -> None:
    base = Scenario(nodes=5, model_size=16 * MiB, piece_size=1 * MiB, origin_gbps=1)
    throttled = base.with_overrides(
        throttles=(Throttle(start=0.0, end=1.0, request_rate=0.0),),
        first_byte_latency=0.01,
        retry_after=0.2,
    )
    calm = run_strategy(base, "direct")
    result = run_strategy(throttled, "direct")
    assert result.throttled_requests > 0
    assert result.origin_bytes == pytest.approx(calm.origin_bytes)
    assert _max(result.completion) > _max(calm.completion)
    assert result.sim_seconds >= 1.0


def test_late_joiners_are_timed_from_their_join() -> None:
    scenario = Scenario(
        nodes=8,
        model_size=32 * MiB,
        piece_size=2 * MiB,
        nic_gbps=10,
        origin_gbps=1,
        join=Join(count=3, start=5.0, interval=1.0),
    )
    result = run_strategy(scenario, "swarm")
    assert len(result.completed()) == 8
    for node in (5, 6, 7):
        finish = result.finish_time[node]
        completion = result.completion[node]
        assert finish is not None and completion is not None
        assert finish - completion == pytest.approx(5.0 + (node - 5))


def test_shipped_scenarios_load_with_their_variants() -> None:
    names = list_scenarios()
    assert {"fireworks-kimi", "kraken-2600", "dragonfly-1200"} <= set(names)
    kimi = load_scenario("fireworks-kimi")
    assert kimi.model_size == 1024**4 and kimi.piece_size == 256 * MiB
    small = kimi.select_variant("n100-o10")
    assert (small.nodes, small.origin_gbps, small.variant) == (100, 10, "n100-o10")
    with pytest.raises(ConfigError, match="no variant"):
        kimi.select_variant("nope")
    with pytest.raises(ConfigError, match="no scenario"):
        load_scenario("nope")


def test_bad_scenario_values_are_refused(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="nodes"):
        Scenario(nodes=0)
    with pytest.raises(ConfigError, match="crash names node 9"):
        Scenario(nodes=3, crashes=(Crash(node=9, at=1.0),))
    with pytest.raises(ConfigError, match="unknown strategy"):
        Scenario(strategies=("bittorrent",))


def test_measured_link_rates_give_per_node_completion_times() -> None:
    # Measured downlinks of 1, 2, 4 and 8 Gbit/s behind a fast origin: each node
    # finishes at F / d_i, and the result reports each one separately.
    downs = (1.0, 2.0, 4.0, 8.0)
    scenario = Scenario(
        nodes=4,
        model_size=64 * MiB,
        piece_size=4 * MiB,
        nic_gbps=10,
        origin_gbps=100,
        node_groups=tuple(NodeGroup(1, down_gbps=d) for d in downs),
    )
    result = run_strategy(scenario, "direct")
    for node, down in enumerate(downs):
        completion = result.completion[node]
        assert completion == pytest.approx(64 * MiB / gbps(down), rel=0.01)
    assert result.lower_bound_seconds == pytest.approx(64 * MiB / gbps(1.0))


def test_each_node_is_held_to_its_own_bound_on_a_mixed_fleet() -> None:
    scenario = Scenario(
        nodes=8,
        model_size=64 * MiB,
        piece_size=4 * MiB,
        nic_gbps=4,
        origin_gbps=2,
        node_groups=(NodeGroup(count=2, up_gbps=1, down_gbps=1),),
    )
    bounds = scenario.node_bounds()
    size = 64 * MiB
    shared = max(size / gbps(2), 8 * size / (gbps(2) + 2 * gbps(1) + 6 * gbps(4)))
    assert bounds[:2] == [pytest.approx(max(shared, size / gbps(1)))] * 2
    assert bounds[2:] == [pytest.approx(max(shared, size / gbps(4)))] * 6
    assert max(bounds) == pytest.approx(scenario.lower_bound())
    result = run_strategy(scenario, "swarm")
    own = result.summary()["own_bound_ratio"]
    ratios = sorted(c / b for c, b in zip(result.completion, bounds, strict=True) if c is not None)
    assert len(ratios) == 8 and own["max"] == pytest.approx(ratios[-1])
    assert own["p50"] == pytest.approx(ratios[3])
    assert all(r >= 1 - 1e-9 for r in ratios)  # no node beats its own bound
    # T_min, the slow nodes' bound, hides the fast ones: their ratio to it is lower.
    assert result.summary()["completion_ratio"]["p50"] < own["p50"]


def _cut_through_scenario(cut_through: bool) -> Scenario:
    # 256 MiB pieces as the reference deployment ships them, 16 MiB blocks,
    # origin as fast as a node: eight pulls share the origin, so whole pieces
    # leave it only near the end.
    return Scenario(
        nodes=16,
        model_size=2048 * MiB,
        piece_size=256 * MiB,
        block_size=16 * MiB,
        nic_gbps=10,
        origin_gbps=10,
        peer_connections=6,
        cut_through=cut_through,
        seed=3,
    )


def test_cut_through_relays_blocks_before_their_piece_is_whole() -> None:
    on = run_strategy(_cut_through_scenario(True), "swarm")
    off = run_strategy(_cut_through_scenario(False), "swarm")
    bound = _cut_through_scenario(True).lower_bound()
    for result in (on, off):
        assert result.origin_bytes == 2048 * MiB  # relaying early reads nothing twice
    # Measured (seed 3): max 1.69 x T_min with cut-through, 2.80 without.
    assert _max(on.completion) <= 0.7 * _max(off.completion)
    assert _max(on.completion) <= 1.8 * bound
    # Without it no node can finish before the last whole piece leaves the origin.
    assert min(off.completed()) >= bound


def test_every_node_gets_about_peer_connections_neighbours() -> None:
    from simulations.engine import Simulation
    from simulations.strategies import Swarm

    scenario = Scenario(
        nodes=1200, model_size=64 * MiB, piece_size=4 * MiB, peer_connections=10, seed=1
    )
    sim = Simulation(scenario, "swarm")
    swarm = Swarm(sim)
    for node in range(scenario.nodes):
        sim.joined[node] = True
    swarm.start()
    degrees = [len(node.conns) for node in swarm.nodes]
    # A node that has its neighbours takes no more, but for the last few to dial,
    # which find every node with room a neighbour already (left with 6 of 10,
    # dragonfly-1200's last node finished at 1.34 x T_min, the next at 1.17).
    assert min(degrees) == 10 and max(degrees) <= 11
    assert sum(degrees) / len(degrees) <= 10.1


def test_the_simulated_peer_sends_as_many_blocks_at_once_as_the_real_one() -> None:
    from swarm.session import SessionConfig

    assert Scenario().upload_slots == SessionConfig().upload_slots
    for name in list_scenarios():
        assert load_scenario(name).upload_slots == SessionConfig().upload_slots, name


def _upload_limited(origin_copies: float) -> Scenario:
    """16 nodes whose uplinks are a quarter of their downlinks, a fast origin: one
    origin copy leaves the other 15 to cross the nodes' slow uplinks."""
    return Scenario(
        nodes=16,
        model_size=1024 * MiB,
        piece_size=4 * MiB,
        block_size=1 * MiB,
        nic_gbps=0.4,
        origin_gbps=2.0,
        peer_connections=15,
        announce_interval=2.0,
        max_downloads=42,
        node_groups=(NodeGroup(16, up_gbps=0.1, down_gbps=0.4),),
        origin_copies=origin_copies,
    )


@pytest.mark.parametrize(("strategy", "shorter"), [("swarm", 0.9), ("swarm-session", 0.97)])
def test_origin_copies_shorten_an_upload_limited_burst_within_their_budget(
    strategy: str, shorter: float
) -> None:
    # Measured (seed 1): max 2.16 / 2.01 / 1.73 x T_min with 1 / 2 / 4 origin copies
    # (glue); origin bytes 1.0 / 2.0 / 4.0 (3.9) x F. The session model, at the
    # peer's default of 12 requests per connection for these 1 MiB blocks
    # (swarm.session.requests_in_flight): 81.9 s with one copy, 77.3 s with four
    # (65.8 s at 6 requests per connection: deeper queues at the slow uplinks blunt
    # the copies).
    results = {c: run_strategy(_upload_limited(c), strategy) for c in (1.0, 4.0)}
    one, four = results[1.0], results[4.0]
    assert one.origin_bytes == _upload_limited(1.0).model_size  # invariant 1 by default
    assert four.origin_bytes <= 4 * _upload_limited(4.0).model_size
    assert len(four.completed()) == 16
    assert max(four.completed()) < shorter * max(one.completed())
