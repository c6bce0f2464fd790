"""Format-2 manifests: block layers, blocks checked as they land, format 1 still read.

The manifest carries every piece's block layer (the blake3 digests of its blocks)
and a piece's digest is blake3 of that layer, so the root commits to each block.
The store checks a received block in memory before writing it; the session bars
the one peer that sent a block that fails. Loopback tests of the whole path are in
``tests/test_block_layers_swarm.py``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from session_helpers import Harness, make_session, pid

from core.digest import PieceHasher, block_layer, digest, layer_digest, piece_digest
from core.errors import ManifestError, StoreError, VerificationError
from core.manifest import MAX_BLOCKS, Manifest, block_size_for
from swarm.picker import BlockRequest
from swarm.session import BlockStored, Close, Send, StoreBlock, Verify
from swarm.store import PieceStore
from swarm.verify import verify_dir

KIB = 1024
FILES = {"a.bin": os.urandom(5000), "empty.json": b"", "sub/b.bin": os.urandom(2048)}


def v2(files: dict[str, bytes], piece_size: int = 2 * KIB, block_size: int = KIB) -> Manifest:
    sizes = [(p, len(d)) for p, d in files.items()]
    layers = [
        block_layer(files[p][o : o + n], block_size)
        for p, o, n in Manifest.layout(sizes, piece_size)
    ]
    return Manifest.build(
        name="m",
        origin="file:///nowhere",
        piece_size=piece_size,
        files=sizes,
        block_size=block_size,
        layers=layers,
    )


def v1(files: dict[str, bytes], piece_size: int = 2 * KIB) -> Manifest:
    sizes = [(p, len(d)) for p, d in files.items()]
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece_size)]
    return Manifest.build(
        name="m", origin="file:///nowhere", piece_size=piece_size, files=sizes, digests=digests
    )


def piece_bytes(m: Manifest, i: int) -> bytes:
    p = m.piece(i)
    return FILES[p.path][p.offset : p.offset + p.length]


# -- the manifest ------------------------------------------------------------------


def test_format_2_round_trips_and_its_piece_digest_is_that_of_its_layer() -> None:
    m = v2(FILES)
    assert m.format == 2 and m.block_size == KIB
    back = Manifest.decode(m.encode())
    assert back == m and back.root == m.root and back.layers == m.layers
    assert m.piece_lengths == [2048, 2048, 904, 2048]
    assert [m.blocks_in(i) for i in range(4)] == [2, 2, 1, 2]
    for i in range(m.num_pieces):
        data = piece_bytes(m, i)
        assert m.digests[i] == layer_digest(m.layers[i]) == m.piece_digest(data)
        assert m.piece_digest(data) != digest(data)  # not format 1's digest
    # Only whole blocks of the manifest have a digest of their own.
    assert m.block_digest(0, KIB, KIB) == digest(FILES["a.bin"][KIB : 2 * KIB])
    assert m.block_digest(2, 0, 904) == digest(FILES["a.bin"][4096:5000])
    assert m.block_digest(0, 512, KIB) is None
    assert m.block_digest(0, 0, 512) is None
    assert m.block_digest(2, 0, KIB) is None
    assert v1(FILES).block_digest(0, 0, KIB) is None


def test_every_block_digest_is_in_the_root() -> None:
    m = v2(FILES)
    layers = list(m.layers)
    layers[1] = layers[1][:32] + bytes(32)
    changed = Manifest.build(
        name=m.name,
        origin=m.origin,
        piece_size=m.piece_size,
        files=[(f.path, f.size) for f in m.files],
        block_size=m.block_size,
        layers=layers,
    )
    assert changed.root != m.root and changed.digests[1] != m.digests[1]
    assert changed.digests[0] == m.digests[0]


def test_format_1_manifests_still_decode_and_hash_whole_pieces() -> None:
    m = v1(FILES)
    back = Manifest.decode(m.encode())
    assert back == m and back.format == 1 and back.block_size == 0 and not back.layers
    assert msgpack.unpackb(zstandard.decompress(m.encode()))[0] == 1
    assert msgpack.unpackb(zstandard.decompress(v2(FILES).encode()))[0] == 2
    assert m.piece_digest(piece_bytes(m, 0)) == digest(piece_bytes(m, 0))


def _raw(obj: list[object]) -> bytes:
    return zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.__setitem__(0, 3), "unsupported manifest format version 3"),
        (lambda o: o.__setitem__(5, 512), "block size must be between"),
        (lambda o: o.__setitem__(5, 4 * KIB), "block size must be between"),
        (lambda o: o.__setitem__(5, "1024"), "block size must be between"),
        (lambda o: o.__setitem__(6, o[6][:-32]), "fewer block digests"),
        (lambda o: o.__setitem__(6, o[6] + bytes(32)), "more block digests"),
        (lambda o: o.__setitem__(6, o[6][:-1]), "multiple of 32"),
        (lambda o: o.pop(), "must be a list of 7 fields"),
        (lambda o: o.__setitem__(4, [["a.bin", 5000, 9], ["sub/b.bin", 2048, 1]]), "more pieces"),
    ],
)
def test_hostile_format_2_manifests_are_refused(mutate: object, message: str) -> None:
    obj = msgpack.unpackb(v2(FILES).canonical())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        Manifest.decode(_raw(obj))


def test_a_digest_that_does_not_follow_from_the_layers_is_refused() -> None:
    m = v2(FILES)
    with pytest.raises(ManifestError, match="does not match its block layer"):
        Manifest(
            m.name, m.origin, m.piece_size, m.files, (bytes(32),) * 4, m.block_size, m.layers
        )._validate()


def test_block_size_is_the_default_unless_there_would_be_too_many_blocks() -> None:
    mib = 1024 * KIB
    assert block_size_for([10 * mib], 256 * mib) == 4 * mib
    assert block_size_for([10 * KIB], 2 * KIB) == 2 * KIB
    huge = [MAX_BLOCKS * 4 * mib * 3]  # 48 TiB
    assert block_size_for(huge, 256 * mib) == 16 * mib


def test_a_publisher_may_choose_the_block_size_within_the_manifests_limits() -> None:
    mib = 1024 * KIB
    assert block_size_for([10 * mib], 4 * mib, 256 * KIB) == 256 * KIB
    assert block_size_for([10 * KIB], 2 * KIB, 4 * KIB) == 2 * KIB  # never above a piece
    # Too many blocks: doubled from the chosen size, as from the default.
    assert block_size_for([MAX_BLOCKS * 2 * KIB], 256 * mib, KIB) == 2 * KIB
    for bad in (512, 32 * mib):
        with pytest.raises(ManifestError, match="block size"):
            block_size_for([10 * mib], 256 * mib, bad)


@settings(max_examples=50, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=9000),
    block=st.sampled_from([KIB, 3 * KIB, 4 * KIB]),
    cuts=st.lists(st.integers(min_value=0, max_value=9000), max_size=6),
)
def test_streamed_hash_equals_the_hash_of_the_whole(
    data: bytes, block: int, cuts: list[int]
) -> None:
    for size in (0, block):
        hasher = PieceHasher(size)
        at = 0
        for cut in [*sorted({c for c in cuts if c < len(data)}), len(data)]:
            hasher.update(data[at:cut])
            at = cut
        assert hasher.digest() == piece_digest(data, size)


# -- the store ---------------------------------------------------------------------


def blocks_of(m: Manifest, index: int, size: int) -> list[tuple[int, memoryview]]:
    data = piece_bytes(m, index)
    return [(o, memoryview(data[o : o + size])) for o in range(0, len(data), size)]


def test_a_corrupt_block_is_refused_before_it_is_written(tmp_path: Path) -> None:
    m = v2(FILES)
    with PieceStore(tmp_path, m) as store:
        offset, good = blocks_of(m, 1, KIB)[1]
        bad = bytearray(good)
        bad[100] ^= 1
        with pytest.raises(VerificationError, match=r"block 1024\+1024 of piece 1"):
            store.write_block(1, offset, memoryview(bad))
        on_disk = (tmp_path / "a.bin").read_bytes()[2048 + 1024 : 2048 + 2048]
        assert on_disk != bytes(bad)
        # The honest copy is then written, checked and counted.
        for offset, data in blocks_of(m, 1, KIB):
            assert store.write_block(1, offset, data)
        assert store.verify_assembled(1) and store.has(1)
        assert store.read_back_bytes == 0


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_blocks_checked_on_arrival_are_never_read_back(tmp_path: Path, order: str) -> None:
    m = v2(FILES)
    with PieceStore(tmp_path, m) as store:
        for index in range(m.num_pieces):
            blocks = blocks_of(m, index, KIB)
            if order == "reversed":
                blocks.reverse()
            elif order == "shuffled":
                random.Random(index).shuffle(blocks)
            for offset, data in blocks:
                assert store.write_block(index, offset, data)
            assert store.verify_assembled(index)
        assert store.read_back_bytes == 0
        store.finish()
    assert verify_dir(tmp_path).ok


def test_blocks_that_are_not_the_manifests_are_read_back_once(tmp_path: Path) -> None:
    """Smaller requests (another block size) can't be checked alone: the piece is
    checked from disk when complete, block by block, and a lie still fails it."""
    m = v2(FILES)
    with PieceStore(tmp_path, m) as store:
        for offset, data in blocks_of(m, 0, 512):
            assert store.write_block(0, offset, data)
        assert store.verify_assembled(0)
        assert store.read_back_bytes == 2048
        for k, (offset, data) in enumerate(blocks_of(m, 1, 512)):
            raw = bytearray(data)
            if k == 3:
                raw[0] ^= 1
            assert store.write_block(1, offset, memoryview(raw))
        assert not store.verify_assembled(1) and not store.has(1)
        # Bigger requests: each whole block inside is checked as it lands.
        data = memoryview(piece_bytes(m, 3))
        assert store.write_block(3, 0, data)
        assert store.verify_assembled(3)
        assert store.read_back_bytes == 2048 + 2048


def test_only_checked_blocks_of_a_piece_being_assembled_are_servable(tmp_path: Path) -> None:
    """Cut-through: the store serves a block of a piece not yet whole once it was
    checked, nothing else of it; a write over part of a checked block takes it
    back before the bytes change, so no reader ever gets bytes nobody checked."""
    m = v2(FILES)
    buf = bytearray(8192)
    with PieceStore(tmp_path, m) as store:
        assert not store.servable(1, 1024, 1024)
        with pytest.raises(StoreError, match="never served"):
            store.read_direct(1, 1024, 1024, buf)
        offset, data = blocks_of(m, 1, KIB)[1]
        assert store.write_block(1, offset, data)
        assert store.servable(1, 1024, 1024) and store.servable(1, 1500, 10)
        assert not store.servable(1, 0, 1024) and not store.servable(1, 0, 2048)
        store.require_servable(1, 1024, 1024)
        with pytest.raises(StoreError, match=r"bytes 0\+2048 of piece 1"):
            store.require_servable(1, 0, 2048)
        # A write over half of it and half of the block before (another block size,
        # endgame): the checked block is taken back before the bytes land.
        seen: list[bool] = []
        write_at = store._write_at

        def spying(file_index: int, at: int, chunk: memoryview) -> None:
            seen.append(store.servable(1, 1024, 1024))
            write_at(file_index, at, chunk)

        store._write_at = spying  # type: ignore[method-assign]
        assert store.write_block(1, 512, memoryview(piece_bytes(m, 1)[512:1536]))
        assert seen == [False] and not store.servable(1, 1024, 1024)
        store._write_at = write_at  # type: ignore[method-assign]
        # Whole blocks again, then the piece: all of it servable.
        for offset, data in blocks_of(m, 1, KIB):
            store.write_block(1, offset, data)
        assert store.servable(1, 1024, 1024)
        assert store.verify_assembled(1) and store.servable(1, 0, 2048)


def test_a_format_1_piece_is_servable_only_once_verified(tmp_path: Path) -> None:
    m = v1(FILES)
    with PieceStore(tmp_path, m) as store:
        for offset, data in blocks_of(m, 0, KIB):
            store.write_block(0, offset, data)
        assert not store.servable(0, 0, 1024)
        assert store.verify_assembled(0) and store.servable(0, 0, 1024)


def test_format_1_store_still_assembles_and_verifies(tmp_path: Path) -> None:
    m = v1(FILES)
    with PieceStore(tmp_path, m) as store:
        for index in range(m.num_pieces):
            for offset, data in reversed(blocks_of(m, index, KIB)):
                store.write_block(index, offset, data)
            assert store.verify_assembled(index)
        store.finish()
    assert verify_dir(tmp_path).ok


def test_a_killed_fetch_keeps_its_verified_pieces(tmp_path: Path) -> None:
    m = v2(FILES)
    store = PieceStore(tmp_path, m)
    store.open()
    for offset, data in blocks_of(m, 0, KIB):
        store.write_block(0, offset, data)
    assert store.verify_assembled(0)
    store.write_block(1, 0, blocks_of(m, 1, KIB)[0][1])  # half a piece, then "killed"
    store.close()
    with PieceStore(tmp_path, m) as again:
        assert again.has(0) and not again.has(1)
        assert again.missing() == [1, 2, 3]


def test_verify_dir_checks_format_2_pieces(tmp_path: Path) -> None:
    m = v2(FILES)
    with PieceStore(tmp_path, m) as store:
        for index in range(m.num_pieces):
            store.write_piece(index, memoryview(piece_bytes(m, index)))
        store.finish()
    assert verify_dir(tmp_path).ok
    with open(tmp_path / "sub/b.bin", "r+b") as f:
        f.seek(1500)
        f.write(b"\xff")
    report = verify_dir(tmp_path)
    assert not report.ok and [b.index for b in report.bad_pieces] == [3]


# -- the session -------------------------------------------------------------------


def test_a_block_that_fails_its_digest_bars_its_one_sender_at_once() -> None:
    h = Harness(make_session([32, 32], peer_id=pid(50), block_size=16))
    liar = h.connect(pid(1), bitfield=[0, 1])
    honest = h.connect(pid(2), bitfield=[0, 1])
    block = next(iter(liar.outstanding))
    out = h.start_block(liar, block)
    out += h.finish_block(liar)
    stores = [a for a in out if isinstance(a, StoreBlock)]
    assert [s.block for s in stores] == [block]
    out = h.feed(BlockStored(liar.conn, block, written=False, corrupt=True))
    assert pid(1) in h.session.barred
    assert any(isinstance(a, Close) and a.conn == liar.conn for a in out)
    assert h.session.stats.corrupt_blocks == 1 and h.session.stats.corrupt_pieces == 0
    # The block is asked of the honest peer, and the piece completes from it.
    assert block in honest.outstanding
    verified = []
    for _ in range(8):
        pending = [b for b in honest.outstanding if b.piece == block.piece]
        if not pending:
            break
        out = h.deliver(honest, pending[0])
        verified += [a.piece for a in out if isinstance(a, Verify)]
    assert verified == [block.piece]
    assert not any(
        isinstance(a, Send) and a.conn == honest.conn and isinstance(a, Close) for a in out
    )
    assert BlockRequest(block.piece, block.offset, block.length) in honest.requests()
