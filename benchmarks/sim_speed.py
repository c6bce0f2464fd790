"""Simulator speed: the 1000-node x 1 TiB x 256 MiB burst, interpreted and compiled.

Runs one simulator scenario (default: ``fireworks-kimi`` variant ``n1000-o25``,
strategy ``swarm``: 1000 replicas, 4096 pieces, about 4.2 million events) twice
in the same session, each in its own ``swarm simulate --json`` process:

- interpreted (CPython running the sources);
- ``--native`` (the mypyc build of the same sources, :mod:`simulations.native`;
  built first if the sources changed, and the build is not timed).

It reports each run's wall time as the simulator measures it (``wall_seconds``:
the event loop, not interpreter start-up or the build), events per second, the
ratio interpreted ÷ compiled, and whether the runs gave the same result in
every field but the wall time. The compiled run is repeated (``--repeat``,
default 3) because this shared VM's speed drifts by half or more within
minutes: ``compiled`` is the median run, ``compiled_walls`` all of them. Results
go to ``benchmarks/results/sim-speed-<YYYY-MM-DD>.json``.

    .venv/bin/python -m benchmarks.sim_speed [--scenario fireworks-kimi]
        [--variant n1000-o25] [--strategy swarm] [--repeat 3] [--skip-interpreted]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace, *, native: bool) -> dict[str, Any]:
    """One ``swarm simulate --json`` process; its summary of the (single) strategy run."""
    exe = Path(sys.executable).parent / "swarm"
    cmd = [
        str(exe),
        "simulate",
        args.scenario,
        "--variant",
        args.variant,
        "--strategy",
        args.strategy,
        "--json",
    ]
    if native:
        cmd.append("--native")
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "SWARM_SIM_NATIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"swarm simulate failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    print(
        f"  engine {summary['engine']}: {summary['wall_seconds']:.1f} s wall, "
        f"{summary['events']} events",
        file=sys.stderr,
        flush=True,
    )
    return summary


def _wall(summary: dict[str, Any]) -> float:
    return float(summary["wall_seconds"])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' summaries agree in every field but the timing and engine."""
    ignore = {"wall_seconds", "engine", "results"}
    return {k: v for k, v in a.items() if k not in ignore} == {
        k: v for k, v in b.items() if k not in ignore
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="fireworks-kimi")
    parser.add_argument("--variant", default="n1000-o25")
    parser.add_argument("--strategy", default="swarm")
    parser.add_argument(
        "--skip-interpreted",
        action="store_true",
        help="time only the compiled run (the interpreted one takes about six minutes)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="compiled runs to time (the median is reported)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs = sorted((run(args, native=True) for _ in range(args.repeat)), key=_wall)
    compiled = runs[(len(runs) - 1) // 2]
    interpreted = None if args.skip_interpreted else run(args, native=False)

    def timing(summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "engine": summary["engine"],
            "wall_seconds": summary["wall_seconds"],
            "events": summary["events"],
            "events_per_second": summary["events"] / summary["wall_seconds"],
        }

    result: dict[str, Any] = {
        "benchmark": "sim-speed",
        "date": dt.date.today().isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "scenario": args.scenario,
        "variant": args.variant,
        "strategy": args.strategy,
        "nodes": compiled["nodes"],
        "model_bytes": compiled["model_bytes"],
        "piece_bytes": compiled["piece_bytes"],
        "target_wall_seconds": 60,
        "compiled": timing(compiled),
        "compiled_walls": [r["wall_seconds"] for r in runs],
        "compiled_runs_agree": all(_same(r, compiled) for r in runs),
        "interpreted": None if interpreted is None else timing(interpreted),
        "speedup": None
        if interpreted is None
        else interpreted["wall_seconds"] / compiled["wall_seconds"],
        "same_result": None if interpreted is None else _same(compiled, interpreted),
        "completion_ratio": compiled["completion_ratio"],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"sim-speed-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
