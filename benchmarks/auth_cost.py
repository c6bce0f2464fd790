"""The cost of announce authentication on the tracker's announce rate.

Scenario: one in-process ``Tracker`` on 127.0.0.1 with a ``file://`` catalog holding
one artifact of ``--pieces`` pieces (1 KiB each: only the count matters here).
``--peers`` peers join its swarm (one announce each, not timed), then a load
generator in the same process sends ``--announces`` UDP announces round-robin over
the peers, at most ``--window`` in flight, each carrying the peer's full have-set
(a random half of the pieces, as mid-burst). Every datagram is built and signed
before the clock starts, so the figures are the tracker's work (decode, MAC check,
freshness, registry, reply and its MAC) plus loopback I/O, not the generator's.

The same run is made without a token (open cluster) and with one, alternating,
``--rounds`` times each on a fresh tracker; reported per mode: announces/s of the
best round and the median, p50/p99 latency (send to reply) over all rounds, and
the ratio token/open of the median and best rates; and the process's CPU time per
announce (tracker and generator share it; less sensitive than the rate to other
load on the machine) with its ratio. Results go to
``benchmarks/results/auth-cost-<YYYY-MM-DD>.json``.

Then the data plane, in the same run: one complete peer serves ``--dataplane-size``
to one empty peer over loopback (``benchmarks.dataplane.swarm_transfer``: a real
tracker and two ``swarm fetch`` processes), without a token and with one,
alternating, ``--dataplane-rounds`` times each; reported: the fetching peer's MB/s
per round and the ratio token/open of the medians. The token adds a round trip to
each connection's handshake and nothing per block, so this ratio says whether the
proof costs anything a transfer can see.

    .venv/bin/python -m benchmarks.auth_cost [--peers 1000] [--pieces 4000] [--announces 20000]
        [--dataplane-size 256MiB] [--dataplane-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import msgpack

from core.auth import ClusterKey, new_nonce
from core.bitfield import Bitfield
from core.units import parse_size
from seeder.publish import publish
from swarm.announce import Announce
from tracker.config import TrackerConfig
from tracker.service import Tracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import free_port, populate

RESULTS = Path(__file__).resolve().parent / "results"
PIECE = 1024
TOKEN = ClusterKey(b"benchmark cluster token, 32 bytes")
REPLY_TIMEOUT = 2.0


class _Load(asyncio.DatagramProtocol):
    """Sends prepared datagrams with a bounded window and times each reply by its txn."""

    def __init__(self, datagrams: list[tuple[int, bytes]], window: int) -> None:
        self.datagrams = datagrams
        self.window = window
        self.next = 0
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.lost = 0
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def fill(self) -> None:
        assert self.transport is not None
        while len(self.sent) < self.window and self.next < len(self.datagrams):
            txn, data = self.datagrams[self.next]
            self.next += 1
            self.sent[txn] = time.perf_counter()
            self.transport.sendto(data)
        if not self.sent and self.next >= len(self.datagrams) and not self.done.done():
            self.done.set_result(None)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        txn = msgpack.unpackb(data, raw=False)["txn"]
        started = self.sent.pop(txn, None)
        if started is not None:
            self.latencies.append(now - started)
        self.fill()

    def expire(self) -> None:
        """Count datagrams unanswered for REPLY_TIMEOUT as lost and keep going."""
        now = time.perf_counter()
        for txn, started in list(self.sent.items()):
            if now - started > REPLY_TIMEOUT:
                del self.sent[txn]
                self.lost += 1
        self.fill()


async def send_datagrams(port: int, datagrams: list[tuple[int, bytes]], window: int) -> _Load:
    """Send ``datagrams`` to a tracker on 127.0.0.1:``port``, ``window`` in flight; the
    load, with each reply's latency (a datagram unanswered for REPLY_TIMEOUT is lost)."""
    protocol = _Load(datagrams, window)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: protocol, remote_addr=("127.0.0.1", port)
    )
    try:
        protocol.fill()
        while not protocol.done.done():
            await asyncio.wait({protocol.done}, timeout=0.5)
            protocol.expire()
    finally:
        transport.close()
    return protocol


def _datagrams(
    ref: str, key: ClusterKey, peers: list[bytes], haves: list[bytes], count: int, txn0: int
) -> list[tuple[int, bytes]]:
    base_ts = int(time.time() * 1000)
    out = []
    for i in range(count):
        p = i % len(peers)
        msg = Announce(ref, peers[p], 7000 + p, haves[p], host="127.0.0.1", txn=txn0 + i)
        msg.sign(key, base_ts + i, new_nonce())  # strictly increasing per peer
        out.append((msg.txn, msg.encode()))
    return out


async def _round(
    catalog: str, ref: str, key: ClusterKey, args: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    config = TrackerConfig(
        host="127.0.0.1",
        port=free_port(),
        catalog=catalog,
        announce_interval=2.0,
        peer_ttl=3600.0,
        stall_timeout=7200.0,
        restart_grace=0.0,
        key=key,
    )
    tracker = Tracker(config, rng=random.Random(rng.random()))
    await tracker.start()
    try:
        peers = [rng.randbytes(20) for _ in range(args.peers)]
        haves = [
            Bitfield.from_indices(
                rng.sample(range(args.pieces), args.pieces // 2), args.pieces
            ).to_bytes()
            for _ in peers
        ]
        joins = _datagrams(ref, key, peers, haves, args.peers, 0)
        timed = _datagrams(ref, key, peers, haves, args.announces, args.peers)
        for datagrams in (joins, timed):
            started, cpu_started = time.perf_counter(), time.process_time()
            protocol = await send_datagrams(config.port, datagrams, args.window)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
        status = tracker.status()
        swarm = next(iter(status["swarms"].values()))
        return {
            "seconds": round(elapsed, 3),
            "answered": len(protocol.latencies),
            "lost": protocol.lost,
            "announces_per_s": round(len(protocol.latencies) / elapsed, 1),
            "cpu_us_per_announce": round(cpu / max(1, len(protocol.latencies)) * 1e6, 1),
            "latencies_ms": [round(x * 1000, 3) for x in protocol.latencies],
            "tracker_peers": swarm["peers"],
            "auth_failures": status["auth_failures"],
        }
    finally:
        await tracker.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="auth-cost-") as tmp:
        origin = populate(Path(tmp) / "origin", {"weights.bin": rng.randbytes(args.pieces * PIECE)})
        catalog = (Path(tmp) / "catalog").as_uri()
        manifest = await publish(
            origin.as_uri(), "auth-bench", catalog, piece_size=PIECE, key=TOKEN
        )
        modes: dict[str, list[dict[str, Any]]] = {"open": [], "token": []}
        for _ in range(args.rounds):
            for mode, key in (("open", ClusterKey(None)), ("token", TOKEN)):
                modes[mode].append(await _round(catalog, manifest.ref, key, args, rng))
    summary: dict[str, Any] = {}
    for mode, rounds in modes.items():
        latencies = [x for r in rounds for x in r["latencies_ms"]]
        rates = [r["announces_per_s"] for r in rounds]
        cpu = [r["cpu_us_per_announce"] for r in rounds]
        summary[mode] = {
            "median_cpu_us_per_announce": statistics.median(cpu),
            "best_announces_per_s": max(rates),
            "median_announces_per_s": statistics.median(rates),
            "p50_ms": _percentile(latencies, 0.50),
            "p99_ms": _percentile(latencies, 0.99),
            "lost": sum(r["lost"] for r in rounds),
            "rounds": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rounds],
        }
    summary["ratio_token_to_open"] = round(
        summary["token"]["median_announces_per_s"] / summary["open"]["median_announces_per_s"], 3
    )
    summary["ratio_token_to_open_best"] = round(
        summary["token"]["best_announces_per_s"] / summary["open"]["best_announces_per_s"], 3
    )
    summary["cpu_ratio_token_to_open"] = round(
        summary["token"]["median_cpu_us_per_announce"]
        / summary["open"]["median_cpu_us_per_announce"],
        3,
    )
    return summary


def _dataplane(size: int, rounds: int) -> dict[str, Any]:
    """Peer-pair throughput over loopback without and with a token, alternating."""
    import secrets
    import shutil

    from benchmarks.dataplane import swarm_transfer

    token = secrets.token_urlsafe(32)
    runs: dict[str, list[float]] = {"open": [], "token": []}
    for _ in range(rounds):
        for mode, tok in (("open", None), ("token", token)):
            work = Path(tempfile.mkdtemp(prefix=f"auth-cost-dataplane-{mode}-"))
            try:
                fetched = swarm_transfer(work, size, None, False, token=tok)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            runs[mode].append(round(size / float(fetched["seconds"]) / 1e6, 1))
    medians = {mode: statistics.median(v) for mode, v in runs.items()}
    return {
        "model_bytes": size,
        "rounds": rounds,
        "open_mbps": runs["open"],
        "token_mbps": runs["token"],
        "median_open_mbps": medians["open"],
        "median_token_mbps": medians["token"],
        "ratio_token_to_open": round(medians["token"] / medians["open"], 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--pieces", type=int, default=4000)
    parser.add_argument("--announces", type=int, default=20_000, help="timed announces per round")
    parser.add_argument("--window", type=int, default=32, help="announces in flight at most")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode, alternating")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/)")
    parser.add_argument(
        "--dataplane-size", type=parse_size, default=256 * 1024 * 1024, help="0: skip it"
    )
    parser.add_argument("--dataplane-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    measured = asyncio.run(_run(args))
    if args.dataplane_size:
        measured["dataplane"] = _dataplane(args.dataplane_size, args.dataplane_rounds)
    today = dt.date.today().isoformat()
    result = {
        "benchmark": "auth_cost",
        "date": today,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "scenario": (
            "in-process tracker on 127.0.0.1, UDP announces from an in-process load generator "
            "(datagrams built and signed before timing); each announce carries a half-full have-set"
        ),
        "peers": args.peers,
        "pieces": args.pieces,
        "announces_per_round": args.announces,
        "window": args.window,
        "rounds": args.rounds,
        **measured,
    }
    out = args.out or RESULTS / f"auth-cost-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for mode in ("open", "token"):
        m = measured[mode]
        print(
            f"{mode:>5}: {m['median_announces_per_s']:.0f} announces/s (best {m['best_announces_per_s']:.0f}), "
            f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
            f"{m['median_cpu_us_per_announce']:.0f} CPU us/announce, lost {m['lost']}"
        )
    print(
        f"token/open: rate {measured['ratio_token_to_open']:.3f} (median), "
        f"{measured['ratio_token_to_open_best']:.3f} (best); "
        f"CPU per announce {measured['cpu_ratio_token_to_open']:.3f}  ->  {out}"
    )
    if "dataplane" in measured:
        d = measured["dataplane"]
        print(
            f"data plane ({d['model_bytes'] / 2**20:.0f} MiB, peer to peer): open {d['open_mbps']} MB/s, "
            f"token {d['token_mbps']} MB/s; token/open {d['ratio_token_to_open']:.3f} (medians)"
        )
    return result


if __name__ == "__main__":
    main()
