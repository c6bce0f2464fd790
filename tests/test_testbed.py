"""Fast tests of the benchmark harness: the bound, the result JSON, the README table.

No namespaces are built here; the shaped runs are `make bench`, not tests.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from benchmarks.dataplane import build_result, dataplane_result
from benchmarks.run_all import (
    END_MARKER,
    START_MARKER,
    latest_results,
    render_other,
    render_table,
    replace_marked,
    update_readme,
)
from benchmarks.shaped import (
    GBIT,
    GIB,
    MBIT,
    MIB,
    SCENARIOS,
    Scenario,
    lower_bound_seconds,
    result_path,
    scenario_result,
    summarize_system,
    write_result,
)
from benchmarks.testbed import Shape, node_addr

DAY = dt.date(2025, 1, 2)


# --- T_min -----------------------------------------------------------------------------


def test_origin_bound_scenario_is_limited_by_the_origin_link() -> None:
    sc = SCENARIOS["origin-bound"]
    assert (sc.nodes, sc.node_bps, sc.origin_bps, sc.model_bytes) == (
        8,
        10**9,
        2 * 10**8,
        512 * MIB,
    )
    # F/u_s = 512 MiB * 8 / 200 Mbit/s
    assert sc.lower_bound_seconds == pytest.approx(512 * MIB * 8 / 200e6)
    assert sc.lower_bound_seconds == pytest.approx(21.475, abs=1e-3)


def test_fabric_bound_scenario_is_limited_by_the_node_download() -> None:
    sc = SCENARIOS["fabric-bound"]
    assert (sc.nodes, sc.node_bps, sc.origin_bps, sc.model_bytes) == (8, 4 * 10**8, 10**9, GIB)
    assert sc.lower_bound_seconds == pytest.approx(GIB * 8 / 400e6)  # F/d: 21.47 s


def test_bound_is_the_aggregate_upload_term_when_peers_upload_slowly() -> None:
    # N·F/(u_s + N·u) = 10 * 8e9 / (1e9 + 10 * 1e8) = 40 s beats F/u_s = 8 s and F/d = 8 s.
    t = lower_bound_seconds(10**9, nodes=10, origin_up_bps=1e9, node_down_bps=1e9, node_up_bps=1e8)
    assert t == pytest.approx(40.0)


def test_bound_of_one_node_is_the_slower_of_origin_and_download() -> None:
    assert lower_bound_seconds(
        10**9, nodes=1, origin_up_bps=2e9, node_down_bps=1e9, node_up_bps=1e9
    ) == pytest.approx(8.0)


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"origin_up_bps": 0.0}, {"node_up_bps": -1.0}])
def test_bound_refuses_nonsense(bad: dict[str, float]) -> None:
    kwargs: dict[str, float] = {
        "nodes": 4,
        "origin_up_bps": 1e9,
        "node_down_bps": 1e9,
        "node_up_bps": 1e9,
    }
    kwargs.update(bad)
    with pytest.raises(ValueError):
        lower_bound_seconds(10**6, **kwargs)  # type: ignore[arg-type]


def test_shape_and_addresses_stay_inside_the_testbed_subnet() -> None:
    assert node_addr(1) == "10.77.0.11"
    assert node_addr(8) == "10.77.0.18"
    with pytest.raises(ValueError):
        node_addr(0)
    with pytest.raises(ValueError):
        Shape(nodes=0, node_up_bps=1, node_down_bps=1, origin_up_bps=1)
    shape = SCENARIOS["fabric-bound"].shape
    assert (shape.node_up_bps, shape.node_down_bps, shape.origin_up_bps) == (
        400 * MBIT,
        400 * MBIT,
        1000 * MBIT,
    )


def test_mixed_links_scenario_holds_each_node_to_its_own_bound() -> None:
    sc = SCENARIOS["mixed-links"]
    assert sc.node_links_bps == [400 * MBIT] * 6 + [100 * MBIT] * 2
    bits = 8 * sc.model_bytes
    shared = max(bits / 1e9, 8 * bits / (1e9 + 6 * 400e6 + 2 * 100e6))
    fast, slow = max(shared, bits / 400e6), max(shared, bits / 100e6)
    assert sc.node_bounds_seconds == pytest.approx([fast] * 6 + [slow] * 2)
    assert sc.lower_bound_seconds == pytest.approx(slow)  # T_min is the slow nodes' bound
    shape = sc.shape
    assert [shape.up_bps(i) for i in (1, 6, 7, 8)] == [400 * MBIT] * 2 + [100 * MBIT] * 2
    assert shape.down_bps(8) == 100 * MBIT and shape.mtu == 9000
    # Equal links: the node bounds are the Kumar-Ross bound for every node.
    fabric = SCENARIOS["fabric-bound"]
    assert fabric.node_bounds_seconds == pytest.approx([fabric.lower_bound_seconds] * 8)
    assert fabric.shape.node_links == () and fabric.shape.up_bps(3) == 400 * MBIT


def test_unequal_links_are_refused_when_they_do_not_fit() -> None:
    with pytest.raises(ValueError, match="node_links"):
        Shape(nodes=2, node_up_bps=1, node_down_bps=1, origin_up_bps=1, node_links=((1, 1),))
    with pytest.raises(ValueError, match="positive"):
        Shape(nodes=1, node_up_bps=1, node_down_bps=1, origin_up_bps=1, node_links=((1, 0),))
    with pytest.raises(ValueError, match="slow_nodes"):
        Scenario("bad", 4, GBIT, GBIT, MIB, MIB, slow_nodes=4, slow_bps=MBIT)
    with pytest.raises(ValueError, match="slow_nodes"):
        Scenario("bad", 4, GBIT, GBIT, MIB, MIB, slow_nodes=1)


def test_summary_gives_each_node_over_its_own_bound() -> None:
    entry = summarize_system(
        [12.0, 11.0, 40.0],
        origin_bytes=1,
        model_bytes=1,
        bound_seconds=40.0,
        node_bounds=[10.0, 10.0, 40.0],
    )
    assert entry["own_bound_ratios"] == [1.2, 1.1, 1.0]
    assert (entry["own_bound_ratio_p50"], entry["own_bound_ratio_max"]) == (1.1, 1.2)
    assert entry["ratio_to_bound"] == 1.0  # T_min (the slowest bound) hides the fast nodes
    assert "own_bound_ratios" not in summarize_system(
        [1.0], origin_bytes=1, model_bytes=1, bound_seconds=1.0
    )


# --- result JSON -----------------------------------------------------------------------


def _scenario_json() -> dict[str, object]:
    sc = SCENARIOS["origin-bound"]
    bound = sc.lower_bound_seconds
    systems = {
        "swarm": summarize_system(
            [22.0, 24.0, 23.0, 25.0],
            origin_bytes=sc.model_bytes,
            model_bytes=sc.model_bytes,
            bound_seconds=bound,
            extra={"verified": True},
        ),
        "direct": summarize_system(
            [170.0, 172.0, 171.0, 169.0],
            origin_bytes=8 * sc.model_bytes,
            model_bytes=sc.model_bytes,
            bound_seconds=bound,
        ),
    }
    return scenario_result(sc, systems, date=DAY)


def test_scenario_result_has_the_documented_shape() -> None:
    result = _scenario_json()
    assert {"scenario", "nodes", "model_bytes", "lower_bound_seconds", "systems"} <= set(result)
    assert result["scenario"] == "origin-bound"
    assert result["nodes"] == 8
    assert result["model_bytes"] == 512 * MIB
    systems = result["systems"]
    assert isinstance(systems, dict)
    for entry in systems.values():
        assert {"p50_seconds", "max_seconds", "ratio_to_bound", "origin_bytes"} <= set(entry)
    swarm = systems["swarm"]
    assert swarm["p50_seconds"] == pytest.approx(23.5)  # median of four
    assert swarm["max_seconds"] == 25.0
    assert swarm["ratio_to_bound"] == pytest.approx(25.0 / 21.475, abs=1e-3)
    assert swarm["origin_ratio"] == 1.0
    assert swarm["verified"] is True
    assert systems["direct"]["origin_ratio"] == 8.0
    json.dumps(result)  # JSON-able as is


def test_summary_needs_at_least_one_node() -> None:
    with pytest.raises(ValueError):
        summarize_system([], origin_bytes=0, model_bytes=1, bound_seconds=1.0)


def test_result_path_names_scenario_and_date(tmp_path: Path) -> None:
    assert result_path(tmp_path, "fabric-bound", DAY) == tmp_path / "fabric-bound-2025-01-02.json"
    write_result(result_path(tmp_path, "origin-bound", DAY), _scenario_json())
    assert json.loads((tmp_path / "origin-bound-2025-01-02.json").read_text())["nodes"] == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_dataplane_result_reports_both_rates_and_their_ratio() -> None:
    out = dataplane_result(size=GIB, swarm_mbps=1500.0, raw_socket_mbps=3000.0, date=DAY)
    assert out["swarm_mbps"] == 1500.0
    assert out["raw_socket_mbps"] == 3000.0
    assert out["ratio"] == 0.5


def _floor_run(mbps: float, cpu: float, when: str) -> dict[str, object]:
    return {
        "mbps": mbps,
        "cpu_s_per_gib_received": cpu,
        "cpu_s_per_gib_received_after_startup": cpu - 0.05,
        "cpu_s_per_gib_sent": 0.5,
        "peak_rss_mib": 20.0,
        "direct_io": True,
        "when": when,
    }


def _swarm_run(piece_size: int, mbps: float, cpu: float, rss: float) -> dict[str, object]:
    return {
        "piece_size": piece_size,
        "workers": None,
        "round": 0,
        "mbps": mbps,
        "seconds": GIB / mbps / 1e6,
        "cpu_s_per_gib_received": cpu,
        "cpu_s_per_gib_received_after_startup": cpu - 0.45,
        "cpu_s_per_gib_served": 0.75,
        "peak_rss_mib": rss,
    }


def test_dataplane_result_sets_every_swarm_figure_against_the_better_floor() -> None:
    floor = [_floor_run(1000.0, 0.6, "before"), _floor_run(1200.0, 0.5, "after")]
    raw = [{**_floor_run(3000.0, 0.3, "before"), "direct_io": False}]
    swarm = [
        _swarm_run(4 * MIB, 960.0, 0.6, 120.0),
        _swarm_run(256 * MIB, 600.0, 1.0, 300.0),
        _swarm_run(256 * MIB, 500.0, 1.2, 310.0),  # a second round: medians
    ]
    disk_source = [_floor_run(800.0, 0.6, "before")]
    out = build_result(
        size=GIB,
        date=DAY,
        floor_runs=floor,
        swarm_runs=swarm,
        raw_socket_runs=raw,
        disk_source_runs=disk_source,
    )
    assert out["floor"]["mbps"] == 1200.0 and out["floor"]["cpu_s_per_gib_received"] == 0.5
    small, large = out["swarm"]
    assert (small["piece_size"], large["piece_size"]) == (4 * MIB, 256 * MIB)
    assert large["mbps"] == 550.0 and len(large["runs"]) == 2
    assert small["ratios"]["throughput"] == 0.8  # 960 / 1200
    assert small["ratios"]["cpu"] == 1.2  # 0.6 / 0.5
    assert small["ratios"]["cpu_after_startup"] == pytest.approx(0.15 / 0.45, abs=1e-3)
    assert small["ratios"]["cpu_served"] == 1.5  # 0.75 / 0.5
    assert small["ratios"]["throughput_vs_disk_source_floor"] == 1.2  # 960 / 800
    assert out["large_over_small_piece_speed"][0]["value"] == pytest.approx(550 / 960, abs=1e-3)
    met = {(t["config"], t["what"]): t["met"] for t in out["targets"]}
    assert met[("4.0 MiB", "throughput ÷ floor")] is True
    assert met[("4.0 MiB", "CPU-s per GiB received ÷ floor")] is True
    assert met[("256.0 MiB", "CPU-s per GiB received ÷ floor")] is False  # 1.1 / 0.5
    assert met[("256.0 MiB", "peak RSS MiB")] is False
    assert met[("256.0 MiB ÷ 4.0 MiB", "large ÷ small piece speed")] is False
    assert out["targets_met"] is False
    # the keys benchmarks.run_all renders: the slowest piece size against the raw socket
    assert (out["swarm_mbps"], out["piece_size"]) == (550.0, 256 * MIB)
    assert out["raw_socket_mbps"] == 3000.0 and out["ratio"] == pytest.approx(550 / 3000, abs=1e-3)
    table = render_table([], out)
    assert "at 1200 MB/s and 0.50 CPU-s per GiB received" in table
    rows = [r for r in table.splitlines() if r.startswith("| 4.0 MiB") or r.startswith("| 256")]
    assert rows[0] == "| 4.0 MiB | 1 | 960 | 0.80 | 0.60 | 1.20 | – | 0.75 | 120 MiB |"
    assert rows[1].startswith("| 256.0 MiB | 1 | 550 | 0.46 | 1.10 | 2.20 |")
    json.dumps(out)


def test_dataplane_result_needs_a_swarm_run_and_a_floor() -> None:
    with pytest.raises(ValueError):
        build_result(size=GIB, date=DAY, floor_runs=[_floor_run(1.0, 1.0, "x")], swarm_runs=[])
    with pytest.raises(ValueError):
        build_result(size=GIB, date=DAY, floor_runs=[], swarm_runs=[_swarm_run(MIB, 1.0, 1, 1)])


# --- README table ------------------------------------------------------------------------


def test_table_has_one_row_per_system_with_ratios() -> None:
    table = render_table([_scenario_json()], None)
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| ---")]
    assert len(rows) == 3  # header, swarm, direct
    swarm_row = next(r for r in rows if "| swarm |" in r)
    assert "origin-bound" in swarm_row
    assert "21.5 s" in swarm_row  # T_min
    assert "| 25.0 s |" in swarm_row
    assert "| 1.16 |" in swarm_row  # 25 / 21.475
    assert swarm_row.endswith("| 1.00 |")
    direct_row = next(r for r in rows if "| direct |" in r)
    assert direct_row.endswith("| 8.00 |")
    # swarm is listed before direct, whatever the dict order
    assert table.index("| swarm |") < table.index("| direct |")


def test_table_shows_unequal_links_and_each_nodes_own_bound() -> None:
    sc = SCENARIOS["mixed-links"]
    swarm = summarize_system(
        [12.0] * 6 + [44.0, 45.0],
        origin_bytes=sc.model_bytes,
        model_bytes=sc.model_bytes,
        bound_seconds=sc.lower_bound_seconds,
        node_bounds=sc.node_bounds_seconds,
    )
    table = render_table([scenario_result(sc, {"swarm": swarm}, date=DAY)], None)
    row = next(r for r in table.splitlines() if "| swarm |" in r)
    assert "400 Mbit/s (2 at 100 Mbit/s) / 1 Gbit/s" in row
    own = 12.0 / sc.node_bounds_seconds[0]
    assert f"(each node ÷ own bound: max {own:.2f})" in row


def test_table_shows_a_failed_system_and_the_data_plane() -> None:
    result = _scenario_json()
    systems = result["systems"]
    assert isinstance(systems, dict)
    systems["libtorrent"] = {"error": "node 3 exited with 1"}
    plane = dataplane_result(size=GIB, swarm_mbps=1200.0, raw_socket_mbps=3000.0, date=DAY)
    table = render_table([result], plane)
    assert "| libtorrent | failed: node 3 exited with 1 |" in table
    assert "1200 MB/s" in table and "3000 MB/s" in table and "ratio 0.40" in table


def test_replace_marked_rewrites_only_between_the_markers() -> None:
    text = f"# swarm\n\nintro\n{START_MARKER}\nold table\n{END_MARKER}\nafter\n"
    new = replace_marked(text, "| new |\n")
    assert new == f"# swarm\n\nintro\n{START_MARKER}\n| new |\n{END_MARKER}\nafter\n"
    assert replace_marked(new, "| new |\n") == new  # idempotent


@pytest.mark.parametrize(
    "text", ["no markers", f"only {START_MARKER}", f"{END_MARKER} before {START_MARKER}"]
)
def test_replace_marked_refuses_without_both_markers(text: str) -> None:
    assert replace_marked(text, "| t |") is None


def test_update_readme_leaves_a_readme_without_markers_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# swarm\n")
    assert update_readme(readme, "| t |\n") is False
    assert readme.read_text() == "# swarm\n"
    assert update_readme(tmp_path / "missing.md", "| t |\n") is False
    readme.write_text(f"a\n{START_MARKER}\n{END_MARKER}\n")
    assert update_readme(readme, "| t |\n") is True
    assert readme.read_text() == f"a\n{START_MARKER}\n| t |\n{END_MARKER}\n"


def test_latest_results_picks_the_newest_file_of_each_scenario(tmp_path: Path) -> None:
    old = _scenario_json()
    new = dict(old, date="2025-02-01", nodes=4)
    write_result(tmp_path / "origin-bound-2025-01-02.json", old)
    write_result(tmp_path / "origin-bound-2025-02-01.json", new)
    fabric = scenario_result(SCENARIOS["fabric-bound"], {}, date=DAY)
    write_result(tmp_path / "fabric-bound-2025-01-02.json", fabric)
    plane = dataplane_result(size=GIB, swarm_mbps=1.0, raw_socket_mbps=2.0, date=DAY)
    write_result(tmp_path / "dataplane-2025-01-02.json", plane)
    (tmp_path / "notes.json").write_text("{}")  # not a dated result: ignored
    dev = dict(old, date="2025-03-01", reduced=True)
    write_result(tmp_path / "origin-bound-2025-03-01.json", dev)  # a development run: ignored
    scenarios, got_plane = latest_results(tmp_path)
    assert [s["scenario"] for s in scenarios] == ["origin-bound", "fabric-bound"]
    assert scenarios[0]["nodes"] == 4
    assert got_plane is not None and got_plane["ratio"] == 0.5
    assert latest_results(tmp_path / "none") == ([], None)


def test_scenario_overrides_keep_the_bound_consistent() -> None:
    small = Scenario("dev", 4, 10**9, 2 * 10**8, 64 * MIB, 4 * MIB)
    assert small.lower_bound_seconds == pytest.approx(64 * MIB * 8 / 2e8)


def test_sim_speed_renders_old_and_before_after_results() -> None:
    common = {
        "date": "2026-12-03",
        "scenario": "fireworks-kimi",
        "variant": "n1000-o25",
        "strategy": "swarm",
        "nodes": 1000,
        "model_bytes": 1 << 40,
        "piece_bytes": 256 << 20,
        "target_wall_seconds": 60,
    }
    timing = {"wall_seconds": 30.0, "events": 4_000_000}
    old = {**common, "compiled": timing, "compiled_walls": [29.0, 30.0, 31.0]}
    assert "compiled (`--native`) 30 s (median of 3: 29, 30, 31 s)" in render_other(
        None, None, sim_speed=old
    )
    new = {
        **common,
        "before_revision": "main",
        "after": {"compiled": {**timing, "wall_seconds": 60.0}, "compiled_walls": [60.0]},
        "before": {"compiled": timing, "compiled_walls": [30.0]},
        "after_over_before": {"compiled": 2.0, "interpreted": None},
    }
    text = render_other(None, None, sim_speed=new)
    assert "compiled (`--native`) 60 s; main in the same run: compiled 30 s" in text
    assert "(after ÷ before 2.00)" in text
