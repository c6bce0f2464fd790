"""benchmarks.tracker_load and benchmarks.staged_rollout run end to end at a small size:
a real tracker process and real UDP announces, with and without a token, and a
result file with its targets; a staged rollout with and without node agents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.tracker_load import main


@pytest.mark.parametrize("token", [False, True])
def test_the_load_generator_measures_a_real_tracker(tmp_path: Path, token: bool) -> None:
    argv = ["--peers", "20,60", "--pieces", "64", "--announces", "300", "--window", "8"]
    result = main([*argv, *(["--token"] if token else []), "--results-dir", str(tmp_path)])
    assert [r["peers"] for r in result["runs"]] == [20, 60]
    for run in result["runs"]:
        assert run["joined"] == run["peers"]
        assert run["announces"] + run["lost"] == 300 and run["lost"] == 0
        assert run["announces_per_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"]
        assert run["tracker_cpu_us_per_announce"] > 0 and run["tracker_rss_mib"] > 0
    assert result["targets"]["peers"] == 60 and result["token"] is token
    written = json.loads(next(tmp_path.glob("tracker-load-*.json")).read_text())
    assert written["runs"] == result["runs"]


def test_the_staged_rollout_benchmark_runs_and_agents_spare_the_origin(tmp_path: Path) -> None:
    from benchmarks.staged_rollout import main as rollout

    result = rollout(
        [
            "--size",
            "8MiB",
            "--burst",
            "2",
            "--late",
            "1",
            "--gap",
            "0.5",
            "--linger",
            "5",
            "--results-dir",
            str(tmp_path),
        ]
    )
    runs = {r["mode"]: r for r in result["runs"]}
    assert [len(r["replicas"]) for r in runs.values()] == [3, 3]
    assert runs["agents"]["late_origin_over_model"] == 0.0  # served by the agents
    assert runs["agents"]["origin_over_model"] == 1.0
    assert runs["plain"]["late_origin_over_model"] == 1.0  # everyone had left
