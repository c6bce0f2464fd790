"""Scenarios on the shaped testbed: swarm, direct download and libtorrent, side by side.

Scenarios (rates are per link and direction; the bound is DESIGN.md's T_min)::

    origin-bound   8 nodes, node links 1 Gbit/s, origin 200 Mbit/s, 512 MiB, 4 MiB pieces
                   T_min = F/u_s = 21.5 s
    fabric-bound   8 nodes, node links 400 Mbit/s, origin 1 Gbit/s, 1 GiB, 4 MiB pieces
                   T_min = F/d = 21.5 s
    mixed-links    8 nodes, 6 with links of 400 Mbit/s and 2 of 100 Mbit/s, origin 1 Gbit/s,
                   512 MiB, 4 MiB pieces; T_min = F/d_slow = 42.9 s, and each node is also
                   held to its own bound max(F/u_s, F/d_i, N·F/(u_s + Σu)) (10.7 s for the
                   fast ones): ``own_bound_ratios`` in each system's result
    zones          8 nodes in two zones of 4, node links 400 Mbit/s, origin 1 Gbit/s,
                   512 MiB, 4 MiB pieces; swarm without and with --zone, counting the
                   bytes that cross between the zones (``python -m benchmarks.shaped zones``)

Links run jumbo frames (``JUMBO_MTU``): at 1500 bytes a full mesh of TCP flows moved
0.90 of the link rate (``benchmarks.link_floor``), which put every system 10 % or more
over T_min before it did anything.

Piece size: 4 MiB in all three, published in 1 MiB blocks (``--block-size``; the
default for 4 MiB pieces is one 4 MiB block): each block is checked as it lands
and relayed cut-through before its piece is whole. Measured 2026-12-06 (one run
each, noise about +-0.4 s): origin-bound 1.11 / 1.11 x T_min with 4 MiB / 1 MiB
blocks, fabric-bound 1.13 / 1.13-1.15; the transfer is not what the blocks change
here (see start-up below). The tracker keeps up to
two origin pulls per peer in flight, and they share the origin link fairly, so
pieces leave the origin in waves that finish together; the last wave must still
cross the fabric after the origin is done. That tail is proportional to the
piece size: the simulator, driving the same assignment and picker classes with
this testbed's rates (``swarm simulate`` with these parameters), puts the swarm
at 1.12 x T_min (origin-bound) and 1.18 x (fabric-bound) with 16 MiB pieces,
against 1.03 x and 1.10 x with 4 MiB pieces. Smaller pieces than that only add
per-piece messages. (With 1 TiB artifacts the waves are a few GiB of a TiB, and
the default 256 MiB pieces cost nothing.) libtorrent gets the same piece size (a
v1 torrent) so every system moves the same units; ``--lt-piece-size`` changes that.

The artifact is 4 files of random bytes (incompressible), served by a real
S3-compatible server (``rclone serve s3``) in the origin namespace. Systems:

- ``swarm``: a tracker in the bridge namespace and one ``swarm fetch --tracker``
  per node namespace; peers pull their assigned pieces from the S3 origin.
- ``direct``: ``swarm fetch --direct`` in every node namespace.
- ``libtorrent``: one seeding session in the origin namespace (so its upload is
  shaped like the origin), one leeching session per node namespace.

Each node's completion time is measured by this harness from the launch of the
system's processes (one common t0) to the moment the node's completion marker
appears (``.swarm-complete`` for swarm and direct, a done file for libtorrent),
so process start-up counts. The times each process reports itself are kept too
(``self_p50_seconds``, ``self_max_seconds``). Eight ``swarm fetch`` processes starting
at once on this 2-core host reach their peer engines after 0.4-0.6 s (about 0.15
CPU-s each, most of it imports), against about 0.5 s for libtorrent's leechers to ask
for their first bytes. It was 0.9-1.5 s while a fetch also loaded Rich, yarl and the
simulator's command line and imported with the collector running (``cli.entry``,
``cli.term``), and 1.4-1.6 s while every fetch imported boto3 for its origin reads.
Origin bytes are the transmit counter of the origin namespace's ``eth0`` over the
whole run of the system
(frames as the kernel counts them, so TCP/IP and HTTP overhead is included);
the bytes the processes themselves report reading from the origin are kept as
``origin_bytes_reported``. ``--no-fsync`` is passed to swarm fetches (libtorrent
doesn't fsync either).

Each swarm result carries the simulator's prediction for the same run
(``simulated``, see :mod:`benchmarks.sim_truth`): the same nodes, link rates,
artifact, piece size and flags, with the start-up the peers measured added to
every simulated completion; and real ÷ simulated for p50 and max completion and
for origin bytes.

``python -m benchmarks.shaped origin-bound --size 64MiB --nodes 4`` runs a
reduced version for development; such runs write their JSON to the work
directory, not to ``benchmarks/results``, unless ``--results-dir`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

from benchmarks.errors import BenchmarkError
from benchmarks.testbed import BRIDGE_ADDR, ORIGIN_ADDR, Shape, Testbed, node_addr
from core.units import format_size, parse_size
from seeder.local_s3 import LocalS3Server

log = logging.getLogger("benchmarks.shaped")

MIB = 1024 * 1024
GIB = 1024 * MIB
MBIT = 1_000_000
GBIT = 1_000_000_000
JUMBO_MTU = 9000
"""The testbed's MTU. A cluster fabric runs jumbo frames (AWS VPCs default to 9001
bytes; RDMA/GPU fabrics to 4096 or more), and at 1500 a full mesh of TCP flows on
these shaped links moves 0.90 of the link rate (0.98 at 9000): measured all-to-all
between the 8 fabric-bound nodes (``benchmarks.link_floor``), a floor no system passes."""

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SYSTEMS = ("swarm", "libtorrent", "direct")
S3_PORT = 9000
TRACKER_PORT = 7070
TRACKER_GRACE_SECONDS = 1.5 * 2.0 + 0.2  # the tracker's default restart grace, and a margin
LT_PORT = 6881
BUCKET = "models"
CATALOG = "s3://catalog"
COMPLETE_MARKER = ".swarm-complete"
PRODUCT_DIRS = ("swarm", "tracker", "seeder", "cli")


INSTALLED_PACKAGES: tuple[str, ...] = ("core", "swarm", "tracker", "seeder", "cli", "simulations")
"""The packages ``pip install`` puts on a node (pyproject's ``packages.find``)."""


def compile_packages() -> None:
    """Write the bytecode of swarm's packages, as ``pip install`` does on a real node.

    Without it a fresh checkout's first burst has all eight fetches compile the same
    modules from source at once: start-up measured 2.0-2.3 s on this 2-core host
    instead of 1.1-1.3 s, a cost no installed node pays.
    """
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(str(REPO_ROOT / p) for p in INSTALLED_PACKAGES),
        ],
        check=True,
        cwd=REPO_ROOT,
    )


@dataclass(frozen=True)
class Scenario:
    """One benchmark scenario: a burst of ``nodes`` fetches of one artifact.

    With ``slow_nodes``, the last that many nodes have ``slow_bps`` links (up and
    down) instead of ``node_bps``: a fleet whose nodes differ.
    """

    name: str
    nodes: int
    node_bps: int
    origin_bps: int
    model_bytes: int
    piece_size: int
    files: int = 4
    mtu: int = JUMBO_MTU
    block_size: int = 0  # the manifest's (swarm publish --block-size); 0: publish's default
    slow_nodes: int = 0
    slow_bps: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.slow_nodes < self.nodes or (self.slow_nodes and self.slow_bps <= 0):
            raise ValueError("slow_nodes must be in [0, nodes) and slow_bps positive")

    @property
    def node_links_bps(self) -> list[int]:
        """Each node's link rate (up and down alike), in node order."""
        fast = self.nodes - self.slow_nodes
        return [self.node_bps] * fast + [self.slow_bps] * self.slow_nodes

    @property
    def shape(self) -> Shape:
        links = tuple((b, b) for b in self.node_links_bps) if self.slow_nodes else ()
        return Shape(
            nodes=self.nodes,
            node_up_bps=self.node_bps,
            node_down_bps=self.node_bps,
            origin_up_bps=self.origin_bps,
            mtu=self.mtu,
            node_links=links,
        )

    @property
    def node_bounds_seconds(self) -> list[float]:
        """Each node's own bound, max(F/u_s, F/d_i, N·F/(u_s + Σu)), in node order."""
        links = self.node_links_bps
        bits = 8 * self.model_bytes
        shared = max(bits / self.origin_bps, len(links) * bits / (self.origin_bps + sum(links)))
        return [max(shared, bits / d) for d in links]

    @property
    def lower_bound_seconds(self) -> float:
        """T_min: the slowest node's own bound (:func:`lower_bound_seconds` for equal links)."""
        return max(self.node_bounds_seconds)


SCENARIOS: dict[str, Scenario] = {
    "origin-bound": Scenario(
        "origin-bound", 8, 1 * GBIT, 200 * MBIT, 512 * MIB, 4 * MIB, block_size=1 * MIB
    ),
    "fabric-bound": Scenario(
        "fabric-bound", 8, 400 * MBIT, 1 * GBIT, 1 * GIB, 4 * MIB, block_size=1 * MIB
    ),
    "mixed-links": Scenario(
        "mixed-links",
        8,
        400 * MBIT,
        1 * GBIT,
        512 * MIB,
        4 * MIB,
        block_size=1 * MIB,
        slow_nodes=2,
        slow_bps=100 * MBIT,
    ),
}


def lower_bound_seconds(
    model_bytes: int, *, nodes: int, origin_up_bps: float, node_down_bps: float, node_up_bps: float
) -> float:
    """T_min = max(F/u_s, F/d, N·F/(u_s + N·u)) in seconds (Kumar & Ross, 2006); rates in bit/s."""
    if model_bytes < 0 or nodes < 1:
        raise ValueError("model_bytes must be >= 0 and nodes >= 1")
    if min(origin_up_bps, node_down_bps, node_up_bps) <= 0:
        raise ValueError("rates must be positive")
    bits = 8 * model_bytes
    return max(
        bits / origin_up_bps,
        bits / node_down_bps,
        nodes * bits / (origin_up_bps + nodes * node_up_bps),
    )


# --- results ---------------------------------------------------------------------------


def summarize_system(
    node_seconds: Sequence[float],
    *,
    origin_bytes: int,
    model_bytes: int,
    bound_seconds: float,
    node_bounds: Sequence[float] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One system's entry of a scenario result; times are per-node completion times.

    With ``node_bounds`` (each node's own bound, in node order) the entry also
    gives each node's completion over its own bound.
    """
    if not node_seconds:
        raise ValueError("no node completion times")
    p50 = float(statistics.median(node_seconds))
    worst = float(max(node_seconds))
    out: dict[str, Any] = {
        "p50_seconds": round(p50, 3),
        "max_seconds": round(worst, 3),
        "ratio_to_bound": round(worst / bound_seconds, 3),
        "origin_bytes": int(origin_bytes),
        "origin_ratio": round(origin_bytes / model_bytes, 4) if model_bytes else None,
        "node_seconds": [round(s, 3) for s in node_seconds],
    }
    if node_bounds:
        own = [s / b for s, b in zip(node_seconds, node_bounds, strict=True)]
        out["own_bound_ratios"] = [round(r, 3) for r in own]
        out["own_bound_ratio_p50"] = round(float(statistics.median(own)), 3)
        out["own_bound_ratio_max"] = round(max(own), 3)
    if extra:
        out.update(extra)
    return out


def scenario_result(
    scenario: Scenario,
    systems: dict[str, dict[str, Any]],
    *,
    date: dt.date,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object written to ``benchmarks/results/<scenario>-<date>.json``."""
    out: dict[str, Any] = {
        "scenario": scenario.name,
        "date": date.isoformat(),
        "nodes": scenario.nodes,
        "model_bytes": scenario.model_bytes,
        "files": scenario.files,
        "piece_size": scenario.piece_size,
        "node_link_bps": scenario.node_bps,
        "origin_link_bps": scenario.origin_bps,
        "mtu": scenario.mtu,
        **(
            {
                "node_links_bps": scenario.node_links_bps,
                "node_bounds_seconds": [round(b, 3) for b in scenario.node_bounds_seconds],
            }
            if scenario.slow_nodes
            else {}
        ),
        "lower_bound_seconds": round(scenario.lower_bound_seconds, 3),
        "systems": systems,
    }
    if meta:
        out.update(meta)
    return out


def result_path(results_dir: Path, scenario: str, date: dt.date) -> Path:
    return results_dir / f"{scenario}-{date.isoformat()}.json"


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def code_version() -> dict[str, Any]:
    """The commit this run's code is at, and the files of the product changed since it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", *PRODUCT_DIRS],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": head, "uncommitted": sorted(line[3:] for line in changed if line.strip())}


# --- the run ---------------------------------------------------------------------------


@dataclass
class RunOptions:
    """How to run a scenario; defaults are what ``make bench`` uses."""

    systems: tuple[str, ...] = SYSTEMS
    workdir: Path | None = None
    keep_workdir: bool = False
    fetch_args: tuple[str, ...] = ()
    tracker_args: tuple[str, ...] = ()
    lt_piece_size: int | None = None
    seed: int = 20240501
    idle_threshold: float = 0.25
    idle_wait: float = 300.0
    tag: str | None = None
    verbose: bool = False  # swarm processes log at INFO (timestamps of each phase)
    progress: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))


class _CpuMeter:
    """Host-wide CPU busy fraction between start and stop, from /proc/stat."""

    def __init__(self) -> None:
        self.busy0, self.total0 = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def busy_fraction(self) -> float:
        busy, total = self._read()
        return (busy - self.busy0) / max(1, total - self.total0)


class _OriginSampler:
    """Samples the origin interface's transmit counter while a system runs.

    It tells when the origin link started and stopped carrying the artifact
    (relative to the launch of the system's processes) and its rate in between,
    so a result shows how much of a completion time was start-up, how much the
    origin transfer, and how much the tail after the origin's last byte.
    """

    INTERVAL = 0.25
    QUIET = 256 * 1024  # less than this in one interval is control traffic, not data

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="origin-sampler", daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tx = self.tb.counters(self.tb.origin_ns).tx_bytes
            except BenchmarkError:
                return
            self.samples.append((time.monotonic() - self.t0, tx))
            self._stop.wait(self.INTERVAL)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=5)
        busy = [
            (t1, b1 - b0)
            for (_, b0), (t1, b1) in zip(self.samples, self.samples[1:], strict=False)
            if b1 - b0 > self.QUIET
        ]
        if not busy:
            return {}
        first = busy[0][0] - self.INTERVAL
        last = busy[-1][0]
        moved = sum(n for _, n in busy)
        return {
            "first_byte_seconds": round(max(first, 0.0), 2),
            "last_byte_seconds": round(last, 2),
            "mbit_per_s_while_busy": round(8 * moved / max(last - first, 1e-9) / 1e6, 1),
        }


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class ScenarioRunner:
    """Build the testbed for ``scenario``, run each system in turn, tear everything down."""

    def __init__(self, scenario: Scenario, options: RunOptions | None = None) -> None:
        self.scenario = scenario
        self.options = options or RunOptions()
        self.python = sys.executable
        self.env: dict[str, str] = {}
        self.work = Path()
        self.name = f"bench-{scenario.name}"
        self.block_size = 0  # the published manifest's, once published

    def say(self, msg: str) -> None:
        self.options.progress(f"[{self.scenario.name}] {msg}")

    def run(self) -> dict[str, Any]:
        unknown = set(self.options.systems) - set(SYSTEMS)
        if unknown:
            raise BenchmarkError(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
        base = self.options.workdir
        self.work = Path(tempfile.mkdtemp(prefix="swarm-bench-", dir=base))
        try:
            return self._run()
        finally:
            if not self.options.keep_workdir:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        sc = self.scenario
        s3 = LocalS3Server(self.work / "s3", host=ORIGIN_ADDR, port=S3_PORT)
        self.env = {**s3.env(), "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        compile_packages()
        artifact = self._make_artifact(s3.bucket(BUCKET) / self.name)
        s3.bucket("catalog")
        (self.work / "logs").mkdir()
        slow = (
            f" ({sc.slow_nodes} of them {sc.slow_bps / MBIT:.0f} Mbit/s)" if sc.slow_nodes else ""
        )
        self.say(
            f"{sc.nodes} nodes, node links {sc.node_bps / MBIT:.0f} Mbit/s{slow}, origin "
            f"{sc.origin_bps / MBIT:.0f} Mbit/s, {format_size(sc.model_bytes)} in "
            f"{format_size(sc.piece_size)} pieces; T_min {sc.lower_bound_seconds:.1f} s"
        )
        systems: dict[str, dict[str, Any]] = {}
        with Testbed(sc.shape, tag=self.options.tag) as tb:
            self._start_origin(tb)
            self._publish(tb)
            for system in self.options.systems:
                idle = self._wait_for_idle_host()
                self.say(f"running {system} (host CPU busy before: {idle:.0%})")
                try:
                    if system == "swarm":
                        entry = self._run_swarm(tb)
                    elif system == "direct":
                        entry = self._run_direct(tb)
                    else:
                        entry = self._run_libtorrent(tb, artifact)
                except BenchmarkError as exc:
                    # One system's failure is a result too; the others still run.
                    self.say(f"{system} failed: {exc}")
                    systems[system] = {"error": str(exc)}
                    continue
                entry["host_cpu_busy_before"] = round(idle, 3)
                entry["load_average_after"] = round(os.getloadavg()[0], 2)
                systems[system] = entry
                self.say(
                    f"{system}: p50 {entry['p50_seconds']:.1f} s, max {entry['max_seconds']:.1f} s "
                    f"({entry['ratio_to_bound']:.2f} x T_min), origin "
                    f"{entry['origin_ratio']:.3f} x F, host CPU busy {entry['host_cpu_busy']:.0%}"
                    + (
                        f"; each node over its own bound: p50 {entry['own_bound_ratio_p50']:.2f}, "
                        f"max {entry['own_bound_ratio_max']:.2f}"
                        if "own_bound_ratio_max" in entry
                        else ""
                    )
                )
        result = scenario_result(
            sc,
            systems,
            date=dt.date.today(),
            meta={
                "host_cpus": os.cpu_count(),
                "lt_piece_size": self.options.lt_piece_size or sc.piece_size,
                # The manifest's: the unit peers request, check and relay cut-through.
                "block_size": self.block_size,
                "fetch_args": list(self.options.fetch_args),
                "tracker_args": list(self.options.tracker_args),
                "timing": "wall clock from launch of the system's processes to each node's completion marker",
                "origin_bytes_source": "tx bytes of the origin namespace's eth0 (ip -s -j link show)",
            },
        )
        self._add_prediction(result)
        return result

    def _add_prediction(self, result: dict[str, Any]) -> None:
        """The simulator's prediction beside the swarm run (see :mod:`benchmarks.sim_truth`)."""
        entry = result["systems"].get("swarm")
        if entry is None or "error" in entry:
            return
        # Imported here and any failure caught: a run of minutes is kept whatever
        # the simulator does.
        try:
            from benchmarks.sim_truth import add_prediction, format_prediction

            simulated = add_prediction(result)
        except Exception as exc:
            self.say(f"swarm simulated: failed: {exc!r}")
            entry["simulated"] = {"error": repr(exc)}
            return
        if simulated is not None:
            self.say(f"swarm {format_prediction(simulated)}")

    def _wait_for_idle_host(self) -> float:
        """Wait (bounded) until other work on this machine leaves the CPUs mostly idle.

        The machine may be shared; a run that starts while something else keeps the
        cores busy measures that, not the system. Returns the last busy fraction.
        """
        deadline = time.monotonic() + self.options.idle_wait
        while True:
            meter = _CpuMeter()
            time.sleep(1.0)
            busy = meter.busy_fraction()
            if busy <= self.options.idle_threshold or time.monotonic() > deadline:
                if busy > self.options.idle_threshold:
                    self.say(
                        f"host still {busy:.0%} busy after {self.options.idle_wait:.0f} s; running anyway"
                    )
                return busy

    # --- setup ---------------------------------------------------------------------------

    def _make_artifact(self, root: Path) -> Path:
        sc = self.scenario
        root.mkdir(parents=True)
        rng = random.Random(self.options.seed)
        per_file = -(-sc.model_bytes // sc.files)
        left = sc.model_bytes
        for i in range(sc.files):
            size = min(per_file, left)
            left -= size
            with open(root / f"model-{i + 1:05d}-of-{sc.files:05d}.safetensors", "wb") as f:
                while size:
                    n = min(size, 64 * MIB)
                    f.write(rng.randbytes(n))
                    size -= n
        return root

    def _start_origin(self, tb: Testbed) -> None:
        proc = tb.popen(
            tb.origin_ns,
            [
                self.python,
                "-m",
                "benchmarks.origin_server",
                str(self.work / "s3"),
                "--host",
                ORIGIN_ADDR,
                "--port",
                str(S3_PORT),
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._log("origin.err"),
            cwd=REPO_ROOT,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        if not line.startswith("ready"):
            raise BenchmarkError(
                f"S3 origin in {tb.origin_ns} did not start (see {self.work / 'logs/origin.err'})"
            )

    def _publish(self, tb: Testbed) -> None:
        # In the origin namespace, so hashing reads the S3 server over its loopback
        # and nothing crosses the shaped link.
        out = tb.run(
            tb.origin_ns,
            [
                *self._swarm_cli(),
                "publish",
                f"s3://{BUCKET}/{self.name}",
                "--name",
                self.name,
                "--catalog",
                CATALOG,
                "--piece-size",
                str(self.scenario.piece_size),
                *(
                    ["--block-size", str(self.scenario.block_size)]
                    if self.scenario.block_size
                    else []
                ),
                "--json",
            ],
            env=self.env,
        )
        info = json.loads(out)
        self.block_size = int(info["block_size"])
        if info["model_bytes"] != self.scenario.model_bytes:
            raise BenchmarkError(
                f"published {info['model_bytes']} bytes, expected {self.scenario.model_bytes}"
            )
        self.say(f"published {info['ref']} ({info['pieces']} pieces)")

    def _swarm_cli(self) -> list[str]:
        return [self.python, "-m", "cli", *(["-v"] if self.options.verbose else [])]

    def _log(self, name: str) -> IO[bytes]:
        return open(self.work / "logs" / name, "wb")

    def _dest(self, system: str, node: int) -> Path:
        return self.work / "dest" / system / f"n{node}"

    def _timeout(self) -> float:
        sc = self.scenario
        direct = sc.nodes * 8 * sc.model_bytes / sc.origin_bps
        return 60 + 3 * max(direct, sc.lower_bound_seconds)

    # --- systems ---------------------------------------------------------------------------

    def _run_swarm(self, tb: Testbed) -> dict[str, Any]:
        before = tb.counters(tb.origin_ns)
        tracker = tb.popen(
            tb.bridge_ns,
            [
                *self._swarm_cli(),
                "tracker",
                "--listen",
                f"{BRIDGE_ADDR}:{TRACKER_PORT}",
                "--catalog",
                CATALOG,
                *self.options.tracker_args,
            ],
            env=self.env,
            stderr=self._log("swarm-tracker.err"),
            cwd=REPO_ROOT,
        )
        self._wait_listening(tb, tb.bridge_ns, TRACKER_PORT, tracker)
        # A cluster's tracker is a long-lived service, not part of a burst. A fresh
        # one holds back origin assignments for its restart grace (1.5 announce
        # intervals, so that after a restart peers re-announce what they hold
        # first); the burst starts once that has passed, as it would in a cluster.
        time.sleep(TRACKER_GRACE_SECONDS)
        launch = []
        for i in range(1, self.scenario.nodes + 1):
            dest = self._dest("swarm", i)
            argv = [*self._swarm_cli(), "fetch", self.name]
            argv += ["--tracker", f"http://{BRIDGE_ADDR}:{TRACKER_PORT}", "--dest", str(dest)]
            argv += ["--listen", f"{node_addr(i)}:0", "--advertise", node_addr(i)]
            argv += ["--linger", "60", "--json", "--no-fsync", *self.options.fetch_args]
            argv += self._node_args(i)
            launch.append((argv, dest / COMPLETE_MARKER))
        try:
            outcome = self._burst(tb, "swarm", launch)
        finally:
            tb.forget(tracker)
        after = tb.counters(tb.origin_ns)
        reports = outcome.reports
        return self._summary(
            outcome,
            after.tx_bytes - before.tx_bytes,
            {
                "origin_bytes_reported": sum(int(r["origin_bytes"]) for r in reports),
                "peer_bytes_reported": sum(int(r["peer_bytes"]) for r in reports),
                "uploaded_bytes_reported": sum(int(r.get("uploaded_bytes", 0)) for r in reports),
                "duplicate_bytes_reported": sum(int(r.get("duplicate_bytes", 0)) for r in reports),
                "cross_zone_bytes_reported": (
                    sum(int(r.get("cross_zone_bytes", 0)) for r in reports)
                    if any("cross_zone_bytes" in r for r in reports)
                    else None
                ),
                "verified": all(bool(r["verified"]) for r in reports),
            },
        )

    def _node_args(self, node: int) -> list[str]:
        """Extra `swarm fetch` arguments of node ``node`` alone (1-based)."""
        return []

    def _run_direct(self, tb: Testbed) -> dict[str, Any]:
        before = tb.counters(tb.origin_ns)
        launch = []
        for i in range(1, self.scenario.nodes + 1):
            dest = self._dest("direct", i)
            argv = [*self._swarm_cli(), "fetch", self.name, "--catalog", CATALOG]
            argv += ["--dest", str(dest), "--direct", "--json", "--no-fsync"]
            launch.append((argv, dest / COMPLETE_MARKER))
        outcome = self._burst(tb, "direct", launch)
        after = tb.counters(tb.origin_ns)
        reports = outcome.reports
        return self._summary(
            outcome,
            after.tx_bytes - before.tx_bytes,
            {
                "origin_bytes_reported": sum(int(r["origin_bytes"]) for r in reports),
                "verified": all(bool(r["verified"]) for r in reports),
            },
        )

    def _run_libtorrent(self, tb: Testbed, artifact: Path) -> dict[str, Any]:
        try:
            from benchmarks.lt_peer import make_torrent
        except ImportError as exc:
            raise BenchmarkError(
                "the libtorrent system needs the PyPI package `libtorrent` "
                "(pip install libtorrent, or the project's `bench` extra)"
            ) from exc
        piece_size = self.options.lt_piece_size or self.scenario.piece_size
        torrent = self.work / f"{self.name}.torrent"
        torrent.write_bytes(make_torrent(artifact, piece_size))
        before = tb.counters(tb.origin_ns)
        lt_cli = [self.python, "-m", "benchmarks.lt_peer"]
        seeder = tb.popen(
            tb.origin_ns,
            [
                *lt_cli,
                "seed",
                str(torrent),
                "--save-path",
                str(artifact.parent),
                "--listen",
                f"{ORIGIN_ADDR}:{LT_PORT}",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._log("lt-seed.err"),
            cwd=REPO_ROOT,
        )
        assert seeder.stdout is not None
        if not seeder.stdout.readline().startswith(b"ready"):
            raise BenchmarkError(f"libtorrent seeder in {tb.origin_ns} did not start")
        peers = [f"{ORIGIN_ADDR}:{LT_PORT}"]
        peers += [f"{node_addr(i)}:{LT_PORT}" for i in range(1, self.scenario.nodes + 1)]
        launch = []
        for i in range(1, self.scenario.nodes + 1):
            dest = self._dest("libtorrent", i)
            dest.mkdir(parents=True)
            done = dest.parent / f"n{i}.done"
            argv = [*lt_cli, "leech", str(torrent), "--save-path", str(dest)]
            argv += ["--listen", f"{node_addr(i)}:{LT_PORT}", "--done-file", str(done)]
            argv += ["--linger", "60"]
            for peer in peers:
                if peer != f"{node_addr(i)}:{LT_PORT}":
                    argv += ["--peer", peer]
            launch.append((argv, done))
        try:
            outcome = self._burst(tb, "libtorrent", launch, stop_after_done=True)
        finally:
            seeder.terminate()
            try:
                seed_out, _ = seeder.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                seed_out = b""
            tb.forget(seeder)
        after = tb.counters(tb.origin_ns)
        try:
            seed_report = _last_json(seed_out.decode(errors="replace"))
        except BenchmarkError:
            seed_report = {}
        reports = outcome.reports
        return self._summary(
            outcome,
            after.tx_bytes - before.tx_bytes,
            {
                "origin_bytes_reported": int(seed_report.get("payload_upload", -1)),
                "lt_piece_size": piece_size,
                "failed_bytes_reported": sum(int(r["failed_bytes"]) for r in reports),
                "redundant_bytes_reported": sum(int(r["redundant_bytes"]) for r in reports),
                "verified": all(bool(r["verified"]) for r in reports),
            },
        )

    # --- helpers ---------------------------------------------------------------------------

    def _wait_listening(
        self, tb: Testbed, ns: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchmarkError(
                    f"process in {ns} exited with {proc.returncode} before listening on {port}"
                )
            if tb.run(ns, ["ss", "-Hltn", f"sport = :{port}"]).strip():
                return
            time.sleep(0.1)
        raise BenchmarkError(f"nothing listening on port {port} in {ns} after {timeout:.0f} s")

    def _burst(
        self,
        tb: Testbed,
        system: str,
        launch: Sequence[tuple[list[str], Path]],
        *,
        stop_after_done: bool = False,
    ) -> _Outcome:
        """Start one process per node at once; wait for every completion marker, then every exit."""
        cpu0 = _children_cpu()
        meter = _CpuMeter()
        procs: list[subprocess.Popen[bytes]] = []
        outs: list[Path] = []
        sampler = _OriginSampler(tb)
        t0 = time.monotonic()
        sampler.start(t0)
        for i, (argv, _) in enumerate(launch, start=1):
            out = self.work / "logs" / f"{system}-n{i}.out"
            outs.append(out)
            procs.append(
                tb.popen(
                    tb.node_ns[i - 1],
                    argv,
                    env=self.env,
                    stdout=open(out, "wb"),  # noqa: SIM115 - the child owns it
                    stderr=self._log(f"{system}-n{i}.err"),
                    cwd=REPO_ROOT,
                )
            )
        done: dict[int, float] = {}
        deadline = t0 + self._timeout()
        try:
            while len(done) < len(launch):
                now = time.monotonic()
                if now > deadline:
                    raise BenchmarkError(
                        f"{system}: only {len(done)} of {len(launch)} nodes finished within "
                        f"{self._timeout():.0f} s (logs in {self.work / 'logs'})"
                    )
                for i, ((_, marker), proc) in enumerate(zip(launch, procs, strict=True)):
                    if i in done:
                        continue
                    if marker.exists():
                        done[i] = now - t0
                    elif proc.poll() is not None:
                        raise BenchmarkError(
                            f"{system}: node {i + 1} exited with {proc.returncode} before "
                            f"finishing: {_tail(self.work / 'logs' / f'{system}-n{i + 1}.err')}"
                        )
                time.sleep(0.02)
            busy = meter.busy_fraction()
            wall = time.monotonic() - t0
            origin_link = sampler.stop()
            if stop_after_done:
                for proc in procs:
                    proc.terminate()
            for i, proc in enumerate(procs, start=1):
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired as exc:
                    raise BenchmarkError(
                        f"{system}: node {i} did not exit after finishing"
                    ) from exc
                if proc.returncode != 0:
                    raise BenchmarkError(
                        f"{system}: node {i} exited with {proc.returncode}: "
                        f"{_tail(self.work / 'logs' / f'{system}-n{i}.err')}"
                    )
        finally:
            sampler.stop()
            for proc in procs:
                tb.forget(proc)
            shutil.rmtree(self.work / "dest" / system, ignore_errors=True)
        reports = [_last_json(out.read_text()) for out in outs]
        return _Outcome(
            node_seconds=[done[i] for i in range(len(launch))],
            reports=reports,
            cpu_seconds=_children_cpu() - cpu0,
            host_cpu_busy=busy,
            wall_seconds=wall,
            origin_link=origin_link,
        )

    def _summary(
        self, outcome: _Outcome, origin_bytes: int, extra: dict[str, Any]
    ) -> dict[str, Any]:
        self_seconds = [float(r["seconds"]) for r in outcome.reports]
        if not extra.get("verified"):
            raise BenchmarkError("a node reported an unverified result")
        return summarize_system(
            outcome.node_seconds,
            origin_bytes=origin_bytes,
            model_bytes=self.scenario.model_bytes,
            bound_seconds=self.scenario.lower_bound_seconds,
            node_bounds=self.scenario.node_bounds_seconds if self.scenario.slow_nodes else (),
            extra={
                **extra,
                "self_p50_seconds": round(statistics.median(self_seconds), 3),
                "startup_seconds": [
                    float(r["startup_seconds"]) for r in outcome.reports if "startup_seconds" in r
                ],
                "startup_max_seconds": max(
                    (
                        float(r["startup_seconds"])
                        for r in outcome.reports
                        if "startup_seconds" in r
                    ),
                    default=None,
                ),
                "self_max_seconds": round(max(self_seconds), 3),
                "cpu_seconds": round(outcome.cpu_seconds, 2),
                "origin_link": outcome.origin_link,
                "host_cpu_busy": round(outcome.host_cpu_busy, 3),
            },
        )


ZONES_SCENARIO = Scenario("zones", 8, 400 * MBIT, 1 * GBIT, 512 * MIB, 4 * MIB)
ZONE_NAMES = ("a", "b")
ZONE_RUNS = ("swarm", "swarm-zones")


def zone_of(node: int, nodes: int) -> str:
    """Node ``node`` (1-based) of ``nodes`` is in zone a (first half) or b (second half)."""
    return ZONE_NAMES[0] if node <= nodes // 2 else ZONE_NAMES[1]


class ZoneRunner(ScenarioRunner):
    """Swarm with and without ``--zone`` on two zones of nodes, counting cross-zone bytes.

    Both runs use the same testbed, whose node ports count the frames each node
    receives from nodes of the other zone (see :mod:`benchmarks.testbed`); the
    first run passes no ``--zone`` (no preference), the second ``--zone a`` to the
    first half of the nodes and ``--zone b`` to the rest.
    """

    def __init__(
        self,
        scenario: Scenario,
        options: RunOptions | None = None,
        *,
        oversubscription: int | None = None,
    ) -> None:
        super().__init__(scenario, options)
        self.zones = tuple(zone_of(i, scenario.nodes) for i in range(1, scenario.nodes + 1))
        self.zone_flags = False
        # N: a node receives from the other zone at most 1/N of its link, as its
        # share of an uplink N times slower than the zone's nodes together.
        self.oversubscription = oversubscription

    def _node_args(self, node: int) -> list[str]:
        return ["--zone", self.zones[node - 1]] if self.zone_flags else []

    def _run(self) -> dict[str, Any]:
        sc = self.scenario
        s3 = LocalS3Server(self.work / "s3", host=ORIGIN_ADDR, port=S3_PORT)
        self.env = {**s3.env(), "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        self._make_artifact(s3.bucket(BUCKET) / self.name)
        s3.bucket("catalog")
        (self.work / "logs").mkdir()
        self.say(
            f"{sc.nodes} nodes in zones {'/'.join(self.zones)}, node links "
            f"{sc.node_bps / MBIT:.0f} Mbit/s, origin {sc.origin_bps / MBIT:.0f} Mbit/s, "
            f"{format_size(sc.model_bytes)} in {format_size(sc.piece_size)} pieces; "
            f"T_min {sc.lower_bound_seconds:.1f} s"
        )
        runs: dict[str, dict[str, Any]] = {}
        cross_bps = sc.node_bps // self.oversubscription if self.oversubscription else None
        shape = replace(sc.shape, zones=self.zones, cross_zone_down_bps=cross_bps)
        if cross_bps:
            self.say(f"cross-zone receive capped at {cross_bps / MBIT:.0f} Mbit/s per node")
        with Testbed(shape, tag=self.options.tag) as tb:
            self._start_origin(tb)
            self._publish(tb)
            for run in ZONE_RUNS:
                self.zone_flags = run == "swarm-zones"
                idle = self._wait_for_idle_host()
                self.say(f"running {run} (host CPU busy before: {idle:.0%})")
                nodes = range(1, sc.nodes + 1)
                cross0 = [tb.cross_zone_rx_bytes(i) for i in nodes]
                rx0 = [tb.counters(ns).rx_bytes for ns in tb.node_ns]
                try:
                    entry = self._run_swarm(tb)
                except BenchmarkError as exc:
                    self.say(f"{run} failed: {exc}")
                    runs[run] = {"error": str(exc)}
                    continue
                cross = [tb.cross_zone_rx_bytes(i) - c for i, c in zip(nodes, cross0, strict=True)]
                rx = [tb.counters(ns).rx_bytes - r for ns, r in zip(tb.node_ns, rx0, strict=True)]
                entry.update(self._cross_zone(entry, cross, rx))
                entry["host_cpu_busy_before"] = round(idle, 3)
                runs[run] = entry
                self.say(
                    f"{run}: p50 {entry['p50_seconds']:.1f} s, max {entry['max_seconds']:.1f} s "
                    f"({entry['ratio_to_bound']:.2f} x T_min), cross-zone "
                    f"{entry['cross_zone_ratio']:.3f} x F (wire {entry['cross_zone_wire_ratio']:.3f}),"
                    f" reported {entry['cross_zone_reported_ratio']}, origin "
                    f"{entry['origin_ratio']:.3f} x F"
                )
        return scenario_result(
            sc,
            runs,
            date=dt.date.today(),
            meta={
                "host_cpus": os.cpu_count(),
                **code_version(),
                "zones": list(self.zones),
                "oversubscription": self.oversubscription,
                "cross_zone_down_bps": cross_bps,
                "fetch_args": list(self.options.fetch_args),
                "tracker_args": list(self.options.tracker_args),
                "timing": "wall clock from launch of the peers to each node's completion marker",
                "cross_zone_source": (
                    "tc class counters on each node's bridge-side port: frames whose source "
                    "is a node of the other zone (wire bytes, headers included); "
                    "cross_zone_bytes = wire bytes x (payload received / wire received)"
                ),
            },
        )

    def _cross_zone(self, entry: dict[str, Any], cross: list[int], rx: list[int]) -> dict[str, Any]:
        f = self.scenario.model_bytes
        payload = int(entry["peer_bytes_reported"]) + int(entry["origin_bytes_reported"])
        # Headers are the same share of every data frame, so the wire-to-payload
        # factor of all a node received converts its cross-zone frames too.
        payload_share = payload / max(1, sum(rx))
        cross_bytes = round(sum(cross) * payload_share)
        reported = entry.get("cross_zone_bytes_reported")
        return {
            "cross_zone_wire_bytes": sum(cross),
            "cross_zone_wire_bytes_per_node": cross,
            "rx_wire_bytes_per_node": rx,
            "cross_zone_bytes": cross_bytes,
            "cross_zone_wire_ratio": round(sum(cross) / f, 4),
            "cross_zone_ratio": round(cross_bytes / f, 4),
            "cross_zone_reported_ratio": None if reported is None else round(reported / f, 4),
        }


def run_zones(
    *,
    options: RunOptions | None = None,
    size: int | None = None,
    oversubscription: int | None = None,
    results_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the zones scenario (``size`` reduces it) and write its JSON; return it and its path.

    ``oversubscription`` N caps what a node receives from the other zone at 1/N of
    its link (result ``zones-<N>to1-<date>.json``); None leaves the fabric flat.
    """
    name = f"zones-{oversubscription}to1" if oversubscription else "zones"
    scenario = replace(ZONES_SCENARIO, name=name, model_bytes=size or ZONES_SCENARIO.model_bytes)
    result = ZoneRunner(scenario, options, oversubscription=oversubscription).run()
    if size is not None:
        result["reduced"] = True
        out_dir = results_dir or Path(tempfile.gettempdir()) / "swarm-bench-dev"
        path = out_dir / f"{name}-{scenario.model_bytes}b-{result['date']}.json"
    else:
        path = result_path(results_dir or RESULTS_DIR, name, dt.date.fromisoformat(result["date"]))
    write_result(path, result)
    return result, path


@dataclass
class _Outcome:
    node_seconds: list[float]
    reports: list[dict[str, Any]]
    cpu_seconds: float
    host_cpu_busy: float
    wall_seconds: float
    origin_link: dict[str, Any]


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    raise BenchmarkError(f"no JSON summary in output: {text[-300:]!r}")


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"


# --- command line ----------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so every ``with Testbed(...)`` tears down on the way out."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def run_scenario(
    name: str,
    *,
    options: RunOptions | None = None,
    nodes: int | None = None,
    size: int | None = None,
    piece_size: int | None = None,
    block_size: int | None = None,
    results_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run scenario ``name`` (optionally reduced) and write its JSON; return it and its path.

    A reduced run (``nodes``, ``size`` or ``piece_size`` given) is marked as such
    and, unless ``results_dir`` is given, written next to the work directory
    rather than to ``benchmarks/results``.
    """
    if name not in SCENARIOS:
        raise BenchmarkError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    scenario = SCENARIOS[name]
    reduced = any(x is not None for x in (nodes, size, piece_size))
    scenario = replace(
        scenario,
        nodes=nodes or scenario.nodes,
        slow_nodes=min(scenario.slow_nodes, (nodes or scenario.nodes) // 4),
        model_bytes=size or scenario.model_bytes,
        piece_size=piece_size or scenario.piece_size,
        block_size=block_size if block_size is not None else scenario.block_size,
    )
    result = ScenarioRunner(scenario, options).run()
    if reduced:
        result["reduced"] = True
        out_dir = results_dir or Path(tempfile.gettempdir()) / "swarm-bench-dev"
        path = out_dir / f"{name}-{scenario.nodes}n-{scenario.model_bytes}b-{result['date']}.json"
    else:
        path = result_path(results_dir or RESULTS_DIR, name, dt.date.fromisoformat(result["date"]))
    write_result(path, result)
    return result, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shaped",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "scenarios", nargs="*", default=list(SCENARIOS), help=", ".join([*SCENARIOS, "zones"])
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--nodes", type=int, help="reduced run: this many nodes")
    parser.add_argument("--size", type=parse_size, help="reduced run: artifact size, e.g. 64MiB")
    parser.add_argument("--piece-size", type=parse_size, help="override the scenario's piece size")
    parser.add_argument(
        "--block-size",
        type=parse_size,
        help="the manifest's block size (swarm publish --block-size): the unit relayed cut-through",
    )
    parser.add_argument("--lt-piece-size", type=parse_size, help="libtorrent's piece size")
    parser.add_argument(
        "--oversubscription",
        type=int,
        help="zones: a node receives from the other zone at most 1/N of its link",
    )
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--workdir", type=Path, help="parent of the temporary work directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--fetch-arg", action="append", default=[], help="extra `swarm fetch` argument"
    )
    parser.add_argument(
        "--tracker-arg", action="append", default=[], help="extra `swarm tracker` argument"
    )
    parser.add_argument(
        "--idle-wait", type=float, default=300.0, help="seconds to wait for an idle host per system"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="swarm processes log at INFO (see --keep)"
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    options = RunOptions(
        systems=tuple(s for s in args.systems.split(",") if s),
        workdir=args.workdir,
        keep_workdir=args.keep,
        fetch_args=tuple(args.fetch_arg),
        tracker_args=tuple(args.tracker_arg),
        lt_piece_size=args.lt_piece_size,
        idle_wait=args.idle_wait,
        verbose=args.verbose,
    )
    for name in args.scenarios:
        if name == "zones":
            _, path = run_zones(
                options=options,
                size=args.size,
                oversubscription=args.oversubscription,
                results_dir=args.results_dir,
            )
            print(path)
            continue
        _, path = run_scenario(
            name,
            options=options,
            nodes=args.nodes,
            size=args.size,
            piece_size=args.piece_size,
            block_size=args.block_size,
            results_dir=args.results_dir,
        )
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
