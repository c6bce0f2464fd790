"""A killed fetch keeps the checked blocks of the pieces it had not finished.

Format 2 checks every block as it lands; the store records each one written in
``DEST/.swarm/<root>.blocks``. On open the recorded blocks of unfinished pieces are
read and checked again (the record is not flushed with the data), and those that
match count as received: a peer never asks for them again, an origin pull skips the
windows they fill, and a piece completed by them is never read back a second time.
The last two tests kill real ``swarm fetch`` processes part-way through a piece.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fetch_helpers import cli_env, fetch_args, publish, swarm, swarm_argv
from session_helpers import Harness, make_session, pid
from swarm_helpers import FetchProcess, Processes, TrackerProcess
from test_block_layers import FILES, KIB, blocks_of, piece_bytes, v2

from benchmarks.dataplane import announce_placeholder
from seeder.role import pull_piece
from swarm.session import Verify
from swarm.store import STATE_DIR, PieceStore, blocks_path
from swarm.verify import verify_dir

MiB = 1024 * 1024
KILL_WAIT = 30.0  # seconds a fetch may take to record the blocks the test waits for


def _kill_after_blocks(proc: subprocess.Popen[bytes], record: Path, blocks: int) -> int:
    """SIGKILL ``proc`` once its block record says ``blocks`` blocks are written; how many it said."""
    deadline = time.monotonic() + KILL_WAIT
    seen = 0
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the fetch ended ({proc.returncode}) before it was killed"
            try:
                seen = record.read_bytes().count(1)
            except OSError:
                seen = 0
            if seen >= blocks:
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"only {seen} blocks recorded after {KILL_WAIT:.0f} s")
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    return seen


# -- the store ---------------------------------------------------------------------------


def test_the_checked_blocks_of_an_unfinished_piece_survive_a_kill(tmp_path: Path) -> None:
    m = v2(FILES)
    store = PieceStore(tmp_path, m, durable=False)
    store.open()
    first, second = blocks_of(m, 1, KIB)
    assert store.write_block(1, *first)
    store.close()  # killed: nothing more is written, nothing flushed
    record = blocks_path(tmp_path, m.root_hex).read_bytes()
    assert len(record) == sum(m.blocks_in(i) for i in range(m.num_pieces)) == 7
    assert record == bytes([0, 0, 1, 0, 0, 0, 0])

    with PieceStore(tmp_path, m, durable=False) as again:
        assert again.kept_blocks == {1: [0]}
        assert again.kept_block_bytes == KIB
        assert again.rechecked_bytes == KIB  # read and checked again, not taken on its word
        assert not again.has(1)
        # A duplicate of the kept block is turned away; the other block completes it.
        assert not again.write_block(1, *first)
        assert again.write_block(1, *second)
        assert again.verify_assembled(1)
        assert again.read_back_bytes == 0  # the kept block was checked on open, not again
        for index in (0, 2, 3):
            again.write_piece(index, memoryview(piece_bytes(m, index)))
        again.finish()
    assert verify_dir(tmp_path).ok


def test_a_kept_block_changed_on_disk_is_forgotten(tmp_path: Path) -> None:
    m = v2(FILES)
    with PieceStore(tmp_path, m, durable=False) as store:
        for offset, data in blocks_of(m, 3, KIB)[:1]:
            assert store.write_block(3, offset, data)
    piece = m.piece(3)
    with open(tmp_path / piece.path, "r+b") as f:
        f.seek(piece.offset + 10)
        f.write(b"\xff" if FILES[piece.path][piece.offset + 10] != 0xFF else b"\x00")
    with PieceStore(tmp_path, m, durable=False) as again:
        assert again.kept_blocks == {} and again.kept_block_bytes == 0
        assert again.rechecked_bytes == KIB
    assert not any(blocks_path(tmp_path, m.root_hex).read_bytes())  # and the record says so


def test_a_piece_whose_blocks_were_all_written_before_the_kill_is_verified_on_open(
    tmp_path: Path,
) -> None:
    m = v2(FILES)
    with PieceStore(tmp_path, m, durable=False) as store:
        for offset, data in blocks_of(m, 0, KIB):
            assert store.write_block(0, offset, data)
        # killed before verify_assembled
    with PieceStore(tmp_path, m, durable=False) as again:
        assert again.has(0) and again.kept_blocks == {}
        assert again.reused_bytes == m.piece_lengths[0]
    with PieceStore(tmp_path, m, durable=False) as third:
        assert third.has(0) and third.rechecked_bytes == 0  # recorded as verified


def test_format_1_keeps_no_block_record(tmp_path: Path) -> None:
    from test_block_layers import v1

    m = v1(FILES)
    with PieceStore(tmp_path, m, durable=False) as store:
        assert store.write_block(1, 0, memoryview(piece_bytes(m, 1)[:KIB]))
    assert not blocks_path(tmp_path, m.root_hex).exists()
    with PieceStore(tmp_path, m, durable=False) as again:
        assert again.kept_blocks == {}


def test_a_stale_or_foreign_record_of_the_wrong_size_is_reset(tmp_path: Path) -> None:
    m = v2(FILES)
    (tmp_path / STATE_DIR).mkdir()
    blocks_path(tmp_path, m.root_hex).write_bytes(b"\x01" * 3)
    with PieceStore(tmp_path, m, durable=False) as store:
        assert store.kept_blocks == {} and store.rechecked_bytes == 0
    assert blocks_path(tmp_path, m.root_hex).read_bytes() == bytes(7)


# -- the session and the origin pull -----------------------------------------------------


def test_a_resumed_session_never_asks_for_its_kept_blocks() -> None:
    session = make_session([64, 64], block_size=16, requests_per_peer=8)
    session.restore([], {0: [0, 32]})
    h = Harness(session)
    peer = h.connect(pid(1), bitfield=[0, 1])
    asked = {(b.piece, b.offset) for b in peer.outstanding}
    assert (0, 0) not in asked and (0, 32) not in asked
    assert {(0, 16), (0, 48)} <= asked  # the unfinished piece comes first
    out = []
    for block in [b for b in list(peer.outstanding) if b.piece == 0]:
        out += h.deliver(peer, block)
    assert Verify(0) in out


class _Origin:
    """A ranged reader over bytes that records what it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    async def read(
        self,
        path: str,
        offset: int,
        buf: memoryview,
        progress: object = None,
        activity: object = None,
    ) -> None:
        self.reads.append((offset, len(buf)))
        buf[:] = self.data[offset : offset + len(buf)]


def test_an_origin_pull_skips_the_windows_kept_blocks_fill(tmp_path: Path) -> None:
    import asyncio

    data = os.urandom(8 * KIB)
    files = {"w.bin": data}
    m = v2(files, piece_size=8 * KIB, block_size=KIB)
    with PieceStore(tmp_path, m, durable=False) as store:
        for offset in (0, KIB, 2 * KIB, 3 * KIB, 5 * KIB):  # window 0 whole, window 1 in part
            assert store.write_block(0, offset, memoryview(data[offset : offset + KIB]))
    origin = _Origin(data)
    with PieceStore(tmp_path, m, durable=False) as store:
        assert store.kept_block_bytes == 5 * KIB
        window = memoryview(bytearray(4 * KIB))
        assert asyncio.run(pull_piece(origin, store, m, 0, window)) == 0  # type: ignore[arg-type]
        assert store.has(0)
    assert origin.reads == [(4 * KIB, 4 * KIB)]  # the whole window 0 was not read again
    with open(tmp_path / "w.bin", "rb") as f:
        assert f.read() == data


# -- real processes ----------------------------------------------------------------------


def _one_piece_model(tmp_path: Path) -> tuple[bytes, str, dict[str, Any]]:
    """32 MiB of random bytes published as one piece of 8 blocks: its data, catalog and
    the publish summary."""
    origin = tmp_path / "origin"
    origin.mkdir()
    data = os.urandom(32 * MiB)
    (origin / "w.bin").write_bytes(data)
    catalog = (tmp_path / "catalog").as_uri()
    return data, catalog, publish(origin.as_uri(), "w", catalog, piece_size="32MiB")


def test_a_killed_direct_fetch_resumes_without_pulling_its_kept_windows_again(
    tmp_path: Path,
) -> None:
    data, catalog, published = _one_piece_model(tmp_path)
    dest = tmp_path / "dest"
    # 4 MiB ranges, one at a time at 8 MB/s: a 16 MiB window every two seconds.
    args = fetch_args(
        "w",
        catalog,
        dest,
        "--range-size",
        "4MiB",
        "--origin-concurrency",
        "1",
        "--max-download-rate",
        "8MB",
        "--no-fsync",
    )
    proc = subprocess.Popen(
        swarm_argv(*args),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_after_blocks(proc, blocks_path(dest, published["root"]), 4)

    args = [a for a in args if a not in ("--max-download-rate", "8MB")]
    summary = swarm(*args).ok()
    assert summary["verified"] is True
    kept = summary["kept_block_bytes"]
    assert kept >= 16 * MiB  # the first window, 4 blocks of 4 MiB, at least
    # Whole windows held are not read again; a window held in part is read whole.
    assert summary["origin_bytes"] <= 32 * MiB - 16 * MiB
    assert summary["origin_bytes"] + kept >= 32 * MiB
    assert (dest / "w.bin").read_bytes() == data
    assert verify_dir(dest).ok


def test_a_killed_peer_fetch_resumes_asking_peers_only_for_the_blocks_it_lacks(
    tmp_path: Path,
) -> None:
    data, catalog, published = _one_piece_model(tmp_path)
    root, ref = published["root"], published["ref"]
    seed = tmp_path / "seed"
    swarm(*fetch_args("w", catalog, seed, "--no-fsync")).ok()

    logs = tmp_path / "logs"
    procs = Processes()
    try:
        tracker = procs.add(
            TrackerProcess(
                catalog, {}, logs, announce_interval=1.0, peer_ttl=30.0, stall_timeout=20.0
            )
        )
        tracker.start()
        # A complete peer alone in a swarm leaves at once: an unfinished placeholder
        # (nobody listens at its address) keeps the swarm open for the server.
        announce_placeholder(tracker.url, ref, published["pieces"], None)
        server = procs.add(FetchProcess("server", ref, tracker.url, seed, {}, logs, linger=120))
        server.spawn()
        fetcher_args = FetchProcess(
            "fetcher",
            ref,
            tracker.url,
            tmp_path / "dest",
            {},
            logs,
            linger=0,
            extra=["--max-download-rate", "8MB"],
        ).args
        with open(logs / "first.stderr", "wb") as err:
            proc = subprocess.Popen(
                swarm_argv(*fetcher_args),
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        recorded = _kill_after_blocks(proc, blocks_path(tmp_path / "dest", root), 2)
        assert recorded < 8

        again = procs.add(
            FetchProcess("again", ref, tracker.url, tmp_path / "dest", {}, logs, linger=0)
        )
        again.spawn()
        summary = again.wait(60).json()
    finally:
        procs.close()
    assert summary["verified"] is True, summary
    kept = summary["kept_block_bytes"]
    assert kept >= 2 * 4 * MiB
    assert summary["origin_bytes"] == 0
    assert summary["peer_bytes"] == 32 * MiB - kept  # never a kept block again
    assert (tmp_path / "dest" / "w.bin").read_bytes() == data
