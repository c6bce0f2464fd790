"""Review of manifest format 2 (block layers) and ``--workers`` (concurrent writes).

Tests that fail name a bug in their docstring; tests marked "passes: pins ..." hold
a behaviour that was checked by reading the code and must not regress.
"""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import zstandard
from session_helpers import Harness, Remote, make_session, pid

from core.digest import DIGEST_SIZE, block_layer, digest
from core.errors import ManifestError, VerificationError
from core.manifest import MAX_BLOCKS, Manifest, block_size_for, pieces_in
from swarm.picker import BlockRequest
from swarm.protocol import MAX_BLOCK
from swarm.session import BlockStored, Closed, PieceFailed, StoreBlock, Verify
from swarm.store import PieceStore
from swarm.verify import verify_dir

KIB = 1024
MIB = 1024 * KIB
TIB = 1024**4
TIMEOUT = 10.0
DATA = random.Random(7).randbytes(8 * KIB)


def v2(data: bytes = DATA, piece_size: int = 4 * KIB, block_size: int = KIB) -> Manifest:
    sizes = [("w.bin", len(data))]
    layers = [
        block_layer(data[o : o + n], block_size) for _, o, n in Manifest.layout(sizes, piece_size)
    ]
    return Manifest.build(
        name="review",
        origin="file:///nowhere",
        piece_size=piece_size,
        files=sizes,
        block_size=block_size,
        layers=layers,
    )


def v1(data: bytes = DATA, piece_size: int = 4 * KIB) -> Manifest:
    sizes = [("w.bin", len(data))]
    digests = [digest(data[o : o + n]) for _, o, n in Manifest.layout(sizes, piece_size)]
    return Manifest.build(
        name="review", origin="file:///nowhere", piece_size=piece_size, files=sizes, digests=digests
    )


def piece_of(m: Manifest, index: int, data: bytes = DATA) -> bytes:
    p = m.piece(index)
    return data[p.offset : p.offset + p.length]


def on_disk(dest: Path, m: Manifest, index: int) -> bytes:
    p = m.piece(index)
    return (dest / p.path).read_bytes()[p.offset : p.offset + p.length]


# -- the store: checked bytes must stay the bytes that were checked ----------------


def test_unchecked_overlapping_block_cannot_replace_checked_bytes(tmp_path: Path) -> None:
    """BUG: the store keys blocks by offset only and ``_blocks_good`` skips every
    offset in ``checked``. A block at another offset that overlaps checked blocks
    without holding one whole is written unchecked over their bytes, and the piece
    is then recorded verified without a byte of it being read back."""
    m = v2()
    good = piece_of(m, 0)
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:
        assert store.write_block(0, 0, memoryview(good[: 2 * KIB]))  # blocks 0 and 1 checked
        lie = bytes(KIB)  # straddles blocks 0 and 1: holds neither whole
        store.write_block(0, KIB // 2, memoryview(lie))
        assert store.write_block(0, 2 * KIB, memoryview(good[2 * KIB :]))
        verified = store.verify_assembled(0)
        assert not verified or on_disk(tmp_path, m, 0) == good, (
            "piece 0 recorded verified with unchecked bytes on disk"
        )


def _pause_commit(store: PieceStore) -> tuple[threading.Event, threading.Event]:
    """Make ``verify_assembled`` stop just before it records the piece."""
    entered, release = threading.Event(), threading.Event()
    commit = store._commit

    def paused(index: int, file_index: int) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        commit(index, file_index)

    store._commit = paused  # type: ignore[method-assign]
    return entered, release


def test_a_duplicate_written_while_the_piece_is_verified_is_not_recorded_verified(
    tmp_path: Path,
) -> None:
    """BUG (``--workers`` > 1, format 1): ``verify_assembled`` pops the assembly and
    hashes it, then records the piece; a late endgame duplicate handled by another
    worker in between finds no assembly and the piece not yet verified, so it is
    written, unchecked, over bytes that were just verified, and the piece is then
    recorded verified (and its file's identity with it: a restart trusts it)."""
    m = v1()
    good = piece_of(m, 0)
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:
        for offset in range(0, len(good), KIB):
            assert store.write_block(0, offset, memoryview(good[offset : offset + KIB]))
        entered, release = _pause_commit(store)
        result: list[bool] = []
        verifier = threading.Thread(target=lambda: result.append(store.verify_assembled(0)))
        verifier.start()
        try:
            assert entered.wait(TIMEOUT)
            liar = bytes(KIB)  # the liar's endgame copy of block 1, handled by another worker
            store.write_block(0, KIB, memoryview(liar))
        finally:
            release.set()
            verifier.join(TIMEOUT)
        assert result == [True]
        assert on_disk(tmp_path, m, 0) == good, "a verified piece holds unchecked bytes"
    # Only piece 1, never written, is bad on disk.
    assert [b.index for b in verify_dir(tmp_path).bad_pieces] == [1]


def test_a_late_duplicate_of_a_verified_format_2_piece_leaves_no_assembly(tmp_path: Path) -> None:
    """BUG (minor, ``--workers`` > 1): the same window in format 2 writes checked
    (identical) bytes, but leaves an ``_Assembly`` behind for a verified piece: it is
    never popped again (memory held for the rest of the fetch)."""
    m = v2()
    good = piece_of(m, 0)
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:
        for offset in range(0, len(good), KIB):
            assert store.write_block(0, offset, memoryview(good[offset : offset + KIB]))
        entered, release = _pause_commit(store)
        verifier = threading.Thread(target=store.verify_assembled, args=(0,))
        verifier.start()
        try:
            assert entered.wait(TIMEOUT)
            written = store.write_block(0, KIB, memoryview(good[KIB : 2 * KIB]))
        finally:
            release.set()
            verifier.join(TIMEOUT)
        assert store.has(0)
        assert not written, "a duplicate of a piece being verified was written again"
        assert 0 not in store._assemblies


def test_a_corrupt_block_racing_its_honest_copy_never_reaches_disk(tmp_path: Path) -> None:
    """passes: pins that an endgame duplicate waits for the copy being written: the
    liar's copy is refused (or dropped unread) and the honest one is on disk,
    whichever thread starts first, 200 rounds on 2 threads."""
    m = v2()
    good = piece_of(m, 1)
    bad = bytearray(good[:KIB])
    bad[5] ^= 0xFF
    start = m.piece(1).offset
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:

        def write(
            barrier: threading.Barrier, outcome: dict[str, str], name: str, data: bytes
        ) -> None:
            barrier.wait()
            try:
                written = store.write_block(1, 0, memoryview(data))
                outcome[name] = "written" if written else "dup"
            except VerificationError:
                outcome[name] = "refused"

        for round_ in range(200):
            with open(tmp_path / "w.bin", "r+b") as f:  # no earlier round's bytes
                f.seek(start)
                f.write(bytes(KIB))
            barrier = threading.Barrier(2, timeout=TIMEOUT)
            outcome: dict[str, str] = {}
            threads = [
                threading.Thread(target=write, args=(barrier, outcome, "liar", bytes(bad))),
                threading.Thread(target=write, args=(barrier, outcome, "honest", good[:KIB])),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            assert outcome["honest"] == "written", (round_, outcome)
            assert outcome["liar"] in ("refused", "dup"), (round_, outcome)
            assert on_disk(tmp_path, m, 1)[:KIB] == good[:KIB]
            store._assemblies.pop(1)  # next round: a fresh attempt of the piece


def test_an_unfinished_assembly_is_not_verified_after_a_restart(tmp_path: Path) -> None:
    """passes: pins that checked blocks of a piece are not a verified piece: killed
    with every block but one written, the piece is missing after a restart, and a
    verify_assembled without the last block fails (it is read back as zeros)."""
    m = v2()
    good = piece_of(m, 0)
    store = PieceStore(tmp_path, m, durable=False, direct_io=False)
    store.open()
    for offset in range(0, 3 * KIB, KIB):
        assert store.write_block(0, offset, memoryview(good[offset : offset + KIB]))
    store.close()
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as again:
        assert not again.has(0)
        assert not again.verify_assembled(0)
        assert not again.has(0)


# -- the session: endgame duplicates stored by several workers ---------------------


def _endgame_two_copies() -> tuple[Harness, Remote, Remote, BlockRequest, BlockRequest]:
    """A 2-block piece requested of L, then of H in endgame."""
    h = Harness(make_session([32], peer_id=pid(50), block_size=16))
    liar = h.connect(pid(1), bitfield=[0])
    honest = h.connect(pid(2), bitfield=[0])
    b0, b1 = BlockRequest(0, 0, 16), BlockRequest(0, 16, 16)
    assert set(liar.outstanding) == {b0, b1}
    assert set(honest.outstanding) == {b0, b1}  # endgame duplicates
    return h, liar, honest, b0, b1


def test_format_1_blame_ignores_the_order_workers_report_a_duplicate() -> None:
    """BUG (``--workers`` > 1, format 1): H's copy of b1 waits in the store for L's,
    then returns False; both workers finish at once, and the peer may feed H's
    ``BlockStored(written=False)`` first. The session then counts b1 as received
    from H, starts the verify and, when L's ``written=True`` comes, ignores it (the
    piece is verifying): L is not among the contributors. The piece fails (L's bytes
    are on disk) and its only recorded source, the honest H, is barred."""
    h, liar, honest, b0, b1 = _endgame_two_copies()
    out = h.deliver(honest, b0)  # H's b0 is written first
    assert not [a for a in out if isinstance(a, Verify)]
    out = h.start_block(liar, b1) + h.finish_block(liar)
    out += h.start_block(honest, b1) + h.finish_block(honest)
    stores = [a for a in out if isinstance(a, StoreBlock)]
    assert {(s.conn, s.block) for s in stores} == {(liar.conn, b1), (honest.conn, b1)}
    # The store wrote L's copy (first in); H's waited and found it on disk.
    h.feed(BlockStored(honest.conn, b1, written=False))
    h.feed(BlockStored(liar.conn, b1, written=True))
    assert 0 in h.session.verifying
    h.feed(PieceFailed(0))  # L's bytes failed the piece
    assert pid(2) not in h.session.barred, "the honest peer was barred for the liar's bytes"


def test_format_2_a_corrupt_copy_and_its_honest_duplicate_complete_the_piece() -> None:
    """passes: pins that in format 2 the liar's copy (refused) and the honest one
    (written after it) complete the piece in either report order; L barred, H not."""
    for first_liar in (True, False):
        h, liar, honest, b0, b1 = _endgame_two_copies()
        h.deliver(honest, b0)
        h.start_block(liar, b1)
        h.finish_block(liar)
        h.start_block(honest, b1)
        h.finish_block(honest)
        reports = [
            BlockStored(liar.conn, b1, written=False, corrupt=True),
            BlockStored(honest.conn, b1, written=True),
        ]
        verifies: list[int] = []
        for event in reports if first_liar else reversed(reports):
            verifies += [a.piece for a in h.feed(event) if isinstance(a, Verify)]
        assert verifies == [0]
        assert pid(1) in h.session.barred and pid(2) not in h.session.barred
        assert h.session.stats.corrupt_blocks == 1


def test_a_corrupt_report_after_the_liars_connection_closed_still_reasks_the_block() -> None:
    """passes: pins that a corrupt block from a connection already gone bars its
    peer, and the block goes back to be asked of the honest peer (nothing is left
    requested of nobody); a repeated or unknown report changes nothing."""
    h = Harness(make_session([32], peer_id=pid(50), block_size=16, endgame_duplicates=1))
    liar = h.connect(pid(1), bitfield=[0])
    honest = h.connect(pid(2), bitfield=[0])
    mine = sorted(liar.outstanding)
    assert mine and not set(mine) & set(honest.outstanding)
    block = mine[0]
    h.start_block(liar, block)
    h.finish_block(liar)
    h.feed(Closed(liar.conn, "gone"))
    h.feed(BlockStored(liar.conn, block, written=False, corrupt=True))
    h.feed(BlockStored(liar.conn, block, written=False, corrupt=True))
    h.feed(BlockStored(honest.conn, BlockRequest(0, 0, 16), written=False, corrupt=True))
    assert h.session.barred == {pid(1)} and h.session.stats.corrupt_blocks == 1
    verifies: list[int] = []
    for _ in range(8):
        pending = list(honest.outstanding)
        if not pending:
            break
        verifies += [a.piece for a in h.deliver(honest, pending[0]) if isinstance(a, Verify)]
    assert verifies == [0]


# -- the manifest -------------------------------------------------------------------


def test_block_digest_of_a_negative_offset_is_none() -> None:
    """BUG (minor): ``block_digest`` documents None for a range that is not one of
    the manifest's blocks, but a negative offset that is a multiple of the block
    size passes the checks and slices the layer from a negative start: b''."""
    m = v2()
    assert m.block_digest(0, -KIB, KIB) is None
    assert m.block_digest(0, -4 * KIB, KIB) is None


def test_block_digest_of_a_negative_piece_is_refused() -> None:
    """BUG (minor): a negative piece index indexes ``piece_lengths`` and ``layers``
    from the end: ``block_digest(-1, ...)`` is the last piece's block digest, where
    ``piece(-1)`` raises IndexError."""
    m = v2()
    with pytest.raises(IndexError):
        m.piece(-1)
    with pytest.raises(IndexError):
        m.block_digest(-1, 0, KIB)


def test_a_format_2_manifest_of_empty_files_round_trips() -> None:
    """passes: pins that a format-2 manifest without a piece (only empty files)
    keeps its format and block size through encode/decode."""
    m = Manifest.build(
        name="empty",
        origin="file:///nowhere",
        piece_size=4 * KIB,
        files=[("a", 0), ("b/c", 0)],
        block_size=KIB,
        layers=[],
    )
    back = Manifest.decode(m.encode())
    assert back == m and back.format == 2 and back.block_size == KIB and back.num_pieces == 0


def test_format_2_with_a_block_size_that_does_not_divide_the_piece_checks_every_byte(
    tmp_path: Path,
) -> None:
    """passes: pins that a block size that does not divide the piece size (3 KiB in
    4 KiB pieces: blocks 3 KiB + 1 KiB) checks both blocks and each lie is refused."""
    data = os.urandom(10 * KIB)
    m = v2(data, piece_size=4 * KIB, block_size=3 * KIB)
    assert [m.blocks_in(i) for i in range(m.num_pieces)] == [2, 2, 1]
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:
        for index in range(m.num_pieces):
            piece = piece_of(m, index, data)
            for offset in range(0, len(piece), 3 * KIB):
                block = bytearray(piece[offset : offset + 3 * KIB])
                block[-1] ^= 1
                with pytest.raises(VerificationError):
                    store.write_block(index, offset, memoryview(block))
                block[-1] ^= 1
                assert store.write_block(index, offset, memoryview(block))
            assert store.verify_assembled(index)
        assert store.read_back_bytes == 0


def test_a_layer_of_the_right_length_for_a_wrong_piece_count_is_refused() -> None:
    """passes: pins that a file whose piece count is short of its size, with a block
    layer as long as that short count needs, is refused (not laid out anew)."""
    m = v2()
    obj = msgpack.unpackb(m.canonical())
    obj[4] = [["w.bin", len(DATA), 1]]  # needs 2 pieces of 4 KiB
    obj[6] = obj[6][: 4 * DIGEST_SIZE]  # the first piece's 4 blocks
    raw = zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(ManifestError, match="needs 2 pieces"):
        Manifest.decode(raw)


def test_block_size_for_counts_blocks_per_piece() -> None:
    """BUG (edge): ``block_size_for`` counts a file's blocks as if blocks ran across
    pieces (``pieces_in(size, block)``), but every piece starts a block. With a
    block that does not divide the piece (4 MiB blocks in 6 MiB pieces: 2 blocks a
    piece) a 14 TiB artifact gets 4.9M blocks, more than ``MAX_BLOCKS``, and
    ``Manifest.build`` then refuses what ``swarm publish`` hashed."""
    sizes = [14 * TIB]
    piece = 6 * MIB
    block = block_size_for(sizes, piece)
    blocks = 0
    for size in sizes:
        full, rest = divmod(size, piece)
        blocks += full * pieces_in(piece, block) + pieces_in(rest, block)
    assert blocks <= MAX_BLOCKS, f"{blocks} blocks of {block} bytes"


def test_block_size_for_stays_within_the_wires_largest_block() -> None:
    """BUG (edge): past 64 TiB ``block_size_for`` doubles the block beyond the wire's
    ``MAX_BLOCK`` (16 MiB): 200 TiB in 256 MiB pieces gets 64 MiB blocks, which no
    peer can request (see the next test)."""
    assert block_size_for([200 * TIB], 256 * MIB) <= MAX_BLOCK


def test_a_manifest_block_larger_than_the_wire_allows_is_refused() -> None:
    """Was a bug: the peer's format-2 override replaces ``--block-size`` (which the
    CLI caps at ``MAX_BLOCK``) by the manifest's block size. A manifest whose block
    was 32 MiB (then valid: at most its piece size) made the peer ask for blocks the
    protocol refuses to encode. Now such a manifest is refused, built or decoded,
    and the peer never sees it."""
    with pytest.raises(ManifestError, match="block size"):
        Manifest.build(
            name="big",
            origin="file:///nowhere",
            piece_size=64 * MIB,
            files=[("a", 64 * MIB)],
            block_size=32 * MIB,
            layers=[bytes(2 * DIGEST_SIZE)],
        )
    assert MAX_BLOCK == 16 * MIB


def test_format_1_blocks_written_by_eight_threads_in_any_order_verify(tmp_path: Path) -> None:
    """passes: pins format 1 under ``--workers``: the prefix hash is extended under
    the store's lock, so blocks (and honest duplicates) written by 8 threads in a
    shuffled order verify every piece, and the bytes on disk are the artifact's."""
    data = random.Random(11).randbytes(16 * 4 * KIB - 300)
    m = v1(data)
    jobs = [
        (index, offset, piece_of(m, index, data)[offset : offset + KIB])
        for index in range(m.num_pieces)
        for offset in range(0, m.piece_lengths[index], KIB)
    ]
    jobs += random.Random(12).sample(jobs, len(jobs) // 3)  # endgame duplicates
    random.Random(13).shuffle(jobs)
    with PieceStore(tmp_path, m, durable=False, direct_io=False) as store:
        with ThreadPoolExecutor(8) as pool:
            written = list(
                pool.map(lambda j: store.write_block(j[0], j[1], memoryview(j[2])), jobs)
            )
        assert written.count(True) == len({(i, o) for i, o, _ in jobs})
        assert all(store.verify_assembled(i) for i in range(m.num_pieces))
        store.finish()
    assert (tmp_path / "w.bin").read_bytes() == data
