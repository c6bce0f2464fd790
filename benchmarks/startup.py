"""Start-up of a burst: N ``swarm`` processes starting at once, against the interpreter's own.

The shaped testbed starts eight ``swarm fetch`` processes at once on a 2-core host,
and every node's time counts from that launch, so what a process spends before its
peer engine starts is paid eight times over on two cores. This measures that cost
alone, without a network: each round starts ``--processes`` copies of one command at
once and waits for them all, for three commands in turn:

- ``swarm``: ``python -m cli fetch`` with no arguments: the console script's path
  (``cli.entry``) through every import a fetch makes and typer's parsing of the
  fetch command, ending in its one-line usage error (exit 2);
- ``stdlib``: ``python -c "import asyncio, json, logging, ssl"``: what any asyncio
  peer in Python loads, the floor for a fetch written in it;
- ``bare``: ``python -c pass``: the interpreter alone.

Reported per command, medians over ``--rounds``: the burst's wall time (launch to
the last exit) and the CPU-s per process (``RUSAGE_CHILDREN``); and ``swarm`` over
``stdlib`` for both. Bytecode is compiled first, as ``pip install`` leaves it, and
the processes run from an empty directory with the checkout on ``PYTHONPATH`` (run
from the checkout, ``python -c`` would import the working tree's modules, with or
without bytecode, whatever ``PYTHONPATH`` says).

    .venv/bin/python -m benchmarks.startup [--processes 8] [--rounds 8]

writes ``benchmarks/results/startup-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.shaped import REPO_ROOT, code_version, compile_packages, write_result

RESULTS = Path(__file__).resolve().parent / "results"

COMMANDS: dict[str, tuple[list[str], int]] = {
    "swarm": (["-m", "cli", "fetch"], 2),
    "stdlib": (["-c", "import asyncio, json, logging, ssl"], 0),
    "bare": (["-c", "pass"], 0),
}
"""Each command's interpreter arguments and the exit code it must end with."""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def burst(args: list[str], expected: int, processes: int, cwd: Path) -> tuple[float, float]:
    """Start ``processes`` copies of ``python *args`` at once: (wall s, CPU-s per process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cpu = _children_cpu()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    wall = time.perf_counter() - start
    if any(code != expected for code in codes):
        raise RuntimeError(f"python {' '.join(args)} exited {codes}, expected {expected}")
    return wall, (_children_cpu() - cpu) / processes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--processes", type=int, default=8, help="processes started at once")
    parser.add_argument("--rounds", type=int, default=8, help="bursts per command")
    parser.add_argument("--notes", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.processes < 1 or args.rounds < 1:
        parser.error("--processes and --rounds must be at least 1")
    compile_packages()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="swarm-startup-") as tmp:
        for _ in range(args.rounds):  # interleaved, so a slow minute hits every command
            for name, (command, expected) in COMMANDS.items():
                samples[name].append(burst(command, expected, args.processes, Path(tmp)))
    medians = {
        name: {
            "wall_s": round(statistics.median(w for w, _ in runs), 3),
            "cpu_s_per_process": round(statistics.median(c for _, c in runs), 4),
            "runs": [[round(w, 3), round(c, 4)] for w, c in runs],
        }
        for name, runs in samples.items()
    }
    result = {
        "benchmark": "startup",
        "date": dt.date.today().isoformat(),
        "code": code_version(),
        "processes": args.processes,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "notes": args.notes,
        "commands": {name: " ".join(["python", *cmd]) for name, (cmd, _) in COMMANDS.items()},
        "results": medians,
        "ratios": {
            "wall_swarm_over_stdlib": round(
                medians["swarm"]["wall_s"] / medians["stdlib"]["wall_s"], 2
            ),
            "cpu_swarm_over_stdlib": round(
                medians["swarm"]["cpu_s_per_process"] / medians["stdlib"]["cpu_s_per_process"], 2
            ),
        },
    }
    out = args.results_dir / f"startup-{result['date']}.json"
    write_result(out, result)
    summary = {name: {k: v for k, v in m.items() if k != "runs"} for name, m in medians.items()}
    print(json.dumps({"results": summary, "ratios": result["ratios"]}))
    print(out)
    return result


if __name__ == "__main__":
    main()
