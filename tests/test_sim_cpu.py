"""A node's CPU in the simulator: its cores ÷ the measured cost per GiB, and its one event loop.

``cpu_cores`` 0 (the default) leaves CPU out, as before; set, each node's download
and upload are capped at ``cores / (receive + serve cost)`` GiB/s and at
``1 / loop_s_per_gib`` GiB/s, and T_min follows the capped rates.
"""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from simulations.runner import run_strategy
from simulations.scenario import GIB, LOOP_S_PER_GIB, Scenario, gbps, load_scenario

MiB = 1024**2


def test_cpu_left_out_by_default() -> None:
    scenario = Scenario(nodes=4, nic_gbps=100)
    assert scenario.cpu_rate() is None and scenario.cpu_limit() == ""
    assert {r.down for r in scenario.node_rates()} == {gbps(100)}


def test_cores_over_the_cost_cap_both_directions() -> None:
    scenario = Scenario(
        nodes=4,
        nic_gbps=400,
        cpu_cores=8,
        cpu_receive_s_per_gib=1.5,
        cpu_serve_s_per_gib=0.5,
        loop_s_per_gib=0.1,
    )
    assert scenario.cpu_rate() == pytest.approx(4 * GIB)  # 8 cores / 2 CPU-s per GiB
    assert scenario.cpu_limit() == "cores"
    assert {(r.up, r.down) for r in scenario.node_rates()} == {(4 * GIB, 4 * GIB)}


def test_the_event_loop_caps_a_node_whatever_its_cores() -> None:
    many = Scenario(nodes=4, nic_gbps=400, cpu_cores=64, loop_s_per_gib=0.5)
    assert many.cpu_rate() == pytest.approx(2 * GIB) and many.cpu_limit() == "event loop"
    no_loop = many.with_overrides(loop_s_per_gib=0.0)
    assert no_loop.cpu_limit() == "cores"
    assert no_loop.cpu_rate() == pytest.approx(
        64 / (no_loop.cpu_receive_s_per_gib + no_loop.cpu_serve_s_per_gib) * GIB
    )


def test_a_cpu_bound_swarm_takes_the_cpu_bound_time() -> None:
    free = Scenario(
        nodes=8,
        model_size=256 * MiB,
        piece_size=4 * MiB,
        nic_gbps=100,
        origin_gbps=100,
        peer_connections=7,
    )
    capped = free.with_overrides(
        cpu_cores=1, cpu_receive_s_per_gib=3.0, cpu_serve_s_per_gib=1.0, loop_s_per_gib=0.0
    )
    assert capped.lower_bound() == pytest.approx(256 * MiB / (GIB / 4))  # 1 s
    assert capped.lower_bound() > 10 * free.lower_bound()
    done = run_strategy(capped, "swarm").completed()
    assert len(done) == 8
    assert min(done) >= capped.lower_bound() * (1 - 1e-9)
    assert max(done) <= capped.lower_bound() * 1.5


@pytest.mark.parametrize(
    "bad",
    [
        {"cpu_cores": -1},
        {"loop_s_per_gib": -0.1},
        {"cpu_cores": 4, "cpu_receive_s_per_gib": 0, "cpu_serve_s_per_gib": 0},
    ],
)
def test_bad_cpu_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Scenario(**bad)  # type: ignore[arg-type]


def test_the_fireworks_cpu_variants_are_bound_by_the_event_loop() -> None:
    scenario = load_scenario("fireworks-kimi").select_variant("n1000-o100-cpu32")
    assert scenario.cpu_cores == 32 and scenario.cpu_limit() == "event loop"
    # 1 TiB at 1 / LOOP_S_PER_GIB GiB/s (197 s), where the NIC alone allows 88 s.
    assert scenario.lower_bound() == pytest.approx(1024 * LOOP_S_PER_GIB, rel=1e-6)
    assert (
        scenario.lower_bound()
        > 2 * load_scenario("fireworks-kimi").select_variant("n1000-o100").lower_bound()
    )
