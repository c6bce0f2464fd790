"""Data-plane microbenchmark: one peer serves a 1 GiB artifact to one other over loopback.

The swarm side is the real thing: a tracker and two ``swarm fetch --tracker``
processes on 127.0.0.1. The serving peer's destination is already complete (it
was filled by ``swarm fetch --direct`` from a ``file://`` origin), so it only
uploads; the fetching peer receives every block from it, verifies each piece
with blake3 and writes it into its destination (``--no-fsync`` unless
``--fsync``: the data goes to the page cache, as the baseline's does not go
anywhere). Its throughput is F divided by the ``seconds`` it reports (from the
start of its peer engine to the verified, complete artifact).

The baseline, in the same run: a receiver process ``sock_recv_into`` a reused,
pre-touched 4 MiB buffer, the sender ``sock_sendall`` a pre-touched 4 MiB chunk
until F bytes are sent, timed from connect to the receiver's one-byte ack. It is
measured before and after the swarm transfer; the better of the two is the
baseline (the conservative choice for the ratio). MB/s are 10^6 bytes per second.

A second reference, also measured before and after: writing F bytes into a new
file in the same directory the way the piece store does (4 MiB positional writes
from a reused page-aligned buffer, O_DIRECT where possible). The socket baseline
keeps nothing; the fetching peer must also put every byte on disk, and on the
virtual machines we measure on, that write is often the slower of the two.

``python -m benchmarks.dataplane [--size 1GiB] [--results-dir DIR]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import mmap
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchmarkError
from benchmarks.shaped import REPO_ROOT, RESULTS_DIR, write_result
from core.auth import TOKEN_ENV, ClusterKey
from core.bitfield import Bitfield
from core.errors import TrackerError
from core.units import parse_size
from seeder.local_s3 import free_port
from swarm.announce import Announce, TrackerClient

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK = 4 * MIB
FILES = 4
NAME = "bench-dataplane"


# --- raw-socket baseline ---------------------------------------------------------------


async def _receive(port_out: Any, total: int) -> None:
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    print(server.getsockname()[1], file=port_out, flush=True)
    conn, _ = await loop.sock_accept(server)
    server.close()
    conn.setblocking(False)
    buf = bytearray(CHUNK)
    buf[:] = b"\x01" * CHUNK  # pre-touched: no page faults inside the timed loop
    view = memoryview(buf)
    got = 0
    while got < total:
        n = await loop.sock_recv_into(conn, view[: min(CHUNK, total - got)])
        if n == 0:
            raise BenchmarkError(f"raw-socket sender closed after {got} of {total} bytes")
        got += n
    await loop.sock_sendall(conn, b"k")
    conn.close()


async def _send(port: int, total: int) -> float:
    loop = asyncio.get_running_loop()
    chunk = memoryview(bytes(random.Random(1).randbytes(CHUNK)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    started = time.monotonic()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        await loop.sock_sendall(sock, chunk[:n])
        sent += n
    ack = await loop.sock_recv(sock, 1)
    elapsed = time.monotonic() - started
    sock.close()
    if ack != b"k":
        raise BenchmarkError("raw-socket receiver did not acknowledge the transfer")
    return elapsed


def disk_write_mbps(directory: Path, total: int) -> float:
    """How fast this machine writes ``total`` bytes into a new file in ``directory``, in MB/s.

    The same way the swarm's piece store does: positional 4 MiB writes from one
    reused, pre-touched, page-aligned buffer, with O_DIRECT where the file system
    allows it, no fsync. A second reference besides the raw socket: the fetching
    peer must also put every byte on disk, which the socket baseline does not.
    """
    buf = mmap.mmap(-1, CHUNK)
    buf.write(random.Random(2).randbytes(CHUNK))
    view = memoryview(buf)
    path = directory / "disk-baseline.bin"
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, flags)
    try:
        os.ftruncate(fd, total)
        started = time.monotonic()
        for offset in range(0, total, CHUNK):
            os.pwritev(fd, [view[: min(CHUNK, total - offset)]], offset)
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
        path.unlink()
        view.release()
    return total / elapsed / 1e6


def raw_socket_mbps(total: int) -> float:
    """Loopback throughput of sock_sendall → sock_recv_into between two processes, in MB/s."""
    receiver = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.dataplane", "--raw-receiver", str(total)],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=_env(),
    )
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        elapsed = asyncio.run(_send(port, total))
        if receiver.wait(timeout=60) != 0:
            raise BenchmarkError(f"raw-socket receiver exited with {receiver.returncode}")
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
        if receiver.stdout is not None:
            receiver.stdout.close()
    return total / elapsed / 1e6


# --- swarm -----------------------------------------------------------------------------


def _env(token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = token
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "cli.main"]


def _run_json(
    argv: list[str], what: str, timeout: float = 600, token: str | None = None
) -> dict[str, Any]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=_env(token),
        check=False,
    )
    if proc.returncode != 0:
        raise BenchmarkError(f"{what} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _swarm_status(tracker: str, root: str, token: str | None = None) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        client = TrackerClient(tracker, key=ClusterKey(token.encode() if token else None))
        try:
            status, body, _ = await client.get(f"/v1/swarms/{root}")
        finally:
            await client.close()
        return dict(json.loads(body)) if status == 200 else {}

    try:
        return asyncio.run(get())
    except (TrackerError, ValueError):
        return {}


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"tracker exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise BenchmarkError(f"tracker {url} did not answer within {timeout:.0f} s")


async def _announce_placeholder(
    tracker_url: str, ref: str, pieces: int, token: str | None = None
) -> None:
    client = TrackerClient(tracker_url, key=ClusterKey(token.encode() if token else None))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.announce(
                    Announce(
                        ref=ref,
                        peer_id=b"placeholder-not-peer",
                        port=1,
                        host="127.0.0.1",
                        have=Bitfield(pieces).to_bytes(),
                    )
                )
                return
            except TrackerError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.close()


def swarm_transfer(
    work: Path, size: int, piece_size: int | None, fsync: bool, token: str | None = None
) -> dict[str, Any]:
    """Serve ``size`` bytes from one complete peer to one empty peer; return the fetcher's JSON.

    With ``token``, every process holds it (``SWARM_TOKEN``): the catalog entry is
    signed, announces and requests carry MACs, and the peers prove it to each other.
    """
    origin = work / "origin" / NAME
    origin.mkdir(parents=True)
    rng = random.Random(7)
    per_file = -(-size // FILES)
    left = size
    for i in range(FILES):
        n = min(per_file, left)
        left -= n
        with open(origin / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors", "wb") as f:
            while n:
                step = min(n, 64 * MIB)
                f.write(rng.randbytes(step))
                n -= step
    catalog = f"file://{work / 'catalog'}"
    publish = [*_cli(), "publish", f"file://{origin}", "--name", NAME, "--catalog", catalog]
    if piece_size:
        publish += ["--piece-size", str(piece_size)]
    info = _run_json([*publish, "--json"], "swarm publish", token=token)
    seed_dest, fetch_dest = work / "seed", work / "fetch"
    prepare = [*_cli(), "fetch", NAME, "--catalog", catalog, "--dest", str(seed_dest)]
    _run_json(
        [*prepare, "--direct", "--json", "--no-fsync"],
        "swarm fetch --direct (preparing the serving peer)",
        token=token,
    )
    port = free_port()
    tracker_url = f"http://127.0.0.1:{port}"
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            stdout=open(logs / f"{log}.out", "wb"),  # noqa: SIM115 - the child owns it
            stderr=open(logs / f"{log}.err", "wb"),  # noqa: SIM115
            cwd=REPO_ROOT,
            env=_env(token),
        )
        procs.append(proc)
        return proc

    peer_args = ["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1", "--json"]
    if not fsync:
        peer_args.append("--no-fsync")
    server_argv = [*_cli(), "fetch", NAME, "--tracker", tracker_url, "--dest", str(seed_dest)]
    fetcher_argv = [*_cli(), "fetch", NAME, "--tracker", tracker_url, "--dest", str(fetch_dest)]
    tracker_argv = [*_cli(), "tracker", "--listen", f"127.0.0.1:{port}", "--catalog", catalog]
    try:
        tracker = start([*tracker_argv, "--peer-ttl", "300"], "tracker")
        _wait_healthy(tracker_url, tracker)
        # A serving peer alone in a swarm sees it complete and leaves at once; an
        # announced, unfinished placeholder (nothing listens on its port) keeps the
        # swarm open until the fetching peer has joined.
        asyncio.run(_announce_placeholder(tracker_url, info["ref"], info["pieces"], token))
        server = start([*server_argv, "--linger", "300", *peer_args], "server")
        deadline = time.monotonic() + 60
        while True:
            status = _swarm_status(tracker_url, info["root"], token)
            if status.get("present_pieces") == info["pieces"]:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(
                    f"the serving peer never announced its complete copy (logs in {logs})"
                )
            time.sleep(0.1)
        fetcher = start([*fetcher_argv, "--linger", "0", *peer_args], "fetcher")
        if fetcher.wait(timeout=600) != 0:
            raise BenchmarkError(
                f"fetching peer exited with {fetcher.returncode}: "
                f"{(logs / 'fetcher.err').read_text(errors='replace')[-500:]}"
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result = dict(json.loads((logs / "fetcher.out").read_text().strip().splitlines()[-1]))
    if not result.get("verified"):
        raise BenchmarkError("the fetching peer did not report a verified artifact")
    if result["origin_bytes"] != 0 or result["peer_bytes"] != size:
        raise BenchmarkError(
            f"expected every byte from the serving peer, got origin {result['origin_bytes']}, "
            f"peers {result['peer_bytes']}"
        )
    result["piece_size"] = info["piece_size"]
    return result


def run(
    size: int = GIB,
    *,
    piece_size: int | None = None,
    fsync: bool = False,
    workdir: Path | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Both measurements; the JSON written to ``benchmarks/results/dataplane-<date>.json``."""
    work = Path(tempfile.mkdtemp(prefix="swarm-dataplane-", dir=workdir))
    try:
        raw_before = raw_socket_mbps(size)
        disk_before = disk_write_mbps(work, size)
        fetched = swarm_transfer(work, size, piece_size, fsync)
        raw_after = raw_socket_mbps(size)
        disk_after = disk_write_mbps(work, size)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    swarm_mbps = size / float(fetched["seconds"]) / 1e6
    raw = max(raw_before, raw_after)
    disk = max(disk_before, disk_after)
    return dataplane_result(
        size=size,
        swarm_mbps=swarm_mbps,
        raw_socket_mbps=raw,
        date=dt.date.today(),
        extra={
            "raw_socket_runs_mbps": [round(raw_before, 1), round(raw_after, 1)],
            "disk_write_mbps": round(disk, 1),
            "disk_write_runs_mbps": [round(disk_before, 1), round(disk_after, 1)],
            "ratio_to_disk_write": round(swarm_mbps / disk, 3),
            "swarm_seconds": round(float(fetched["seconds"]), 3),
            "piece_size": fetched["piece_size"],
            "fsync": fsync,
            "verified": True,
        },
    )


def dataplane_result(
    *,
    size: int,
    swarm_mbps: float,
    raw_socket_mbps: float,
    date: dt.date,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "dataplane",
        "date": date.isoformat(),
        "model_bytes": size,
        "swarm_mbps": round(swarm_mbps, 1),
        "raw_socket_mbps": round(raw_socket_mbps, 1),
        "ratio": round(swarm_mbps / raw_socket_mbps, 3),
    }
    if extra:
        out.update(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane")
    parser.add_argument("--size", type=parse_size, default=GIB)
    parser.add_argument("--piece-size", type=parse_size)
    parser.add_argument("--fsync", action="store_true", help="flush each piece (default: no)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument("--raw-receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_receiver is not None:
        asyncio.run(_receive(sys.stdout, args.raw_receiver))
        return 0
    result = run(
        args.size,
        piece_size=args.piece_size,
        fsync=args.fsync,
        workdir=args.workdir,
        keep=args.keep,
    )
    path = args.results_dir / f"dataplane-{result['date']}.json"
    write_result(path, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
