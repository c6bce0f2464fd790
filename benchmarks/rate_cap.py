"""Byte-rate caps measured on the shaped testbed: upload, download and the origin cap.

Scenario (links far faster than the cap, so only the cap can hold the rate)::

    4 nodes, node links 1 Gbit/s, origin 1 Gbit/s, 256 MiB in 4 MiB pieces, cap 20 MB/s

- ``upload``: node 1 holds a complete copy (pulled alone beforehand) and serves
  it with ``--max-upload-rate CAP`` to nodes 2 and 3, which start empty. Measured:
  node 1's transmit counter.
- ``download``: node 1 serves (uncapped) to node 4, fetching with
  ``--max-download-rate CAP``. Measured: node 4's receive counter.
- ``origin``: a tracker with ``--origin-rate-limit CAP`` and one lone peer
  (node 2, empty again) pulling everything from the S3 origin. Measured: the
  origin namespace's transmit counter.

For ``upload`` and ``download`` the tracker is fresh and runs with a 4 s
announce interval, so its restart grace (1.5 intervals, no origin assignments)
covers the start of every process: the receivers find the server's copy and
take nothing from the origin (the origin bytes are reported to show it).

Each counter is sampled every 0.2 s; the transfer interval runs from the sample
before the first one that moved more than 256 KiB to the last one that did.
Two ratios per run: ``wire_ratio`` is interface bytes (Ethernet, IP and TCP
headers included, about 4.5% at MTU 1500) over the interval ÷ the cap;
``payload_ratio`` is the bytes the capped process reports (``uploaded_bytes``;
``peer_bytes`` + ``origin_bytes``; the peer's ``origin_bytes``) over the same
interval ÷ the cap. ``steady_*`` drops the first and last 10% of the interval,
so the bucket's initial burst and the ramp-down don't count.

``python -m benchmarks.rate_cap`` writes ``benchmarks/results/rate-cap-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import shaped
from benchmarks.errors import BenchmarkError
from benchmarks.shaped import (
    CATALOG,
    GBIT,
    MIB,
    TRACKER_PORT,
    RunOptions,
    Scenario,
    ScenarioRunner,
)
from benchmarks.testbed import BRIDGE_ADDR, ORIGIN_ADDR, Testbed, node_addr
from core.units import format_size, parse_size
from seeder.local_s3 import LocalS3Server

ANNOUNCE_INTERVAL = 4.0  # grace = 1.5 x this: covers every process's start-up
SAMPLE_INTERVAL = 0.2
QUIET_BYTES = 256 * 1024  # less than this in one sample is control traffic
DEFAULT_CAP = 20_000_000  # bytes per second
EXPERIMENTS = ("upload", "download", "origin")


@dataclass(frozen=True)
class Window:
    """Bytes through one counter over the interval it carried the transfer."""

    seconds: float
    wire_bytes: int
    steady_seconds: float
    steady_wire_bytes: int


def busy_window(samples: list[tuple[float, int]], interval: float = SAMPLE_INTERVAL) -> Window:
    """The transfer interval of a sampled cumulative counter ``[(t, bytes), ...]``."""
    moved = [
        (i, b1 - b0)
        for i, ((_, b0), (_, b1)) in enumerate(itertools.pairwise(samples), start=1)
        if b1 - b0 > QUIET_BYTES
    ]
    if not moved:
        raise BenchmarkError("the measured counter never moved")
    first, last = moved[0][0] - 1, moved[-1][0]
    t0, b0 = samples[first]
    t1, b1 = samples[last]
    span = last - first
    # The middle 80% of the interval, in whole samples.
    s0, s1 = first + span // 10, last - span // 10
    if s1 <= s0:
        s0, s1 = first, last
    return Window(
        seconds=t1 - t0,
        wire_bytes=b1 - b0,
        steady_seconds=samples[s1][0] - samples[s0][0],
        steady_wire_bytes=samples[s1][1] - samples[s0][1],
    )


def cap_entry(
    window: Window, payload_bytes: int, cap: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """One experiment's result: wire and payload rates over the window, ÷ the cap."""
    wire_rate = window.wire_bytes / window.seconds
    payload_rate = payload_bytes / window.seconds
    steady = window.steady_wire_bytes / window.steady_seconds
    return {
        "cap_bytes_per_s": cap,
        "interval_seconds": round(window.seconds, 3),
        "wire_bytes": window.wire_bytes,
        "payload_bytes": payload_bytes,
        "wire_bytes_per_s": round(wire_rate),
        "payload_bytes_per_s": round(payload_rate),
        "wire_ratio": round(wire_rate / cap, 4),
        "payload_ratio": round(payload_rate / cap, 4),
        "steady_seconds": round(window.steady_seconds, 3),
        "steady_wire_ratio": round(steady / cap, 4),
        # Payload share of the wire bytes, applied to the steady wire rate.
        "steady_payload_ratio_est": round(
            steady * payload_bytes / max(1, window.wire_bytes) / cap, 4
        ),
        **extra,
    }


class _Sampler:
    """Samples one interface counter of one namespace in a thread."""

    def __init__(self, tb: Testbed, ns: str, direction: str) -> None:
        self.tb, self.ns, self.direction = tb, ns, direction
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{ns}", daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c = self.tb.counters(self.ns)
            except BenchmarkError:
                return
            value = c.tx_bytes if self.direction == "tx" else c.rx_bytes
            self.samples.append((time.monotonic() - self._t0, value))
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


class CapRunner(ScenarioRunner):
    """The three cap experiments on one testbed, each with a fresh tracker."""

    def __init__(
        self,
        scenario: Scenario,
        options: RunOptions,
        *,
        cap: int,
        experiments: tuple[str, ...] = EXPERIMENTS,
    ) -> None:
        super().__init__(scenario, options)
        self.cap = cap
        self.experiments = experiments
        self.name = "bench-rate-cap"

    def _run(self) -> dict[str, Any]:
        sc = self.scenario
        s3 = LocalS3Server(self.work / "s3", host=ORIGIN_ADDR, port=shaped.S3_PORT)
        self.env = {**s3.env(), "PYTHONPATH": str(shaped.REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        self._make_artifact(s3.bucket(shaped.BUCKET) / self.name)
        s3.bucket("catalog")
        (self.work / "logs").mkdir()
        self.say(
            f"{sc.nodes} nodes, links {sc.node_bps / 1e6:.0f} Mbit/s, {format_size(sc.model_bytes)}"
            f" in {format_size(sc.piece_size)} pieces, cap {self.cap / 1e6:.0f} MB/s"
        )
        results: dict[str, Any] = {}
        with Testbed(sc.shape, tag=self.options.tag) as tb:
            self._start_origin(tb)
            self._publish(tb)
            if {"upload", "download"} & set(self.experiments):
                self.say("node 1 pulls a complete copy alone")
                self._fetch_alone(tb, 1, [])
            for name in self.experiments:
                self._wait_for_idle_host()
                self.say(f"running {name}")
                try:
                    if name == "upload":
                        entry = self._upload(tb)
                    elif name == "download":
                        entry = self._download(tb)
                    else:
                        entry = self._origin(tb)
                except BenchmarkError as exc:
                    self.say(f"{name} failed: {exc}")
                    results[name] = {"error": str(exc)}
                    continue
                results[name] = entry
                self.say(
                    f"{name}: wire {entry['wire_ratio']:.3f} x cap, payload "
                    f"{entry['payload_ratio']:.3f} x cap, steady wire "
                    f"{entry['steady_wire_ratio']:.3f} over {entry['interval_seconds']:.1f} s"
                )
        return {
            "scenario": "rate-cap",
            "date": dt.date.today().isoformat(),
            "nodes": sc.nodes,
            "model_bytes": sc.model_bytes,
            "piece_size": sc.piece_size,
            "node_link_bps": sc.node_bps,
            "origin_link_bps": sc.origin_bps,
            "cap_bytes_per_s": self.cap,
            "sample_interval_seconds": SAMPLE_INTERVAL,
            **shaped.code_version(),
            "wire_bytes_source": "ip -s -j link show of the capped side's eth0 (frames)",
            "experiments": results,
        }

    # --- processes -----------------------------------------------------------------------

    def _tracker(self, tb: Testbed, extra: list[str]) -> subprocess.Popen[bytes]:
        tracker = tb.popen(
            tb.bridge_ns,
            [
                *self._swarm_cli(),
                "tracker",
                "--listen",
                f"{BRIDGE_ADDR}:{TRACKER_PORT}",
                "--catalog",
                CATALOG,
                *extra,
            ],
            env=self.env,
            stderr=self._log(f"tracker-{time.monotonic_ns()}.err"),
            cwd=shaped.REPO_ROOT,
        )
        self._wait_listening(tb, tb.bridge_ns, TRACKER_PORT, tracker)
        return tracker

    def _fetch(
        self, tb: Testbed, node: int, extra: list[str], tag: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        dest = self.work / "dest" / f"n{node}"
        argv = [*self._swarm_cli(), "fetch", self.name]
        argv += ["--tracker", f"http://{BRIDGE_ADDR}:{TRACKER_PORT}", "--dest", str(dest)]
        argv += ["--listen", f"{node_addr(node)}:0", "--advertise", node_addr(node)]
        argv += ["--linger", "60", "--json", "--no-fsync", *extra]
        out = self.work / "logs" / f"{tag}-n{node}.out"
        proc = tb.popen(
            tb.node_ns[node - 1],
            argv,
            env=self.env,
            stdout=open(out, "wb"),  # noqa: SIM115 - the child owns it
            stderr=self._log(f"{tag}-n{node}.err"),
            cwd=shaped.REPO_ROOT,
        )
        return proc, out

    def _finish(
        self, tb: Testbed, procs: list[tuple[int, subprocess.Popen[bytes], Path]], tag: str
    ) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + self._timeout()
        reports: dict[int, dict[str, Any]] = {}
        for node, proc, out in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise BenchmarkError(f"{tag}: node {node} did not finish in time") from exc
            finally:
                tb.forget(proc)
            if proc.returncode != 0:
                raise BenchmarkError(
                    f"{tag}: node {node} exited with {proc.returncode}: "
                    f"{shaped._tail(self.work / 'logs' / f'{tag}-n{node}.err')}"
                )
            reports[node] = shaped._last_json(out.read_text())
            if not reports[node].get("verified"):
                raise BenchmarkError(f"{tag}: node {node} reported an unverified result")
        return reports

    def _fetch_alone(self, tb: Testbed, node: int, tracker_args: list[str]) -> dict[str, Any]:
        tracker = self._tracker(tb, tracker_args)
        try:
            time.sleep(shaped.TRACKER_GRACE_SECONDS)
            proc, out = self._fetch(tb, node, [], f"alone{node}")
            return self._finish(tb, [(node, proc, out)], f"alone{node}")[node]
        finally:
            tb.forget(tracker)

    def _serve(
        self,
        tb: Testbed,
        *,
        measured: str,
        direction: str,
        server_args: list[str],
        receivers: dict[int, list[str]],
        tag: str,
    ) -> tuple[list[tuple[float, int]], dict[int, dict[str, Any]], int]:
        """Node 1 (complete) serves ``receivers``; sample ``measured``'s counter meanwhile."""
        for node in receivers:
            shutil.rmtree(self.work / "dest" / f"n{node}", ignore_errors=True)
        tracker = self._tracker(tb, ["--announce-interval", str(ANNOUNCE_INTERVAL)])
        origin0 = tb.counters(tb.origin_ns).tx_bytes
        sampler = _Sampler(tb, measured, direction)
        try:
            procs = [(n, *self._fetch(tb, n, args, tag)) for n, args in receivers.items()]
            # After the receivers, so the server never announces into a swarm of one
            # (it would find the swarm complete and stop lingering at once).
            time.sleep(1.0)
            procs.append((1, *self._fetch(tb, 1, server_args, tag)))
            reports = self._finish(tb, procs, tag)
        finally:
            samples = sampler.stop()
            tb.forget(tracker)
        return samples, reports, tb.counters(tb.origin_ns).tx_bytes - origin0

    def _upload(self, tb: Testbed) -> dict[str, Any]:
        samples, reports, origin = self._serve(
            tb,
            measured=tb.node_ns[0],
            direction="tx",
            server_args=["--max-upload-rate", str(self.cap)],
            receivers={2: [], 3: []},
            tag="upload",
        )
        return cap_entry(
            busy_window(samples),
            int(reports[1]["uploaded_bytes"]),
            self.cap,
            {
                "flag": "--max-upload-rate",
                "measured": "node 1 (server) eth0 tx",
                "payload_source": "server's uploaded_bytes",
                "receivers": 2,
                "receiver_peer_bytes": [int(reports[n]["peer_bytes"]) for n in (2, 3)],
                "origin_wire_bytes": origin,
            },
        )

    def _download(self, tb: Testbed) -> dict[str, Any]:
        samples, reports, origin = self._serve(
            tb,
            measured=tb.node_ns[3],
            direction="rx",
            server_args=[],
            receivers={4: ["--max-download-rate", str(self.cap)]},
            tag="download",
        )
        r = reports[4]
        return cap_entry(
            busy_window(samples),
            int(r["peer_bytes"]) + int(r["origin_bytes"]),
            self.cap,
            {
                "flag": "--max-download-rate",
                "measured": "node 4 (receiver) eth0 rx",
                "payload_source": "receiver's peer_bytes + origin_bytes",
                "origin_wire_bytes": origin,
            },
        )

    def _origin(self, tb: Testbed) -> dict[str, Any]:
        node = 2
        shutil.rmtree(self.work / "dest" / f"n{node}", ignore_errors=True)
        sampler = _Sampler(tb, tb.origin_ns, "tx")
        try:
            report = self._fetch_alone(tb, node, ["--origin-rate-limit", str(self.cap)])
        finally:
            samples = sampler.stop()
        return cap_entry(
            busy_window(samples),
            int(report["origin_bytes"]),
            self.cap,
            {
                "flag": "tracker --origin-rate-limit",
                "measured": "origin namespace eth0 tx",
                "payload_source": "the lone peer's origin_bytes",
            },
        )


def run_rate_cap(
    *,
    cap: int = DEFAULT_CAP,
    size: int = 256 * MIB,
    experiments: tuple[str, ...] = EXPERIMENTS,
    options: RunOptions | None = None,
    results_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the cap experiments and write their JSON; return it and its path."""
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise BenchmarkError(f"unknown experiments {sorted(unknown)}; known: {EXPERIMENTS}")
    scenario = Scenario("rate-cap", 4, 1 * GBIT, 1 * GBIT, size, 4 * MIB)
    runner = CapRunner(scenario, options or RunOptions(), cap=cap, experiments=experiments)
    result = runner.run()
    name = "rate-cap" if cap == DEFAULT_CAP else f"rate-cap-{cap}"
    if size != 256 * MIB or experiments != EXPERIMENTS:
        result["reduced"] = True
        name += f"-{size}b"
    path = (results_dir or shaped.RESULTS_DIR) / f"{name}-{result['date']}.json"
    shaped.write_result(path, result)
    return result, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rate_cap",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--cap", type=parse_size, default=DEFAULT_CAP, help="bytes per second")
    parser.add_argument("--size", type=parse_size, default=256 * MIB)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated")
    parser.add_argument("--results-dir", type=Path, default=shaped.RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument("--idle-wait", type=float, default=120.0)
    args = parser.parse_args(argv)
    shaped.exit_on_sigterm()
    _, path = run_rate_cap(
        cap=args.cap,
        size=args.size,
        experiments=tuple(e for e in args.experiments.split(",") if e),
        options=RunOptions(keep_workdir=args.keep, idle_wait=args.idle_wait),
        results_dir=args.results_dir,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
