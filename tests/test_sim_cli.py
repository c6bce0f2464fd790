"""``swarm simulate`` registered on a local typer app."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from simulations.cli import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Test app."""

    return app


SMALL = [
    "simulate",
    "dragonfly-1200",
    "--nodes",
    "20",
    "--model-size",
    "40MB",
    "--piece-size",
    "4MiB",
    "--nic-gbps",
    "1",
    "--origin-gbps",
    "2",
    "--seed",
    "3",
]


def test_json_is_one_object_with_the_required_fields(tmp_path: Path) -> None:
    plot = tmp_path / "out.png"
    result = CliRunner().invoke(
        _app(), [*SMALL, "--strategy", "swarm,direct", "--json", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    for key in (
        "strategy",
        "nodes",
        "model_bytes",
        "lower_bound_seconds",
        "completion_seconds",
        "origin_bytes",
        "wall_seconds",
    ):
        assert key in obj
    assert obj["strategy"] == "swarm"
    assert obj["nodes"] == 20
    assert obj["model_bytes"] == 40_000_000
    assert set(obj["completion_seconds"]) >= {"p50", "p99", "max"}
    assert obj["completion_seconds"]["max"] >= obj["lower_bound_seconds"]
    assert obj["origin_bytes"] == 40_000_000
    assert [r["strategy"] for r in obj["results"]] == ["swarm", "direct"]
    assert obj["results"][1]["origin_bytes"] == 20 * 40_000_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_goes_to_stderr_not_stdout() -> None:
    result = CliRunner().invoke(_app(), [*SMALL, "--strategy", "cache"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "cache" in result.stderr


def test_bad_input_is_a_clear_error() -> None:
    runner = CliRunner()
    bad_strategy = runner.invoke(_app(), [*SMALL, "--strategy", "bittorrent"])
    assert bad_strategy.exit_code == 2
    assert "unknown strategy 'bittorrent'" in bad_strategy.stderr
    bad_size = runner.invoke(_app(), ["simulate", "dragonfly-1200", "--model-size", "lots"])
    assert bad_size.exit_code == 2
    assert "not a size" in bad_size.stderr


def test_per_node_times_from_a_scenario_file_with_measured_rates(tmp_path: Path) -> None:
    scenario = tmp_path / "measured.toml"
    scenario.write_text(
        """
model_size = "16MiB"
piece_size = "1MiB"
nodes = 3
nic_gbps = 10
origin_gbps = 10

[[node_group]]
count = 1
down_gbps = 0.5

[[node_group]]
count = 1
up_gbps = 2
down_gbps = 2
"""
    )
    result = CliRunner().invoke(
        _app(), ["simulate", str(scenario), "--strategy", "swarm", "--json", "--per-node"]
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    completion = obj["node_completion_seconds"]
    assert len(completion) == 3 == len(obj["node_finish_seconds"])
    assert max(completion) == obj["completion_seconds"]["max"]
    # The 0.5 Gbit/s node is the slowest and can't beat F / d.
    assert completion[0] == max(completion)
    assert completion[0] >= 16 * 1024**2 / (0.5e9 / 8) * (1 - 1e-9)
