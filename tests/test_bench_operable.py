"""Fast tests of the rate-cap and zones harness: windows, ratios, zone layout.

No namespaces are built here; the shaped runs are `make bench`, not tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.errors import BenchmarkError
from benchmarks.rate_cap import QUIET_BYTES, busy_window, cap_entry
from benchmarks.shaped import ZONES_SCENARIO, zone_of
from benchmarks.startup import COMMANDS, burst
from benchmarks.testbed import Shape

MB = 1_000_000


def _samples(rates: list[int], step: float = 0.2) -> list[tuple[float, int]]:
    """A cumulative counter sampled every ``step`` s that moved ``rates[i]`` bytes in step i."""
    out, total = [(0.0, 0)], 0
    for i, n in enumerate(rates, start=1):
        total += n
        out.append((round(i * step, 3), total))
    return out


def test_busy_window_spans_only_the_samples_that_carried_data() -> None:
    # 1 s idle, 10 steps of 4 MB (20 MB/s at 0.2 s), 1 s of control chatter.
    samples = _samples([1000] * 5 + [4 * MB] * 10 + [1000] * 5)
    w = busy_window(samples)
    assert w.seconds == pytest.approx(2.0)
    assert w.wire_bytes == 40 * MB
    assert w.steady_seconds == pytest.approx(1.6)
    assert w.steady_wire_bytes == 32 * MB


def test_busy_window_keeps_the_initial_burst_out_of_the_steady_part() -> None:
    samples = _samples([12 * MB] + [4 * MB] * 19)
    w = busy_window(samples)
    assert w.wire_bytes / w.seconds > 21 * MB  # the burst inflates the whole interval
    assert w.steady_wire_bytes / w.steady_seconds == pytest.approx(20 * MB)


def test_busy_window_refuses_a_counter_that_never_moved() -> None:
    with pytest.raises(BenchmarkError, match="never moved"):
        busy_window(_samples([QUIET_BYTES] * 10))


def test_cap_entry_reports_wire_and_payload_ratios_over_the_same_interval() -> None:
    w = busy_window(_samples([4 * MB] * 10))
    entry = cap_entry(w, payload_bytes=38 * MB, cap=20 * MB, extra={"flag": "--x"})
    assert entry["wire_ratio"] == pytest.approx(1.0)
    assert entry["payload_ratio"] == pytest.approx(0.95)
    assert entry["steady_payload_ratio_est"] == pytest.approx(0.95)
    assert entry["flag"] == "--x"


def test_zones_scenario_is_two_zones_of_four() -> None:
    zones = [zone_of(i, ZONES_SCENARIO.nodes) for i in range(1, ZONES_SCENARIO.nodes + 1)]
    assert zones == ["a"] * 4 + ["b"] * 4
    assert ZONES_SCENARIO.node_bps == 400_000_000
    assert ZONES_SCENARIO.origin_bps == 1_000_000_000


def test_shape_refuses_zones_that_do_not_name_every_node() -> None:
    with pytest.raises(ValueError, match="zones"):
        Shape(nodes=3, node_up_bps=1, node_down_bps=1, origin_up_bps=1, zones=("a", "b"))
    assert Shape(nodes=2, node_up_bps=1, node_down_bps=1, origin_up_bps=1, zones=("a", "b"))


def test_shape_caps_cross_zone_receive_only_with_zones_and_below_the_link() -> None:
    ok = Shape(
        nodes=2,
        node_up_bps=8,
        node_down_bps=8,
        origin_up_bps=1,
        zones=("a", "b"),
        cross_zone_down_bps=2,
    )
    assert ok.cross_zone_down_bps == 2
    for zones, cross in (((), 2), (("a", "b"), 9), (("a", "b"), 0)):
        with pytest.raises(ValueError, match="cross_zone_down_bps"):
            Shape(
                nodes=2,
                node_up_bps=8,
                node_down_bps=8,
                origin_up_bps=1,
                zones=zones,
                cross_zone_down_bps=cross,
            )


def test_a_startup_burst_runs_real_processes_and_checks_their_exit(tmp_path: Path) -> None:
    wall, cpu = burst(["-c", "import json"], 0, 2, tmp_path)
    assert wall > 0 and cpu > 0
    with pytest.raises(RuntimeError, match="exited"):
        burst(["-c", "raise SystemExit(3)"], 0, 2, tmp_path)
    # The swarm command is the fetch command's usage error: exit 2, every import made.
    args, expected = COMMANDS["swarm"]
    burst(args, expected, 1, tmp_path)
