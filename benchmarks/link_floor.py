"""The fabric's floor: TCP goodput of a full mesh on the shaped testbed, per MTU.

Every node of the ``fabric-bound`` shape sends to every other node at once, as
fast as TCP will (one connection per pair, as a swarm's peers hold), and each
node counts the payload bytes it receives over the steady part of the run. The
mean over nodes, divided by the link rate, is the most any TCP system can move
through these links: no swarm, torrent or direct download can beat it, so it is
the floor a shaped result's distance from T_min should be read against.

Measured 2026-12-05 (``python -m benchmarks.link_floor``): 0.90 of the link at
MTU 1500 (the slowest node 0.81), 0.98 at 9000 (the slowest 0.96). Hence the
testbed's jumbo frames (``benchmarks.shaped.JUMBO_MTU``).

Needs root (network namespaces); writes ``benchmarks/results/link-floor-<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.shaped import RESULTS_DIR, SCENARIOS, write_result
from benchmarks.testbed import SUBNET_PREFIX, Testbed

PORT = 5001

# One process per node: a listener counting what arrives, and one sender thread
# per other node. It prints the bits per second received over the measured window.
_NODE = r"""
import socket, sys, threading, time
me, n, seconds, settle, port = (int(a) for a in sys.argv[1:6])
prefix = sys.argv[6]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(n)
received = [0]
def drain(conn):
    buf = bytearray(1 << 20)  # reused: the floor should cost as little CPU as it can
    while True:
        got = conn.recv_into(buf)
        if not got:
            return
        received[0] += got
def accept():
    for _ in range(n - 1):
        conn, _ = server.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
time.sleep(1.0)  # every listener is up
end = time.monotonic() + settle + seconds + 1
def send(j):
    conn = socket.create_connection((f"{prefix}.{10 + j}", port), timeout=10)
    block = b"x" * (1 << 20)
    while time.monotonic() < end:
        conn.sendall(block)
    conn.close()
for j in range(1, n + 1):
    if j != me:
        threading.Thread(target=send, args=(j,), daemon=True).start()
time.sleep(settle)
start_bytes, start = received[0], time.monotonic()
time.sleep(seconds)
print((received[0] - start_bytes) * 8 / (time.monotonic() - start))
"""


def measure(mtu: int, *, seconds: float, settle: float) -> dict[str, Any]:
    """Goodput into each node of the fabric-bound shape at ``mtu``, all nodes sending."""
    shape = dataclasses.replace(SCENARIOS["fabric-bound"].shape, mtu=mtu)
    with Testbed(shape) as tb:
        argv = [str(shape.nodes), str(int(seconds)), str(int(settle)), str(PORT), SUBNET_PREFIX]
        procs = [
            tb.popen(ns, [sys.executable, "-c", _NODE, str(i), *argv], stdout=subprocess.PIPE)
            for i, ns in enumerate(tb.node_ns, start=1)
        ]
        timeout = seconds + settle + 60
        bps = [float(p.communicate(timeout=timeout)[0]) for p in procs]
    link = shape.node_down_bps
    return {
        "mtu": mtu,
        "link_bps": link,
        "node_goodput_bps": [round(b) for b in bps],
        "mean_of_link": round(statistics.mean(bps) / link, 4),
        "min_of_link": round(min(bps) / link, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.link_floor", description=__doc__)
    parser.add_argument("--mtu", default="1500,9000", help="comma-separated MTUs to measure")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per MTU")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    runs = []
    for mtu in (int(m) for m in args.mtu.split(",")):
        run = measure(mtu, seconds=args.seconds, settle=args.settle)
        print(
            f"MTU {mtu}: full-mesh goodput {run['mean_of_link']:.3f} of the link "
            f"(slowest node {run['min_of_link']:.3f})",
            flush=True,
        )
        runs.append(run)
    today = dt.date.today()
    result = {
        "benchmark": "link-floor",
        "date": today.isoformat(),
        "shape": "fabric-bound",
        "nodes": SCENARIOS["fabric-bound"].nodes,
        "runs": runs,
    }
    path = args.results_dir / f"link-floor-{today.isoformat()}.json"
    write_result(path, result)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
