"""Origin bytes of a staged rollout, with and without node agents.

A rollout rarely starts every replica at once: a burst, then replicas joining one
by one (an autoscale, a restart, a node replaced). Without agents every finished
``swarm fetch`` leaves once no peer of the swarm still needs it (at most
``--linger``), so a replica that starts after that reads the artifact from the
origin again. With agents the nodes keep what they hold in the swarm.

The run, on loopback with real processes: a tracker, a ``file://`` origin of
``--size`` bytes, ``--burst`` replicas started together, then ``--late`` replicas
started one at a time, ``--gap`` seconds apart, each after the previous finished.

- ``plain``: every replica is ``swarm fetch --tracker ... --linger L`` (default 300,
  as a user would leave it) on a node of its own;
- ``agents``: every node runs ``swarm agent``, and every replica is ``swarm fetch
  --agent`` on its node (a late replica's node is a new agent, started when it is).

Reported for each: the origin bytes every replica read, their sum ÷ F, and seconds
per replica. The origin bytes come from each fetch's own JSON (for the agents, what
that request moved).

    .venv/bin/python -m benchmarks.staged_rollout [--size 64MiB] [--burst 3] [--late 3] [--gap 5]

writes ``benchmarks/results/staged-rollout-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.units import parse_size
from seeder.local_s3 import free_port

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300.0


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("SWARM_AGENT", None)
    return env


def _swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _fetch(argv: list[str], log: Path) -> dict[str, Any]:
    started = time.monotonic()
    with open(log, "wb") as err:
        done = subprocess.run(
            argv, env=_env(), stdout=subprocess.PIPE, stderr=err, timeout=TIMEOUT, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:])} failed: {log.read_text()[-1500:]}")
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return {
        "origin_bytes": out["origin_bytes"],
        "peer_bytes": out["peer_bytes"],
        "seconds": round(time.monotonic() - started, 3),
    }


def _run(
    mode: str, work: Path, catalog: str, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    tracker = f"http://127.0.0.1:{port}"
    logs = work / f"logs-{mode}"
    logs.mkdir()
    with contextlib.ExitStack() as files, _processes() as procs:

        def log(name: str) -> Any:
            return files.enter_context(open(logs / name, "wb"))

        procs.append(
            subprocess.Popen(
                _swarm(
                    "tracker",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--catalog",
                    catalog,
                    "--announce-interval",
                    "1",
                    "--peer-ttl",
                    "5",
                ),
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=log("tracker.err"),
            )
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{tracker}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the tracker did not start") from None
                time.sleep(0.1)

        def replica(i: int) -> list[str]:
            dest = work / f"{mode}-replica{i}"
            if mode == "plain":
                return _swarm(
                    "fetch",
                    "m",
                    "--tracker",
                    tracker,
                    "--dest",
                    str(dest),
                    "--listen",
                    "127.0.0.1:0",
                    "--no-fsync",
                    "--json",
                    "--linger",
                    str(args.linger),
                )
            sock = work / f"agent{i}.sock"
            procs.append(
                subprocess.Popen(
                    _swarm(
                        "agent",
                        "--cache",
                        str(work / f"cache{i}"),
                        "--tracker",
                        tracker,
                        "--socket",
                        str(sock),
                        "--listen",
                        "127.0.0.1",
                        "--no-fsync",
                    ),
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=log(f"agent{i}.err"),
                )
            )
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent {i} did not start")
                time.sleep(0.05)
            return _swarm("fetch", "m", "--dest", str(dest), "--agent", str(sock), "--json")

        burst_argv = [replica(i) for i in range(args.burst)]
        started = time.monotonic()
        running = [
            (
                subprocess.Popen(
                    a,
                    env=_env(),
                    stdout=subprocess.PIPE,
                    stderr=log(f"replica{i}.err"),
                ),
                i,
            )
            for i, a in enumerate(burst_argv)
        ]
        replicas = []
        for proc, i in running:
            out, _ = proc.communicate(timeout=TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"burst replica {i}: {(logs / f'replica{i}.err').read_text()[-1500:]}"
                )
            got = json.loads(out.decode().strip().splitlines()[-1])
            replicas.append(
                {
                    "replica": i,
                    "stage": "burst",
                    "origin_bytes": got["origin_bytes"],
                    "peer_bytes": got["peer_bytes"],
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
        for j in range(args.late):
            time.sleep(args.gap)
            i = args.burst + j
            got = _fetch(replica(i), logs / f"replica{i}.err")
            replicas.append({"replica": i, "stage": "late", **got})
    origin = sum(r["origin_bytes"] for r in replicas)
    return {
        "mode": mode,
        "replicas": replicas,
        "origin_bytes": origin,
        "origin_over_model": round(origin / size, 3),
        "late_origin_over_model": round(
            sum(r["origin_bytes"] for r in replicas if r["stage"] == "late") / size, 3
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.staged_rollout")
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--burst", type=int, default=3)
    parser.add_argument("--late", type=int, default=3)
    parser.add_argument("--gap", type=float, default=5.0, help="seconds between late replicas")
    parser.add_argument("--linger", type=float, default=300.0, help="plain fetches' --linger")
    parser.add_argument("--notes", default="")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="staged-rollout-") as tmp:
        work = Path(tmp)
        origin = work / "origin"
        origin.mkdir()
        (origin / "model.bin").write_bytes(random.Random(1).randbytes(size))
        catalog = (work / "catalog").as_uri()
        subprocess.run(
            _swarm(
                "publish",
                origin.as_uri(),
                "--name",
                "m",
                "--catalog",
                catalog,
                "--piece-size",
                "8MiB",
                "--json",
            ),
            env=_env(),
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        runs = [_run(mode, work, catalog, size, args) for mode in ("plain", "agents")]
    result = {
        "benchmark": "staged-rollout",
        "date": dt.date.today().isoformat(),
        "model_bytes": size,
        "burst": args.burst,
        "late": args.late,
        "gap_seconds": args.gap,
        "plain_linger": args.linger,
        "notes": args.notes,
        "runs": runs,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"staged-rollout-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for run in runs:
        print(
            f"{run['mode']}: origin {run['origin_over_model']} x F "
            f"(late replicas {run['late_origin_over_model']} x F)",
            file=sys.stderr,
        )
    print(out)
    return result


if __name__ == "__main__":
    main()
