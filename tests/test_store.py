"""Piece store: verify before counting, resume from recorded state, complete only when whole."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.errors import DiskFullError, StoreError, VerificationError
from swarm.manifest import Manifest
from swarm.store import COMPLETE_MARKER, PieceStore, digest, read_complete_marker

KIB = 1024


def artifact(files: dict[str, bytes], piece_size: int = KIB) -> Manifest:
    sizes = [(p, len(d)) for p, d in files.items()]
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece_size)]
    return Manifest.build(
        name="m", origin="file:///nowhere", piece_size=piece_size, files=sizes, digests=digests
    )


FILES = {"a.bin": os.urandom(2500), "empty.json": b"", "sub/b.bin": os.urandom(1024)}


def piece_bytes(m: Manifest, i: int) -> memoryview:
    p = m.piece(i)
    return memoryview(FILES[p.path][p.offset : p.offset + p.length])


def test_write_all_then_complete(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [0, 1, 2, 3]
        for i in reversed(range(m.num_pieces)):
            store.write_piece(i, piece_bytes(m, i))
        assert read_complete_marker(tmp_path) is None
        store.finish()
    for path, data in FILES.items():
        assert (tmp_path / path).read_bytes() == data
    marker = read_complete_marker(tmp_path)
    assert marker is not None and marker["root"] == m.root_hex


def test_bad_piece_is_not_counted(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        bad = bytearray(piece_bytes(m, 1))
        bad[0] ^= 1
        with pytest.raises(VerificationError, match=r"piece 1 \(a.bin bytes 1024-2047\)"):
            store.write_piece(1, memoryview(bad))
        with pytest.raises(VerificationError):
            store.write_piece(1, piece_bytes(m, 1)[:10])
        assert not store.has(1)
        with pytest.raises(StoreError, match="not verified"):
            store.finish()
    assert not (tmp_path / COMPLETE_MARKER).exists()


def test_resume_keeps_verified_pieces(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        store.write_piece(0, piece_bytes(m, 0))
        store.write_piece(3, piece_bytes(m, 3))
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [1, 2]
        assert store.reused_bytes == 2 * KIB


def test_corrupt_state_is_distrusted(tmp_path: Path) -> None:
    m = artifact(FILES)
    with PieceStore(tmp_path, m) as store:
        store.write_piece(0, piece_bytes(m, 0))
    (tmp_path / ".swarm" / f"{m.root_hex}.state").write_bytes(b"\x07\x01")
    with PieceStore(tmp_path, m) as store:
        assert store.missing() == [0, 1, 2, 3]


def test_new_version_unmarks_old_one(tmp_path: Path) -> None:
    old = artifact(FILES)
    with PieceStore(tmp_path, old) as store:
        for i in range(old.num_pieces):
            store.write_piece(i, piece_bytes(old, i))
        store.finish()
    new = artifact({"a.bin": b"x" * 10})
    with PieceStore(tmp_path, new):
        assert read_complete_marker(tmp_path) is None


def test_unwritable_destination(tmp_path: Path) -> None:
    m = artifact(FILES)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="can't create destination"):
        PieceStore(blocker / "dest", m).open()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that fills up."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("can't mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error(tiny_fs: Path) -> None:
    big = {"weights.bin": os.urandom(200 * KIB)}
    m = artifact(big, piece_size=64 * KIB)
    with pytest.raises(DiskFullError, match=r"weights\.bin.*no space left"):
        with PieceStore(tiny_fs / "model", m) as store:
            store.write_piece(0, memoryview(big["weights.bin"][: 64 * KIB]))
    assert read_complete_marker(tiny_fs / "model") is None


def blocks_of(m: Manifest, i: int, size: int) -> list[tuple[int, memoryview]]:
    data = piece_bytes(m, i)
    return [(o, data[o : o + size]) for o in range(0, len(data), size)]


@pytest.mark.parametrize("order", ["in order", "reversed", "middle first"])
def test_blocks_assembled_in_any_order_verify(tmp_path: Path, order: str) -> None:
    m = artifact(FILES)
    blocks = blocks_of(m, 0, 100)  # 11 blocks, the last one short
    if order == "reversed":
        blocks.reverse()
    elif order == "middle first":
        blocks = blocks[5:] + blocks[:5]
    with PieceStore(tmp_path, m) as store:
        for offset, data in blocks:
            assert store.write_block(0, offset, data)
        assert store.verify_assembled(0)
        assert store.has(0)
    assert (tmp_path / "a.bin").read_bytes()[:KIB] == FILES["a.bin"][:KIB]


def test_a_block_once_written_is_never_overwritten(tmp_path: Path) -> None:
    """An endgame duplicate that differs (a liar's copy) must not replace hashed bytes."""
    m = artifact(FILES)
    blocks = blocks_of(m, 0, 256)
    with PieceStore(tmp_path, m) as store:
        offset, good = blocks[0]
        assert store.write_block(0, offset, good)
        assert not store.write_block(0, offset, memoryview(bytes(len(good))))
        for offset, data in blocks[1:]:
            store.write_block(0, offset, data)
        assert store.verify_assembled(0)
    assert (tmp_path / "a.bin").read_bytes()[:256] == FILES["a.bin"][:256]


def test_a_corrupt_block_fails_verification_and_the_next_attempt_starts_clean(
    tmp_path: Path,
) -> None:
    m = artifact(FILES)
    blocks = blocks_of(m, 1, 256)
    with PieceStore(tmp_path, m) as store:
        for k, (offset, data) in enumerate(blocks):
            bad = bytearray(data)
            if k == 2:
                bad[7] ^= 1
            store.write_block(1, offset, memoryview(bad))
        assert not store.verify_assembled(1)
        assert not store.has(1)
        for offset, data in blocks:  # the retry from an honest peer
            assert store.write_block(1, offset, data)
        assert store.verify_assembled(1)
        with pytest.raises(StoreError, match="outside"):
            store.write_block(1, 1000, memoryview(b"x" * 100))


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_io_round_trip_with_unaligned_file_tails(tmp_path: Path, direct_io: bool) -> None:
    """Pieces land and are read back exactly, whether or not the page cache is bypassed.

    The files' sizes are not multiples of 4 KiB, so every file's last block is
    written partly around the page cache and partly through it.
    """
    import mmap

    files = {"w.bin": os.urandom(3 * 8192 + 1234), "x.bin": os.urandom(5000)}
    sizes = [(p, len(d)) for p, d in files.items()]
    piece = 8192
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece)]
    m = Manifest.build(name="d", origin="file:///x", piece_size=piece, files=sizes, digests=digests)
    buf = mmap.mmap(-1, piece)  # page-aligned, like the engine's pool buffers
    with PieceStore(tmp_path, m, direct_io=direct_io) as store:
        if direct_io and not store.direct_io:
            pytest.skip(f"{tmp_path} is on a file system without O_DIRECT")
        assert store.direct_io == direct_io
        for i in range(m.num_pieces):
            p = m.piece(i)
            data = files[p.path][p.offset : p.offset + p.length]
            if i % 2:
                buf[: len(data)] = data
                store.write_piece(i, memoryview(buf)[: len(data)])
            else:  # as blocks, the way peers deliver them
                for off in range(0, len(data), 4096):
                    store.write_block(i, off, memoryview(data)[off : off + 4096])
                assert store.verify_assembled(i)
        for i in range(m.num_pieces):
            p = m.piece(i)
            want = files[p.path][p.offset : p.offset + p.length]
            if store.read_direct(i, 0, p.length, buf):
                assert direct_io
                assert buf[: p.length] == want
            else:
                assert not direct_io
            # An unaligned offset is never read around the cache: the caller falls back.
            assert not store.read_direct(i, 1, 10, buf)
        store.finish()
    for path, data in files.items():
        assert (tmp_path / path).read_bytes() == data
