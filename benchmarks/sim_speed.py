"""Simulator speed: one scenario run interpreted and compiled, this checkout beside an
earlier revision, in the same session.

Runs one simulator scenario (default: ``fireworks-kimi`` variant ``n1000-o25``,
strategy ``swarm``: 1000 replicas of a 1 TiB model) in its own
``python -m cli.main simulate --json`` process per run:

- interpreted (CPython running the sources);
- ``--native`` (the mypyc build of the same sources, :mod:`simulations.native`;
  built first if the sources changed, and the build is not timed).

With ``--before REV`` every run is made twice, once from this checkout and
once from a git worktree of ``REV`` (made in a temporary directory and removed
at the end), alternating which goes first, so that both see the same drift of
this shared VM (its speed swings by half within minutes). The report gives
each run's wall time as the simulator measures it (``wall_seconds``: the event
loop, not interpreter start-up or the build), events per second, the network
solver's re-levellings, the ratios interpreted ÷ compiled and after ÷ before,
and whether runs of one revision agree in every field but the timing. The
compiled runs are repeated (``--repeat``, default 3; the median is reported).
``--model-size`` and ``--nodes`` time a slice of the scenario.
Results go to ``benchmarks/results/sim-speed-<YYYY-MM-DD>.json``.

    .venv/bin/python -m benchmarks.sim_speed [--scenario fireworks-kimi]
        [--variant n1000-o25] [--strategy swarm] [--repeat 3] [--skip-interpreted]
        [--model-size 16GiB] [--nodes 1000] [--before REV]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace, root: Path, *, native: bool) -> dict[str, Any]:
    """One simulate process run from ``root``; its summary of the (single) strategy run."""
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "simulate",
        args.scenario,
        "--variant",
        args.variant,
        "--strategy",
        args.strategy,
        "--json",
    ]
    for flag, value in (("--model-size", args.model_size), ("--nodes", args.nodes)):
        if value is not None:
            cmd += [flag, str(value)]
    if native:
        cmd.append("--native")
    print(f"$ (in {root}) " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    # Run from ``root`` with it first on the path: its packages, not the installed ones.
    env = {k: v for k, v in os.environ.items() if k not in ("SWARM_SIM_NATIVE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    if done.returncode != 0:
        raise SystemExit(f"simulate failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    print(
        f"  engine {summary['engine']}: {summary['wall_seconds']:.1f} s wall, "
        f"{summary['events']} events",
        file=sys.stderr,
        flush=True,
    )
    return summary


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' summaries agree in every field but the timing and engine."""
    ignore = {"wall_seconds", "engine", "results"}
    return {k: v for k, v in a.items() if k not in ignore} == {
        k: v for k, v in b.items() if k not in ignore
    }


def _timing(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "engine": summary["engine"],
        "wall_seconds": summary["wall_seconds"],
        "events": summary["events"],
        "events_per_second": summary["events"] / summary["wall_seconds"],
        "network_relevels": summary.get("network_relevels"),
        "completion_ratio": summary["completion_ratio"],
    }


def _report(runs: list[dict[str, Any]], interpreted: dict[str, Any] | None) -> dict[str, Any]:
    walls = [r["wall_seconds"] for r in runs]
    median = statistics.median(walls)
    compiled = min(runs, key=lambda r: abs(r["wall_seconds"] - median))
    return {
        "compiled": _timing(compiled),
        "compiled_walls": walls,
        "compiled_median_seconds": median,
        "compiled_runs_agree": all(_same(r, compiled) for r in runs),
        "interpreted": None if interpreted is None else _timing(interpreted),
        "speedup": None if interpreted is None else interpreted["wall_seconds"] / median,
        "same_result": None if interpreted is None else _same(compiled, interpreted),
    }


def _worktree(rev: str, into: Path) -> Path:
    path = into / "before"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="fireworks-kimi")
    parser.add_argument("--variant", default="n1000-o25")
    parser.add_argument("--strategy", default="swarm")
    parser.add_argument(
        "--skip-interpreted",
        action="store_true",
        help="time only the compiled runs (the interpreted ones take ten times as long)",
    )
    parser.add_argument("--model-size", help="time a slice: this artifact size (e.g. 16GiB)")
    parser.add_argument("--nodes", type=int, help="time a slice: this many nodes")
    parser.add_argument(
        "--repeat", type=int, default=3, help="compiled runs to time (the median is reported)"
    )
    parser.add_argument(
        "--before", metavar="REV", help="also time git revision REV, run for run beside this one"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    with tempfile.TemporaryDirectory(prefix="sim-speed-") as tmp:
        roots = {"after": ROOT}
        if args.before:
            roots["before"] = _worktree(args.before, Path(tmp))
        try:
            compiled: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
            names = list(roots)
            for i in range(args.repeat):
                for name in names if i % 2 == 0 else names[::-1]:
                    compiled[name].append(run(args, roots[name], native=True))
            interpreted: dict[str, dict[str, Any] | None] = {name: None for name in roots}
            if not args.skip_interpreted:
                for name in names:
                    interpreted[name] = run(args, roots[name], native=False)
        finally:
            if args.before:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", roots["before"]],
                    check=False,
                    capture_output=True,
                )
    first = compiled["after"][0]
    result: dict[str, Any] = {
        "benchmark": "sim-speed",
        "date": dt.date.today().isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "scenario": args.scenario,
        "variant": args.variant,
        "strategy": args.strategy,
        "nodes": first["nodes"],
        "model_bytes": first["model_bytes"],
        "piece_bytes": first["piece_bytes"],
        "model_size_override": args.model_size,
        "before_revision": args.before,
        "target_wall_seconds": 60,
        **{name: _report(compiled[name], interpreted[name]) for name in roots},
    }
    if args.before:
        after, before = result["after"], result["before"]
        result["after_over_before"] = {
            "compiled": after["compiled_median_seconds"] / before["compiled_median_seconds"],
            "interpreted": None
            if args.skip_interpreted
            else after["interpreted"]["wall_seconds"] / before["interpreted"]["wall_seconds"],
        }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"sim-speed-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
