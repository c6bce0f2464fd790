"""The simulator's prediction beside a shaped run: the scenario built from a run, and the ratios.

No namespaces: each test feeds a small made-up run record (a few nodes, a few
MiB) and runs the simulator on it, which takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics

import pytest

from benchmarks.shaped import MBIT, MIB, Scenario, scenario_result, summarize_system
from benchmarks.sim_truth import (
    RunRecord,
    add_prediction,
    build_scenario,
    format_prediction,
    predict,
    record_from_result,
    run_settings,
    startup_delay,
)
from swarm.peer import PeerConfig
from tracker.config import TrackerConfig

GBIT = 1000 * MBIT


def make_record(**changes: object) -> RunRecord:
    values: dict[str, object] = {
        "name": "tiny",
        "model_bytes": 24 * MIB,
        "files": 3,
        "piece_size": 1 * MIB,
        "node_up_bps": (GBIT,) * 4,
        "node_down_bps": (GBIT,) * 4,
        "origin_up_bps": 200 * MBIT,
        "p50_seconds": 2.0,
        "max_seconds": 2.5,
        "origin_bytes": 24 * MIB + 50_000,
        "origin_bytes_reported": 24 * MIB,
        "startup_seconds": (0.9, 1.0, 1.1, 3.0),
    }
    values.update(changes)
    return RunRecord(**values)  # type: ignore[arg-type]


# --- settings --------------------------------------------------------------------------


def test_settings_default_to_the_peer_and_tracker_configs() -> None:
    settings = run_settings()
    peer, tracker = PeerConfig(), TrackerConfig()
    assert settings.block_size == peer.block_size
    assert settings.requests_per_peer == peer.requests_per_peer
    assert settings.upload_slots == peer.upload_slots
    assert settings.announce_interval == tracker.announce_interval
    assert settings.per_peer_limit == tracker.per_peer_limit
    assert settings.origin_rate is None


def test_flags_of_the_run_override_the_defaults() -> None:
    settings = run_settings(
        ["--no-fsync", "--block-size", "1MiB", "--requests-per-peer=3", "--max-upload-rate", "5MB"],
        ["--announce-interval", "0.5", "--per-peer-origin-pieces", "1"],
    )
    assert settings.block_size == MIB
    assert settings.requests_per_peer == 3
    assert settings.max_upload_rate == 5_000_000
    assert settings.announce_interval == 0.5
    assert settings.per_peer_limit == 1


# --- the scenario ----------------------------------------------------------------------


def test_scenario_has_the_runs_nodes_rates_and_artifact() -> None:
    record = make_record()
    settings = run_settings()
    sc = build_scenario(record, settings)
    assert sc.nodes == 4
    assert sc.model_size == 24 * MIB
    assert sc.files == 3
    assert sc.piece_size == MIB
    assert sc.block_size == min(PeerConfig().block_size, MIB)  # a block never exceeds a piece
    assert sc.origin_rate == pytest.approx(200 * MBIT / 8)
    assert {(r.up, r.down) for r in sc.node_rates()} == {(GBIT / 8, GBIT / 8)}
    assert sc.peer_connections == 3  # every other node: the tracker's reply holds them all
    assert sc.upload_slots == settings.upload_slots
    assert sc.announce_interval == settings.announce_interval
    assert sc.lower_bound() == pytest.approx(8 * 24 * MIB / (200 * MBIT))


def test_request_depth_is_the_peers() -> None:
    sc = build_scenario(make_record(), run_settings(["--requests-per-peer", "3"]))
    names = {f.name for f in dataclasses.fields(sc)}
    if "requests_per_peer" in names:
        assert getattr(sc, "requests_per_peer") == 3  # noqa: B009 - not every Scenario has it
    else:
        # A node-wide limit only: the most the peer keeps in flight over its connections.
        assert getattr(sc, "max_downloads") == 3 * sc.peer_connections  # noqa: B009


def test_nodes_with_different_links_get_a_group_each() -> None:
    ups = (GBIT, 500 * MBIT, GBIT)
    downs = (GBIT, GBIT, 250 * MBIT)
    sc = build_scenario(make_record(node_up_bps=ups, node_down_bps=downs), run_settings())
    assert [(r.up, r.down) for r in sc.node_rates()] == [
        (u / 8, d / 8) for u, d in zip(ups, downs, strict=True)
    ]


def test_rate_caps_of_the_run_lower_the_links() -> None:
    settings = run_settings(["--max-download-rate", "10MB"], ["--origin-rate-limit", "2MB"])
    sc = build_scenario(make_record(), settings)
    assert {r.down for r in sc.node_rates()} == {10_000_000}
    assert sc.origin_rate == pytest.approx(2_000_000)


# --- start-up --------------------------------------------------------------------------


def test_startup_is_the_median_the_peers_report_else_the_best_measure_kept() -> None:
    seconds, source = startup_delay(make_record())
    assert seconds == pytest.approx(1.05)
    assert source == "median of the peers' startup_seconds"
    old = make_record(startup_seconds=(), startup_max_seconds=1.7, origin_first_byte_seconds=1.9)
    assert startup_delay(old)[0] == 1.7
    older = make_record(startup_seconds=(), origin_first_byte_seconds=1.9)
    assert startup_delay(older)[0] == 1.9
    assert startup_delay(make_record(startup_seconds=()))[0] == 0.0


# --- the prediction --------------------------------------------------------------------


def test_prediction_adds_startup_and_divides_real_by_simulated() -> None:
    record = make_record()
    sim = predict(record)
    startup = statistics.median(record.startup_seconds)
    assert sim["completed"] == record.nodes
    assert sim["startup_added_seconds"] == pytest.approx(startup, abs=1e-3)
    assert sim["p50_seconds"] == pytest.approx(sim["engine_p50_seconds"] + startup, abs=2e-3)
    assert sim["max_seconds"] == pytest.approx(sim["engine_max_seconds"] + startup, abs=2e-3)
    # Nothing delivers faster than T_min, the simulator included.
    assert sim["engine_p50_seconds"] >= sim["lower_bound_seconds"] * 0.999
    assert sim["real_over_sim"]["p50"] == pytest.approx(2.0 / sim["p50_seconds"], rel=2e-3)
    assert sim["real_over_sim"]["max"] == pytest.approx(2.5 / sim["max_seconds"], rel=2e-3)
    assert sim["max_ratio_to_bound"] == pytest.approx(
        sim["max_seconds"] / sim["lower_bound_seconds"], rel=2e-3
    )
    # One origin copy in the model; the run's payload matches it, its wire bytes exceed it.
    assert sim["origin_ratio"] == 1.0
    assert sim["origin_real_over_sim"]["reported"] == 1.0
    assert sim["origin_real_over_sim"]["wire"] > 1.0
    assert sim["scenario"]["nodes"] == 4
    assert sim["scenario"]["piece_size"] == MIB


def test_tolerance_judges_both_ratios() -> None:
    sim = predict(make_record())
    near = predict(make_record(p50_seconds=sim["p50_seconds"], max_seconds=sim["max_seconds"]))
    assert near["within_tolerance"]
    slow = predict(make_record(p50_seconds=sim["p50_seconds"], max_seconds=2 * sim["max_seconds"]))
    assert not slow["within_tolerance"]
    assert "outside" in format_prediction(slow)


def test_same_record_same_prediction() -> None:
    first, second = predict(make_record()), predict(make_record())
    first.pop("wall_seconds")
    second.pop("wall_seconds")
    assert first == second


# --- in the result file ----------------------------------------------------------------


def test_result_of_the_shaped_bench_gains_a_simulated_object() -> None:
    scenario = Scenario("tiny", 4, GBIT, 200 * MBIT, 24 * MIB, MIB, files=3)
    swarm = summarize_system(
        [1.9, 2.0, 2.1, 2.6],
        origin_bytes=24 * MIB + 50_000,
        model_bytes=scenario.model_bytes,
        bound_seconds=scenario.lower_bound_seconds,
        extra={"origin_bytes_reported": 24 * MIB, "startup_seconds": [1.0, 1.0, 1.2, 1.2]},
    )
    result = scenario_result(
        scenario,
        {"swarm": swarm, "direct": {"error": "not run"}},
        date=dt.date(2026, 12, 3),
        meta={"fetch_args": ["--requests-per-peer", "2"], "tracker_args": []},
    )
    record = record_from_result(result)
    assert record.nodes == 4 and record.files == 3 and record.fetch_args[-1] == "2"
    assert record.p50_seconds == 2.05
    simulated = add_prediction(result)
    assert simulated is not None
    assert result["systems"]["swarm"]["simulated"] is simulated
    assert simulated["startup_added_seconds"] == 1.1
    assert simulated["real_over_sim"]["p50"] == pytest.approx(
        2.05 / simulated["p50_seconds"], rel=2e-3
    )
    assert add_prediction(result, "direct") is None
    assert "simulated" not in result["systems"]["direct"]


def test_a_run_with_unequal_links_is_simulated_with_each_nodes_link() -> None:
    scenario = Scenario("mixed", 4, GBIT, GBIT, 16 * MIB, MIB, slow_nodes=1, slow_bps=250 * MBIT)
    swarm = summarize_system(
        [0.5, 0.5, 0.5, 0.9],
        origin_bytes=16 * MIB,
        model_bytes=scenario.model_bytes,
        bound_seconds=scenario.lower_bound_seconds,
        node_bounds=scenario.node_bounds_seconds,
    )
    result = scenario_result(scenario, {"swarm": swarm}, date=dt.date(2026, 12, 5))
    assert result["node_links_bps"] == [GBIT] * 3 + [250 * MBIT]
    record = record_from_result(result)
    assert record.node_down_bps == (GBIT, GBIT, GBIT, 250 * MBIT) == record.node_up_bps
