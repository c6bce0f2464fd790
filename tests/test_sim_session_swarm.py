"""The swarm-session model: every simulated node a real PeerSession (small runs)."""

from __future__ import annotations

import dataclasses

import pytest

from simulations.engine import Simulation
from simulations.runner import run_strategy
from simulations.scenario import Crash, NodeGroup, Scenario
from simulations.session_swarm import SessionSwarm
from simulations.strategies import RandomOrderPicker
from swarm.picker import PiecePicker
from swarm.session import CUT_THROUGH_BLOCKS, PeerSession, SessionConfig
from tracker import assignment
from tracker.registry import SwarmRegistry

MiB = 1024**2


def test_every_node_is_a_peer_session_and_the_tracker_is_the_registry() -> None:
    # Blocks of a quarter piece; everything else is the peer's default.
    scenario = Scenario(
        nodes=8, model_size=32 * MiB, piece_size=4 * MiB, block_size=1 * MiB, nic_gbps=1
    )
    sim = Simulation(scenario, "swarm-session")
    strategy = SessionSwarm(sim)
    result = sim.run(strategy)
    assert len(result.completed()) == 8
    assert result.origin_bytes == scenario.model_size
    assert isinstance(strategy.registry, SwarmRegistry)
    assert strategy.registry.num_peers == 8
    peer = SessionConfig()
    for node in strategy.nodes:
        session = node.session
        assert isinstance(session, PeerSession)
        assert type(session.picker) is PiecePicker
        assert session.block_size == 1 * MiB
        assert session.config.cut_through == CUT_THROUGH_BLOCKS  # the scenario's default: on
        assert (
            dataclasses.replace(session.config, block_size=peer.block_size, cut_through=0) == peer
        )
        assert session.complete
        assert session.peers  # it found others through the tracker's replies
    # Only the origin pieces' bytes came from the origin: four blocks per piece
    # moved between peers, and the sessions stored and verified each piece once.
    assert sum(n.session.stats.origin_pieces for n in strategy.nodes if n.session) == 8


def test_without_a_block_size_the_session_uses_the_peers() -> None:
    scenario = Scenario(nodes=3, model_size=16 * MiB, piece_size=8 * MiB, nic_gbps=1)
    sim = Simulation(scenario, "swarm-session")
    strategy = SessionSwarm(sim)
    sim.run(strategy)
    for node in strategy.nodes:
        assert node.session is not None
        assert node.session.block_size == SessionConfig().block_size


def test_random_order_uses_the_random_picker() -> None:
    scenario = Scenario(nodes=6, model_size=48 * MiB, piece_size=4 * MiB, nic_gbps=10)
    result = run_strategy(scenario, "swarm-session-random")
    assert result.strategy == "swarm-session-random"
    assert len(result.completed()) == 6
    assert result.origin_bytes == scenario.model_size
    sim = Simulation(scenario, "swarm-session-random")
    strategy = SessionSwarm(sim, random_order=True)
    sim.run(strategy)
    for node in strategy.nodes:
        assert node.session is not None
        assert type(node.session.picker) is RandomOrderPicker


def test_a_crashed_seeder_is_forgotten_and_the_others_finish() -> None:
    scenario = Scenario(
        nodes=6,
        model_size=48 * MiB,
        piece_size=4 * MiB,
        nic_gbps=1,
        origin_gbps=1,
        crashes=(Crash(node=0, at=0.2),),
    )
    sim = Simulation(scenario, "swarm-session")
    swarm = SessionSwarm(sim)
    result = sim.run(swarm)
    assert result.crashed == 1
    assert result.completion[0] is None
    assert all(c is not None for c in result.completion[1:])
    assert result.origin_bytes >= scenario.model_size
    # Its connections closed at the other ends, and the tracker forgot it.
    crashed = swarm.nodes[0].peer_id
    for node in swarm.nodes[1:]:
        assert node.session is not None
        assert crashed not in node.session.peers
    assert crashed not in swarm.registry


def test_cut_through_moves_256_mib_pieces_at_block_granularity() -> None:
    # 12 nodes, 2 GiB in the default 256 MiB pieces, the origin as fast as a NIC:
    # without cut-through a piece helps nobody until its seeder holds it whole,
    # and the 8 pieces' seeders pull them at once while the fabric idles.
    scenario = Scenario(
        nodes=12,
        model_size=2048 * MiB,
        piece_size=256 * MiB,
        nic_gbps=10,
        origin_gbps=10,
        peer_connections=11,
    )
    results = {}
    for on in (True, False):
        sim = Simulation(scenario.with_overrides(cut_through=on), "swarm-session")
        strategy = SessionSwarm(sim)
        result = sim.run(strategy)
        assert len(result.completed()) == 12
        assert result.origin_bytes == scenario.model_size  # still one origin copy
        relayed = sum(n.session.stats.cut_through_bytes for n in strategy.nodes if n.session)
        results[on] = (max(result.completed()), relayed)
    (on_time, on_relayed), (off_time, off_relayed) = results[True], results[False]
    assert off_relayed == 0 and on_relayed > 0
    assert on_time < off_time * 0.9, results


def _mixed_fleet(block_size: int, seed: int) -> Scenario:
    """The shaped mixed-links run, as the simulator takes it: 8 nodes at 400 Mbit/s,
    two of them at 100, origin 1 Gbit/s, 512 MiB in 4 MiB pieces."""
    return Scenario(
        nodes=8,
        model_size=512 * MiB,
        piece_size=4 * MiB,
        block_size=block_size,
        nic_gbps=0.4,
        origin_gbps=1,
        peer_connections=7,
        announce_interval=2.0,
        upload_slots=16,
        max_downloads=42,
        node_groups=(NodeGroup(6), NodeGroup(2, up_gbps=0.1, down_gbps=0.1)),
        seed=seed,
    )


def test_slow_nodes_pull_no_origin_pieces_the_fast_ones_would_wait_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shaped mixed-links run (see _mixed_fleet). A slow node's pulls share
    # its downlink with everything it fetches from peers; pieces it pulled reach the
    # fast nodes late and through its slow uplink.
    scenario = _mixed_fleet(4 * MiB, 1)
    bounds = scenario.node_bounds()
    fast: dict[float, float] = {}
    for slow_seeder in (0.0, assignment.SLOW_SEEDER):  # 0: nobody is ever slow
        monkeypatch.setattr(assignment, "SLOW_SEEDER", slow_seeder)
        sim = Simulation(scenario, "swarm-session")
        strategy = SessionSwarm(sim)
        result = sim.run(strategy)
        assert len(result.completed()) == 8 and result.origin_bytes == scenario.model_size
        pulled = strategy.registry.assignment.stats.pulled
        slow_pulls = sum(pulled.get(n.peer_id, 0) for n in strategy.nodes[6:])
        fast[slow_seeder] = max(
            c / b for c, b in zip(result.completion[:6], bounds[:6], strict=True)
        )
        assert all(c / b < 1.1 for c, b in zip(result.completion[6:], bounds[6:], strict=True))
    # Measured: 1.18 without the rule, 1.07 with it (1.36 and 1.12 before the
    # upload order of swarm.choker, fewest copies first).
    assert fast[assignment.SLOW_SEEDER] < 0.95 * fast[0.0], fast
    assert slow_pulls < 2 * 6  # a start-up round, no more


@pytest.mark.parametrize(
    ("block_mib", "seeds", "within"), [(1, range(1, 9), 1.10), (4, (1, 4), 1.2)]
)
def test_a_slow_nodes_uplink_sends_each_block_once_before_it_sends_any_twice(
    block_mib: int, seeds: range | tuple[int, ...], within: float
) -> None:
    # The mixed fleet above, over seeds. Every fast node queues the same rare
    # blocks at a slow node (the pieces it pulled from the origin); sent in
    # arrival order, each went to each of them through the slow uplink in turn.
    # Fewest copies first sends each once, and the fast nodes relay it: worst
    # fast node / its own bound over seeds 1-8 went 1.19 -> 1.07 with 1 MiB
    # blocks (cut-through) and 1.66 -> 1.15 with 4 MiB ones (no cut-through).
    # With cut-through, every node of the fleet, fast or slow, finishes within
    # 1.10 of its own bound max(F/u_s, F/d_i, N F/(u_s + sum u)) on every seed.
    worst = {}
    for seed in seeds:
        scenario = _mixed_fleet(block_mib * MiB, seed)
        bounds = scenario.node_bounds()
        result = run_strategy(scenario, "swarm-session")
        assert len(result.completed()) == 8 and result.origin_bytes == scenario.model_size
        worst[seed] = max(c / b for c, b in zip(result.completion, bounds, strict=True))
    assert max(worst.values()) <= within, worst
