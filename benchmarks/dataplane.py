"""Data-plane benchmark: one peer serves F bytes (default 1 GiB) to one other over loopback,
set against the floor pipeline measured in the same run.

**The floor pipeline** is the least any receiver must do with each byte. A receiver
process reads with ``recv_into`` into a reused, pre-touched, page-aligned 4 MiB
buffer until it is full, hashes the buffer with blake3 (the ``blake3`` package, one
thread) and writes it with ``pwrite`` and O_DIRECT into a file in the run's
temporary directory (space reserved with ``posix_fallocate`` before the connection
is accepted, as the piece store does; where the file system refuses O_DIRECT the
writes go through the page cache and ``direct_io`` says so). A sender process
``sendall``s a pre-touched 4 MiB chunk until F bytes are sent. The receiver times
itself from ``accept`` to its last write. Each process reports, as one JSON line on
stdout, its own ``getrusage(RUSAGE_SELF)`` user + system CPU (the whole process:
interpreter start-up included, a few hundredths of a second; the receiver also
reports what it had used at ``accept``, giving ``cpu_s_per_gib_received_after_startup``)
and the receiver its peak RSS (``VmHWM``, see ``peak_rss_kib``). The floor is
measured before and after the swarm runs; the floor is the better of the two for
each figure (highest MB/s, lowest CPU per GiB), the conservative choice for the
swarm's ratios. Two more references, before and after as well: the same sender
with a receiver that only reads (``recv_into``) gives the raw-socket rate
(``raw_socket``); the floor pipeline with a sender that first reads each chunk with
O_DIRECT from a file on the same disk gives ``floor_disk_source``. The serving
peer reads its blocks that way, from the disk the fetching peer writes to, and on
a virtual disk that contention alone can halve the O_DIRECT write rate; each swarm
entry has its ``throughput_vs_disk_source_floor`` too (not a target).

**The swarm transfer** is the real thing: a ``swarm tracker`` and two ``swarm
fetch --tracker`` processes on 127.0.0.1, once per piece size (``--piece-sizes``,
default 4 MiB and 256 MiB, each published with ``swarm publish --piece-size`` from
the same ``file://`` origin into a catalog of its own). The serving peer's
destination is already complete (filled by ``swarm fetch --direct``), so it only
uploads; the fetching peer (``--linger 0``) receives every block from it, verifies
it with blake3 and writes it to disk (``--no-fsync`` unless ``--fsync``). Each
transfer has a fresh tracker and an empty destination. For each piece size:

- ``mbps``: F ÷ the ``seconds`` the fetching peer reports (its peer engine's start
  to the verified, complete artifact), in MB/s (10^6 bytes per second);
- ``cpu_s_per_gib_received``: the fetching process's user + system CPU seconds
  from ``os.wait4`` on its pid, per GiB (2^30 bytes) received. This is the whole
  process, its start-up included (interpreter, imports, manifest look-up: ~0.3-0.5
  CPU-s); ``cpu_s_per_gib_received_after_startup`` leaves out the CPU it had used
  when its peer engine started (``/proc/PID/stat`` sampled every 20 ms while it
  runs, interpolated at the ``startup_seconds`` it reports, after launch);
- ``cpu_s_per_gib_served``: the serving process keeps running (it lingers), so its
  CPU is ``utime + stime`` from ``/proc/PID/stat`` (``SC_CLK_TCK`` ticks) read just
  before the fetching process starts and just after it exits, per GiB served;
- ``loop_cpu_s_per_gib_received``: the CPU of the fetching process's main thread
  (its event loop: every socket read, the session, the framing) after start-up,
  per GiB, from ``/proc/PID/task/PID/stat`` sampled every 20 ms (the last sample
  misses at most its final 20 ms). One thread can spend at most one CPU-second a
  second, so this caps the node at 1 ÷ it GiB/s whatever its cores: the
  simulator's ``loop_s_per_gib``;
- ``peak_rss_mib``: the fetching process's peak RSS, ``VmHWM`` from
  ``/proc/PID/status`` sampled every 20 ms until it exits (not ``wait4``'s
  ``ru_maxrss``, which starts from this parent's high-water mark).

**Ratios**, for each piece size: ``throughput`` (swarm MB/s ÷ floor MB/s), ``cpu``
(swarm CPU-s per GiB received ÷ the floor receiver's), ``cpu_after_startup`` (the
same, start-up left out on both sides) and ``cpu_served`` (÷ the floor sender's
CPU-s per GiB sent); across piece sizes, ``large_over_small_piece_speed`` (the
largest piece size's MB/s ÷ the smallest's). ``targets`` states, as data and not
asserted, what the data plane should reach, each with the measured value and
``met``: throughput ≥ 0.75 × floor, CPU per GiB received (whole process) ≤ 1.3 ×
floor, 256 MiB pieces ≥ 0.95 × the speed of 4 MiB pieces, and the fetching peer's
peak RSS < 250 MiB.

With ``--rounds N`` every swarm transfer is repeated N times (piece sizes in
alternating order) and each figure is the median of its rounds. ``--workers 1,2``
asks for runs with that many data-plane workers per peer (passed to both peers);
when ``swarm fetch --help`` has no ``--workers`` option the result records
``"supported": false`` ("not supported by this swarm build") and each piece size
runs once with the build's own data path.

``notes`` is free text (``--notes``); ``host`` has the load average at the start
and the end. The top-level ``swarm_mbps`` (the slowest piece size's MB/s; its
``piece_size``), ``raw_socket_mbps`` and ``ratio`` (their quotient) keep the form
of older results, which ``benchmarks.run_all`` renders into the README.

``python -m benchmarks.dataplane [--size 1GiB] [--piece-sizes 4MiB,256MiB]
[--rounds 1] [--workers 1,2] [--notes TEXT] [--results-dir DIR]`` writes
``benchmarks/results/dataplane-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import itertools
import json
import mmap
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

# Only light imports at module level: the floor's receiver and sender are this
# module run as processes, and must carry no more than their pipeline does.
from benchmarks.errors import BenchmarkError
from core.units import format_size, parse_size

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK = 4 * MIB
_ALIGN = 4096  # O_DIRECT's offsets, lengths and buffers: whole pages
FILES = 4
NAME = "bench-dataplane"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PIECE_SIZES = (4 * MIB, 256 * MIB)
FETCH_TIMEOUT = 600.0
SAMPLE_INTERVAL = 0.02
NOT_SUPPORTED = "not supported by this swarm build"

# What the data plane should reach, relative to the floor measured in the same run.
TARGET_THROUGHPUT_RATIO = 0.75  # swarm MB/s ÷ floor MB/s, at least
TARGET_CPU_RATIO = 1.3  # swarm CPU-s per GiB received ÷ floor's, at most
TARGET_PIECE_SPEED_RATIO = 0.95  # largest piece size's MB/s ÷ smallest's, at least
TARGET_PEAK_RSS_MIB = 250.0  # the fetching peer's peak RSS, below


# --- the floor: two minimal processes ------------------------------------------------------


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return float(usage.ru_utime + usage.ru_stime)


def peak_rss_kib(pid: int | str = "self") -> int | None:
    """A live process's peak resident set (``VmHWM`` in ``/proc/PID/status``), in KiB.

    Not ``ru_maxrss``: Linux carries the high-water mark of the process that forked
    a child over its ``exec``, so a child's ``ru_maxrss`` is at least its parent's.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a zombie: its memory is gone


def _report(out: IO[str], **fields: Any) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fields.update(cpu_seconds=_cpu_seconds(usage), peak_rss_kib=peak_rss_kib())
    print(json.dumps(fields), file=out, flush=True)


def _touched_buffer(fill: bytes) -> mmap.mmap:
    """A page-aligned buffer of CHUNK bytes, every page already faulted in."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(fill)
    return buf


def _open_for_direct_write(path: Path, size: int) -> tuple[int, bool]:
    """``path`` created with ``size`` bytes reserved, opened with O_DIRECT where allowed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with contextlib.suppress(OSError):  # no reservation here: the writes allocate
        os.posix_fallocate(fd, 0, size)
    os.close(fd)
    if not hasattr(os, "O_DIRECT"):
        return os.open(path, os.O_WRONLY), False
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_WRONLY), False


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class _FloorFile:
    """Where the floor's receiver writes: O_DIRECT for whole aligned blocks, the page
    cache for a file's unaligned tail, and for everything once O_DIRECT is refused."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.fd, self.direct = _open_for_direct_write(path, size)
        self._buffered = -1

    def _buffered_fd(self) -> int:
        if self._buffered < 0:
            self._buffered = os.open(self.path, os.O_WRONLY)
        return self._buffered

    def write(self, data: memoryview, offset: int) -> None:
        aligned = len(data) - len(data) % _ALIGN
        if self.direct and aligned:
            try:
                _pwrite_all(self.fd, data[:aligned], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # e.g. a file system that opens O_DIRECT but refuses it
                _pwrite_all(self._buffered_fd(), data[:aligned], offset)
            data, offset = data[aligned:], offset + aligned
        if data:
            _pwrite_all(self._buffered_fd() if self.direct else self.fd, data, offset)

    def close(self) -> None:
        for fd in (self.fd, self._buffered):
            if fd >= 0:
                os.close(fd)


def floor_receiver(total: int, path: Path | None, out: IO[str]) -> None:
    """Receive ``total`` bytes on a fresh loopback port (printed first) into a reused
    4 MiB buffer; with ``path``, hash each full buffer with blake3 and write it there
    with O_DIRECT. Prints one JSON line: seconds, CPU seconds, peak RSS, direct_io."""
    buf = _touched_buffer(b"\x01" * CHUNK)
    view = memoryview(buf)
    target = _FloorFile(path, total) if path is not None else None
    if target is not None:
        import blake3  # only here: the sender and the raw-socket receiver don't hash
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    print(server.getsockname()[1], file=out, flush=True)
    conn, _ = server.accept()
    started = time.monotonic()
    startup_cpu = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
    server.close()
    got = 0
    digest = b""
    try:
        while got < total:
            want = min(CHUNK, total - got)
            filled = 0
            while filled < want:
                n = conn.recv_into(view[filled:want])
                if n == 0:
                    raise BenchmarkError(f"the floor's sender closed after {got + filled} bytes")
                filled += n
            if target is not None:
                digest = blake3.blake3(view[:want]).digest()
                target.write(view[:want], got)
            got += want
        seconds = time.monotonic() - started
    finally:
        conn.close()
        if target is not None:
            target.close()
        view.release()
        buf.close()
    _report(
        out,
        bytes=got,
        seconds=seconds,
        startup_cpu_seconds=startup_cpu,
        direct_io=target is not None and target.direct,
        last_digest=digest.hex(),
    )


def floor_sender(port: int, total: int, out: IO[str], source: Path | None = None) -> None:
    """Send ``total`` bytes to 127.0.0.1:``port`` from one pre-touched 4 MiB chunk; with
    ``source``, each chunk is first read from that file with O_DIRECT (as the serving
    peer reads its blocks) into the chunk's buffer."""
    buf = _touched_buffer(random.Random(1).randbytes(CHUNK))
    view = memoryview(buf)
    fd = -1
    if source is not None:
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(source, os.O_RDONLY)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            started = time.monotonic()
            sent = 0
            while sent < total:
                n = min(CHUNK, total - sent)
                if fd >= 0 and os.preadv(fd, [view], sent) < n:
                    raise BenchmarkError(f"{source} is shorter than {total} bytes")
                sock.sendall(view[:n])
                sent += n
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver closes once everything is written
            seconds = time.monotonic() - started
    finally:
        if fd >= 0:
            os.close(fd)
        view.release()
        buf.close()
    _report(out, bytes=sent, seconds=seconds)


def write_floor_source(path: Path, size: int) -> None:
    """``size`` bytes in ``path`` for a floor sender that reads from disk."""
    buf = _touched_buffer(random.Random(2).randbytes(CHUNK))
    target = _FloorFile(path, size)
    try:
        for offset in range(0, size, CHUNK):
            target.write(memoryview(buf)[: min(CHUNK, size - offset)], offset)
    finally:
        target.close()
        buf.close()


def _last_json(text: str, what: str) -> dict[str, Any]:
    lines = text.strip().splitlines()
    if not lines:
        raise BenchmarkError(f"{what} printed nothing")
    return dict(json.loads(lines[-1]))


def floor_run(
    work: Path, total: int, *, pipeline: bool = True, source: Path | None = None
) -> dict[str, Any]:
    """One floor measurement (``pipeline=False``: the raw socket, nothing hashed or
    written; ``source``: the sender reads each chunk from that file with O_DIRECT);
    MB/s, CPU seconds per GiB received and sent, the receiver's peak RSS."""
    target = work / "floor.bin"
    role = [sys.executable, "-m", "benchmarks.dataplane"]
    receiver_argv = [*role, "--floor-receiver", str(total)]
    if pipeline:
        receiver_argv += ["--floor-file", str(target)]
    receiver = subprocess.Popen(
        receiver_argv, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=_env()
    )
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        sender_argv = [*role, "--floor-sender", str(port), str(total)]
        if source is not None:
            sender_argv += ["--floor-source", str(source)]
        sender = subprocess.Popen(
            sender_argv,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=_env(),
        )
        sent_out, _ = sender.communicate(timeout=FETCH_TIMEOUT)
        got_out, _ = receiver.communicate(timeout=60)
        if sender.returncode != 0 or receiver.returncode != 0:
            raise BenchmarkError(
                f"floor processes exited with {sender.returncode} (sender) and "
                f"{receiver.returncode} (receiver)"
            )
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        target.unlink(missing_ok=True)
    got = _last_json(got_out, "the floor's receiver")
    sent = _last_json(sent_out, "the floor's sender")
    if got["bytes"] != total or sent["bytes"] != total:
        raise BenchmarkError(f"floor moved {got['bytes']} of {total} bytes")
    gib = total / GIB
    run: dict[str, Any] = {
        "mbps": round(total / got["seconds"] / 1e6, 1),
        "seconds": round(got["seconds"], 3),
        "cpu_s_per_gib_received": round(got["cpu_seconds"] / gib, 3),
        "cpu_s_per_gib_received_after_startup": round(
            (got["cpu_seconds"] - got["startup_cpu_seconds"]) / gib, 3
        ),
        "cpu_s_per_gib_sent": round(sent["cpu_seconds"] / gib, 3),
        "receiver_cpu_seconds": round(got["cpu_seconds"], 3),
        "receiver_startup_cpu_seconds": round(got["startup_cpu_seconds"], 3),
        "sender_cpu_seconds": round(sent["cpu_seconds"], 3),
        "peak_rss_mib": round(got["peak_rss_kib"] / 1024, 1),
    }
    if pipeline:
        run["direct_io"] = bool(got["direct_io"])
    return run


# --- swarm -----------------------------------------------------------------------------


def _env(token: str | None = None) -> dict[str, str]:
    from core.auth import TOKEN_ENV

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop(TOKEN_ENV, None)
    # An installed swarm runs from cached bytecode (pip compiles it at install); a
    # shell that says PYTHONDONTWRITEBYTECODE would have every process compile this
    # checkout's modules from source again, ~0.07 CPU-s of start-up each here.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if token:
        env[TOKEN_ENV] = token
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "cli"]


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
    return _last_json(proc.stdout, what)


def fetch_worker_option() -> str | None:
    """The ``swarm fetch`` option that sets data-plane workers, or None if this build has none."""
    proc = subprocess.run(
        [*_cli(), "fetch", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**_env(), "COLUMNS": "200", "NO_COLOR": "1"},
        check=False,
    )
    return "--workers" if "--workers " in proc.stdout else None


def _swarm_status(tracker: str, root: str, token: str | None = None) -> dict[str, Any]:
    import asyncio

    from core.auth import ClusterKey
    from core.errors import TrackerError
    from swarm.announce import TrackerClient

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
    import urllib.error
    import urllib.request

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


def announce_placeholder(tracker_url: str, ref: str, pieces: int, token: str | None) -> None:
    import asyncio

    from core.auth import ClusterKey
    from core.bitfield import Bitfield
    from core.errors import TrackerError
    from swarm.announce import Announce, TrackerClient

    async def announce() -> None:
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

    asyncio.run(announce())


def _proc_cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU of a live process (or of its ``thread``) from ``/proc``; None
    once it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_at(samples: Sequence[tuple[float, float]], at: float) -> float | None:
    """The CPU seconds a sampled process had used ``at`` seconds after launch (linear
    between the samples around it); None without a sample on both sides."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= at <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (at - t0) / (t1 - t0)
    return None


def write_origin(origin: Path, size: int) -> None:
    """``size`` random bytes in FILES safetensors-named files under ``origin``."""
    origin.mkdir(parents=True)
    rng = random.Random(7)
    per_file = -(-size // FILES)
    left = size
    for i in range(FILES):
        n = min(per_file, left)
        left -= n
        with open(origin / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors", "wb") as f:
            while n:
                step = min(n, CHUNK)  # small steps: children inherit nothing big
                f.write(rng.randbytes(step))
                n -= step


def prepare_serving_peer(
    work: Path, origin: Path, piece_size: int | None, token: str | None = None
) -> dict[str, Any]:
    """Publish ``origin`` with ``piece_size`` into a catalog of its own and fill a serving
    peer's destination with ``swarm fetch --direct``; the publish JSON plus
    ``catalog`` and ``seed_dest``."""
    tag = f"{piece_size}" if piece_size else "default"
    catalog = f"file://{work / f'catalog-{tag}'}"
    publish = [*_cli(), "publish", f"file://{origin}", "--name", NAME, "--catalog", catalog]
    if piece_size:
        publish += ["--piece-size", str(piece_size)]
    info = _run_json([*publish, "--json"], "swarm publish", token=token)
    seed_dest = work / f"seed-{tag}"
    direct = ["--dest", str(seed_dest), "--direct", "--json", "--no-fsync"]
    _run_json(
        [*_cli(), "fetch", NAME, "--catalog", catalog, *direct],
        "swarm fetch --direct (preparing the serving peer)",
        token=token,
    )
    return {**info, "catalog": catalog, "seed_dest": str(seed_dest)}


def _wait_measured(
    proc: subprocess.Popen[bytes], launched: float, timeout: float
) -> tuple[int, float, int, list[tuple[float, float]], list[tuple[float, float]]]:
    """Wait for ``proc`` with ``os.wait4``, sampling its CPU and peak RSS from ``/proc``
    meanwhile: its exit code, CPU seconds (from ``wait4``), the last peak RSS seen
    (KiB; ``VmHWM`` only grows, so the last sample misses at most the final 20 ms)
    and (seconds since launch, CPU seconds) samples of the process and of its main
    thread."""
    samples: list[tuple[float, float]] = [(0.0, 0.0)]
    main: list[tuple[float, float]] = [(0.0, 0.0)]
    peak = 0
    deadline = launched + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        now = time.monotonic()
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            samples.append((now - launched, _cpu_seconds(usage)))
            return proc.returncode, _cpu_seconds(usage), peak, samples, main
        cpu = _proc_cpu_seconds(proc.pid)
        if cpu is not None:
            samples.append((now - launched, cpu))
        cpu = _proc_cpu_seconds(proc.pid, thread=proc.pid)
        if cpu is not None:
            main.append((now - launched, cpu))
        peak = max(peak, peak_rss_kib(proc.pid) or 0)
        if now > deadline:
            raise BenchmarkError(f"the fetching peer did not finish within {timeout:.0f} s")
        time.sleep(SAMPLE_INTERVAL)


def transfer(
    work: Path,
    prepared: dict[str, Any],
    size: int,
    *,
    fsync: bool = False,
    token: str | None = None,
    peer_options: Sequence[str] = (),
) -> dict[str, Any]:
    """Serve the prepared artifact from its complete peer to an empty one through a fresh
    tracker; the fetching peer's JSON plus the measured ``fetcher_cpu_seconds``,
    ``fetcher_peak_rss_kib``, ``startup_cpu_seconds`` and ``server_cpu_seconds``."""
    from seeder.local_s3 import free_port

    catalog, seed_dest = prepared["catalog"], prepared["seed_dest"]
    fetch_dest = Path(tempfile.mkdtemp(prefix="fetch-", dir=work))
    port = free_port()
    tracker_url = f"http://127.0.0.1:{port}"
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=work))
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

    peer_args = ["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1", "--json", *peer_options]
    if not fsync:
        peer_args.append("--no-fsync")
    fetch = [*_cli(), "fetch", NAME, "--tracker", tracker_url]
    tracker_argv = [*_cli(), "tracker", "--listen", f"127.0.0.1:{port}", "--catalog", catalog]
    try:
        tracker = start([*tracker_argv, "--peer-ttl", "300"], "tracker")
        _wait_healthy(tracker_url, tracker)
        # A serving peer alone in a swarm sees it complete and leaves at once; an
        # announced, unfinished placeholder (nothing listens on its port) keeps the
        # swarm open until the fetching peer has joined.
        announce_placeholder(tracker_url, prepared["ref"], prepared["pieces"], token)
        server = start([*fetch, "--dest", seed_dest, "--linger", "300", *peer_args], "server")
        deadline = time.monotonic() + 60
        while (
            _swarm_status(tracker_url, prepared["root"], token).get("present_pieces")
            != (prepared["pieces"])
        ):
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(
                    f"the serving peer never announced its complete copy (logs in {logs})"
                )
            time.sleep(0.1)
        server_cpu_before = _proc_cpu_seconds(server.pid)
        launched = time.monotonic()
        fetcher = start([*fetch, "--dest", str(fetch_dest), "--linger", "0", *peer_args], "fetcher")
        code, fetcher_cpu, fetcher_peak, samples, main = _wait_measured(
            fetcher, launched, FETCH_TIMEOUT
        )
        server_cpu_after = _proc_cpu_seconds(server.pid)
        if code != 0:
            raise BenchmarkError(
                f"fetching peer exited with {code}: "
                f"{(logs / 'fetcher.err').read_text(errors='replace')[-500:]}"
            )
        if server_cpu_before is None or server_cpu_after is None:
            raise BenchmarkError(f"the serving peer exited during the transfer (logs in {logs})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result = _last_json((logs / "fetcher.out").read_text(), "the fetching peer")
    if not result.get("verified"):
        raise BenchmarkError("the fetching peer did not report a verified artifact")
    if result["origin_bytes"] != 0 or result["peer_bytes"] != size:
        raise BenchmarkError(
            f"expected every byte from the serving peer, got origin {result['origin_bytes']}, "
            f"peers {result['peer_bytes']}"
        )
    shutil.rmtree(fetch_dest, ignore_errors=True)
    startup = result.get("startup_seconds")
    result.update(
        piece_size=prepared["piece_size"],
        fetcher_cpu_seconds=fetcher_cpu,
        fetcher_peak_rss_kib=fetcher_peak,
        startup_cpu_seconds=None if startup is None else _cpu_at(samples, float(startup)),
        loop_cpu_seconds=(
            None
            if startup is None or (at := _cpu_at(main, float(startup))) is None
            else main[-1][1] - at
        ),
        server_cpu_seconds=server_cpu_after - server_cpu_before,
        logs=str(logs),
    )
    return result


def swarm_transfer(
    work: Path, size: int, piece_size: int | None, fsync: bool, token: str | None = None
) -> dict[str, Any]:
    """Serve ``size`` bytes from one complete peer to one empty peer; return the fetcher's
    JSON (with the measurements ``transfer`` adds). Everything from scratch in ``work``.

    With ``token``, every process holds it (``SWARM_TOKEN``): the catalog entry is
    signed, announces and requests carry MACs, and the peers prove it to each other.
    """
    origin = work / "origin" / NAME
    write_origin(origin, size)
    prepared = prepare_serving_peer(work, origin, piece_size, token)
    return transfer(work, prepared, size, fsync=fsync, token=token)


def swarm_run(
    fetched: dict[str, Any], size: int, workers: int | None, round_: int
) -> dict[str, Any]:
    """The figures of one swarm transfer (``transfer``'s result) for the result JSON."""
    gib = size / GIB
    seconds = float(fetched["seconds"])
    startup_cpu = fetched.get("startup_cpu_seconds")
    fetcher_cpu = float(fetched["fetcher_cpu_seconds"])
    return {
        "piece_size": int(fetched["piece_size"]),
        "workers": workers,
        "round": round_,
        "mbps": round(size / seconds / 1e6, 1),
        "seconds": round(seconds, 3),
        "cpu_s_per_gib_received": round(fetcher_cpu / gib, 3),
        "cpu_s_per_gib_received_after_startup": (
            None if startup_cpu is None else round((fetcher_cpu - startup_cpu) / gib, 3)
        ),
        "cpu_s_per_gib_served": round(float(fetched["server_cpu_seconds"]) / gib, 3),
        "loop_cpu_s_per_gib_received": (
            None
            if fetched.get("loop_cpu_seconds") is None
            else round(float(fetched["loop_cpu_seconds"]) / gib, 3)
        ),
        "peak_rss_mib": round(int(fetched["fetcher_peak_rss_kib"]) / 1024, 1),
        "fetcher_cpu_seconds": round(fetcher_cpu, 3),
        "startup_seconds": fetched.get("startup_seconds"),
        "startup_cpu_seconds": None if startup_cpu is None else round(startup_cpu, 3),
        "server_cpu_seconds": round(float(fetched["server_cpu_seconds"]), 3),
    }


# --- the result (pure) -----------------------------------------------------------------------


def best_floor(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The floor from its runs: the best of each figure (highest MB/s, lowest CPU and RSS)."""
    if not runs:
        raise ValueError("the floor needs at least one run")
    out: dict[str, Any] = {
        "mbps": max(r["mbps"] for r in runs),
        "cpu_s_per_gib_received": min(r["cpu_s_per_gib_received"] for r in runs),
        "cpu_s_per_gib_received_after_startup": min(
            r.get("cpu_s_per_gib_received_after_startup", r["cpu_s_per_gib_received"]) for r in runs
        ),
        "cpu_s_per_gib_sent": min(r["cpu_s_per_gib_sent"] for r in runs),
        "peak_rss_mib": min(r["peak_rss_mib"] for r in runs),
    }
    if any("direct_io" in r for r in runs):
        out["direct_io"] = all(r.get("direct_io", False) for r in runs)
    return out


_SWARM_FIGURES = (
    "mbps",
    "seconds",
    "cpu_s_per_gib_received",
    "cpu_s_per_gib_received_after_startup",
    "cpu_s_per_gib_served",
    "loop_cpu_s_per_gib_received",
    "peak_rss_mib",
)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else round(num / den, 3)


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, target: value >= target,
    "<=": lambda value, target: value <= target,
    "<": lambda value, target: value < target,
}


def _target(what: str, config: str, value: float | None, op: str, target: float) -> dict[str, Any]:
    met = None if value is None else _OPS[op](value, target)
    return {"what": what, "config": config, "value": value, "op": op, "target": target, "met": met}


def build_result(
    *,
    size: int,
    date: dt.date,
    floor_runs: Sequence[dict[str, Any]],
    swarm_runs: Sequence[dict[str, Any]],
    raw_socket_runs: Sequence[dict[str, Any]] = (),
    disk_source_runs: Sequence[dict[str, Any]] = (),
    workers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result JSON from the measured runs: the floor, each swarm configuration (piece
    size × workers) with the medians of its rounds and its ratios to the floor, the
    piece-size speed ratio, the targets, and the top-level keys ``dataplane_result`` makes."""
    if not swarm_runs:
        raise ValueError("no swarm run to report")
    floor = best_floor(floor_runs)
    disk_source = best_floor(disk_source_runs) if disk_source_runs else None
    configs: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for run in swarm_runs:
        configs.setdefault((run["piece_size"], run["workers"]), []).append(run)
    swarm: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    for (piece_size, n_workers), runs in sorted(
        configs.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)
    ):
        entry: dict[str, Any] = {"piece_size": piece_size, "workers": n_workers}
        entry.update({k: _median([r.get(k) for r in runs]) for k in _SWARM_FIGURES})
        entry["ratios"] = {
            "throughput": _ratio(entry["mbps"], floor["mbps"]),
            "cpu": _ratio(entry["cpu_s_per_gib_received"], floor["cpu_s_per_gib_received"]),
            "cpu_after_startup": _ratio(
                entry["cpu_s_per_gib_received_after_startup"],
                floor["cpu_s_per_gib_received_after_startup"],
            ),
            "cpu_served": _ratio(entry["cpu_s_per_gib_served"], floor["cpu_s_per_gib_sent"]),
        }
        if disk_source is not None:
            entry["ratios"]["throughput_vs_disk_source_floor"] = _ratio(
                entry["mbps"], disk_source["mbps"]
            )
        entry["runs"] = list(runs)
        swarm.append(entry)
        config = format_size(piece_size) + ("" if n_workers is None else f", {n_workers} workers")
        targets += [
            _target(
                "throughput ÷ floor",
                config,
                entry["ratios"]["throughput"],
                ">=",
                TARGET_THROUGHPUT_RATIO,
            ),
            _target(
                "CPU-s per GiB received ÷ floor",
                config,
                entry["ratios"]["cpu"],
                "<=",
                TARGET_CPU_RATIO,
            ),
            _target("peak RSS MiB", config, entry["peak_rss_mib"], "<", TARGET_PEAK_RSS_MIB),
        ]
    piece_speed: list[dict[str, Any]] = []
    for n_workers in sorted({e["workers"] for e in swarm}, key=lambda w: w or 0):
        same = [e for e in swarm if e["workers"] == n_workers]
        small, large = same[0], same[-1]
        if small is large:
            continue
        value = _ratio(large["mbps"], small["mbps"])
        config = f"{format_size(large['piece_size'])} ÷ {format_size(small['piece_size'])}"
        if n_workers is not None:
            config += f", {n_workers} workers"
        piece_speed.append({"config": config, "workers": n_workers, "value": value})
        targets.append(
            _target("large ÷ small piece speed", config, value, ">=", TARGET_PIECE_SPEED_RATIO)
        )
    slowest = min(swarm, key=lambda e: e["mbps"])
    raw = best_floor(raw_socket_runs) if raw_socket_runs else None
    out = dataplane_result(
        size=size,
        swarm_mbps=slowest["mbps"],
        raw_socket_mbps=raw["mbps"] if raw else floor["mbps"],
        date=date,
        extra={
            "piece_size": slowest["piece_size"],
            "floor": {**floor, "runs": list(floor_runs)},
            "swarm": swarm,
            "large_over_small_piece_speed": piece_speed,
            "targets": targets,
            "targets_met": all(t["met"] is True for t in targets),
            "workers": workers or {"requested": None},
        },
    )
    if disk_source is not None:
        out["floor_disk_source"] = {**disk_source, "runs": list(disk_source_runs)}
    if raw is not None:
        out["raw_socket"] = {**raw, "runs": list(raw_socket_runs)}
    else:
        out.pop("raw_socket_mbps")
        out.pop("ratio")
    if extra:
        out.update(extra)
    return out


def dataplane_result(
    *,
    size: int,
    swarm_mbps: float,
    raw_socket_mbps: float,
    date: dt.date,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The headline keys every data-plane result has (``benchmarks.run_all`` reads them)."""
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


# --- the run -----------------------------------------------------------------------------


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(
    size: int = GIB,
    *,
    piece_sizes: Sequence[int] = DEFAULT_PIECE_SIZES,
    rounds: int = 1,
    workers: Sequence[int] = (),
    fsync: bool = False,
    workdir: Path | None = None,
    keep: bool = False,
    notes: str | None = None,
) -> dict[str, Any]:
    """Floor, swarm transfers, floor again; the JSON for ``benchmarks/results/dataplane-<date>.json``."""
    from benchmarks.shaped import code_version

    if rounds < 1 or not piece_sizes:
        raise ValueError("need at least one round and one piece size")
    option = fetch_worker_option() if workers else None
    worker_counts: list[int | None] = list(workers) if option else [None]
    workers_info: dict[str, Any] = {"requested": list(workers) or None}
    if workers:
        workers_info.update(supported=option is not None, option=option)
        if option is None:
            workers_info["note"] = NOT_SUPPORTED
    load_start = _loadavg()
    work = Path(tempfile.mkdtemp(prefix="swarm-dataplane-", dir=workdir))
    floor_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    disk_source_runs: list[dict[str, Any]] = []
    swarm_runs: list[dict[str, Any]] = []
    source = work / "floor-source.bin"
    try:
        write_floor_source(source, size)
        raw_runs.append({**floor_run(work, size, pipeline=False), "when": "before"})
        floor_runs.append({**floor_run(work, size), "when": "before"})
        disk_source_runs.append({**floor_run(work, size, source=source), "when": "before"})
        origin = work / "origin" / NAME
        write_origin(origin, size)
        prepared = {p: prepare_serving_peer(work, origin, p) for p in piece_sizes}
        for round_ in range(rounds):
            order = list(piece_sizes) if round_ % 2 == 0 else list(reversed(piece_sizes))
            for piece_size in order:
                for n in worker_counts:
                    options = [option, str(n)] if option and n is not None else []
                    fetched = transfer(
                        work, prepared[piece_size], size, fsync=fsync, peer_options=options
                    )
                    swarm_runs.append(swarm_run(fetched, size, n, round_))
                    if not keep:
                        shutil.rmtree(fetched["logs"], ignore_errors=True)
        disk_source_runs.append({**floor_run(work, size, source=source), "when": "after"})
        floor_runs.append({**floor_run(work, size), "when": "after"})
        raw_runs.append({**floor_run(work, size, pipeline=False), "when": "after"})
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    extra: dict[str, Any] = {
        "rounds": rounds,
        "fsync": fsync,
        "verified": True,
        "host": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "code": code_version(),
    }
    if notes:
        extra["notes"] = notes
    return build_result(
        size=size,
        date=dt.date.today(),
        floor_runs=floor_runs,
        swarm_runs=swarm_runs,
        raw_socket_runs=raw_runs,
        disk_source_runs=disk_source_runs,
        workers=workers_info,
        extra=extra,
    )


def _sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def _counts(text: str) -> list[int]:
    counts = [int(s) for s in text.split(",") if s.strip()]
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("worker counts are positive integers")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane")
    parser.add_argument("--size", type=parse_size, default=GIB, help="bytes moved (F)")
    parser.add_argument(
        "--piece-sizes",
        type=_sizes,
        default=list(DEFAULT_PIECE_SIZES),
        help="comma-separated piece sizes of the swarm runs (default 4MiB,256MiB)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="swarm runs per configuration")
    parser.add_argument(
        "--workers", type=_counts, default=[], help="comma-separated data-plane worker counts"
    )
    parser.add_argument("--fsync", action="store_true", help="flush each piece (default: no)")
    parser.add_argument("--notes", help="free text for the result, e.g. the state of the host")
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument("--floor-receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-sender", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--floor-source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_receiver is not None:
        floor_receiver(args.floor_receiver, args.floor_file, sys.stdout)
        return 0
    if args.floor_sender is not None:
        port, total = args.floor_sender
        floor_sender(port, total, sys.stdout, args.floor_source)
        return 0
    from benchmarks.shaped import RESULTS_DIR, write_result

    result = run(
        args.size,
        piece_sizes=args.piece_sizes,
        rounds=args.rounds,
        workers=args.workers,
        fsync=args.fsync,
        workdir=args.workdir,
        keep=args.keep,
        notes=args.notes,
    )
    path = (args.results_dir or RESULTS_DIR) / f"dataplane-{result['date']}.json"
    write_result(path, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
