"""The demo topology on loopback: N peers fetch a model through the swarm.

    python -m benchmarks.swarm_loopback [--peers 4 8 16] [--size 1GiB] [--piece-size 64MiB]

For each N it runs ``swarm demo`` (rclone S3 server, publish, tracker, N ``swarm
fetch`` processes) and records seconds, origin bytes ÷ model bytes and aggregate
MB/s. All N peers share this machine's 2 cores, so the aggregate rate measures the
data path's CPU cost more than any network. Raw results go to
``benchmarks/results/swarm-loopback-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from core.units import parse_size
from swarm.demo import run_demo
from swarm.demo_config import DemoConfig

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--piece-size", default="64MiB")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    size, piece = parse_size(args.size), parse_size(args.piece_size)
    runs: list[dict[str, Any]] = []
    for n in args.peers:
        started = time.monotonic()
        summary = asyncio.run(run_demo(DemoConfig(peers=n, size=size, piece_size=piece), console))
        summary["wall_with_setup_seconds"] = time.monotonic() - started
        runs.append(summary)
        console.print(
            f"N={n}: {summary['seconds']:.1f}s, origin/model {summary['origin_ratio']:.3f}, "
            f"aggregate {summary['aggregate_mb_per_s']:.0f} MB/s, verified={summary['verified']}"
        )
    out = {
        "benchmark": "swarm-loopback",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": __import__("os").cpu_count(), "python": sys.version.split()[0]},
        "model_bytes": size,
        "piece_size": piece,
        "runs": [
            {
                "peers": r["peers"],
                "seconds": r["seconds"],
                "origin_ratio": r["origin_ratio"],
                "aggregate_mb_per_s": r["aggregate_mb_per_s"],
                "verified": r["verified"],
                "per_peer": r["per_peer"],
            }
            for r in runs
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"swarm-loopback-{out['date']}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0 if all(r["verified"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
