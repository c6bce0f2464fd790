"""A lone peer through the tracker beside ``swarm fetch --direct``, from a ``file://`` origin.

    python -m benchmarks.origin_path [--size 1GiB] [--piece-size 4MiB 256MiB] [--repeat 3]

Writes ``--size`` random bytes into a temporary folder, publishes it once per
piece size to a ``file://`` catalog, starts a real ``swarm tracker`` on loopback
(default flags) and waits out its restart grace (1.5 announce intervals, during
which a new tracker assigns nothing: a long-running tracker is past it). Then,
``--repeat`` times and alternating which goes first, one ``swarm fetch --direct``
and one lone ``swarm fetch --tracker`` (``--linger 0``) into fresh folders. For
each it records the fetch's own ``seconds`` (process start-up excluded: that is
``startup_seconds``) and the process's wall time and CPU (rusage), and reports
the median MB/s (10^6 bytes/s) of each and the ratio tracker ÷ direct of the
medians. Results go to ``benchmarks/results/origin-path-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from core.units import format_size, parse_size
from tracker.config import TrackerConfig

RESULTS = Path(__file__).resolve().parent / "results"
SWARM = str(Path(sys.executable).parent / "swarm")
TIMEOUT = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _timed(args: list[str]) -> dict[str, Any]:
    """Run ``swarm ARGS --json``; its JSON result with wall and CPU seconds added."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [SWARM, *args, "--json"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(
            f"swarm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    if not result.get("verified"):
        raise SystemExit(f"swarm {' '.join(args)} did not verify: {result}")
    result["wall_seconds"] = wall
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def _wait_ready(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"tracker at {url} not ready") from None
            time.sleep(0.1)


def _summary(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "runs": [
            {
                k: r[k]
                for k in (
                    "seconds",
                    "startup_seconds",
                    "wall_seconds",
                    "cpu_seconds",
                    "origin_bytes",
                    "origin_pieces",
                )
                if k in r
            }
            for r in runs
        ],
        "median_seconds": seconds,
        "mb_per_s": size / seconds / 1e6,
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--piece-size", nargs="+", default=["4MiB", "256MiB"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    size = parse_size(args.size)
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="origin-path-") as tmp:
        root = Path(tmp)
        (root / "origin").mkdir()
        with (root / "origin" / "model.bin").open("wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 64 << 20))
                f.write(chunk)
                left -= len(chunk)
        catalog = (root / "catalog").as_uri()
        names = []
        for piece in args.piece_size:
            name = f"model-{piece.lower()}"
            subprocess.run(
                [
                    SWARM,
                    "publish",
                    (root / "origin").as_uri(),
                    "--name",
                    name,
                    *("--catalog", catalog),
                    *("--piece-size", piece),
                ],
                check=True,
                capture_output=True,
                timeout=TIMEOUT,
            )
            names.append((piece, name))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        tracker = subprocess.Popen(
            [SWARM, "tracker", "--listen", f"127.0.0.1:{port}", "--catalog", catalog],
            stdout=subprocess.DEVNULL,
            stderr=(root / "tracker.log").open("wb"),
        )
        try:
            _wait_ready(url, time.monotonic() + 30)
            # Past the restart grace, as a long-running tracker is.
            time.sleep(1.5 * TrackerConfig().announce_interval + 0.5)
            for piece, name in names:
                direct: list[dict[str, Any]] = []
                lone: list[dict[str, Any]] = []
                for i in range(args.repeat):
                    order = ("direct", "tracker") if i % 2 == 0 else ("tracker", "direct")
                    for kind in order:
                        dest = root / f"dest-{kind}"
                        shutil.rmtree(dest, ignore_errors=True)
                        if kind == "direct":
                            direct.append(
                                _timed(
                                    [
                                        "fetch",
                                        name,
                                        "--dest",
                                        str(dest),
                                        "--direct",
                                        *("--catalog", catalog),
                                    ]
                                )
                            )
                        else:
                            lone.append(
                                _timed(
                                    [
                                        "fetch",
                                        name,
                                        "--dest",
                                        str(dest),
                                        "--tracker",
                                        url,
                                        *("--listen", "127.0.0.1:0", "--linger", "0"),
                                    ]
                                )
                            )
                        print(
                            f"{piece} {kind}: {(direct if kind == 'direct' else lone)[-1]['seconds']:.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                d, t = _summary(direct, size), _summary(lone, size)
                cases.append(
                    {
                        "piece_size": parse_size(piece),
                        "direct": d,
                        "tracker": t,
                        "tracker_over_direct_throughput": t["mb_per_s"] / d["mb_per_s"],
                    }
                )
                print(
                    f"{piece}: direct {d['mb_per_s']:.0f} MB/s, lone peer through the tracker "
                    f"{t['mb_per_s']:.0f} MB/s, ratio {t['mb_per_s'] / d['mb_per_s']:.2f}",
                    file=sys.stderr,
                )
        finally:
            tracker.terminate()
            tracker.wait(timeout=30)
    result = {
        "benchmark": "origin-path",
        "date": dt.date.today().isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "model_bytes": size,
        "model": format_size(size),
        "repeat": args.repeat,
        "cases": cases,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"origin-path-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
