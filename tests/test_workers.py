"""Workers: received blocks checked and written on several threads at once.

``swarm fetch --workers N`` (default: the cores the process may use, affinity and
cgroup quota) sizes the pool that checks and writes received blocks; the store
takes concurrent ``write_block`` calls, endgame duplicates and lies included.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aio_helpers import run_bounded, wait_until
from fetch_helpers import swarm_argv

from core.cpus import usable_cores
from core.digest import block_layer
from core.errors import VerificationError
from core.manifest import Manifest
from swarm.announce import TrackerClient
from swarm.peer import PeerConfig, SwarmPeer
from swarm.picker import BlockRequest
from swarm.store import PieceStore
from swarm.verify import verify_dir

KIB = 1024
TIMEOUT = 20.0


def _manifest(data: bytes, origin: str, piece: int = 8 * KIB, block: int = KIB) -> Manifest:
    sizes = [("w.bin", len(data))]
    layers = [block_layer(data[o : o + n], block) for _, o, n in Manifest.layout(sizes, piece)]
    return Manifest.build(
        name="workers",
        origin=origin,
        piece_size=piece,
        files=sizes,
        block_size=block,
        layers=layers,
    )


# -- usable cores -------------------------------------------------------------------


def _cgroup(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_usable_cores_follow_the_affinity_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "none") == affinity
    assert usable_cores(_cgroup(tmp_path / "v2max", **{"cpu.max": "max 100000\n"})) == affinity
    assert usable_cores(_cgroup(tmp_path / "v2half", **{"cpu.max": "50000 100000\n"})) == 1
    one_and_a_half = _cgroup(tmp_path / "v2", **{"cpu.max": "150000 100000\n"})
    assert usable_cores(one_and_a_half) == min(affinity, 2)
    v1 = _cgroup(
        tmp_path / "v1", **{"cpu__cpu.cfs_quota_us": "100000\n", "cpu__cpu.cfs_period_us": "100000"}
    )
    assert usable_cores(v1) == 1
    unlimited = _cgroup(
        tmp_path / "v1u", **{"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000"}
    )
    assert usable_cores(unlimited) == affinity
    assert usable_cores(_cgroup(tmp_path / "bad", **{"cpu.max": "lots 0\n"})) == affinity


# -- the store under concurrent writes ----------------------------------------------


def test_concurrent_writers_with_racing_lies_leave_only_checked_bytes(tmp_path: Path) -> None:
    """Eight threads write every block of 16 pieces, each block twice or three
    times at once, a third of the copies corrupt: every piece verifies from the
    honest copies, every lie is refused, nothing is read back."""
    data = random.Random(5).randbytes(16 * 8 * KIB - 100)
    m = _manifest(data, "file:///nowhere")
    jobs: list[tuple[int, int, bytes, bool]] = []
    rng = random.Random(6)
    for index in range(m.num_pieces):
        p = m.piece(index)
        for offset in range(0, p.length, KIB):
            block = data[p.offset + offset : p.offset + min(offset + KIB, p.length)]
            copies = [(block, False)] + [
                (bytes([block[0] ^ 1]) + block[1:], True) for _ in range(rng.randint(0, 2))
            ]
            jobs += [(index, offset, b, lie) for b, lie in copies]
    rng.shuffle(jobs)
    with PieceStore(tmp_path, m, durable=False) as store:

        def write(job: tuple[int, int, bytes, bool]) -> tuple[bool, str]:
            index, offset, block, lie = job
            try:
                written = store.write_block(index, offset, memoryview(block))
            except VerificationError:
                return lie, "refused"
            return lie, "written" if written else "duplicate"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(write, jobs))
        # A lie is refused, or dropped unread when the honest copy got there first.
        assert {o for lie, o in outcomes if lie} <= {"refused", "duplicate"}
        assert {o for lie, o in outcomes if not lie} == {"written"}
        assert any(o == "refused" for _, o in outcomes)
        for index in range(m.num_pieces):
            assert store.verify_assembled(index), index
        assert store.read_back_bytes == 0
        store.finish()
    assert (tmp_path / "w.bin").read_bytes() == data
    assert verify_dir(tmp_path).ok


# -- the peer honours --workers -----------------------------------------------------


def _peer(tmp_path: Path, workers: int) -> tuple[SwarmPeer, TrackerClient]:
    data = random.Random(3).randbytes(16 * KIB)
    manifest = _manifest(data, (tmp_path / "origin").as_uri())
    tracker = TrackerClient("http://127.0.0.1:9")  # never called
    config = PeerConfig(listen_host="127.0.0.1", durable=False, direct_io=False, workers=workers)
    peer = SwarmPeer(manifest, tmp_path / "dest", tracker, config=config, rng=random.Random(1))
    return peer, tracker


@pytest.mark.parametrize("workers", [1, 3])
def test_the_peer_writes_as_many_blocks_at_once_as_it_has_workers(
    tmp_path: Path, workers: int
) -> None:
    """Blocks are handed to the workers as they arrive; a write that waits for
    ``workers`` writes to be under way at once passes only with that many threads."""
    under_way = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def slow_write(index: int, offset: int, data: memoryview) -> bool:
        nonlocal under_way, most
        with lock:
            under_way += 1
            most = max(most, under_way)
            if under_way == workers:
                release.set()
        release.wait(TIMEOUT)
        with lock:
            under_way -= 1
        return True

    async def main() -> None:
        peer, tracker = _peer(tmp_path, workers)
        assert peer.workers == workers
        peer.store.write_block = slow_write  # type: ignore[method-assign]
        try:
            for k in range(workers + 1):
                block = BlockRequest(k, 0, KIB)
                buf = mmap.mmap(-1, KIB)
                peer._received[(7, block)] = buf
                peer._store_block(7, block)
            await wait_until(release.is_set, "every worker writing at once", TIMEOUT)
            await wait_until(lambda: under_way == 0, "the writes to end", TIMEOUT)
        finally:
            release.set()
            await peer._shutdown()
            await tracker.close()

    run_bounded(main, TIMEOUT * 2)
    assert most == workers


def test_workers_default_to_the_usable_cores(tmp_path: Path) -> None:
    async def main() -> None:
        peer, tracker = _peer(tmp_path, 0)
        try:
            assert peer.workers == usable_cores()
        finally:
            await peer._shutdown()
            await tracker.close()

    run_bounded(main, TIMEOUT)


def test_fetch_refuses_a_negative_worker_count() -> None:
    done = subprocess.run(
        swarm_argv(
            "fetch", "m", "--tracker", "http://127.0.0.1:9", "--dest", "/tmp/x", "--workers", "-1"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--workers" in done.stderr
